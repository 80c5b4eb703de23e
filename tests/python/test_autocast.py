"""Under torch.autocast both operators run in float32 and return the dtype of
their data argument; outside it, half-precision inputs are a clear error."""

from __future__ import annotations

import pytest
import torch

import nanobragg_ops

HALF = {"cpu": torch.bfloat16, "cuda": torch.float16}


def tricubic_inputs(device):
    gen = torch.Generator().manual_seed(4)
    grid = torch.rand(9, 9, 9, generator=gen) * 10 + 1
    hkl = torch.rand(30, 3, generator=gen) * 4 + 2
    return grid.to(device), hkl.to(device)


def absorption_inputs(device):
    gen = torch.Generator().manual_seed(5)
    intensity = torch.rand(4, 5, generator=gen) * 100
    pixels = torch.rand(4, 5, 3, generator=gen) * 0.1 - 0.05
    pixels[..., 2] = 0.1
    return intensity.to(device), pixels.to(device), torch.tensor([0.1, 0.0, 1.0], device=device)


def test_tricubic_runs_in_float32_under_autocast(device):
    half = HALF[device]
    grid, hkl = tricubic_inputs(device)
    g = grid.to(half).requires_grad_(True)
    with torch.autocast(device, dtype=half):
        out = nanobragg_ops.tricubic_interp(g, hkl.to(half), (0, 0, 0))
    assert out.dtype == half
    # float32 arithmetic on the half-precision inputs, rounded once at the end.
    expected = nanobragg_ops.tricubic_interp(g.detach().float(), hkl.to(half).float(), (0, 0, 0)).to(half)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().sum().backward()
    assert g.grad.dtype == half and g.grad.abs().sum() > 0


def test_absorption_runs_in_float32_under_autocast(device):
    half = HALF[device]
    intensity, pixels, odet = absorption_inputs(device)
    I = intensity.to(half).requires_grad_(True)
    with torch.autocast(device, dtype=half):
        out = nanobragg_ops.detector_absorption(I, pixels.to(half), odet.to(half), 3e-4, 2e-4, 3, True)
    assert out.dtype == half
    expected = nanobragg_ops.detector_absorption(
        I.detach().float(), pixels.to(half).float(), odet.to(half).float(), 3e-4, 2e-4, 3, True
    ).to(half)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().sum().backward()
    assert I.grad.dtype == half and I.grad.abs().sum() > 0


def test_float32_and_float64_are_untouched_by_autocast(device):
    grid, hkl = tricubic_inputs(device)
    for dtype in (torch.float32, torch.float64):
        plain = nanobragg_ops.tricubic_interp(grid.to(dtype), hkl.to(dtype), (0, 0, 0))
        with torch.autocast(device, dtype=HALF[device]):
            auto = nanobragg_ops.tricubic_interp(grid.to(dtype), hkl.to(dtype), (0, 0, 0))
        assert auto.dtype == dtype
        torch.testing.assert_close(auto, plain, rtol=0, atol=0)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_outside_autocast_is_a_clear_error(device, half):
    grid, hkl = tricubic_inputs(device)
    with pytest.raises(RuntimeError, match=r"argument 'grid' must be a float32 or float64.*torch.autocast"):
        nanobragg_ops.tricubic_interp(grid.to(half), hkl.to(half), (0, 0, 0))
    intensity, pixels, odet = absorption_inputs(device)
    with pytest.raises(RuntimeError, match=r"argument 'intensity' must be a float32 or float64.*torch.autocast"):
        nanobragg_ops.detector_absorption(intensity.to(half), pixels.to(half), odet.to(half), 3e-4, 2e-4, 3, True)
