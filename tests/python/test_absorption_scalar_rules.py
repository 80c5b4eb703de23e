"""PyTorch's scalar rules for detector_absorption's geometry arguments (issue
16): odet, thickness and attenuation_length of any floating dtype (float16,
bfloat16, float32, float64), thickness / attenuation_length also as Python
numbers and as 0-dim CPU tensors with data on CUDA; the scalars are read and
combined in float64, the per-pixel math runs in intensity's dtype, and each
gradient comes back in its argument's own dtype and device. gradcheck covers the mixed cases: float64 inputs are checked
against finite differences, lower-precision ones against a float64 run."""

from __future__ import annotations

import pytest
import torch

import nanobragg_ops
from test_absorption import ATTENUATION, OP, make_inputs, reference

SCALAR_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# A gradient computed in float64 and rounded to its argument's dtype.
ROUNDING = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-12}


def run(inputs, thicksteps=3, oversample_thick=True, per_layer=False):
    return OP(*inputs, thicksteps, oversample_thick, per_layer)


def rounded_to(inputs, dtypes):
    """The inputs with odet, thickness and attenuation_length converted to
    `dtypes` (three dtypes), requiring grad."""
    i, p, o, t, a = inputs
    return (i, p) + tuple(x.to(d).requires_grad_(True) for x, d in zip((o, t, a), dtypes))


def float64_of(inputs):
    """The same values in float64 (lower-precision scalars rounded first)."""
    return tuple(x.detach().double().requires_grad_(True) for x in inputs)


@pytest.mark.parametrize("oversample_thick", [True, False])
@pytest.mark.parametrize("dtype", SCALAR_DTYPES, ids=str)
def test_scalars_of_any_floating_dtype_with_float64_data(absorption_device, dtype, oversample_thick):
    base = make_inputs(absorption_device, odet="tilted")
    i, p = (x.clone().requires_grad_(True) for x in base[:2])
    mixed = (i, p) + rounded_to(base, [dtype] * 3)[2:]
    out = run(mixed, oversample_thick=oversample_thick)
    assert out.dtype == torch.float64 and out.device == i.device

    ref_inputs = float64_of(mixed)
    ref = run(ref_inputs, oversample_thick=oversample_thick)
    # The scalars' (rounded) values, read as doubles: the same result.
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=0)

    weights = torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    weights = weights.to(absorption_device)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for got, want in zip(mixed, ref_inputs):
        assert got.grad.dtype == got.dtype and got.grad.device == got.device
        assert got.grad.shape == got.shape
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=ROUNDING[got.dtype], atol=0)


def test_gradcheck_float64_data_with_float32_scalars(absorption_device):
    """gradcheck (float64 only) of intensity, pixel_coords and
    attenuation_length with a float32 thickness and odet in the call; the
    float32 arguments' gradients against a float64 run."""
    i, p, o, t, a = make_inputs(absorption_device, odet="tilted")
    o32, t32 = o.float(), t.float()
    # The attenuation length is checked in units of ATTENUATION (2e-4 m): a step
    # of 1e-7 m, 5e-4 of it, left a truncation error above rtol in the second
    # derivative for 1 of 80 random cotangents (the one CI drew); in these units
    # 0 of 200 fail. (The cotangents gradgradcheck draws come from the global
    # generator, which conftest.py seeds before every test.)
    for oversample_thick in (True, False):
        def f(i_, p_, a_units):
            return OP(i_, p_, o32, t32, a_units * ATTENUATION, 3, oversample_thick, False)

        checked = tuple(x.clone().requires_grad_(True) for x in (i, p, a / ATTENUATION))
        assert torch.autograd.gradcheck(f, checked, eps=1e-7, atol=1e-6, rtol=1e-5, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(f, checked, eps=1e-7, atol=1e-5, rtol=1e-4, check_fwd_over_rev=True)

    mixed = (i, p) + rounded_to((i, p, o, t, a), [torch.float32, torch.float32, torch.float64])[2:]
    ref_inputs = float64_of(mixed)
    run(mixed).sum().backward()
    run(ref_inputs).sum().backward()
    for got, want in zip(mixed[2:], ref_inputs[2:]):
        assert got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=ROUNDING[got.dtype], atol=0)


