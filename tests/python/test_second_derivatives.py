"""Second derivatives of both operators (docs/CONTRACT.md §3, "twice
differentiable"): gradgradcheck in float64 on every differentiable input,
mixed terms included; Hessian-vector products of a small refinement loss
against finite differences; opcheck of the double-backward ops; and the
clear error of a third derivative."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradgradcheck

import nanobragg_ops
from test_absorption import make_inputs as absorption_inputs
from test_tricubic import INDEX_MIN, assert_nearest_differs, make_inputs as tricubic_inputs

TRICUBIC_DD = torch.ops.nanobragg.tricubic_interp_double_backward.default
ABSORPTION_DD = torch.ops.nanobragg.detector_absorption_double_backward.default


@pytest.mark.parametrize("mode", ["default", "nearest"])
def test_gradgradcheck_tricubic(device, mode):
    grid, hkl = tricubic_inputs(device, n=24, outside=6)
    if mode == "nearest":
        assert_nearest_differs(grid, hkl, 0.5)
    grid.requires_grad_(True)
    hkl.requires_grad_(True)
    f = lambda g, h: nanobragg_ops.tricubic_interp(g, h, INDEX_MIN, 0.5, mode)  # noqa: E731
    assert gradgradcheck(f, (grid, hkl), check_fwd_over_rev=True)


def test_gradgradcheck_tricubic_broadcast_points(device):
    # One set of points looked up for 3 "mosaic domains": hkl expanded, not copied.
    grid, hkl = tricubic_inputs(device, n=8, outside=2)
    grid.requires_grad_(True)
    hkl.requires_grad_(True)
    f = lambda g, h: nanobragg_ops.tricubic_interp(g, h.expand(3, *h.shape), INDEX_MIN)  # noqa: E731
    assert gradgradcheck(f, (grid, hkl), check_fwd_over_rev=True)


@pytest.mark.parametrize("oversample_thick", [True, False])
@pytest.mark.parametrize(
    "layout,odet",
    [
        ("shared", "tilted"),
        ("broadcast_intensity", "tilted"),
        ("per_layer", "tilted"),
        ("per_layer_shared_pixels", "tilted"),
        ("per_layer_shared_intensity", "tilted"),
        # The sensor facing away: negative parallax, negative fractions.
        ("shared", "flipped"),
        ("per_layer", "flipped"),
    ],
)
def test_gradgradcheck_absorption(absorption_device, oversample_thick, layout, odet):
    per_layer = layout.startswith("per_layer")
    inputs = list(
        absorption_inputs(
            absorption_device, odet=odet, thicksteps=3, per_layer=per_layer,
            pixel_layers=1 if layout == "per_layer_shared_pixels" else None,
            intensity_layers=1 if layout == "per_layer_shared_intensity" else None,
        )
    )
    if layout == "broadcast_intensity":
        inputs[0] = inputs[0][0].clone()  # [F], broadcast over S
    inputs = [x.requires_grad_(True) for x in inputs]
    f = lambda *a: nanobragg_ops.detector_absorption(*a, 3, oversample_thick, per_layer)  # noqa: E731
    # thickness is 3e-4: the default step (1e-6) is too coarse a fraction of it.
    # With that step the differences' rounding is |f| 1.1e-16 / 1e-8, about 1.7e-5 on
    # the thickness gradient (|f| ~ 1.5e3): above gradcheck's default atol (1e-5), so
    # 2 of 40 random cotangents failed (per_layer, oversampled); atol 1e-4 sits above
    # that floor (0 of 40). (The cotangents gradgradcheck draws come from the global
    # generator, which conftest.py seeds before every test.)
    assert gradgradcheck(f, tuple(inputs), eps=1e-8, atol=1e-4, check_fwd_over_rev=True)


def test_tricubic_second_derivatives_on_nodes_are_the_ones_from_above(device):
    # On an integer coordinate the stencil of floor(x) is the one
    # differentiated (docs/CONTRACT.md §1), for second derivatives as for
    # first: the Hessian-vector product in hkl is the forward difference of
    # the hkl gradient along v from above (error ~ step times the third
    # derivative), and the mixed grid term the exact change of c.grad_hkl.v
    # under a change E of the grid (linear in the grid). Points on nodes in
    # every axis, in one, and off nodes; each interpolates.
    grid, _ = tricubic_inputs(device, n=1, outside=0)
    hkl = torch.tensor(
        [[0.0, 3.0, 5.0], [1.4, 4.0, 6.7], [-1.0, 5.3, 4.0], [0.6, 3.2, 7.5], [1.0, 6.0, 8.0]],
        dtype=torch.float64, device=device,
    )
    gen = torch.Generator().manual_seed(3)
    c = (torch.rand(len(hkl), generator=gen, dtype=torch.float64) + 0.5).to(device)
    # Positive: a step along v leaves every node upwards.
    v = (torch.rand(hkl.shape, generator=gen, dtype=torch.float64) + 0.5).to(device)
    E = (torch.rand(grid.shape, generator=gen, dtype=torch.float64) - 0.5).to(device)

    def hkl_grad(g, h, create_graph=False):
        out = nanobragg_ops.tricubic_interp(g, h, INDEX_MIN, -100.0)
        assert (out != -100.0).all(), "every point interpolates"
        return torch.autograd.grad(out, h, c, create_graph=create_graph)[0]

    g = grid.clone().requires_grad_(True)
    h = hkl.clone().requires_grad_(True)
    gh = hkl_grad(g, h, create_graph=True)
    hv, grid_term = torch.autograd.grad(gh, (h, g), v)

    step = 1e-7
    fd = (hkl_grad(grid, (hkl + step * v).requires_grad_(True))
          - hkl_grad(grid, hkl.clone().requires_grad_(True))) / step
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-5 * fd.abs().max().item())
    # Only the stencil of floor(x) gives this: the one from below (the same
    # difference a step below the nodes) differs.
    below = (hkl_grad(grid, (hkl - step * v).requires_grad_(True))
             - hkl_grad(grid, (hkl - 2 * step * v).requires_grad_(True))) / step
    assert not torch.allclose(hv, below, rtol=1e-3, atol=1e-3 * fd.abs().max().item())

    change = (hkl_grad(grid + E, hkl.clone().requires_grad_(True))
              - hkl_grad(grid, hkl.clone().requires_grad_(True))) * v
    assert torch.allclose((grid_term * E).sum(), change.sum(), rtol=1e-12, atol=0)


def refinement_loss(params, grid, hkl, pixels, target, mode="default"):
    """A miniature refinement: the structure-factor grid scaled, the Miller
    indices shifted, F^2 absorbed by a sensor whose thickness, attenuation
    length and normal are refined too, and the pixels moved along z (so
    every differentiable input of both operators carries a parameter)."""
    scale, shift, thickness, tilt = params[0], params[1:4], params[4], params[5:7]
    attenuation, dz = params[7], params[8]
    F = nanobragg_ops.tricubic_interp(grid * scale, hkl + shift, INDEX_MIN, 0.0, mode)
    odet = torch.cat([tilt, torch.ones_like(tilt[:1])])
    odet = odet / odet.norm()
    moved = pixels + torch.cat([torch.zeros_like(params[:2]), dz.reshape(1)])
    image = nanobragg_ops.detector_absorption(F**2, moved, odet, thickness, attenuation, 3, True)
    return ((image - target) ** 2).sum()


@pytest.mark.parametrize("mode", ["default", "nearest"])
def test_hvp_of_refinement_loss_matches_finite_differences(device, mode):
    # "nearest": 4 of the 20 points leave the grid, 2 of them within reach
    # of a node (make_inputs), so their F is the nearest node's value.
    grid, hkl = tricubic_inputs(device, n=20, outside=0 if mode == "default" else 4)
    if mode == "nearest":
        assert_nearest_differs(grid, hkl)
    hkl = hkl.view(4, 5, 3)
    _, pixels, *_ = absorption_inputs(device)
    params = torch.tensor([1.1, 0.01, -0.02, 0.03, 3e-4, 0.05, -0.1, 2e-4, 0.0], dtype=torch.float64, device=device)
    target = torch.rand(4, 5, dtype=torch.float64, device=device) * 100
    loss = lambda p: refinement_loss(p, grid, hkl, pixels, target, mode)  # noqa: E731
    # Directions scaled to each parameter's size (thickness and attenuation ~1e-4).
    v = torch.tensor([0.3, -0.5, 0.2, 0.7, 1e-4, 0.4, 0.6, 5e-5, 0.01], dtype=torch.float64, device=device)
    _, hv = torch.autograd.functional.hvp(loss, params, v)

    def gradient(p):
        p = p.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(p), p)
        return g

    eps = 1e-6  # small enough that no point's stencil or nearest node moves
    fd = (gradient(params + eps * v) - gradient(params - eps * v)) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())
    assert hv.abs().max() > 1.0  # a real curvature, not zeros


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]])
def test_opcheck_tricubic_double_backward(device, mask):
    grid, hkl = tricubic_inputs(device)
    assert_nearest_differs(grid, hkl)
    grad = torch.randn(hkl.shape[:-1], dtype=grid.dtype, device=device)
    gg_grid, gg_hkl = torch.randn_like(grid), torch.randn_like(hkl)
    torch.library.opcheck(TRICUBIC_DD, (gg_grid, gg_hkl, grad, grid, hkl, list(INDEX_MIN), "nearest", mask))
    torch.library.opcheck(TRICUBIC_DD, (None, gg_hkl, grad, grid, hkl, list(INDEX_MIN), "default", mask))


@pytest.mark.parametrize("per_layer", [False, True])
def test_opcheck_absorption_double_backward(absorption_device, per_layer):
    inputs = absorption_inputs(absorption_device, odet="tilted", thicksteps=3, per_layer=per_layer, pixel_layers=1)
    grad = torch.randn(inputs[0].shape[-2:], dtype=torch.float64, device=absorption_device)
    cotangents = [torch.randn_like(x) for x in inputs]
    torch.library.opcheck(ABSORPTION_DD, (*cotangents, grad, *inputs, 3, True, per_layer, [True] * 6))
    cotangents[0] = cotangents[3] = None
    torch.library.opcheck(ABSORPTION_DD, (*cotangents, grad, *inputs, 3, False, per_layer, [True] * 6))


def assert_masked_outputs(op, args, n_outputs, masks):
    """Each mask's requested outputs equal the all-true call's (to rounding:
    a kernel may take a shorter route when less is asked), and each output
    not asked for is a shape-[0] tensor on the inputs' device."""
    full = op(*args, [True] * n_outputs)
    for mask in masks:
        got = op(*args, mask)
        for i, (wanted, g, f) in enumerate(zip(mask, got, full)):
            if wanted:
                assert g.shape == f.shape and g.dtype == f.dtype and g.device == f.device, i
                torch.testing.assert_close(g, f, rtol=1e-12, atol=1e-12 * f.abs().max().item())
            else:
                assert g.shape == (0,) and g.device == f.device, (mask, i, g.shape)


