"""detector_absorption from Python: gradcheck, opcheck, a pure-PyTorch
reference (the PyTorch port's formulation), TorchScript, torch.compile and
error messages. The contract is docs/CONTRACT.md §2 and §3."""

from __future__ import annotations

import math

import pytest
import torch

import nanobragg_ops

# torch 2.11 deprecates TorchScript (the design card still supports it); its
# tests expect the warning instead of hiding it.
JIT_DEPRECATION = r"`torch\.jit\.script` is deprecated"

OP_NAME = "nanobragg::detector_absorption"
OP = torch.ops.nanobragg.detector_absorption.default
BACKWARD_OP = torch.ops.nanobragg.detector_absorption_backward.default

S, F = 4, 5
DISTANCE = 0.1
THICKNESS = 3e-4
ATTENUATION = 2e-4  # thickness / attenuation = 1.5: far from both trivial limits


def unit(v) -> torch.Tensor:
    v = torch.tensor(v, dtype=torch.float64)
    return v / v.norm()


ODETS = {
    "normal": unit([0.0, 0.0, 1.0]),
    "tilted": unit([0.25, -0.15, 1.0]),
    # sensor facing away from the sample: negative parallax, negative fractions
    "flipped": -unit([0.05, 0.02, 1.0]),
}


def make_pixels(shape=(S, F), seed=0) -> torch.Tensor:
    """A detector plane at z = DISTANCE, pixels spread over +-0.05 in x and y,
    jittered so that no two pixels share a parallax."""
    gen = torch.Generator().manual_seed(seed)
    s, f = shape[-2], shape[-1]
    y, x = torch.meshgrid(
        torch.linspace(-0.05, 0.05, s, dtype=torch.float64),
        torch.linspace(-0.05, 0.05, f, dtype=torch.float64),
        indexing="ij",
    )
    p = torch.stack([x, y, torch.full_like(x, DISTANCE)], dim=-1)
    p = p.expand(*shape, 3).clone()
    p += 2e-3 * (torch.rand(p.shape, generator=gen, dtype=torch.float64) - 0.5)
    return p


def make_inputs(
    device="cpu",
    dtype=torch.float64,
    *,
    odet="normal",
    thicksteps=3,
    per_layer=False,
    intensity_layers=None,
    pixel_layers=None,
    seed=0,
):
    """(intensity, pixel_coords, odet, thickness, attenuation_length).

    With per_layer, `intensity_layers`/`pixel_layers` give the size of dim 0
    (thicksteps or 1); pixels in different layers sit at their layer's depth
    along odet, as nanoBragg C moves them."""
    gen = torch.Generator().manual_seed(seed + 1)
    o = ODETS[odet].clone()  # callers set requires_grad in place
    if per_layer:
        li = thicksteps if intensity_layers is None else intensity_layers
        lp = thicksteps if pixel_layers is None else pixel_layers
        intensity = torch.rand(li, S, F, generator=gen, dtype=torch.float64) + 0.5
        depth = (torch.arange(lp, dtype=torch.float64) + 0.5) * (THICKNESS / thicksteps)
        pixels = make_pixels((lp, S, F), seed) + depth[:, None, None, None] * o
    else:
        intensity = torch.rand(S, F, generator=gen, dtype=torch.float64) + 0.5
        pixels = make_pixels((S, F), seed)
    return (
        intensity.to(device, dtype),
        pixels.to(device, dtype),
        o.to(device, dtype),
        torch.tensor(THICKNESS, dtype=dtype, device=device),
        torch.tensor(ATTENUATION, dtype=dtype, device=device),
    )