# (not float16: these second derivatives, ~1e8 with lengths in metres,
# overflow its range, as they would in any float16 computation)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_second_derivatives_of_lower_precision_scalars(absorption_device, dtype):
    """d2/dthickness2 and the mixed d2/dthickness d(att) through the double
    backward: each in its argument's dtype, values as a float64 run's."""
    base = make_inputs(absorption_device, odet="tilted")
    mixed = rounded_to(base, [dtype, dtype, torch.float64])
    ref_inputs = float64_of(mixed)
    results = []
    for inputs in (mixed, ref_inputs):
        (g_t,) = torch.autograd.grad(run(inputs).sum(), inputs[3], create_graph=True)
        assert g_t.dtype == inputs[3].dtype
        results.append(torch.autograd.grad(g_t, (inputs[3], inputs[4])))
    for got, want, like in zip(results[0], results[1], mixed[3:]):
        assert got.dtype == like.dtype and got.device == like.device
        torch.testing.assert_close(got.double(), want, rtol=ROUNDING[like.dtype], atol=0)


def test_float32_data_with_float64_scalars(absorption_device):
    i, p, o, t, a = make_inputs(absorption_device, odet="tilted")
    mixed = (i.float().requires_grad_(True), p.float()) + rounded_to((i, p, o, t, a), [torch.float64] * 3)[2:]
    out = run(mixed)
    assert out.dtype == torch.float32
    ref = run((i, p, o, t, a))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)
    out.sum().backward()
    assert all(x.grad.dtype == torch.float64 for x in mixed[2:])
    assert mixed[0].grad.dtype == torch.float32


@pytest.mark.parametrize("data_dtype", [torch.float64, torch.float32], ids=str)
def test_python_numbers_and_wrapper(absorption_device, data_dtype):
    """The wrapper passes Python numbers as float64 values (bitwise what 0-dim
    float64 tensors on intensity's device give, never rounded to the data's
    dtype), and tensors of any floating dtype as given."""
    i, p, o, t, a = make_inputs(absorption_device, odet="tilted")
    i, p, o = (x.to(data_dtype) for x in (i, p, o))
    # Values that float32 does not hold exactly.
    thickness, attenuation = t.item() * (1 + 1e-9), a.item() * (1 - 1e-9)
    got = nanobragg_ops.detector_absorption(i, p, o, thickness, attenuation, 3, True)
    as_float64 = [torch.tensor(v, dtype=torch.float64, device=i.device) for v in (thickness, attenuation)]
    torch.testing.assert_close(got, OP(i, p, o, *as_float64, 3, True, False), rtol=0, atol=0)
    # A number rounded to float32 first would give another result.
    as_float32 = [x.float() for x in as_float64]
    rounded = OP(i.double(), p.double(), o.double(), *as_float32, 3, True, False)
    exact = OP(i.double(), p.double(), o.double(), *as_float64, 3, True, False)
    assert not torch.equal(rounded, exact)
    if data_dtype == torch.float64:
        assert not torch.equal(got, rounded)

    t32 = t.float().requires_grad_(True)
    got = nanobragg_ops.detector_absorption(i, p, o.float(), t32, attenuation, 3, True)
    torch.testing.assert_close(got, OP(i, p, o.float(), t32.detach(), as_float64[1], 3, True, False), rtol=0, atol=0)
    got.sum().backward()
    assert t32.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "thickness, attenuation_length",
    [(1e-300, 2.5e-4), (450e-6, 1e-50), (450e-6, 1e300), (1e39, 2.5e-4)],
    ids=["tiny-thickness", "tiny-attenuation", "huge-attenuation", "huge-thickness"],
)
def test_python_numbers_are_not_rounded_to_float32_first(absorption_device, thickness, attenuation_length):
    """Valid Python numbers with float32 data: their float64 values, as 0-dim
    float64 tensors give. Rounded to float32 first, 1e-300 became 0 (no
    thickness modelling: the output was the intensity), 1e-50 became 0 (an
    error), and 1e300 and 1e39 overflowed (an error naming neither the op nor
    the argument)."""
    i, p, o, _, _ = make_inputs(absorption_device, odet="tilted")
    got = nanobragg_ops.detector_absorption(i.float(), p.float(), o.float(), thickness, attenuation_length, 3, True)
    assert got.dtype == torch.float32
    scalars = [torch.tensor(v, dtype=torch.float64) for v in (thickness, attenuation_length)]
    want = reference(i, p, o, *scalars, 3, True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-30)
    # With float64 data too, where the tiny captures (1e-296 of the intensity
    # and less, flushed to 0 in float32) are resolved: against the layers'
    # total, 1 - exp(-T / (att rho)), in expm1 (the port's difference of
    # exponentials gives 0 there).
    got64 = nanobragg_ops.detector_absorption(i, p, o, thickness, attenuation_length, 3, True)
    rho = (o * p).sum(-1) / p.norm(dim=-1)
    total = i * -torch.expm1(-thickness / (attenuation_length * rho))
    assert (total > 0).all()
    torch.testing.assert_close(got64, total, rtol=1e-12, atol=0)


