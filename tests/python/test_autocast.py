"""Under torch.autocast both operators run in float32 and return the dtype of
their data argument; outside it, half-precision inputs are a clear error."""

from __future__ import annotations

import pytest
import torch

import nanobragg_ops
from conftest import deterministic

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


def float32_run(fn, *inputs):
    """fn on the inputs converted to float32 (leaves that need a gradient),
    and the gradients of out.sum() rounded back to each input's dtype: what
    autocast's float32 run gives, bitwise (the casts' backward rounds the
    float32 gradients once)."""
    leaves = [x.detach().float().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    return out, [g.to(x.dtype) for g, x in zip(grads, inputs)]


@deterministic(True)  # the grid gradient compared bitwise: on CUDA the sorted path
def test_tricubic_runs_in_float32_under_autocast(device):
    half = HALF[device]
    grid, hkl = tricubic_inputs(device)
    g = grid.to(half).requires_grad_(True)
    h = hkl.to(half).requires_grad_(True)
    with torch.autocast(device, dtype=half):
        out = nanobragg_ops.tricubic_interp(g, h, (0, 0, 0))
    assert out.dtype == half
    # float32 arithmetic on the half-precision inputs, rounded once at the end.
    expected, grads = float32_run(lambda a, b: nanobragg_ops.tricubic_interp(a, b, (0, 0, 0)), g, h)
    torch.testing.assert_close(out, expected.to(half), rtol=0, atol=0)
    out.float().sum().backward()
    for x, want in zip((g, h), grads):
        assert x.grad.dtype == half and x.grad.abs().sum() > 0
        torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


def test_absorption_runs_in_float32_under_autocast(device):
    half = HALF[device]
    intensity, pixels, odet = absorption_inputs(device)
    inputs = [x.to(half).requires_grad_(True) for x in (intensity, pixels, odet)]
    with torch.autocast(device, dtype=half):
        out = nanobragg_ops.detector_absorption(*inputs, 3e-4, 2e-4, 3, True)
    assert out.dtype == half
    expected, grads = float32_run(lambda i, p, o: nanobragg_ops.detector_absorption(i, p, o, 3e-4, 2e-4, 3, True),
                                  *inputs)
    torch.testing.assert_close(out, expected.to(half), rtol=0, atol=0)
    out.float().sum().backward()
    for x, want in zip(inputs, grads):
        assert x.grad.dtype == half and x.grad.abs().sum() > 0
        torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


def test_float32_and_float64_are_untouched_by_autocast(device):
    grid, hkl = tricubic_inputs(device)
    intensity, pixels, odet = absorption_inputs(device)
    for dtype in (torch.float32, torch.float64):
        plain = nanobragg_ops.tricubic_interp(grid.to(dtype), hkl.to(dtype), (0, 0, 0))
        plain_abs = nanobragg_ops.detector_absorption(
            intensity.to(dtype), pixels.to(dtype), odet.to(dtype), 3e-4, 2e-4, 3, True)
        with torch.autocast(device, dtype=HALF[device]):
            auto = nanobragg_ops.tricubic_interp(grid.to(dtype), hkl.to(dtype), (0, 0, 0))
            auto_abs = nanobragg_ops.detector_absorption(
                intensity.to(dtype), pixels.to(dtype), odet.to(dtype), 3e-4, 2e-4, 3, True)
        assert auto.dtype == dtype and auto_abs.dtype == dtype
        torch.testing.assert_close(auto, plain, rtol=0, atol=0)
        torch.testing.assert_close(auto_abs, plain_abs, rtol=0, atol=0)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_outside_autocast_is_a_clear_error(device, half):
    grid, hkl = tricubic_inputs(device)
    with pytest.raises(RuntimeError, match=r"argument 'grid' must be a float32 or float64.*torch.autocast"):
        nanobragg_ops.tricubic_interp(grid.to(half), hkl.to(half), (0, 0, 0))
    intensity, pixels, odet = absorption_inputs(device)
    with pytest.raises(RuntimeError, match=r"argument 'intensity' must be a float32 or float64.*torch.autocast"):
        nanobragg_ops.detector_absorption(intensity.to(half), pixels.to(half), odet.to(half), 3e-4, 2e-4, 3, True)


def test_a_mismatched_pair_under_autocast_names_the_dtypes_given(device):
    # float16 with float64 does not run (the half one becomes float32, the
    # float64 one stays): the message names what the caller passed, not the
    # cast dtype.
    grid, hkl = tricubic_inputs(device)
    intensity, pixels, odet = absorption_inputs(device)
    with torch.autocast(device):
        with pytest.raises(RuntimeError, match=r"argument 'hkl' must have the dtype of 'grid' \(Half\), got Double"):
            nanobragg_ops.tricubic_interp(grid.half(), hkl.double(), (0, 0, 0))
        with pytest.raises(RuntimeError, match=r"argument 'pixel_coords' must have the dtype of 'intensity' \(BFloat16\), got Double"):
            nanobragg_ops.detector_absorption(intensity.bfloat16(), pixels.double(), odet, 3e-4, 2e-4, 3, True)
        # float16 with float32 runs in float32
        assert nanobragg_ops.tricubic_interp(grid.half(), hkl.float(), (0, 0, 0)).dtype == torch.float16
