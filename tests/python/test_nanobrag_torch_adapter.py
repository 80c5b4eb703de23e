"""examples/nanobrag_torch_adapter.py without the port (CI cannot import it:
it is not on a package index): the whole-batch fallback rule, the argument
mapping, and the fractional call site, on stand-ins with the port's
attributes. The adapter against the port itself: docs/nanobrag_torch.md."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

import nanobragg_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import nanobrag_torch_adapter as adapter  # noqa: E402

DT = torch.float64


# A grid with a different range on each axis, so that an adapter that mixed
# up the axes' bounds would be seen.
INDEX_MIN = (-6, -4, -5)
INDEX_MAX = (6, 7, 3)


def fake_crystal(default_F=3.5):
    """What the adapter reads of a port Crystal."""
    shape = tuple(hi - lo + 1 for lo, hi in zip(INDEX_MIN, INDEX_MAX))
    grid = torch.rand(shape, dtype=DT, generator=torch.Generator().manual_seed(0))
    (h_min, k_min, l_min), (h_max, k_max, l_max) = INDEX_MIN, INDEX_MAX
    return types.SimpleNamespace(
        hkl_data=grid,
        hkl_metadata=dict(h_min=h_min, h_max=h_max, k_min=k_min, k_max=k_max, l_min=l_min, l_max=l_max),
        config=types.SimpleNamespace(default_F=default_F),
        dtype=DT, device=torch.device("cpu"), interpolate=True,
    )


def test_stencil_rule_is_the_ports():
    # the port: floor(x) - 1 < min or floor(x) + 2 > max on any axis
    x = torch.tensor([-5.0, -5.01, 3.99, 4.0, 5.0, float("nan")], dtype=DT)
    hkl = torch.stack([torch.zeros_like(x), x, torch.zeros_like(x)], -1)
    got = adapter.stencil_leaves_grid(hkl, (-6, -6, -6), (6, 6, 6))
    assert got.tolist() == [False, True, False, False, True, True]
    # each axis against its own bounds
    points = [[0.0, -3.0, 0.0], [0.0, 0.0, 1.5], [0.0, 0.0, 2.0], [-5.0, 0.0, 0.0], [0.0, -3.5, 0.0]]
    got = adapter.stencil_leaves_grid(torch.tensor(points, dtype=DT), INDEX_MIN, INDEX_MAX)
    assert got.tolist() == [False, False, True, False, True]


def test_in_range_batch_is_the_operator():
    c = fake_crystal()
    # inside every axis' stencil range: floor(x) - 1 >= min, floor(x) + 2 <= max
    h, k, l = (torch.rand(7, 5, dtype=DT) * (hi - lo - 4) + lo + 1 for lo, hi in zip(INDEX_MIN, INDEX_MAX))  # noqa: E741
    assert not adapter.stencil_leaves_grid(torch.stack([h, k, l], -1), INDEX_MIN, INDEX_MAX).any()
    got = adapter.tricubic_interpolation(c, h, k, l)
    want = nanobragg_ops.tricubic_interp(c.hkl_data, torch.stack([h, k, l], -1), INDEX_MIN, 3.5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got != 3.5).all() and c.interpolate is True


def test_one_point_out_of_range_falls_back_for_the_whole_batch(capsys):
    c = fake_crystal()
    h = torch.tensor([0.5, 1.5, 4.2], dtype=DT)  # 4.2: stencil 3..6 fits; 5 would not
    zeros = torch.zeros_like(h)
    assert (adapter.tricubic_interpolation(c, h, zeros, zeros) != 3.5).all()
    h[2] = 5.0
    got = adapter.tricubic_interpolation(c, h, zeros, zeros)
    assert got.tolist() == [3.5, 3.5, 3.5]
    assert c.interpolate is False and "out of range" in capsys.readouterr().out
    adapter.tricubic_interpolation(c, h, zeros, zeros)
    assert capsys.readouterr().out == ""  # warned once


@pytest.mark.parametrize("out_of_range", ["default", "nearest"])
def test_per_point_rule_without_the_ports_fallback(out_of_range):
    c = fake_crystal()
    h = torch.tensor([0.5, 5.0], dtype=DT)
    zeros = torch.zeros_like(h)
    got = adapter.tricubic_interpolation(c, h, zeros, zeros, keep_port_fallback=False, out_of_range=out_of_range)
    assert c.interpolate is True
    inside = nanobragg_ops.tricubic_interp(c.hkl_data, torch.tensor([[0.5, 0.0, 0.0]], dtype=DT), INDEX_MIN)
    assert got[0] == inside[0]
    # (5, 0, 0): node (5 - h_min, 0 - k_min, 0 - l_min)
    assert got[1] == (3.5 if out_of_range == "default" else c.hkl_data[11, 4, 5])


def test_no_grid_gives_default_F():
    c = fake_crystal()
    c.hkl_data = None
    got = adapter.tricubic_interpolation(c, torch.zeros(3, dtype=DT), torch.zeros(3), torch.zeros(3))
    assert got.tolist() == [3.5] * 3 and got.dtype == DT


def test_grid_gradient_flows():
    c = fake_crystal()
    c.hkl_data.requires_grad_(True)
    h = torch.rand(10, dtype=DT)
    adapter.tricubic_interpolation(c, h, h, h).sum().backward()
    assert c.hkl_data.grad.abs().sum() > 0


def test_absorption_argument_mapping():
    cfg = types.SimpleNamespace(detector_thick_um=torch.tensor([450.0], dtype=torch.float32),
                                detector_abs_um=234.0, detector_thicksteps=5)
    odet = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float32)
    intensity = torch.rand(4, 4, dtype=DT)
    pixels = torch.rand(4, 4, 3, dtype=torch.float32) + torch.tensor([0.0, 0.0, 0.1])
    args = adapter.absorption_arguments(cfg, odet, intensity, pixels, True)
    i, p, o, t, a, steps, over = args
    assert i is intensity and p.dtype == DT and o is odet
    assert t.shape == () and t.dtype == torch.float32 and t.item() == pytest.approx(450e-6)
    assert a == pytest.approx(234e-6) and steps == 5 and over is True
    sim = types.SimpleNamespace(detector=types.SimpleNamespace(config=cfg, odet_vec=odet))
    got = adapter.apply_detector_absorption(sim, intensity, pixels, True)
    torch.testing.assert_close(got, nanobragg_ops.detector_absorption(*args))


def test_port_formula_of_absorption_matches():
    """The port's _apply_detector_absorption (its formula, copied) against the
    adapter's call, oversample_thick both ways."""
    cfg = types.SimpleNamespace(detector_thick_um=450.0, detector_abs_um=234.0, detector_thicksteps=5)
    odet = torch.tensor([0.1, 0.0, 1.0], dtype=DT)
    odet = odet / odet.norm()
    intensity = torch.rand(6, 7, dtype=DT)
    pixels = torch.rand(6, 7, 3, dtype=DT) * 0.1 - 0.05
    pixels[..., 2] = 0.1
    sim = types.SimpleNamespace(detector=types.SimpleNamespace(config=cfg, odet_vec=odet))
    for over in (True, False):
        rho = (odet * pixels / pixels.norm(dim=-1, keepdim=True)).sum(-1)
        dz_mu = 450e-6 / 5 / 234e-6
        t = torch.arange(5, dtype=DT).reshape(-1, 1, 1)
        c = torch.exp(-t * dz_mu / rho) - torch.exp(-(t + 1) * dz_mu / rho)
        want = (intensity * c).sum(0) if over else intensity * c[-1]
        torch.testing.assert_close(adapter.apply_detector_absorption(sim, intensity, pixels, over), want,
                                   rtol=1e-13, atol=0)