def test_vmap_grad_and_compile_with_mixed_dtypes(absorption_device):
    i, p, o, t, a = make_inputs(absorption_device, odet="tilted")
    o32, t32 = o.float(), t.float()
    batch = torch.stack([i, 2 * i, 3 * i])
    vmapped = torch.func.vmap(lambda i_: OP(i_, p, o32, t32, a, 3, True, False))(batch)
    looped = torch.stack([OP(b, p, o32, t32, a, 3, True, False) for b in batch])
    torch.testing.assert_close(vmapped, looped, rtol=1e-15, atol=0)
    # a batched float32 thickness: one call per entry
    ts = torch.stack([t32, 2 * t32])
    per_t = torch.func.vmap(lambda t_: OP(i, p, o32, t_, a, 3, True, False))(ts)
    torch.testing.assert_close(per_t[1], OP(i, p, o32, ts[1], a, 3, True, False), rtol=0, atol=0)
    g = torch.func.grad(lambda t_: OP(i, p, o32, t_, a, 3, True, False).sum())(t32)
    assert g.dtype == torch.float32

    compiled = torch.compile(lambda *x: OP(*x, 3, True, False), fullgraph=True)
    t_req = t32.clone().requires_grad_(True)
    out = compiled(i, p, o32, t_req, a)
    torch.testing.assert_close(out, OP(i, p, o32, t32, a, 3, True, False), rtol=0, atol=0)
    out.sum().backward()
    assert t_req.grad.dtype == torch.float32


def test_opcheck_mixed_dtypes(absorption_device):
    i, p, o, t, a = make_inputs(absorption_device, odet="tilted")
    args = (i.requires_grad_(True), p, o.to(torch.bfloat16).requires_grad_(True),
            t.float().requires_grad_(True), a.half().requires_grad_(True), 3, True, False)
    torch.library.opcheck(OP, args)


def check_against_float64(out, thickness_grad, inputs, rounding):
    """An autocast call's output and thickness gradient (of out.sum()) against
    the float64 call on the same inputs rounded to `rounding` (the float64
    thickness and attenuation as given), to that dtype's precision: the
    per-pixel math of the lower-precision run is rounded once per step, so
    a few of its ulps."""
    i, p, o, t, a = (x.detach().cpu() for x in inputs)
    i, p, o = (x.to(rounding).double() for x in (i, p, o))
    t64 = t.double().requires_grad_(True)
    want = OP(i, p, o, t64, a.double(), 3, True, False)
    want.sum().backward()
    tol = 2e-2 if rounding == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.detach().cpu().double(), want.detach(), rtol=tol, atol=tol * want.abs().max().item())
    torch.testing.assert_close(thickness_grad.cpu(), t64.grad, rtol=tol, atol=0)