def single_and_mixed_masks(n):
    masks = [[j == i for j in range(n)] for i in range(n)]
    return masks + [[i % 2 == 0 for i in range(n)], [i % 2 == 1 for i in range(n)], [False] * n]


def test_tricubic_double_backward_output_mask(device):
    grid, hkl = tricubic_inputs(device, n=24, outside=6)
    grad = torch.randn(hkl.shape[:-1], dtype=grid.dtype, device=device)
    gg_grid, gg_hkl = torch.randn_like(grid), torch.randn_like(hkl)
    for mode in ("default", "nearest"):
        args = (gg_grid, gg_hkl, grad, grid, hkl, list(INDEX_MIN), mode)
        assert_masked_outputs(TRICUBIC_DD, args, 3, single_and_mixed_masks(3))


@pytest.mark.parametrize("per_layer", [False, True])
def test_absorption_double_backward_output_mask(absorption_device, per_layer):
    inputs = absorption_inputs(absorption_device, odet="tilted", thicksteps=3, per_layer=per_layer)
    grad = torch.randn(inputs[0].shape[-2:], dtype=torch.float64, device=absorption_device)
    cotangents = [torch.randn_like(x) for x in inputs]
    for oversample_thick in (True, False):
        args = (*cotangents, grad, *inputs, 3, oversample_thick, per_layer)
        assert_masked_outputs(ABSORPTION_DD, args, 6, single_and_mixed_masks(6))