def test_fractional_lookup_swaps_only_the_rounded_tensors():
    memo = adapter._RoundMemo()
    h, k, l = (torch.tensor([0.3, 1.7], dtype=DT) + i for i in range(3))  # noqa: E741
    h0, k0, l0 = memo.round(h), memo.round(k), memo.round(l)
    assert memo.zeros is torch.zeros  # everything else is torch
    seen = []
    lookup = adapter.fractional_lookup(lambda *x: seen.append(x) or x[0], memo)
    lookup(h0, k0, l0)
    assert all(a is b for a, b in zip(seen[-1], (h, k, l)))
    other = torch.round(h)
    lookup(other, k0, l0)  # not the port's rounded tensors: passed as given
    assert seen[-1][0] is other


def test_install_replaces_both_steps():
    crystal = fake_crystal()
    cfg = types.SimpleNamespace(detector_thick_um=450.0, detector_abs_um=234.0, detector_thicksteps=3)
    sim = types.SimpleNamespace(crystal=crystal,
                                detector=types.SimpleNamespace(config=cfg, odet_vec=torch.tensor([0.0, 0, 1.0])))
    adapter.install(sim)
    h = torch.rand(5, dtype=DT)
    torch.testing.assert_close(crystal._tricubic_interpolation(h, h, h), adapter.tricubic_interpolation(crystal, h, h, h))
    intensity = torch.rand(2, 2)
    pixels = torch.rand(2, 2, 3) + torch.tensor([0.0, 0.0, 0.1])
    torch.testing.assert_close(sim._apply_detector_absorption(intensity, pixels, True),
                               adapter.apply_detector_absorption(sim, intensity, pixels, True))