def test_autocast_cpu_keeps_a_float64_thickness():
    """Autocast casts intensity (and the other CPU tensors of the call) to
    float32 but leaves float64 tensors alone: a float64 thickness is now fine."""
    i, p, o, t, a = make_inputs("cpu", odet="tilted")
    t64 = t.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OP(i.bfloat16(), p.bfloat16(), o.bfloat16(), t64, a, 3, True, False)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert t64.grad.dtype == torch.float64
    check_against_float64(out, t64.grad, (i, p, o, t, a), rounding=torch.bfloat16)


@pytest.mark.parametrize(
    "thickness, message",
    [
        (lambda t: t.float().reshape(1), r"argument 'thickness' must be a 0-dim tensor, got shape \[1\]"),
        (lambda t: t.long(), r"argument 'thickness' must be a floating-point tensor"),
        (lambda t: t.to(torch.complex64), r"argument 'thickness' must be a floating-point tensor"),
    ],
    ids=["shape-1", "integer", "complex"],
)
def test_other_mismatches_stay_errors(absorption_device, thickness, message):
    i, p, o, t, a = make_inputs(absorption_device)
    with pytest.raises(RuntimeError, match=r"nanobragg::detector_absorption: " + message):
        OP(i, p, o, thickness(t), a, 3, True, False)
    with pytest.raises(RuntimeError, match=r"argument 'pixel_coords' must have the dtype of 'intensity'"):
        OP(i, p.float(), o, t, a, 3, True, False)


def test_cotangents_must_match_their_inputs_dtype():
    """The double backward keeps its rule: a cotangent has its input's dtype."""
    i, p, o, t, a = make_inputs("cpu", odet="tilted")
    g = torch.ones(i.shape, dtype=i.dtype)
    double_backward = torch.ops.nanobragg.detector_absorption_double_backward.default
    t32 = t.float()
    outs = double_backward(None, None, None, torch.tensor(1.0), None, g, i, p, o, t32, a, 3, True, False,
                           [True, True, False, False, True, False])
    assert outs[4].dtype == torch.float32
    with pytest.raises(RuntimeError, match=r"'grad_grad_thickness' must have the dtype of 'thickness'"):
        double_backward(None, None, None, torch.tensor(1.0, dtype=torch.float64), None, g, i, p, o, t32,
                        a, 3, True, False, [True, True, False, False, True, False])


# --- CUDA: 0-dim CPU scalars with data on the GPU (skip without one) -------


def cuda_or_skip():
    reason = None
    if not torch._C._dispatch_has_kernel_for_dispatch_key("nanobragg::detector_absorption", "CUDA"):
        reason = "CUDA kernels of nanobragg::detector_absorption are not built"
    elif not torch.cuda.is_available():
        reason = "no CUDA GPU on this machine"
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_cuda_data_with_cpu_scalars_of_any_dtype(dtype):
    cuda_or_skip()
    cpu = make_inputs("cpu", odet="tilted")
    i, p, o = (x.cuda() for x in cpu[:3])
    t = cpu[3].to(dtype).requires_grad_(True)
    a = cpu[4].to(dtype).requires_grad_(True)
    o_half = o.to(dtype).requires_grad_(True)
    out = run((i, p, o_half, t, a))
    ref_inputs = float64_of((cpu[0], cpu[1], o_half.cpu(), t, a))
    ref = run(ref_inputs)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=0)
    out.sum().backward()
    run(ref_inputs).sum().backward()
    for got, want in zip((o_half, t, a), ref_inputs[2:]):
        assert got.grad.dtype == dtype and got.grad.device == got.device
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=ROUNDING[dtype], atol=0)


def test_cuda_autocast_with_a_float64_cpu_thickness():
    cuda_or_skip()
    i, p, o, t, a = make_inputs("cpu", odet="tilted")
    t64 = t.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.float16):
        out = OP(i.cuda().half(), p.cuda().half(), o.cuda().half(), t64, a.cuda(), 3, True, False)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert t64.grad.dtype == torch.float64 and t64.grad.device.type == "cpu"
    check_against_float64(out, t64.grad, (i, p, o, t, a), rounding=torch.float16)