def reference(
    intensity, pixel_coords, odet, thickness, attenuation_length, thicksteps, oversample_thick, per_layer=False
):
    """The PyTorch port's Simulator._apply_detector_absorption, extended to
    per-layer inputs as docs/CONTRACT.md §2 describes; evaluated in float64."""
    intensity, pixel_coords, odet, thickness, attenuation_length = (
        x.double() for x in (intensity, pixel_coords, odet, thickness, attenuation_length)
    )
    if not per_layer:
        intensity, pixel_coords = intensity[None], pixel_coords[None]
    norm = pixel_coords.norm(dim=-1, keepdim=True).clamp_min(1e-10)
    rho = (odet * pixel_coords / norm).sum(-1)
    sign = torch.where(rho >= 0, 1.0, -1.0).to(rho)
    rho = torch.where(rho.abs() < 1e-10, sign * 1e-10, rho)
    if thickness.item() == 0:
        # no thickness modelling: capture fraction 1
        return intensity.expand(torch.broadcast_shapes(intensity.shape, rho.shape)).mean(0)
    dz = thickness / thicksteps
    mu = 1.0 / attenuation_length
    t = torch.arange(thicksteps, dtype=torch.float64, device=rho.device).reshape(-1, *([1] * (rho.dim() - 1)))
    capture = torch.exp(-t * dz * mu / rho) - torch.exp(-(t + 1) * dz * mu / rho)
    if oversample_thick:
        return (capture * intensity).sum(0)
    layers = torch.broadcast_shapes(capture.shape, intensity.shape)
    return capture[-1] * intensity.expand(layers).mean(0)


def test_op_is_registered():
    for key in ("CPU", "Meta", "Autograd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME + "_backward", key)


def gradcheck_all(inputs, thicksteps, oversample_thick, per_layer):
    inputs = tuple(x.clone().requires_grad_(True) for x in inputs)

    def f(i, p, o, t, a):
        return OP(i, p, o, t, a, thicksteps, oversample_thick, per_layer)

    # thickness and attenuation are ~1e-4, so even eps = 1e-7 leaves a
    # central-difference truncation error of ~1e-6 relative in their
    # derivatives; a smaller eps drowns the odet derivative in rounding.
    assert torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-6, rtol=1e-5, check_forward_ad=True)
    return inputs


@pytest.mark.parametrize("oversample_thick", [True, False])
@pytest.mark.parametrize("odet", ["normal", "tilted", "flipped"])
def test_gradcheck(absorption_device, oversample_thick, odet):
    inputs = make_inputs(absorption_device, odet=odet, thicksteps=3)
    gradcheck_all(inputs, 3, oversample_thick, per_layer=False)


@pytest.mark.parametrize("oversample_thick", [True, False])
@pytest.mark.parametrize("layers", [(3, 1), (3, 3), (1, 3)], ids=lambda l: f"I{l[0]}-P{l[1]}")
def test_gradcheck_per_layer(absorption_device, oversample_thick, layers):
    inputs = make_inputs(
        absorption_device, odet="tilted", thicksteps=3, per_layer=True,
        intensity_layers=layers[0], pixel_layers=layers[1],
    )
    gradcheck_all(inputs, 3, oversample_thick, per_layer=True)


@pytest.mark.parametrize("oversample_thick", [True, False])
def test_gradcheck_broadcast_intensity(absorption_device, oversample_thick):
    intensity, pixels, odet, thickness, attenuation = make_inputs(absorption_device, odet="tilted")
    row = intensity[0].clone()  # [F], broadcast over S
    inputs = gradcheck_all((row, pixels, odet, thickness, attenuation), 4, oversample_thick, per_layer=False)
    out = OP(*inputs, 4, oversample_thick, False)
    assert out.shape == (S, F)
    (grad,) = torch.autograd.grad(out.sum(), inputs[0])
    assert grad.shape == (F,)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("oversample_thick", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(absorption_device, dtype, requires_grad, oversample_thick, per_layer):
    inputs = make_inputs(absorption_device, dtype, odet="tilted", thicksteps=3, per_layer=per_layer, pixel_layers=1)
    inputs = tuple(x.requires_grad_(requires_grad) for x in inputs)
    torch.library.opcheck(OP, (*inputs, 3, oversample_thick, per_layer))


@pytest.mark.parametrize(
    "mask",
    [
        [True] * 5,
        [True, False, False, False, False],
        [False, True, True, False, False],
        [False, False, False, True, True],
        [False] * 5,
    ],
)
@pytest.mark.parametrize("per_layer", [False, True])
def test_opcheck_backward(absorption_device, mask, per_layer):
    inputs = make_inputs(absorption_device, odet="tilted", thicksteps=3, per_layer=per_layer, intensity_layers=1)
    out = OP(*inputs, 3, True, per_layer)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3)).to(out.device)
    args = (grad, *inputs, 3, True, per_layer, mask)
    torch.library.opcheck(BACKWARD_OP, args)
    grads = BACKWARD_OP(*args)
    for wanted, g, x in zip(mask, grads, inputs):
        assert g.shape == (x.shape if wanted else (0,))


