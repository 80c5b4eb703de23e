"""The CPU backward kernels' fast paths (issue 17): the absorption backward
takes any layout of the incoming gradient (contiguous, expanded as .sum()
gives it, strided, transposed) and computes only what output_mask asks for;
the tricubic backward gives both gradients in one pass. Each must agree with
the plain path, and stay bitwise independent of the thread count."""

from __future__ import annotations

import pytest
import torch

import nanobragg_ops  # noqa: F401

ABS_BACKWARD = torch.ops.nanobragg.detector_absorption_backward.default
TRI_BACKWARD = torch.ops.nanobragg.tricubic_interp_backward.default

SIZE = 67  # not a multiple of any vector width: partial last steps run too


def absorption_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    c = torch.linspace(-0.05, 0.05, SIZE, dtype=torch.float64)
    y, x = torch.meshgrid(c, c, indexing="ij")
    coords = torch.stack([x, y, torch.full_like(x, 0.1)], -1).to(dtype)
    intensity = (torch.rand(SIZE, SIZE, generator=g, dtype=torch.float64) * 100).to(dtype)
    odet = torch.tensor([0.02, -0.01, 1.0], dtype=torch.float64)
    odet = (odet / odet.norm()).to(dtype)
    return intensity, coords, odet, torch.tensor(450e-6, dtype=dtype), torch.tensor(234e-6, dtype=dtype)


def grad_layouts(values):
    """values [SIZE, SIZE] in three layouts, all equal elementwise (the
    fourth, expanded from one value, is checked on its own)."""
    wide = torch.zeros(SIZE, 2 * SIZE, dtype=values.dtype)
    wide[:, ::2] = values
    return {
        "contiguous": values.contiguous(),
        "strided": wide[:, ::2],
        "transposed": values.t().contiguous().t(),
    }


MASKS = [
    [True, False, False, False, False],
    [False, True, False, False, False],
    [False, False, True, True, True],
    [True, True, True, True, True],
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_absorption_backward_any_grad_layout(dtype, mask):
    inputs = absorption_inputs(dtype)
    g = torch.Generator().manual_seed(5)
    values = torch.rand(SIZE, SIZE, generator=g, dtype=torch.float64).to(dtype)
    ref = ABS_BACKWARD(values.contiguous(), *inputs, 5, True, False, [True] * 5)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for name, grad in grad_layouts(values).items():
        got = ABS_BACKWARD(grad, *inputs, 5, True, False, mask)
        for i, wanted in enumerate(mask):
            if wanted:
                scale = ref[i].abs().max()
                torch.testing.assert_close(got[i] / scale, ref[i] / scale, **tol, msg=f"{name}, output {i}")
            else:
                assert got[i].shape == (0,), f"{name}: output {i} not asked for"
    # expanded (stride 0), as out.sum().backward() hands it
    ones = torch.ones((), dtype=dtype).expand(SIZE, SIZE)
    ref1 = ABS_BACKWARD(torch.ones(SIZE, SIZE, dtype=dtype), *inputs, 5, True, False, [True] * 5)
    got1 = ABS_BACKWARD(ones, *inputs, 5, True, False, mask)
    for i, wanted in enumerate(mask):
        if wanted:
            scale = ref1[i].abs().max()
            torch.testing.assert_close(got1[i] / scale, ref1[i] / scale, **tol, msg=f"expanded, output {i}")
        else:
            assert got1[i].shape == (0,), f"expanded: output {i} not asked for"


def test_absorption_sum_backward_matches_autograd_of_contiguous():
    inputs = [t.clone().requires_grad_(True) for t in absorption_inputs(torch.float64)]
    nanobragg_ops.detector_absorption(*inputs, thicksteps=5, oversample_thick=True).sum().backward()
    ref = ABS_BACKWARD(torch.ones(SIZE, SIZE, dtype=torch.float64), *[t.detach() for t in inputs],
                       5, True, False, [True] * 5)
    for t, r in zip(inputs, ref):
        torch.testing.assert_close(t.grad, r.reshape(t.shape), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mask", [[True, False, False, False, False], [True] * 5])
def test_absorption_backward_thread_count_independent(mask):
    inputs = absorption_inputs(torch.float32)
    grad = torch.ones((), dtype=torch.float32).expand(SIZE * 4, SIZE * 4)
    big = [torch.nn.functional.interpolate(inputs[0][None, None], scale_factor=4)[0, 0],
           torch.nn.functional.interpolate(inputs[1].permute(2, 0, 1)[None], scale_factor=4)[0].permute(1, 2, 0).contiguous(),
           *inputs[2:]]
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ABS_BACKWARD(grad, *big, 5, True, False, mask)
        torch.set_num_threads(2)
        two = ABS_BACKWARD(grad, *big, 5, True, False, mask)
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tricubic_one_pass_backward_matches_single_gradients(dtype):
    g = torch.Generator().manual_seed(9)
    grid = torch.rand(20, 21, 22, generator=g, dtype=dtype)
    # inside, near the edges (nearest) and outside (default)
    hkl = (torch.rand(40000, 3, generator=g, dtype=torch.float64) * 26 - 13).to(dtype)
    grad = torch.rand(40000, generator=g, dtype=dtype)
    for mode in ("default", "nearest"):
        both = TRI_BACKWARD(grad, grid, hkl, [-10, -10, -11], mode, [True, True])
        grid_only = TRI_BACKWARD(grad, grid, hkl, [-10, -10, -11], mode, [True, False])
        hkl_only = TRI_BACKWARD(grad, grid, hkl, [-10, -10, -11], mode, [False, True])
        # What output_mask does not ask for comes back as an empty [0].
        assert grid_only[1].shape == (0,) and hkl_only[0].shape == (0,)
        # The grid scatter is the same arithmetic in the same order: equal.
        assert torch.equal(both[0], grid_only[0])
        tol = dict(rtol=1e-13, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both[1], hkl_only[1], **tol)
        # and on 1 and on 2 threads, set explicitly (the default may be 1)
        saved = torch.get_num_threads()
        try:
            runs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                runs.append(TRI_BACKWARD(grad, grid, hkl, [-10, -10, -11], mode, [True, True]))
        finally:
            torch.set_num_threads(saved)
        for run in runs:
            assert torch.equal(run[0], both[0]) and torch.equal(run[1], both[1])
