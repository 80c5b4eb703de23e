"""torch.func.vmap over a batch of size 0, for both operators and every
level (op, backward, double backward): the results are [0, ...] of one
entry's shape and dtype, folded or looped alike, and no backend kernel runs
(the shapes come from the Meta kernels)."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacrev, vmap

import nanobragg_ops
from test_absorption import make_inputs as absorption_inputs
from test_tricubic import INDEX_MIN, make_inputs as tricubic_inputs


def empty_batch_of(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0)[:0]


def assert_empty_like(batched: torch.Tensor, one: torch.Tensor) -> None:
    assert batched.shape == (0, *one.shape)
    assert batched.dtype == one.dtype
    assert batched.device == one.device


def tricubic(grid, hkl):
    return nanobragg_ops.tricubic_interp(grid, hkl, INDEX_MIN, 0.5, "nearest")


@pytest.mark.parametrize("batched", ["hkl", "grid", "both"])
def test_tricubic_forward_and_grad(device, batched):
    grid, hkl = tricubic_inputs(device, n=10, outside=3)
    in_dims = {"hkl": (None, 0), "grid": (0, None), "both": (0, 0)}[batched]
    args = [empty_batch_of(x) if d == 0 else x for x, d in zip((grid, hkl), in_dims)]
    assert_empty_like(vmap(tricubic, in_dims=in_dims)(*args), tricubic(grid, hkl))

    loss = lambda g, h: tricubic(g, h).pow(2).sum()  # noqa: E731
    grads = vmap(grad(loss, argnums=(0, 1)), in_dims=in_dims)(*args)
    assert_empty_like(grads[0], grid)
    assert_empty_like(grads[1], hkl)
    # Second derivatives (the double backward under vmap).
    gnorm = lambda g, h: grad(loss, argnums=1)(g, h).pow(2).sum()  # noqa: E731
    gg = vmap(grad(gnorm, argnums=(0, 1)), in_dims=in_dims)(*args)
    assert_empty_like(gg[0], grid)
    assert_empty_like(gg[1], hkl)


def test_tricubic_jacrev_of_no_points(device):
    # jacrev's vmap over a basis of size 0: no output, no row of the Jacobian.
    grid, hkl = tricubic_inputs(device, n=10, outside=3)
    jac = jacrev(tricubic, argnums=1)(grid, hkl[:0])
    assert jac.shape == (0, 0, 3)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("batched", ["intensity", "pixel_coords", "thickness", "all"])
def test_absorption_forward_and_grad(absorption_device, per_layer, batched):
    inputs = absorption_inputs(
        absorption_device, odet="tilted", per_layer=per_layer, pixel_layers=1 if per_layer else None
    )
    names = ["intensity", "pixel_coords", "odet", "thickness", "attenuation_length"]
    in_dims = tuple(0 if batched in (name, "all") else None for name in names)
    args = [empty_batch_of(x) if d == 0 else x for x, d in zip(inputs, in_dims)]

    def f(*xs):
        return nanobragg_ops.detector_absorption(*xs, 3, True, per_layer)

    assert_empty_like(vmap(f, in_dims=in_dims)(*args), f(*inputs))

    loss = lambda *xs: f(*xs).pow(2).sum()  # noqa: E731
    grads = vmap(grad(loss, argnums=(0, 1, 2, 3, 4)), in_dims=in_dims)(*args)
    for g, x in zip(grads, inputs):
        assert_empty_like(g, x)
    gnorm = lambda *xs: grad(loss, argnums=3)(*xs).pow(2).sum()  # noqa: E731
    gg = vmap(grad(gnorm, argnums=(0, 1, 2, 3, 4)), in_dims=in_dims)(*args)
    for g, x in zip(gg, inputs):
        assert_empty_like(g, x)


def test_absorption_gradients_of_cpu_scalars_stay_on_cpu():
    # Each result of an empty batch is made on its argument's device, as the
    # backends make it: a 0-dim CPU thickness / attenuation_length with data
    # elsewhere gets its gradient on the CPU. (Meta data stands in for CUDA
    # here; test_cuda.py checks CUDA itself.)
    f64 = torch.float64
    data = dict(dtype=f64, device="meta")
    intensity, pixels = torch.empty(4, 5, **data), torch.empty(4, 5, 3, **data)
    odet = torch.empty(3, **data)
    thickness, attenuation = torch.tensor(450e-6, dtype=f64), torch.tensor(234e-6, dtype=f64)

    def backward(grad_output):
        return torch.ops.nanobragg.detector_absorption_backward(
            grad_output, intensity, pixels, odet, thickness, attenuation, 4, True, False, [True] * 5
        )

    one = backward(torch.empty(4, 5, **data))
    batched = vmap(backward)(torch.empty(0, 4, 5, **data))
    assert [g.device.type for g in one] == ["meta", "meta", "meta", "cpu", "cpu"]
    for b, g in zip(batched, one):
        assert_empty_like(b, g)


@pytest.mark.parametrize("level", ["forward", "backward", "double_backward"])
@pytest.mark.parametrize(
    "bad", [dict(thickness=-1.0), dict(thickness=float("inf")), dict(attenuation_length=0.0),
            dict(attenuation_length=float("nan"))], ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items())
)
def test_absorption_rejects_invalid_host_lengths_with_no_batch(level, bad):
    # An empty batch runs no backend kernel, but a thickness or attenuation
    # length held on the host is still read and rejected, as in any other
    # call (docs/CONTRACT.md §3), at every level of derivative.
    intensity, pixels, odet, thickness, attenuation = absorption_inputs("cpu", odet="tilted")
    lengths = dict(thickness=thickness, attenuation_length=attenuation)
    lengths.update({k: torch.tensor(v, dtype=torch.float64) for k, v in bad.items()})

    def f(i):
        return nanobragg_ops.detector_absorption(i, pixels, odet, *lengths.values(), 3, True)

    loss = lambda i: f(i).pow(2).sum()  # noqa: E731
    run = {"forward": f, "backward": grad(loss), "double_backward": grad(lambda i: grad(loss)(i).pow(2).sum())}[level]
    (name,) = bad
    with pytest.raises(RuntimeError, match=rf"nanobragg::detector_absorption\w*: argument '{name}'"):
        vmap(run)(empty_batch_of(intensity))
    # Valid lengths: the same call gives its empty result.
    lengths.update(thickness=thickness, attenuation_length=attenuation)
    assert vmap(run)(empty_batch_of(intensity)).shape == (0, *intensity.shape)


@pytest.mark.parametrize("op", ["backward", "double_backward"])
def test_backward_ops_reject_invalid_host_lengths_with_no_batch(op):
    # The backward ops' own Meta kernels (vmap over grad_output alone: no
    # forward runs first).
    intensity, pixels, odet, thickness, _ = absorption_inputs("cpu", odet="tilted")
    bad = torch.tensor(float("nan"), dtype=torch.float64)
    inputs = (intensity, pixels, odet, thickness, bad, 3, True, False)
    if op == "backward":
        run = lambda g: torch.ops.nanobragg.detector_absorption_backward(g, *inputs, [True] * 5)  # noqa: E731
    else:
        run = lambda g: torch.ops.nanobragg.detector_absorption_double_backward(  # noqa: E731
            torch.ones_like(intensity), None, None, None, None, g, *inputs, [True] * 6)
    with pytest.raises(RuntimeError, match=rf"nanobragg::detector_absorption_{op}: argument 'attenuation_length'"):
        vmap(run)(empty_batch_of(intensity))


def test_meta_data_with_an_invalid_host_length_is_an_error():
    # Meta data computes no value, but a 0-dim CPU length with it is read.
    f64 = torch.float64
    meta = dict(dtype=f64, device="meta")
    args = (torch.empty(4, 5, **meta), torch.empty(4, 5, 3, **meta), torch.empty(3, **meta))
    with pytest.raises(RuntimeError, match="argument 'thickness' must be finite and >= 0, got -1"):
        torch.ops.nanobragg.detector_absorption(*args, torch.tensor(-1.0, dtype=f64), torch.tensor(1.0, dtype=f64), 3, True)
    out = torch.ops.nanobragg.detector_absorption(*args, torch.tensor(1.0, dtype=f64), torch.tensor(1.0, dtype=f64), 3, True)
    assert out.shape == (4, 5) and out.device.type == "meta"
