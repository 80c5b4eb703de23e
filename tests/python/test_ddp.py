"""DistributedDataParallel over a module that uses both operators: two gloo
processes, each with half of the pixels, give the gradients of one process
with all of them."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nanobragg_ops


class Detector(torch.nn.Module):
    """Structure factors (a learnable scale on a fixed grid) seen through a
    sensor of learnable thickness."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.scale = torch.nn.Parameter(torch.tensor(1.7, dtype=torch.float64))
        self.thickness = torch.nn.Parameter(torch.tensor(120e-6, dtype=torch.float64))
        self.register_buffer("grid", torch.rand(10, 10, 10, generator=gen, dtype=torch.float64) + 1)

    def forward(self, hkl, pixels):
        F = nanobragg_ops.tricubic_interp(self.scale * self.grid, hkl, (-5, -5, -5))
        odet = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        return nanobragg_ops.detector_absorption(F * F, pixels, odet, self.thickness, 234e-6, 3, True)


def batch():
    gen = torch.Generator().manual_seed(5)
    hkl = torch.rand(8, 6, 3, generator=gen, dtype=torch.float64) * 5 - 2.5
    pixels = torch.rand(8, 6, 3, generator=gen, dtype=torch.float64) * 0.1 - 0.05
    pixels[..., 2] = 0.1
    target = torch.rand(8, 6, generator=gen, dtype=torch.float64)
    return hkl, pixels, target


def loss_of(model, hkl, pixels, target):
    return ((model(hkl, pixels) - target) ** 2).mean()


def worker(rank, world, rendezvous, results):
    # A file rendezvous: no port to pick, so none another process can take
    # between picking it and binding it.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(Detector())
        hkl, pixels, target = batch()
        rows = slice(rank * 4, rank * 4 + 4)  # this rank's half of the detector
        loss_of(model, hkl[rows], pixels[rows], target[rows]).backward()
        results[rank] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    single = Detector()
    loss_of(single, *batch()).backward()
    expected = {n: p.grad for n, p in single.named_parameters()}
    assert all(g.abs() > 0 for g in expected.values())

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
        got = dict(results)
    for rank in (0, 1):
        for name, grad in expected.items():
            torch.testing.assert_close(got[rank][name], grad, rtol=1e-12, atol=0)