REFERENCE_CASES = {
    # name: (odet, thicksteps, per_layer, intensity_layers, pixel_layers)
    "normal-L1": ("normal", 1, False, None, None),
    "normal-L3": ("normal", 3, False, None, None),
    "tilted-L5": ("tilted", 5, False, None, None),
    "flipped-L4": ("flipped", 4, False, None, None),
    "per-layer-I3-P1": ("tilted", 3, True, 3, 1),
    "per-layer-I3-P3": ("tilted", 3, True, 3, 3),
    "per-layer-I1-P5": ("flipped", 5, True, 1, 5),
}

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_matches_reference(out, args, dtype):
    expected = reference(*args)
    assert out.dtype == dtype
    assert out.shape == expected.shape
    assert torch.isfinite(expected).all()
    atol = RTOL[dtype] * expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=RTOL[dtype], atol=atol)


@pytest.mark.parametrize("oversample_thick", [True, False])
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(absorption_device, dtype, case, oversample_thick):
    odet, thicksteps, per_layer, li, lp = REFERENCE_CASES[case]
    inputs = make_inputs(
        absorption_device, dtype, odet=odet, thicksteps=thicksteps,
        per_layer=per_layer, intensity_layers=li, pixel_layers=lp,
    )
    args = (*inputs, thicksteps, oversample_thick, per_layer)
    out = OP(*args)
    assert_matches_reference(out, args, dtype)
    if odet == "flipped":
        assert (out < 0).all()
    elif odet == "normal" and not per_layer:
        assert ((out > 0) & (out < inputs[0])).all()


@pytest.mark.parametrize("oversample_thick", [True, False])
@pytest.mark.parametrize("thicksteps", [1, 3])
def test_grazing_and_zero_pixels_take_positive_parallax(absorption_device, thicksteps, oversample_thick):
    # rho == 0 exactly (pixel in the sensor plane through the sample, and a
    # pixel at the origin): clamped to +1e-10, so layer 0 captures everything.
    intensity, pixels, odet, thickness, attenuation = make_inputs(absorption_device)
    pixels[0, 0] = torch.tensor([0.05, 0.02, 0.0])
    pixels[0, 1] = 0.0
    args = (intensity, pixels, odet, thickness, attenuation, thicksteps, oversample_thick, False)
    out = OP(*args)
    assert_matches_reference(out, args, torch.float64)
    captured = intensity[0, :2] if oversample_thick or thicksteps == 1 else torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(out[0, :2], captured.to(out.device), rtol=1e-15, atol=0)


def test_strided_inputs_match_contiguous(absorption_device):
    intensity, pixels, odet, thickness, attenuation = make_inputs(absorption_device, odet="tilted")
    # transposed pixel grid, a coordinate-major pixel buffer and a strided odet
    intensity_t = intensity.t().contiguous().t()
    pixels_t = pixels.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    odet_t = torch.stack([odet, odet], dim=-1)[:, 1]
    assert not pixels_t.is_contiguous() and not odet_t.is_contiguous()
    for oversample in (True, False):
        a = OP(intensity, pixels, odet, thickness, attenuation, 4, oversample, False)
        b = OP(intensity_t, pixels_t, odet_t, thickness, attenuation, 4, oversample, False)
        torch.testing.assert_close(b, a, rtol=1e-14, atol=0)


def unmergeable_inputs(case, gen):
    """Inputs over 12 pixel dims of size 2 (one of size 0 for "empty") whose
    layouts leave more dims than the kernels' pixel offsets hold
    (kMaxPointDims, csrc/common/point_offsets.h), and an incoming gradient:
    "broadcast": intensity holds every other dim and is broadcast over the
    rest, pixel_coords the opposite, and the gradient is permuted; "gradient":
    contiguous inputs, only the gradient permuted; "per_layer": the broadcast
    ones with a layer dim of 3 on intensity; "empty": broadcast, one dim 0."""
    dims = 12
    sizes = [0 if case == "empty" and d == 5 else 2 for d in range(dims)]
    i_shape = [sizes[d] if d % 2 == 0 else 1 for d in range(dims)]
    p_shape = [1 if d % 2 == 0 else sizes[d] for d in range(dims)]
    if case == "gradient":
        i_shape = p_shape = sizes
    layers = [3] if case == "per_layer" else []
    intensity = torch.rand(*layers, *i_shape, generator=gen, dtype=torch.float64) + 0.5
    count = math.prod(p_shape)
    xy = 0.1 * (torch.rand(count, 2, generator=gen, dtype=torch.float64) - 0.5)
    pixels = torch.cat([xy, torch.full((count, 1), DISTANCE, dtype=torch.float64)], -1)
    pixels = pixels.view(*([1] if layers else []), *p_shape, 3)
    grad = torch.rand(sizes[::-1], generator=gen, dtype=torch.float64).permute(*reversed(range(dims)))
    return intensity, pixels, grad


