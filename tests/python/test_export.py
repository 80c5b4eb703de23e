"""torch.export keeps each operator as one node, with a dynamic point
dimension (the Meta kernels use symbolic sizes), and round-trips through
torch.export.save/load. (The rest of deployment, AOTInductor and autocast, is
an open issue.)"""

from __future__ import annotations

import torch

import nanobragg_ops  # noqa: F401


class Detector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.grid = torch.nn.Parameter(torch.rand(10, 10, 10, generator=gen))
        self.thickness = torch.nn.Parameter(torch.tensor(1e-4))
        self.register_buffer("odet", torch.tensor([0.0, 0.0, 1.0]))
        self.register_buffer("attenuation_length", torch.tensor(2e-4))

    def forward(self, hkl, pixels):
        F = torch.ops.nanobragg.tricubic_interp(self.grid, hkl, [-5, -5, -5], 0.0, "default")
        return torch.ops.nanobragg.detector_absorption(
            F * F, pixels, self.odet, self.thickness, self.attenuation_length, 3, True, False
        )


def inputs(n):
    gen = torch.Generator().manual_seed(n)
    hkl = torch.rand(n, 3, generator=gen) * 4 - 2
    pixels = torch.rand(n, 3, generator=gen) * 0.1 - 0.05
    pixels[:, 2] = 0.1
    return hkl, pixels


def test_export_with_dynamic_points_keeps_single_nodes_and_round_trips(tmp_path):
    model = Detector()
    n = torch.export.Dim("n", min=2)
    program = torch.export.export(model, inputs(50), dynamic_shapes=({0: n}, {0: n}))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.nanobragg.tricubic_interp.default) == 1
    assert targets.count(torch.ops.nanobragg.detector_absorption.default) == 1
    # Never decomposed: no gather/index ops stand in for the interpolation.
    assert not any("index" in str(t) or "gather" in str(t) for t in targets), targets

    path = tmp_path / "detector.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    for size in (7, 123):  # other sizes than the one traced
        torch.testing.assert_close(loaded(*inputs(size)), model(*inputs(size)), rtol=0, atol=0)
