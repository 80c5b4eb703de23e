"""Deployment beyond TorchScript: torch.export keeps each operator as one
node, with a dynamic point dimension (the Meta kernels use symbolic sizes),
and round-trips through torch.export.save/load; AOTInductor packages run from
Python and from C++; a full training step compiles with fullgraph=True; and
compiled autograd traces the backward through the library's Nodes."""

from __future__ import annotations

import torch

import nanobragg_ops  # noqa: F401
from conftest import require_built


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


def test_aotinductor_package_from_python_and_from_cpp(tmp_path):
    # The exported program compiled by AOTInductor (CPU; ~30 s), loaded back in
    # Python and by examples/aoti/run_aoti.cpp, built against the installed
    # package: both give eager's numbers for sizes other than the traced one.
    import subprocess
    from pathlib import Path

    model = Detector()
    n = torch.export.Dim("n", min=2)
    program = torch.export.export(model, inputs(50), dynamic_shapes=({0: n}, {0: n}))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "detector.pt2"))

    runner = torch._inductor.aoti_load_package(package)
    for size in (7, 123):
        torch.testing.assert_close(runner(*inputs(size)), model(*inputs(size)), rtol=1e-5, atol=0)

    binary = Path(__file__).resolve().parents[2] / "build" / "examples" / "run_aoti"
    require_built(binary, "scripts/build_examples.sh")
    hkl, pixels = inputs(33)
    hkl.numpy().tofile(tmp_path / "hkl.bin")
    pixels.numpy().tofile(tmp_path / "pixels.bin")
    out = subprocess.run(
        [str(binary), package, str(tmp_path / "hkl.bin"), "33,3", str(tmp_path / "pixels.bin"), "33,3"],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    got = torch.tensor([float(v) for v in out.stdout.split()[1:]])
    torch.testing.assert_close(got, model(hkl, pixels).detach(), rtol=1e-5, atol=0)


def test_compiled_refinement_step_without_graph_breaks():
    # Loss through both operators, backward and the parameter update in one
    # torch.compile(fullgraph=True) graph (Dynamo traces .backward() with
    # trace_autograd_ops; torch.optim's step has graph breaks of its own in
    # torch 2.11, so the update is written out), against eager, step by step.
    # The thickness gradient is large (1e-4 m), so a stale or accumulated
    # gradient would show at once.
    # float64, so that inductor's reordered reductions stay below the tolerance.
    hkl, pixels = (t.double() for t in inputs(40))
    target = torch.rand(40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def step(model):
        loss = ((model(hkl, pixels) - target) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 1e-3 * p.grad
        return loss.detach()

    eager, compiled = Detector().double(), Detector().double()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled_step = torch.compile(step, fullgraph=True)
        for _ in range(3):
            for p in (*eager.parameters(), *compiled.parameters()):
                p.grad = None  # outside the graph: Dynamo does not replay it
            torch.testing.assert_close(compiled_step(compiled), step(eager), rtol=1e-12, atol=0)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15, msg=name)
    assert (eager.grid - Detector().double().grid).abs().max() > 0  # the steps did move it


def test_compiled_autograd_captures_the_backward_nodes():
    # torch._dynamo.config.compiled_autograd traces the backward graph through
    # the library's autograd Nodes (their compiled_args / apply_with_saved).
    from torch._dynamo.utils import counters

    hkl, pixels = (t.double() for t in inputs(30))
    eager, compiled = Detector().double(), Detector().double()
    (eager(hkl, pixels) ** 2).sum().backward()
    torch._dynamo.reset()
    counters.clear()

    def loss_and_backward(model):
        loss = (model(hkl, pixels) ** 2).sum()
        loss.backward()
        return loss

    with torch._dynamo.config.patch(compiled_autograd=True, trace_autograd_ops=True):
        torch.compile(loss_and_backward, backend="aot_eager")(compiled)
    assert counters["compiled_autograd"]["captures"] >= 1
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=0, msg=name)