@pytest.mark.parametrize("case", ["broadcast", "gradient", "per_layer", "empty"])
@pytest.mark.parametrize("oversample_thick", [True, False])
def test_twelve_unmergeable_pixel_dims(absorption_device, oversample_thick, case):
    # Where the layouts leave too many dims the operands are copied
    # contiguous: values, gradients and second derivatives as the float64
    # reference's.
    gen = torch.Generator().manual_seed(3)
    intensity, pixels, grad = unmergeable_inputs(case, gen)
    _, _, odet, thickness, attenuation = make_inputs(absorption_device, odet="tilted")
    leaves = [
        x.to(absorption_device).requires_grad_()
        for x in (intensity, pixels, odet, thickness, attenuation)
    ]
    grad = grad.to(absorption_device)
    args = (3 if case == "per_layer" else 4, oversample_thick, case == "per_layer")
    out = OP(*leaves, *args)
    expected = reference(*leaves, *args)
    assert out.shape == expected.shape == grad.shape
    assert (out.numel() == 0) == (case == "empty")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)

    grads = torch.autograd.grad(out, leaves, grad, create_graph=True)
    expected_grads = torch.autograd.grad(expected, leaves, grad, create_graph=True)
    for got, want in zip(grads, expected_grads):
        atol = 1e-12 * want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=atol)

    # a second derivative along random cotangents of every gradient (the
    # intensity's broadcast like intensity itself)
    cotangents = [torch.rand(x.shape, generator=gen, dtype=torch.float64).to(absorption_device) for x in grads]
    second = torch.autograd.grad(sum((a * v).sum() for a, v in zip(grads, cotangents)), leaves)
    expected_second = torch.autograd.grad(sum((a * v).sum() for a, v in zip(expected_grads, cotangents)), leaves)
    for got, want in zip(second, expected_second):
        atol = 1e-11 * want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=1e-9, atol=atol)


def test_empty_inputs_give_empty_output(absorption_device):
    intensity, pixels, odet, thickness, attenuation = make_inputs(absorption_device)
    out = OP(intensity[:0], pixels[:0], odet, thickness, attenuation, 3, True, False)
    assert out.shape == (0, F)


@pytest.mark.parametrize("oversample_thick", [True, False])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_thickness_keeps_mean_intensity(absorption_device, dtype, per_layer, oversample_thick):
    intensity, pixels, odet, _, attenuation = make_inputs(
        absorption_device, dtype, odet="tilted", thicksteps=3, per_layer=per_layer, pixel_layers=1
    )
    zero = torch.zeros((), dtype=dtype, device=absorption_device)
    args = (intensity, pixels, odet, zero, attenuation, 3, oversample_thick, per_layer)
    out = OP(*args)
    assert_matches_reference(out, args, dtype)
    expected = intensity.mean(0) if per_layer else intensity
    torch.testing.assert_close(out, expected, rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize("oversample_thick", [True, False])
@pytest.mark.parametrize("per_layer", [False, True])
def test_infinite_attenuation_length_gives_zero(absorption_device, per_layer, oversample_thick):
    intensity, pixels, odet, thickness, _ = make_inputs(absorption_device, thicksteps=3, per_layer=per_layer)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=absorption_device)
    out = OP(intensity, pixels, odet, thickness, inf, 3, oversample_thick, per_layer)
    assert out.shape == (S, F)
    assert (out == 0).all()


