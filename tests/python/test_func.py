"""torch.func through both operators: grad, vmap (the library's own batching
rules, at functorch's FuncTorchBatched key), jacrev, jacfwd and hessian,
each against eager autograd in float64; and a check that the library emits
no warnings of its own on any of these paths."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import nanobragg_ops
from test_absorption import make_inputs as absorption_inputs
from test_tricubic import INDEX_MIN, assert_nearest_differs, make_inputs as tricubic_inputs

jacobian = torch.autograd.functional.jacobian


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_grad_matches_autograd(device):
    grid, hkl = tricubic_inputs(device, n=16, outside=4)
    assert_nearest_differs(grid, hkl)
    loss = lambda g, h: nanobragg_ops.tricubic_interp(g, h, INDEX_MIN, 0.0, "nearest").pow(2).sum()  # noqa: E731
    g_func = grad(loss, argnums=(0, 1))(grid, hkl)
    g_ref = torch.autograd.grad(loss(grid.requires_grad_(), hkl.requires_grad_()), (grid, hkl))
    close(g_func[0], g_ref[0])
    close(g_func[1], g_ref[1])
    # Second derivative through torch.func: grad of a gradient norm.
    gg = grad(lambda h: grad(loss, argnums=1)(grid.detach(), h).pow(2).sum())(hkl.detach())
    h = hkl.detach().requires_grad_()
    (g_h,) = torch.autograd.grad(loss(grid.detach(), h), h, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_h.pow(2).sum(), h)
    assert gg.abs().max() > 0
    close(gg, gg_ref)


def test_vmap_over_hkl_and_grid(device):
    grid, hkl = tricubic_inputs(device, n=12, outside=3)
    f = lambda g, h: nanobragg_ops.tricubic_interp(g, h, INDEX_MIN)  # noqa: E731
    hkl_batch = torch.stack([hkl, hkl + 0.25, hkl - 0.5])
    expected = torch.stack([f(grid, h) for h in hkl_batch])
    close(vmap(f, in_dims=(None, 0))(grid, hkl_batch), expected)
    close(vmap(f, in_dims=(None, 1))(grid, hkl_batch.movedim(0, 1)), expected)
    # Batched grids (one per crystal): one call per batch entry.
    grids = torch.stack([grid, 2 * grid])
    close(vmap(f, in_dims=(0, None))(grids, hkl), torch.stack([f(grid, hkl), 2 * f(grid, hkl)]))
    close(vmap(f)(grids, hkl_batch[:2]), torch.stack([f(grid, hkl_batch[0]), 2 * f(grid, hkl_batch[1])]))


def test_vmap_of_backward_folded_or_looped_agree(device):
    # jacrev's path: the backward op under vmap with a batch of grad_outputs.
    # Folded (only grad_hkl asked for) and looped (grad_grid too) give the
    # same values and the same per-entry shape-[0] placeholder.
    grid, hkl = tricubic_inputs(device, n=6, outside=2)
    assert_nearest_differs(grid, hkl)
    backward = torch.ops.nanobragg.tricubic_interp_backward
    basis = torch.eye(6, dtype=grid.dtype, device=device)
    f = lambda g, grid_, mask: backward(g, grid_, hkl, list(INDEX_MIN), "nearest", mask)  # noqa: E731
    folded = vmap(lambda g: f(g, grid, [False, True]))(basis)
    # A batched grid forces the loop.
    grids = grid.expand(6, *grid.shape)
    looped = vmap(lambda g, grid_: f(g, grid_, [False, True]))(basis, grids)
    close(folded[1], looped[1])
    assert folded[0].shape == looped[0].shape == (6, 0)


@pytest.mark.parametrize("per_layer", [False, True])
def test_vmap_over_intensity_and_pixels(device, per_layer):
    intensity, pixels, odet, thickness, attenuation = absorption_inputs(
        device, odet="tilted", per_layer=per_layer, pixel_layers=1 if per_layer else None
    )
    f = lambda i, p: nanobragg_ops.detector_absorption(i, p, odet, thickness, attenuation, 3, True, per_layer)  # noqa: E731
    batch = torch.stack([intensity, 2 * intensity, intensity.flip(-1)])
    close(vmap(f, in_dims=(0, None))(batch, pixels), torch.stack([f(i, pixels) for i in batch]))
    pixel_batch = torch.stack([pixels, 1.1 * pixels])
    close(vmap(f, in_dims=(None, 0))(intensity, pixel_batch), torch.stack([f(intensity, p) for p in pixel_batch]))
    # An intensity row broadcast over the other pixel dimension, batched.
    if not per_layer:
        rows = batch[:, 0]
        close(vmap(f, in_dims=(0, None))(rows, pixels), torch.stack([f(r, pixels) for r in rows]))
    # Batched scalars: one call per batch entry.
    g = lambda t: nanobragg_ops.detector_absorption(intensity, pixels, odet, t, attenuation, 3, False, per_layer)  # noqa: E731
    ts = torch.stack([thickness, 2 * thickness])
    close(vmap(g)(ts), torch.stack([g(t) for t in ts]))


# PyTorch's own: forward-mode AD loads decompositions scripted with torch.jit.
TORCH_FWAD_JIT_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


def test_every_op_has_a_vmap_rule():
    for op in ("tricubic_interp", "detector_absorption"):
        for level in ("", "_backward", "_double_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nanobragg::{op}{level}", "FuncTorchBatched")


@pytest.mark.filterwarnings(TORCH_FWAD_JIT_WARNING)
def test_jacrev_jacfwd_hessian_tricubic(device):
    grid, hkl = tricubic_inputs(device, n=6, outside=2)
    assert_nearest_differs(grid, hkl)
    f = lambda g, h: nanobragg_ops.tricubic_interp(g, h, INDEX_MIN, 0.0, "nearest")  # noqa: E731
    ref_hkl = jacobian(lambda h: f(grid, h), hkl)
    ref_grid = jacobian(lambda g: f(g, hkl), grid)
    close(jacrev(f, argnums=1)(grid, hkl), ref_hkl)
    close(jacrev(f, argnums=0)(grid, hkl), ref_grid)
    close(jacfwd(f, argnums=1)(grid, hkl), ref_hkl)
    close(jacfwd(f, argnums=0)(grid, hkl), ref_grid)
    loss = lambda h: f(grid, h).pow(2).sum()  # noqa: E731
    close(hessian(loss)(hkl), torch.autograd.functional.hessian(loss, hkl))


@pytest.mark.filterwarnings(TORCH_FWAD_JIT_WARNING)
def test_jacrev_jacfwd_hessian_absorption(device):
    intensity, pixels, odet, thickness, attenuation = absorption_inputs(device, odet="tilted")
    intensity, pixels = intensity[:2, :3], pixels[:2, :3]
    f = lambda i, p, o, t, a: nanobragg_ops.detector_absorption(i, p, o, t, a, 3, True)  # noqa: E731
    args = (intensity, pixels, odet, thickness, attenuation)
    for argnum in range(5):
        ref = jacobian(lambda x: f(*args[:argnum], x, *args[argnum + 1:]), args[argnum])
        close(jacrev(f, argnums=argnum)(*args), ref)
        close(jacfwd(f, argnums=argnum)(*args), ref)
    loss = lambda p: f(intensity, p, odet, thickness, attenuation).pow(2).sum()  # noqa: E731
    close(hessian(loss)(pixels), torch.autograd.functional.hessian(loss, pixels))


NO_WARNINGS_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.path.insert(0, {tests!r})
    with warnings.catch_warnings():  # what torch's own import warns (no NumPy, say) is not ours
        warnings.simplefilter("ignore")
        import torch
    warnings.simplefilter("error")
    # PyTorch's own (torch.func.jvp scripts decompositions with torch.jit).
    warnings.filterwarnings("ignore", message=r".*torch\\.jit\\.script. is deprecated")
    import nanobragg_ops
    from torch.func import grad, hessian, jacfwd, jacrev, vmap
    from test_tricubic import INDEX_MIN, make_inputs as tricubic_inputs
    from test_absorption import make_inputs as absorption_inputs

    grid, hkl = tricubic_inputs("cpu", n=6, outside=2)
    f = lambda h: nanobragg_ops.tricubic_interp(grid, h, INDEX_MIN, 0.0, "nearest")
    i, p, o, t, a = absorption_inputs("cpu", odet="tilted")
    g = lambda p: nanobragg_ops.detector_absorption(i, p, o, t, a, 3, True)
    for fn, x in ((f, hkl), (g, p)):
        xr = x.clone().requires_grad_()
        (d1,) = torch.autograd.grad(fn(xr).pow(2).sum(), xr, create_graph=True)
        d1.sum().backward()
        torch.autograd.functional.hvp(lambda z: fn(z).pow(2).sum(), x, torch.ones_like(x))
        vmap(fn)(torch.stack([x, x]))
        jacrev(fn)(x)
        jacfwd(fn)(x)
        hessian(lambda z: fn(z).pow(2).sum())(x)
        grad(lambda z: fn(z).sum())(x)
    print("done")
    """
)


def test_library_emits_no_warnings(tmp_path):
    """Every path above, in a fresh process with warnings as errors; and
    nothing on stderr, where C++ warnings raised outside Python land. (Before
    the library had vmap rules, functorch's fallback warned on every call
    here: the test sees such warnings.)"""
    script = NO_WARNINGS_SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    assert out.stderr == "", out.stderr