# The port's simulator module as the fractional call site sees it: a module
# whose functions call torch.round through the module's global `torch`, and a
# Simulator whose run() looks F up at the rounded indices.
FAKE_PORT_MODULE = """
def compute_physics_for_position(h, k, l, lookup):
    return lookup(torch.round(h), torch.round(k), torch.round(l))


class Simulator:
    def __init__(self, crystal, detector):
        self.crystal, self.detector = crystal, detector
        self._compiled_compute_physics = None

    def run(self, h, k, l):
        return compute_physics_for_position(h, k, l, self.crystal.get_structure_factor)
"""


def fake_port_module(monkeypatch):
    module = types.ModuleType("fake_nanobrag_torch_simulator")
    module.torch = torch
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(FAKE_PORT_MODULE, module.__dict__)
    return module


def test_fix_rounded_call_gives_the_lookup_the_fractional_indices(monkeypatch):
    module = fake_port_module(monkeypatch)
    crystal = fake_crystal()
    seen = []

    def lookup(h, k, l):  # noqa: E741
        seen.append((h, k, l))
        return h + 10 * k + 100 * l

    crystal.get_structure_factor = lookup
    detector = types.SimpleNamespace(config=types.SimpleNamespace(
        detector_thick_um=450.0, detector_abs_um=234.0, detector_thicksteps=3), odet_vec=torch.tensor([0.0, 0, 1.0]))
    h, k, l = (torch.tensor([0.3, 1.7], dtype=DT) + i for i in range(3))  # noqa: E741

    as_shipped = module.Simulator(crystal, detector)
    torch.testing.assert_close(as_shipped.run(h, k, l), torch.round(h) + 10 * torch.round(k) + 100 * torch.round(l))

    sim = adapter.install(module.Simulator(crystal, detector), fix_rounded_call=True)
    assert sim._compiled_compute_physics is module.compute_physics_for_position  # the eager path
    torch.testing.assert_close(sim.run(h, k, l), h + 10 * k + 100 * l)
    assert all(a is b for a, b in zip(seen[-1], (h, k, l)))
    # restored after the run
    assert module.torch is torch and crystal.get_structure_factor is lookup

    def failing(h, k, l):  # noqa: E741
        raise RuntimeError("lookup failed")

    crystal.get_structure_factor = failing
    sim = adapter.install(module.Simulator(crystal, detector), fix_rounded_call=True)
    with pytest.raises(RuntimeError, match="lookup failed"):
        sim.run(h, k, l)
    assert module.torch is torch and crystal.get_structure_factor is failing  # restored on error too