@pytest.mark.parametrize(
    "dtype, thickness, attenuation_length",
    [
        # float32 data: the step, 1.5e46, is an infinite float32.
        (torch.float32, 450e-6, 1e-50),
        # float64 data: the step overflows in float64 too.
        (torch.float64, 1e300, 1e-10),
        # a finite step (1.5e301), but 1 / attenuation_length squared overflows.
        (torch.float64, 450e-6, 1e-305),
    ],
    ids=["float32-step-inf", "float64-step-inf", "float64-tiny-attenuation"],
)
@pytest.mark.parametrize(
    "layout", ["shared", "per_layer", "per_layer_shared_intensity", "per_layer_shared_pixels"]
)
@pytest.mark.parametrize("thicksteps, oversample_thick", [(1, False), (3, False), (3, True), (1, True)])
def test_saturated_absorption_is_its_limit(
    absorption_device, dtype, thickness, attenuation_length, layout, thicksteps, oversample_thick
):
    """Valid lengths whose optical depth per layer is beyond any floating
    number: layer 0 captures everything, so with oversampling out = I_0, and
    without it out = mean_t I_t when there is one layer and 0 otherwise;
    every gradient but intensity's is 0, and every second derivative is 0
    (out is linear in the intensity, with constant captures). They were NaN
    (exp(-0 a) and dL/da * a at a = inf, and 0 * inf in the chain rule to
    the lengths)."""
    per_layer = layout != "shared"
    inputs = make_inputs(
        absorption_device, dtype, odet="tilted", thicksteps=thicksteps, per_layer=per_layer,
        intensity_layers=1 if layout == "per_layer_shared_intensity" else None,
        pixel_layers=1 if layout == "per_layer_shared_pixels" else None,
    )
    intensity = inputs[0]
    lengths = [torch.tensor(v, dtype=torch.float64, device=absorption_device) for v in (thickness, attenuation_length)]
    leaves = [x.clone().requires_grad_(True) for x in (*inputs[:3], *lengths)]
    out = nanobragg_ops.detector_absorption(*leaves, thicksteps, oversample_thick, per_layer)
    layers = intensity if per_layer else intensity[None]
    first_layer_capture = torch.zeros(layers.shape[0], dtype=dtype, device=absorption_device)
    if oversample_thick:
        first_layer_capture[0] = 1.0  # I_0, of layer 0 (or of every layer when shared)
    elif thicksteps == 1:
        first_layer_capture[:] = 1.0 / layers.shape[0]  # the mean of the intensity layers
    expected = (first_layer_capture[:, None, None] * layers).sum(0)
    assert torch.equal(out.detach(), expected.expand_as(out)), (out, expected)

    cotangent = torch.rand(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cotangent = cotangent.to(absorption_device, dtype)
    grads = torch.autograd.grad(out, leaves, cotangent, create_graph=True)
    if per_layer:
        want_intensity = first_layer_capture[:, None, None] * cotangent
    else:
        want_intensity = first_layer_capture[0] * cotangent
    torch.testing.assert_close(grads[0], want_intensity.expand_as(intensity).contiguous(), rtol=0, atol=0)
    for name, g in zip(("pixel_coords", "odet", "thickness", "attenuation_length"), grads[1:]):
        assert (g == 0).all(), f"d out / d {name} is {g}, not 0"
    directions = [torch.ones_like(g) for g in grads]
    second = torch.autograd.grad(
        [g for g in grads if g.requires_grad], leaves,
        [d for g, d in zip(grads, directions) if g.requires_grad], allow_unused=True,
    )
    for name, h in zip(("intensity", "pixel_coords", "odet", "thickness", "attenuation_length"), second):
        assert h is None or (h == 0).all(), f"second derivative in {name} is {h}, not 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("thicksteps, oversample_thick", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("per_layer", [False, True])
def test_saturated_absorption_facing_away_is_minus_infinity(absorption_device, dtype, thicksteps, oversample_thick, per_layer):
    """The sensor facing away (negative parallax, negative fractions) with a
    step beyond the floating range: every fraction's limit is -inf, and so
    is the output, not NaN (exp(-0 a) at a = -inf)."""
    inputs = list(make_inputs(absorption_device, dtype, odet="flipped", thicksteps=thicksteps, per_layer=per_layer))
    out = nanobragg_ops.detector_absorption(*inputs[:3], 1e300, 1e-10, thicksteps, oversample_thick, per_layer)
    assert (out == -math.inf).all(), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["shared", "per_layer"])