def third_derivative(f, x):
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x, create_graph=True)  # second: exact
    assert h.requires_grad
    with pytest.raises(NotImplementedError, match="third derivatives are not implemented"):
        torch.autograd.grad(h.sum(), x)


def test_third_derivative_is_a_clear_error(device):
    grid, hkl = tricubic_inputs(device)
    third_derivative(lambda h: nanobragg_ops.tricubic_interp(grid, h, INDEX_MIN), hkl.requires_grad_(True))
    intensity, pixels, odet, thickness, attenuation = absorption_inputs(device)
    third_derivative(
        lambda p: nanobragg_ops.detector_absorption(intensity, p, odet, thickness, attenuation, 3, True),
        pixels.requires_grad_(True),
    )


def reverse_over_forward(f, xs, ts, w):
    """d/dx <w, J(x) t>: the forward's tangent J t (forward mode), then its
    reverse-mode gradient in every input."""
    import torch.autograd.forward_ad as fwAD

    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(x, t) for x, t in zip(leaves, ts)])
        tangent = fwAD.unpack_dual(out).tangent
    return torch.autograd.grad((tangent * w).sum(), leaves)


def directional_jvp(f, xs, ts, w):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(x, t) for x, t in zip(xs, ts)])
        return (fwAD.unpack_dual(out).tangent * w).sum()