def test_a_nan_coordinate_gives_nan_for_its_pixel_only(absorption_device, dtype, layout):
    """NaN stays NaN through the parallax and the capped optical depth, in its
    pixel's value and gradients (and the scalars' sums), and nowhere else."""
    per_layer = layout == "per_layer"
    inputs = [x.clone() for x in make_inputs(absorption_device, dtype, odet="tilted", thicksteps=3, per_layer=per_layer)]
    inputs[1][..., 1, 2, 0] = math.nan  # pixel (1, 2), every layer
    for oversample_thick in (True, False):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out = nanobragg_ops.detector_absorption(*leaves, 3, oversample_thick, per_layer)
        bad = torch.zeros(S, F, dtype=torch.bool, device=absorption_device)
        bad[1, 2] = True
        assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all(), out
        g_intensity, g_coords, g_odet, g_thickness, g_att = torch.autograd.grad(out.sum(), leaves)
        assert torch.isnan(g_intensity[..., 1, 2]).all() and torch.isfinite(g_intensity[..., ~bad]).all()
        assert torch.isfinite(g_coords[..., ~bad, :]).all()
        if per_layer and not oversample_thick:  # only the last layer's position counts
            assert torch.isnan(g_coords[-1, 1, 2]).all() and (g_coords[:-1, 1, 2] == 0).all()
        else:
            assert torch.isnan(g_coords[..., 1, 2, :]).all()
        assert torch.isnan(g_odet).all() and torch.isnan(g_thickness) and torch.isnan(g_att)


def test_wrapper_matches_torch_ops(absorption_device):
    assert hasattr(nanobragg_ops, "detector_absorption"), "nanobragg_ops.detector_absorption is missing"
    intensity, pixels, odet, thickness, attenuation = make_inputs(absorption_device, odet="tilted", per_layer=True)
    expected = torch.ops.nanobragg.detector_absorption(intensity, pixels, odet, thickness, attenuation, 3, False, True)
    with_tensors = nanobragg_ops.detector_absorption(intensity, pixels, odet, thickness, attenuation, 3, False, True)
    with_floats = nanobragg_ops.detector_absorption(intensity, pixels, odet, THICKNESS, ATTENUATION, 3, False, True)
    torch.testing.assert_close(with_tensors, expected, rtol=0, atol=0)
    torch.testing.assert_close(with_floats, expected, rtol=0, atol=0)
    # per_layer defaults to False, as in the schema
    torch.testing.assert_close(
        nanobragg_ops.detector_absorption(intensity[0], pixels[0], odet, THICKNESS, ATTENUATION, 3, True),
        torch.ops.nanobragg.detector_absorption(intensity[0], pixels[0], odet, thickness, attenuation, 3, True),
        rtol=0, atol=0,
    )


def test_torchscript_values_and_gradients(absorption_device):
    def f(i: torch.Tensor, p: torch.Tensor, o: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.ops.nanobragg.detector_absorption(i, p, o, t, a, 3, True, True)

    with pytest.warns(DeprecationWarning, match=JIT_DEPRECATION):  # PyTorch 2.11's, not ours
        scripted = torch.jit.script(f)
    inputs = make_inputs(absorption_device, odet="tilted", per_layer=True)
    eager_in = [x.clone().requires_grad_() for x in inputs]
    script_in = [x.clone().requires_grad_() for x in inputs]
    out_eager = f(*eager_in)
    out_script = scripted(*script_in)
    torch.testing.assert_close(out_script, out_eager, rtol=0, atol=0)
    weights = torch.linspace(-1, 1, out_eager.numel(), dtype=out_eager.dtype, device=absorption_device)
    (out_eager * weights.view_as(out_eager)).sum().backward()
    (out_script * weights.view_as(out_script)).sum().backward()
    for a, b in zip(eager_in, script_in):
        assert a.grad.abs().sum() > 0
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


def test_torch_compile_fullgraph_matches_eager(absorption_device):
    torch._dynamo.reset()

    def loss(intensity, pixels, odet, thickness, attenuation):
        out = torch.ops.nanobragg.detector_absorption(intensity, pixels, odet, thickness, attenuation, 4, False)
        return (out**2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    intensity, pixels, odet, thickness, attenuation = make_inputs(absorption_device, torch.float32, odet="tilted")
    eager_in = [intensity.clone().requires_grad_(), pixels.clone().requires_grad_(), thickness.clone().requires_grad_()]
    comp_in = [intensity.clone().requires_grad_(), pixels.clone().requires_grad_(), thickness.clone().requires_grad_()]
    eager = loss(eager_in[0], eager_in[1], odet, eager_in[2], attenuation)
    comp = compiled(comp_in[0], comp_in[1], odet, comp_in[2], attenuation)
    torch.testing.assert_close(comp, eager)
    eager.backward()
    comp.backward()
    for a, b in zip(eager_in, comp_in):
        assert a.grad.abs().sum() > 0
        torch.testing.assert_close(b.grad, a.grad)


def bad_scalar(name, factor, message):
    """An error case: the valid `thickness` or `attenuation_length` times
    `factor`, as a 0-dim CPU tensor, checked on the host with data on either
    device. (Held on a GPU a bad value gives an all-NaN result instead, not
    an error: test_cuda.py.)"""
    if name == "thickness":
        return (lambda i, p, o, t, a: dict(thickness=(t * factor).cpu()), message)
    return (lambda i, p, o, t, a: dict(attenuation_length=(a * factor).cpu()), message)


ERROR_CASES = {
    # name: (changes to a valid call, what the message must say after the operator name)
    "thicksteps-0": (lambda i, p, o, t, a: dict(thicksteps=0), r"argument 'thicksteps' must be at least 1, got 0"),
    "thickness-negative": bad_scalar("thickness", -1, r"argument 'thickness' must be finite and >= 0, got -0.0003"),
    "thickness-nan": bad_scalar("thickness", math.nan, r"argument 'thickness' must be finite and >= 0, got nan"),
    "thickness-inf": bad_scalar("thickness", math.inf, r"argument 'thickness' must be finite and >= 0, got inf"),
    "attenuation-zero": bad_scalar("attenuation_length", 0, r"argument 'attenuation_length' must be > 0 .*got 0"),
    "attenuation-negative": bad_scalar(
        "attenuation_length", -1, r"argument 'attenuation_length' must be > 0 .*got -0.0002"
    ),
    "attenuation-nan": bad_scalar("attenuation_length", math.nan, r"argument 'attenuation_length' must be > 0 .*got nan"),
    "intensity-layers": (
        lambda i, p, o, t, a: dict(intensity=i.expand(2, S, F), pixel_coords=p[None], per_layer=True),
        r"argument 'intensity' has a layer dimension \(dim 0\) of size 2.*thicksteps = 3 or 1",
    ),
    "pixel-layers": (
        lambda i, p, o, t, a: dict(intensity=i[None], pixel_coords=p.expand(2, S, F, 3), per_layer=True),
        r"argument 'pixel_coords' has a layer dimension \(dim 0\) of size 2.*thicksteps = 3 or 1",
    ),
    "no-broadcast": (
        lambda i, p, o, t, a: dict(intensity=i[:, :3]),
        r"the pixel shapes of 'intensity' \[4, 3\] and 'pixel_coords' \[4, 5\] do not broadcast",
    ),
    "odet-shape": (lambda i, p, o, t, a: dict(odet=o[:2]), r"argument 'odet' must have shape \[3\], got \[2\]"),
    "thickness-1d": (
        lambda i, p, o, t, a: dict(thickness=t.reshape(1)),
        r"argument 'thickness' must be a 0-dim tensor, got shape \[1\]",
    ),
    "attenuation-1d": (
        lambda i, p, o, t, a: dict(attenuation_length=a.reshape(1)),
        r"argument 'attenuation_length' must be a 0-dim tensor",
    ),
    "intensity-integer": (
        lambda i, p, o, t, a: dict(intensity=i.long()),
        r"argument 'intensity' must be a float32 or float64 tensor",
    ),
    "intensity-complex": (
        lambda i, p, o, t, a: dict(intensity=i.to(torch.complex128)),
        r"argument 'intensity' must be a float32 or float64 tensor",
    ),
    "pixel-dtype": (
        lambda i, p, o, t, a: dict(pixel_coords=p.float()),
        r"argument 'pixel_coords' must have the dtype of 'intensity'",
    ),
    # odet, thickness and attenuation_length may have any floating dtype
    # (test_absorption_scalar_rules.py); integers stay an error.
    "thickness-integer": (
        lambda i, p, o, t, a: dict(thickness=torch.ones((), dtype=torch.int64, device=t.device)),
        r"argument 'thickness' must be a floating-point tensor \(float16, bfloat16, float32 or "
        r"float64\), got Long",
    ),
    "odet-bool": (
        lambda i, p, o, t, a: dict(odet=o > 0),
        r"argument 'odet' must be a floating-point tensor",
    ),
    "pixel-last-dim": (
        lambda i, p, o, t, a: dict(pixel_coords=p[..., :2]),
        r"argument 'pixel_coords' must have shape \[\.\.\., 3\]",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_the_operator_and_argument(absorption_device, case):
    changes, message = ERROR_CASES[case]
    inputs = make_inputs(absorption_device)
    args = dict(
        intensity=inputs[0], pixel_coords=inputs[1], odet=inputs[2], thickness=inputs[3],
        attenuation_length=inputs[4], thicksteps=3, oversample_thick=True, per_layer=False,
    )
    args.update(changes(*inputs))
    with pytest.raises(RuntimeError, match=r"nanobragg::detector_absorption: " + message):
        OP(*args.values())


@pytest.mark.parametrize(
    "bad",
    [
        dict(thickness=1 + 2j),
        dict(attenuation_length="2e-4"),
        dict(thicksteps=2.7),
        dict(thicksteps="3"),
        dict(oversample_thick="False"),
        # What PyTorch's argument parser would convert silently: a one-element
        # float tensor or array for an int (2.9 layers truncated to 2), None or
        # a float for a bool.
        dict(thicksteps=torch.tensor(2.9)),
        dict(thicksteps=torch.tensor([2.9])),
        dict(thicksteps="numpy 2.9"),
        dict(thicksteps=__import__("decimal").Decimal("2.9")),
        dict(oversample_thick=None),
        dict(oversample_thick=0.3),
        dict(oversample_thick=float("nan")),
        dict(oversample_thick=torch.tensor([True])),
        dict(per_layer=None),
    ],
    ids=lambda b: "-".join(f"{k}={v!r}" for k, v in b.items()),
)
def test_wrapper_rejects_wrong_kinds_with_the_schema_message(bad):
    # What the wrapper does not convert reaches the schema, or gets the
    # schema's message from the wrapper, which names the operator and the
    # argument: no bare TypeError for a complex thickness, no 2.7 layers
    # turned into 2.
    if bad.get("thicksteps") == "numpy 2.9":
        bad = dict(thicksteps=pytest.importorskip("numpy").array(2.9))
    intensity, pixels, odet, _, _ = make_inputs()
    args = dict(thickness=THICKNESS, attenuation_length=ATTENUATION, thicksteps=3, oversample_thick=True)
    args.update(bad)
    (name,) = bad
    with pytest.raises(RuntimeError, match=rf"nanobragg::detector_absorption\(\) .* argument '{name}'"):
        nanobragg_ops.detector_absorption(intensity, pixels, odet, **args)


def test_wrapper_takes_integer_flags():
    # Flags, as PyTorch's own ops take them: Python's and NumPy's bools and
    # integers, 0-dim integer arrays and 0-dim bool or integer tensors.
    np = pytest.importorskip("numpy")
    intensity, pixels, odet, thickness, attenuation = make_inputs()
    for flag, value in [(True, True), (np.array(1), True), (np.array(0), False), (torch.tensor(True), True),
                        (torch.tensor(0), False), (np.int8(1), True)]:
        expected = OP(intensity, pixels, odet, thickness, attenuation, 3, value, False)
        got = nanobragg_ops.detector_absorption(intensity, pixels, odet, thickness, attenuation, 3, flag)
        assert torch.equal(got, expected), flag


def test_wrapper_takes_numpy_numbers():
    # NumPy's scalars, 0-dim arrays and bools, as Python's numbers
    np = pytest.importorskip("numpy")
    intensity, pixels, odet, thickness, attenuation = make_inputs()
    expected = OP(intensity, pixels, odet, thickness, attenuation, 3, True, False)
    for t, a, steps, flag in [
        (np.float64(THICKNESS), np.float32(ATTENUATION).astype(np.float64), np.int32(3), np.bool_(True)),
        (np.array(THICKNESS), np.array(ATTENUATION), np.array(3), 1),
    ]:
        got = nanobragg_ops.detector_absorption(intensity, pixels, odet, t, a, steps, flag)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    exact = nanobragg_ops.detector_absorption(intensity, pixels, odet, np.array(THICKNESS), np.array(ATTENUATION),
                                              np.array(3), np.bool_(True), np.array(False))
    assert torch.equal(exact, expected)