def check_reverse_over_forward(f, xs, seed):
    """The gradient of <w, J t> against central differences of the tangent
    along a direction v scaled to each input (its second derivatives)."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)  # noqa: E731
    ts = [draw(x) * x.abs().mean() for x in xs]
    vs = [draw(x) * x.abs().mean() for x in xs]
    out = f(*xs)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    grads = reverse_over_forward(f, xs, ts, w)
    eps = 1e-6
    plus = directional_jvp(f, [x + eps * v for x, v in zip(xs, vs)], ts, w)
    minus = directional_jvp(f, [x - eps * v for x, v in zip(xs, vs)], ts, w)
    fd = (plus - minus) / (2 * eps)
    along_v = sum((g * v).sum() for g, v in zip(grads, vs))
    torch.testing.assert_close(along_v, fd, rtol=1e-6, atol=1e-9 * fd.abs().item())
    assert fd.abs() > 1e-3  # a real curvature, not zeros
    return grads


def test_reverse_mode_over_forward_mode_is_exact(device):
    """Second derivatives through forward mode then reverse mode (what
    torch.func.jacrev(jacfwd(f)) does): the forward's tangent is the double
    backward's first output, whose input gradients are second derivatives."""
    grid, hkl = tricubic_inputs(device, n=24)
    check_reverse_over_forward(lambda g, h: nanobragg_ops.tricubic_interp(g, h, INDEX_MIN), [grid, hkl], 61)
    inputs = absorption_inputs(device, odet="tilted", thicksteps=3)
    check_reverse_over_forward(lambda *a: nanobragg_ops.detector_absorption(*a, 3, True), list(inputs), 62)
    per_layer = absorption_inputs(device, odet="tilted", thicksteps=3, per_layer=True)
    check_reverse_over_forward(lambda *a: nanobragg_ops.detector_absorption(*a, 3, False, True), list(per_layer), 63)
    # torch.func's reverse over forward and forward over reverse: one Hessian.
    loss = lambda h: nanobragg_ops.tricubic_interp(grid, h, INDEX_MIN).pow(2).sum()  # noqa: E731
    h = hkl[:6]
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacfwd(loss))(h), torch.func.hessian(loss)(h),
                               rtol=1e-12, atol=1e-12)


def test_forward_mode_over_forward_mode_is_a_clear_error(device):
    grid, hkl = tricubic_inputs(device, n=6)
    loss = lambda h: nanobragg_ops.tricubic_interp(grid, h, INDEX_MIN).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match=r"forward mode over forward mode \(jacfwd\(jacfwd"):
        torch.func.jacfwd(torch.func.jacfwd(loss))(hkl)


def test_forward_mode_third_derivative_is_a_clear_error(device):
    # A tangent into the double backward asks for a third derivative too.
    import torch.autograd.forward_ad as fwAD

    grid, hkl = tricubic_inputs(device)
    grad = torch.ones(hkl.shape[:-1], dtype=hkl.dtype, device=device)
    intensity, pixels, odet, thickness, attenuation = absorption_inputs(device)
    with fwAD.dual_level():
        dual_hkl = fwAD.make_dual(hkl, torch.ones_like(hkl))
        with pytest.raises(NotImplementedError, match="forward-mode AD of the double backward"):
            TRICUBIC_DD(torch.ones_like(grid), torch.ones_like(hkl), grad, grid, dual_hkl, INDEX_MIN, "default",
                        [True, True, True])
        dual_pixels = fwAD.make_dual(pixels, torch.ones_like(pixels))
        with pytest.raises(NotImplementedError, match="forward-mode AD of the double backward"):
            ABSORPTION_DD(torch.ones_like(intensity), None, None, None, None, torch.ones_like(intensity),
                          intensity, dual_pixels, odet, thickness, attenuation, 3, True, False, [True] * 6)
