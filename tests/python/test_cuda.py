"""Both operators on CUDA: parity with the CPU kernels in float64 (forward,
backward, double backward) over layouts and edge cases, the deterministic and
atomic grid gradients, grid-stride loops that iterate, non-default streams,
CPU scalar arguments, no host synchronisation, CUDA graph capture,
torch.compile(mode="reduce-overhead"), concurrent callers and float32 edges.

Every test here skips, saying why, where CUDA cannot run. Each compares the
CUDA result, moved to the CPU, against the CPU operator on the same data (an
independent backend), never against the CUDA output itself.
"""

from __future__ import annotations

import contextlib
import math
import threading

import pytest
import torch

import nanobragg_ops
from conftest import cuda_unavailable_reason, deterministic

TRICUBIC = "nanobragg::tricubic_interp"
ABSORPTION = "nanobragg::detector_absorption"
_REASON = cuda_unavailable_reason(TRICUBIC) or cuda_unavailable_reason(ABSORPTION)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

F64 = torch.float64
INDEX_MIN = (-5, -6, -4)
GRID_SHAPE = (11, 12, 13)
THICKNESS = 450e-6
ATTENUATION = 234e-6
# CUDA against CPU in float64 (docs/CONTRACT.md, Devices): to RTOL of each
# result's largest entry, and entry by entry to 10 RTOL (assert_close_rel).
RTOL = 1e-12

TRICUBIC_BACKWARD = torch.ops.nanobragg.tricubic_interp_backward.default
TRICUBIC_DOUBLE_BACKWARD = torch.ops.nanobragg.tricubic_interp_double_backward.default


# --------------------------------------------------------------------------
# helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close_rel(actual, expected, rtol=None, floor_frac=1e-3, what=""):
    """max |a - e| / max(|e|, floor_frac * max|e|) <= rtol over the finite
    entries; NaN and infinite entries must sit at the same places (and the
    infinities have the same sign). Both sides are moved to CPU float64.
    Without rtol, the contract's measure: within RTOL of the largest entry
    (floor_frac 1) and entry by entry within 10 RTOL (floor_frac 1e-3), since
    a sum over many points, such as a grid gradient, is added in another
    order on each device."""
    if rtol is None:
        assert_close_rel(actual, expected, RTOL, 1.0, what)
        assert_close_rel(actual, expected, 10 * RTOL, 1e-3, what + " (entry by entry)")
        return
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual)}"
    a = actual.detach().to("cpu", F64)
    e = expected.detach().to("cpu", F64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{what}: NaN at {nan_a.sum().item()} entries, expected {nan_e.sum().item()}; "
        f"first differing index {torch.nonzero(nan_a != nan_e)[:1].tolist()}"
    )
    inf_e = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf_e), f"{what}: infinities at different places"
    assert torch.equal(a[inf_e], e[inf_e]), f"{what}: infinities of different sign"
    fin = torch.isfinite(e)
    if not fin.any():
        return
    a, e = a[fin], e[fin]
    scale = e.abs().max().item()
    if scale == 0.0:
        worst = a.abs().max().item()
        assert worst == 0.0, f"{what}: expected all zeros, got max |a| = {worst:.3e}"
        return
    denom = torch.clamp(e.abs(), min=floor_frac * scale)
    err = ((a - e).abs() / denom).max().item()
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e} (max |expected| {scale:.3e})"


def assert_all_close(actual, expected, what="", **kw):
    assert len(actual) == len(expected), f"{what}: {len(actual)} results, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close_rel(a, e, what=f"{what} [result {i}]", **kw)


@contextlib.contextmanager
def sync_debug_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def all_orders(fn, inputs, out_cotangent, first_cotangents):
    """[output, first derivatives..., second derivatives...] of fn at
    `inputs` (a list of tensors, the differentiable ones with requires_grad).
    First: grads of <out_cotangent, fn> (the cotangent requires grad).
    Second: grads of sum_i <first_cotangents[i], first_i> with respect to the
    differentiable inputs and the output cotangent (unused ones are zeros)."""
    out = fn(*inputs)
    diff = [x for x in inputs if x.requires_grad]
    first = torch.autograd.grad(out, diff, out_cotangent, create_graph=True, materialize_grads=True)
    assert len(first) == len(first_cotangents)
    total = sum((f * w).sum() for f, w in zip(first, first_cotangents))
    second = torch.autograd.grad(total, diff + [out_cotangent], materialize_grads=True)
    return [out] + list(first) + list(second)


def run_on(device, make):
    """make(device) -> (fn, inputs, out_cotangent, first_cotangents); runs
    all_orders on `device`."""
    fn, inputs, g, w = make(device)
    return all_orders(fn, inputs, g, w)


def cuda_matches_cpu(make, what):
    cpu = run_on("cpu", make)
    cuda = run_on("cuda", make)
    torch.cuda.synchronize()
    assert_all_close(cuda, cpu, what=what)
    return cpu, cuda


# --------------------------------------------------------------------------
# tricubic_interp inputs


def tricubic_points(n, seed, outside=0, special=False):
    """float64 [n, 3] points spread over the grid (and a margin past it); the
    first `outside` leave it on h; with `special`, rows of NaN, +-Inf, 1e30,
    exact integers and the last valid stencil positions."""
    g = gen(seed)
    lo = torch.tensor(INDEX_MIN, dtype=F64)
    size = torch.tensor(GRID_SHAPE, dtype=F64)
    hkl = lo + 0.5 + torch.rand(n, 3, generator=g, dtype=F64) * (size - 2.0)
    if outside:
        hkl[:outside, 0] += size[0] - 0.5  # beyond: nearest node outside too for some
        hkl[: outside // 2, 0] = lo[0] + size[0] - 1.2  # nearest node inside
    if special:
        rows = [
            [math.nan, 0.3, 0.2],
            [0.1, math.inf, 0.2],
            [0.1, 0.3, -math.inf],
            [1e30, 0.3, 0.2],
            [0.1, -1e30, 0.2],
            [-2.0, 0.0, 1.0],  # integers
            [lo[0] + 1, lo[1] + 1, lo[2] + 1],  # first valid stencil
            # the stencil n-1..n+2 fits while n <= lo + size - 3
            [lo[0] + size[0] - 3, lo[1] + size[1] - 3, lo[2] + size[2] - 3],  # touches the last nodes
            [lo[0] + size[0] - 2.0000001, 0.5, 0.5],  # last valid
            [lo[0] + size[0] - 2, 0.5, 0.5],  # just outside
        ]
        hkl[: len(rows)] = torch.tensor(rows, dtype=F64)
    return hkl


def tricubic_grid(seed):
    return torch.rand(GRID_SHAPE, generator=gen(seed), dtype=F64) * 9 + 1


def tricubic_case(layout, mode, n=300, special=False, seed=0):
    """A make(device) for cuda_matches_cpu. Layouts: contiguous, strided
    (transposed grid, hkl sliced from a wider tensor, strided cotangents),
    expanded (stride-0 hkl and cotangents)."""
    grid_base = tricubic_grid(seed)
    pts = tricubic_points(n, seed + 1, outside=n // 10, special=special)
    g = gen(seed + 2)
    gout = torch.randn(n, generator=g, dtype=F64)
    w_grid = torch.randn(GRID_SHAPE, generator=g, dtype=F64)
    w_hkl = torch.randn(n, 3, generator=g, dtype=F64)

    def make(device):
        if layout == "contiguous":
            grid = grid_base.to(device)
            hkl = pts.to(device)
            go, wg, wh = gout.to(device), w_grid.to(device), w_hkl.to(device)
        elif layout == "strided":
            # the grid stored [l, k, h] and viewed back: non-contiguous
            grid = grid_base.permute(2, 1, 0).contiguous().to(device).permute(2, 1, 0)
            wide = torch.zeros(n, 7, dtype=F64)
            wide[:, 1:7:2] = pts
            hkl = wide.to(device)[:, 1:7:2]
            go = torch.stack([gout, gout], 1).to(device)[:, 1]
            wg = w_grid.transpose(0, 1).contiguous().to(device).transpose(0, 1)
            wh = w_hkl.t().contiguous().to(device).t()
            assert not grid.is_contiguous() and not hkl.is_contiguous() and not go.is_contiguous()
        elif layout == "expanded":
            grid = grid_base.to(device)
            hkl = pts[-1:].to(device).expand(n, 3)  # one inside point, stride 0
            go = torch.ones((), dtype=F64, device=device).expand(n)  # .sum().backward()
            wg = w_grid.to(device)
            wh = w_hkl[-1:].to(device).expand(n, 3)
        else:
            raise AssertionError(layout)
        grid = grid.detach().requires_grad_(True)
        hkl = hkl.detach().requires_grad_(True)
        go = go.detach().requires_grad_(True)

        def fn(gr, h):
            return nanobragg_ops.tricubic_interp(gr, h, INDEX_MIN, -1.5, mode)

        return fn, [grid, hkl], go, [wg, wh]

    return make


# --------------------------------------------------------------------------
# detector_absorption inputs


def absorption_base(shape, seed, layers=None):
    """(intensity, pixel coords) in float64: a detector plane at 0.1, pixels
    over +-0.05, jittered; with `layers`, a leading layer dimension."""
    g = gen(seed)
    lead = (layers,) if layers else ()
    s, f = shape
    y, x = torch.meshgrid(torch.linspace(-0.05, 0.05, s, dtype=F64), torch.linspace(-0.05, 0.05, f, dtype=F64), indexing="ij")
    p = torch.stack([x, y, torch.full_like(x, 0.1)], -1).expand(*lead, s, f, 3).clone()
    p += 2e-3 * (torch.rand(p.shape, generator=g, dtype=F64) - 0.5)
    if layers:
        p[..., 2] += (torch.arange(layers, dtype=F64) * 1e-4)[:, None, None]
    intensity = torch.rand(*lead, s, f, generator=g, dtype=F64) + 0.5
    return intensity, p


def absorption_case(layout="contiguous", *, per_layer=False, oversample=True, thicksteps=3,
                    thickness=THICKNESS, attenuation=ATTENUATION, special=None, shape=(6, 7), seed=0):
    """special: "nonfinite" (NaN and +-Inf inputs) or "grazing" (the parallax
    clamp and the sample position). Apart: a NaN pixel makes the summed odet,
    thickness and attenuation gradients NaN, which would hide the others."""
    layers = thicksteps if per_layer else None
    intensity, pixels = absorption_base(shape, seed, layers)
    odet = torch.tensor([0.1, -0.05, 1.0], dtype=F64)
    odet = odet / odet.norm()
    flat_i, flat_p = intensity.view(-1), pixels.view(-1, 3)
    if special == "nonfinite":
        flat_p[0, 0] = math.nan
        flat_i[1] = math.nan
        flat_i[2] = math.inf
        flat_i[5] = -math.inf
    elif special == "grazing":
        # a pixel perpendicular to odet (odet x e_x, 0.1 long), so that the
        # parallax reaches its clamp through the per-layer path too; 1e-14
        # along odet puts it on the + side, far above the rounding of the dot
        # product (1e-19), whose sign depends on how the compiler fuses it
        across = torch.stack([torch.zeros((), dtype=F64), odet[2], -odet[1]])
        flat_p[3] = across * (0.1 / across.norm()) + 1e-14 * odet
        assert abs(float(flat_p[3] @ odet)) / 0.1 < 1e-10, "not grazing"
        flat_p[4] = 0.0  # the sample position
    else:
        assert special is None, special
    g = gen(seed + 7)
    gout = torch.randn(shape, generator=g, dtype=F64)
    w = [torch.randn(t.shape, generator=g, dtype=F64) for t in (intensity, pixels, odet)]
    w += [torch.randn((), generator=g, dtype=F64) for _ in range(2)]

    def make(device):
        if layout == "contiguous":
            I, P = intensity.to(device), pixels.to(device)
            go = gout.to(device)
        elif layout == "strided":
            I = intensity.transpose(-1, -2).contiguous().to(device).transpose(-1, -2)
            wide = torch.zeros(*pixels.shape[:-1], 8, dtype=F64)
            wide[..., 0:6:2] = pixels
            P = wide.to(device)[..., 0:6:2]
            go = gout.t().contiguous().to(device).t()
            assert not P.is_contiguous() and not I.is_contiguous() and not go.is_contiguous()
        elif layout == "expanded":
            I = intensity[..., :1, :].to(device).expand(intensity.shape)  # rows stride 0
            P = pixels[..., :, :1, :].to(device).expand(pixels.shape)  # columns stride 0
            go = torch.ones((), dtype=F64, device=device).expand(shape)
        else:
            raise AssertionError(layout)
        ws = [x.to(device) for x in w]
        if layout == "expanded":
            ws[0] = ws[0][..., :1].expand(ws[0].shape)
        leaves = [I, P, odet.to(device), torch.tensor(thickness, dtype=F64, device=device),
                  torch.tensor(attenuation, dtype=F64, device=device)]
        leaves = [x.detach().requires_grad_(True) for x in leaves]
        go = go.detach().requires_grad_(True)

        def fn(i, p, o, t, a):
            return nanobragg_ops.detector_absorption(i, p, o, t, a, thicksteps, oversample, per_layer)

        return fn, leaves, go, ws

    return make


# --------------------------------------------------------------------------
# parity: CUDA against CPU in float64


@pytest.mark.parametrize("layout", ["contiguous", "strided", "expanded"])
@pytest.mark.parametrize("mode", ["default", "nearest"])
def test_cuda_tricubic_matches_cpu_all_orders(layout, mode):
    cpu, _ = cuda_matches_cpu(tricubic_case(layout, mode), f"tricubic {layout} {mode}")
    assert cpu[1].abs().sum() > 0 and cpu[2].abs().sum() > 0  # not vacuous


@pytest.mark.parametrize("mode", ["default", "nearest"])
def test_cuda_tricubic_nonfinite_huge_and_boundary_points_match_cpu(mode):
    cuda_matches_cpu(tricubic_case("contiguous", mode, special=True), f"tricubic special {mode}")


@pytest.mark.parametrize("layout", ["contiguous", "strided", "expanded"])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("oversample", [True, False])
def test_cuda_absorption_matches_cpu_all_orders(layout, per_layer, oversample):
    make = absorption_case(layout, per_layer=per_layer, oversample=oversample)
    cpu, _ = cuda_matches_cpu(make, f"absorption {layout} per_layer={per_layer} oversample={oversample}")
    assert all(t.abs().sum() > 0 for t in cpu[:6])  # output and every first derivative


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("oversample", [True, False])
@pytest.mark.parametrize(
    "scalars",
    [dict(thickness=0.0), dict(attenuation=math.inf), dict(special="nonfinite"), dict(special="grazing")],
    ids=["thickness0", "attenuation_inf", "nan_inf", "grazing"],
)
def test_cuda_absorption_edge_values_match_cpu(per_layer, oversample, scalars):
    make = absorption_case(per_layer=per_layer, oversample=oversample, thicksteps=4, **scalars)
    cpu, _ = cuda_matches_cpu(make, f"absorption {scalars} per_layer={per_layer} oversample={oversample}")
    if scalars.get("special") == "grazing":
        # compared as numbers, not as NaN == NaN: every result finite, and the
        # summed odet, thickness and attenuation gradients (first and second
        # order) nonzero
        for i, t in enumerate(cpu):
            assert torch.isfinite(t).all(), f"grazing: result {i} has non-finite entries on the CPU"
        for i in (3, 4, 5, 8, 9, 10):
            assert cpu[i].abs().sum() > 0, f"grazing: result {i} is zero"


# --------------------------------------------------------------------------
# the grid gradient: atomics and the deterministic path


def first_order_grid_gradient(grid, hkl, g, mode="nearest", index_min=INDEX_MIN):
    return TRICUBIC_BACKWARD(g, grid, hkl, list(index_min), mode, [True, False])[0]


def grid_gradients(grid, hkl, g, v, mode="nearest", index_min=INDEX_MIN):
    """(first-order grid gradient, second-order grid gradient from the
    double backward with a grad_hkl cotangent v)."""
    first = first_order_grid_gradient(grid, hkl, g, mode, index_min)
    _, second, _ = TRICUBIC_DOUBLE_BACKWARD(None, v, g, grid, hkl, list(index_min), mode, [False, True, False])
    return first, second


def contended_inputs(dtype, n=200_000, seed=3):
    """Many points on a small grid: every node takes thousands of atomics."""
    g = gen(seed)
    grid = tricubic_grid(seed)
    hkl = tricubic_points(n, seed, outside=n // 20)
    grad = torch.randn(n, generator=g, dtype=F64)
    v = torch.randn(n, 3, generator=g, dtype=F64)
    cuda_in = [x.to("cuda", dtype) for x in (grid, hkl, grad, v)]
    # The float64 reference takes the values the GPU gets: a coordinate rounded to
    # float32 can cross a half-integer and move its point to the next nearest node.
    return cuda_in, tuple(x.to("cpu", F64) for x in cuda_in)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_deterministic_grid_gradient_matches_atomic_and_repeats_bitwise(dtype):
    cuda_in, cpu64 = contended_inputs(dtype)
    with deterministic(False):
        atomic = grid_gradients(*cuda_in)
    with deterministic(True):
        d1 = grid_gradients(*cuda_in)
        d2 = grid_gradients(*cuda_in)
    torch.cuda.synchronize()
    reference = grid_gradients(*cpu64)  # the CPU kernel in float64
    for order in range(2):
        assert torch.equal(d1[order], d2[order]), f"order {order + 1}: deterministic path not bitwise repeatable"
        # atomic and deterministic sum the same terms in different orders
        tol = 1e-4 if dtype == torch.float32 else 1e-12
        assert_close_rel(d1[order], atomic[order], rtol=tol, floor_frac=1.0, what=f"order {order + 1} det vs atomic")
        assert_close_rel(d1[order], reference[order], rtol=tol, floor_frac=1.0, what=f"order {order + 1} det vs CPU")
        assert_close_rel(atomic[order], reference[order], rtol=tol, floor_frac=1.0, what=f"order {order + 1} atomic vs CPU")
        assert reference[order].abs().sum() > 1.0


def test_cuda_deterministic_autograd_grid_gradient_is_bitwise_repeatable():
    (grid, hkl, grad, _), _ = contended_inputs(F64, n=50_000)
    results = []
    with deterministic(True):
        for _ in range(2):
            gr = grid.clone().requires_grad_(True)
            out = nanobragg_ops.tricubic_interp(gr, hkl, INDEX_MIN, 0.0, "nearest")
            (out * grad).sum().backward()
            results.append(gr.grad)
    assert torch.equal(results[0], results[1]), "deterministic grid gradient differs between two runs"


# The sorted path's keys are 2 x node (tricubic_math.h, stencil_key): int32
# up to 2^30 nodes, int64 beyond. A grid of 1040 x 1024 x 1024 nodes (4.1 GiB
# in float32) takes the int64 keys; those of its far corner (h >= 1024) pass
# 2^31.
INT64_KEY_GRID = (1040, 1024, 1024)
KEY_WINDOW = 16  # nodes per axis of each corner window below


def int64_key_points(shape, n=3000, seed=41):
    """Points in two corner windows of a grid of `shape` (index_min 0). The
    far one (the largest keys): stencil points; points with one coordinate
    within 2.9 nodes of an upper face (nearest points where the stencil leaves
    the grid and the rounded node is inside, the rest stencil points); 64
    copies each of one stencil point and one nearest point (runs long enough
    for the piece table); points whose nearest node is past the grid (the
    sentinel key). The one at the origin: stencil points. Returns (hkl
    float64 [N, 3], [(window index_min, rows of hkl in it)])."""
    g = gen(seed)
    w = KEY_WINDOW
    size = torch.tensor(shape, dtype=F64)
    far = size - w
    # first node floor(x) - 1 >= far and its last, floor(x) + 2, <= far + w - 1
    far_stencil = far + 1.5 + (w - 4.0) * torch.rand(n, 3, generator=g, dtype=F64)
    near_face = far + 1.5 + (w - 4.0) * torch.rand(n, 3, generator=g, dtype=F64)
    axis = torch.randint(0, 3, (n,), generator=g)
    near_face[torch.arange(n), axis] = size[axis] - 2.9 + 2.35 * torch.rand(n, generator=g, dtype=F64)
    middle = far + w / 2 + 0.3
    one_stencil = middle.expand(64, 3)
    one_nearest = torch.stack([size[0] - 1.2, middle[1], middle[2]]).expand(64, 3)
    past = middle.expand(8, 3).clone()
    past[:, 0] = size[0] + 1.2
    origin = 1.5 + (w - 4.0) * torch.rand(n, 3, generator=g, dtype=F64)
    far_rows = torch.cat([far_stencil, near_face, one_stencil, one_nearest, past])
    hkl = torch.cat([far_rows, origin])
    m = far_rows.shape[0]
    windows = [(tuple(int(x) for x in far), slice(0, m)), ((0, 0, 0), slice(m, m + n))]
    return hkl, windows


def check_int64_key_case(device, shape, dtype):
    """The grid gradients of both orders, deterministic and atomic, window
    by window against the CPU kernel in float64 on a window-sized grid with
    the window's index_min, and zero outside the windows; the deterministic
    first order twice, bitwise the same. Grid gradients do not depend on the
    grid's values (the second-order one through grad_hkl, linear in the
    grid), so the grid is zeros."""
    hkl64, windows = int64_key_points(shape)
    n = hkl64.shape[0]
    gen_ = gen(42)
    g64 = torch.randn(n, generator=gen_, dtype=F64)
    v64 = torch.randn(n, 3, generator=gen_, dtype=F64)
    hkl, g, v = (x.to(device, dtype) for x in (hkl64, g64, v64))
    # The large tensors, dropped on the way out even when an assertion fails
    # (pytest keeps the failing frame, and with it GiBs of GPU memory).
    big = {"grid": torch.zeros(shape, device=device, dtype=dtype)}
    try:
        zero = (0, 0, 0)
        with deterministic(True):
            big["det"] = grid_gradients(big["grid"], hkl, g, v, index_min=zero)
            big["again"] = first_order_grid_gradient(big["grid"], hkl, g, index_min=zero)
        assert torch.equal(big["det"][0], big["again"]), "deterministic path not bitwise repeatable"
        del big["again"]
        with deterministic(False):
            big["atomic"] = grid_gradients(big["grid"], hkl, g, v, index_min=zero)
        del big["grid"]
        det, atomic = big["det"], big["atomic"]
        tol = 1e-4 if dtype == torch.float32 else 1e-12
        w = KEY_WINDOW
        inside = [0, 0]  # nonzero nodes of each order inside the windows
        for lo, rows in windows:
            # the values the device got, in float64
            args = [x[rows].to("cpu", F64) for x in (hkl, g, v)]
            references = grid_gradients(torch.zeros((w, w, w), dtype=F64), *args, index_min=lo)
            box = tuple(slice(a, a + w) for a in lo)
            for order, reference in enumerate(references):
                what = f"order {order + 1}, window at {lo}"
                assert_close_rel(det[order][box], reference, rtol=tol, floor_frac=1.0, what=what + " det vs CPU")
                assert_close_rel(atomic[order][box], reference, rtol=tol, floor_frac=1.0, what=what + " atomic vs CPU")
                assert reference.abs().sum() > 1.0, what + ": the window gets no gradient"
                inside[order] += torch.count_nonzero(det[order][box]).item()
        for order in range(2):
            nonzero = torch.count_nonzero(det[order]).item()
            assert nonzero == inside[order], (
                f"order {order + 1}: {nonzero - inside[order]} nodes outside the windows have a gradient"
            )
    finally:
        det = atomic = None  # noqa: F841 (the frame pytest keeps holds no GiBs)
        big.clear()


def test_cuda_deterministic_grid_gradient_with_int64_sort_keys():
    nodes = math.prod(INT64_KEY_GRID)
    assert 2 * 1024 * 1024 * 1024 > 2**31 - 1  # the far corner's smallest key needs int64
    # Measured in the caching allocator's blocks: the grid, both orders of the
    # deterministic result, the second first-order one and the two int32 run
    # tables of 2 x nodes + 1 entries (8 grid sizes), and a block the
    # allocator's splitting leaves unusable; then the atomic results.
    grid_bytes = 4 * nodes
    need = 11 * grid_bytes + (2 << 30)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    try:
        check_int64_key_case("cuda", INT64_KEY_GRID, torch.float32)
    finally:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------
# grid-stride loops that iterate: n >= 3 x the resident threads of the GPU


def resident_threads() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.multi_processor_count * props.max_threads_per_multi_processor


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_cuda_tricubic_large_n_matches_cpu(det):
    n = 3 * resident_threads() + 12_345
    grid = tricubic_grid(11)
    hkl = tricubic_points(n, 12, outside=n // 10)
    gout = torch.randn(n, generator=gen(13), dtype=F64)
    v = torch.randn(n, 3, generator=gen(14), dtype=F64)

    def run(device):
        gr = grid.to(device).requires_grad_(True)
        h = hkl.to(device).requires_grad_(True)
        out = nanobragg_ops.tricubic_interp(gr, h, INDEX_MIN, 0.0, "nearest")
        gg, gh = torch.autograd.grad(out, (gr, h), gout.to(device))
        _, dd_grid, dd_hkl = TRICUBIC_DOUBLE_BACKWARD(
            None, v.to(device), gout.to(device), gr.detach(), h.detach(), list(INDEX_MIN), "nearest", [True, True, True]
        )
        return [out, gg, gh, dd_grid, dd_hkl]

    with deterministic(det):  # the grid gradient's atomic or sorted path
        got = run("cuda")
    assert_all_close(got, run("cpu"), what=f"tricubic n={n} deterministic={det}")


@pytest.mark.parametrize("oversample", [True, False])
def test_cuda_absorption_large_n_matches_cpu(oversample):
    n = 3 * resident_threads() + 777
    side = math.isqrt(n) + 1  # side^2 >= n pixels
    make = absorption_case(shape=(side, side), oversample=oversample, thicksteps=4, seed=21)
    fn, inputs, g, _ = make("cpu")

    def run(device):
        xs = [x.detach().to(device).requires_grad_(True) for x in inputs]
        out = fn(*xs)
        return [out] + list(torch.autograd.grad(out, xs, g.detach().to(device)))

    # every scalar gradient (odet, thickness, attenuation) is reduced over
    # more than one block partial
    assert_all_close(run("cuda"), run("cpu"), what=f"absorption {side}x{side}")


# --------------------------------------------------------------------------
# streams


def forward_backward_both(grid, hkl, intensity, pixels, odet, thickness, att):
    """Leaves are the arguments themselves (they require grad)."""
    F = nanobragg_ops.tricubic_interp(grid, hkl, INDEX_MIN, 0.0, "nearest")
    out = nanobragg_ops.detector_absorption(intensity * F.reshape(intensity.shape), pixels, odet, thickness, att, 3, True)
    loss = (out * out).sum()
    grads = torch.autograd.grad(loss, (grid, hkl, intensity, pixels, odet, thickness, att))
    return [F.detach(), out.detach()] + list(grads)


def stream_inputs(shape=(64, 80), seed=30):
    intensity, pixels = absorption_base(shape, seed)
    n = shape[0] * shape[1]
    odet = torch.tensor([0.05, 0.0, 1.0], dtype=F64)
    return [tricubic_grid(seed), tricubic_points(n, seed + 1, outside=n // 10), intensity, pixels,
            odet / odet.norm(), torch.tensor(THICKNESS, dtype=F64), torch.tensor(ATTENUATION, dtype=F64)]


def test_cuda_non_default_stream_matches_default_stream():
    cpu_inputs = stream_inputs()
    src = [x.cuda() for x in cpu_inputs]
    torch.cuda.synchronize()
    expected = forward_backward_both(*[x.clone().requires_grad_(True) for x in src])
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        # a long kernel first, then the inputs made on s: a kernel that ran
        # on another stream would read them before they exist
        torch.cuda._sleep(100_000_000)
        fresh = [x.clone().requires_grad_(True) for x in src]
        got = forward_backward_both(*fresh)
        got = [x.clone() for x in got]
    torch.cuda.synchronize()
    assert_all_close(got, expected, what="stream s vs default stream", rtol=1e-12)
    assert_all_close(got, forward_backward_both(*[x.clone().requires_grad_(True) for x in cpu_inputs]), what="stream s vs CPU")


# --------------------------------------------------------------------------
# CPU scalars and Python floats with CUDA tensors


@pytest.mark.parametrize("grad_of", ["thickness", "attenuation_length"])
def test_cuda_cpu_scalar_arguments_work_and_their_gradients_stay_on_cpu(grad_of):
    intensity, pixels = absorption_base((9, 10), 40)
    odet = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    I, P, O = intensity.cuda(), pixels.cuda(), odet.cuda()
    g = torch.randn(9, 10, generator=gen(41), dtype=F64).cuda()
    for oversample in (True, False):
        t_cpu = torch.tensor(450e-6, dtype=F64, requires_grad=grad_of == "thickness")
        a_cpu = torch.tensor(234e-6, dtype=F64, requires_grad=grad_of == "attenuation_length")
        t_cuda = t_cpu.detach().cuda().requires_grad_(t_cpu.requires_grad)
        a_cuda = a_cpu.detach().cuda().requires_grad_(a_cpu.requires_grad)
        mixed = nanobragg_ops.detector_absorption(I, P, O, t_cpu, a_cpu, 4, oversample)
        alldev = nanobragg_ops.detector_absorption(I, P, O, t_cuda, a_cuda, 4, oversample)
        floats = nanobragg_ops.detector_absorption(I, P, O, 450e-6, 234e-6, 4, oversample)
        ops_mixed = torch.ops.nanobragg.detector_absorption(I, P, O, t_cpu.detach(), a_cpu.detach(), 4, oversample, False)
        assert mixed.device.type == "cuda", f"output on {mixed.device}"
        assert_close_rel(mixed, alldev, rtol=1e-14, what="CPU scalars vs CUDA scalars")
        assert_close_rel(floats, alldev, rtol=1e-14, what="Python floats vs CUDA scalars")
        assert_close_rel(ops_mixed, alldev, rtol=1e-14, what="torch.ops with CPU scalars")
        leaf_cpu = t_cpu if grad_of == "thickness" else a_cpu
        leaf_cuda = t_cuda if grad_of == "thickness" else a_cuda
        (got,) = torch.autograd.grad(mixed, leaf_cpu, g)
        (want,) = torch.autograd.grad(alldev, leaf_cuda, g)
        assert got.device.type == "cpu", f"gradient of a CPU {grad_of} came back on {got.device}"
        assert got.shape == torch.Size([]), f"gradient shape {tuple(got.shape)}"
        assert_close_rel(got, want, rtol=1e-12, what=f"gradient of CPU {grad_of}")
        assert want.abs().item() > 0


def test_cuda_cpu_scalar_gradients_stay_on_cpu_under_vmap_of_an_empty_batch():
    # A batch of size 0 runs no kernel (the results' shapes come from the Meta
    # kernels), and its gradients still go where the backends put them.
    intensity, pixels = absorption_base((4, 5), 42)
    I, P = intensity.cuda(), pixels.cuda()
    O = torch.tensor([0.0, 0.0, 1.0], dtype=F64).cuda()
    t, a = torch.tensor(450e-6, dtype=F64), torch.tensor(234e-6, dtype=F64)

    def backward(go):
        return torch.ops.nanobragg.detector_absorption_backward(go, I, P, O, t, a, 4, True, False, [True] * 5)

    grads = torch.func.vmap(backward)(torch.ones(0, 4, 5, dtype=F64).cuda())
    assert [x.device.type for x in grads] == ["cuda", "cuda", "cuda", "cpu", "cpu"]
    assert [tuple(x.shape) for x in grads] == [(0, 4, 5), (0, 4, 5, 3), (0, 3), (0,), (0,)]


@pytest.mark.parametrize("scalar_dtype", [torch.float16, torch.bfloat16, torch.float32, F64],
                         ids=["float16", "bfloat16", "float32", "float64"])
def test_cuda_gpu_held_scalars_of_every_floating_dtype_match_cpu(scalar_dtype):
    # odet, thickness and attenuation_length on the GPU in their own dtype
    # (odet a strided view) are read by the kernels themselves, one branch
    # per dtype (ScalarArg): the same values, and gradients, as the CPU's
    # host-read scalars of that dtype, with float64 data.
    intensity, pixels = absorption_base((9, 10), 60)
    odet_wide = torch.tensor([[0.1, 7.0], [-0.05, 7.0], [1.0, 7.0]], dtype=scalar_dtype)
    g = torch.randn(9, 10, generator=gen(61), dtype=F64)
    results = {}
    for device in ("cpu", "cuda"):
        leaves = [intensity.to(device), pixels.to(device), odet_wide.to(device)[:, 0],
                  torch.tensor(THICKNESS, dtype=scalar_dtype, device=device),
                  torch.tensor(ATTENUATION, dtype=scalar_dtype, device=device)]
        assert not leaves[2].is_contiguous()
        leaves = [x.detach().requires_grad_(True) for x in leaves]
        out = nanobragg_ops.detector_absorption(*leaves, 4, True)
        grads = torch.autograd.grad(out, leaves, g.to(device))
        results[device] = [out, *grads]
    torch.cuda.synchronize()
    names = ["output", "d/dintensity", "d/dpixel_coords", "d/dodet", "d/dthickness",
             "d/dattenuation_length"]
    for name, got, want in zip(names, results["cuda"], results["cpu"]):
        assert got.dtype == want.dtype, f"{name}: {got.dtype} on CUDA, {want.dtype} on CPU"
        # The scalars' gradients come back in their own (maybe half) dtype:
        # rounded from the same float64 value on both devices.
        assert_close_rel(got, want, what=f"{name}, scalars in {scalar_dtype}")
    assert results["cpu"][0].dtype == F64
    assert results["cpu"][4].dtype == scalar_dtype


@pytest.mark.parametrize(
    "bad",
    [dict(thickness=-1e-4), dict(thickness=math.nan), dict(thickness=math.inf),
     dict(attenuation_length=0.0), dict(attenuation_length=-2e-4), dict(attenuation_length=math.nan)],
    ids=["thickness-negative", "thickness-nan", "thickness-inf",
         "attenuation-zero", "attenuation-negative", "attenuation-nan"],
)
def test_cuda_invalid_scalar_on_cuda_gives_nan_on_cpu_raises(bad):
    intensity, pixels = absorption_base((5, 6), 50)
    args = dict(intensity=intensity.cuda(), pixel_coords=pixels.cuda(),
                odet=torch.tensor([0.0, 0.0, 1.0], dtype=F64, device="cuda"),
                thickness=THICKNESS, attenuation_length=ATTENUATION, thicksteps=3, oversample_thick=True)
    (name, value), = bad.items()
    # Held on the GPU the value cannot be checked without a synchronisation:
    # the contract is an all-NaN output, and all-NaN derivatives of both
    # orders (the kernels' NaN step), not a crash or a plausible number.
    on_gpu = dict(args, **{name: torch.tensor(value, dtype=F64, device="cuda")})
    on_gpu["thickness"] = torch.as_tensor(on_gpu["thickness"], dtype=F64, device="cuda")
    on_gpu["attenuation_length"] = torch.as_tensor(on_gpu["attenuation_length"], dtype=F64, device="cuda")
    names = ("intensity", "pixel_coords", "odet", "thickness", "attenuation_length")
    leaves = [on_gpu[k].detach().requires_grad_(True) for k in names]
    g = gen(51)
    out_cotangent = torch.randn(5, 6, generator=g, dtype=F64).cuda().requires_grad_(True)
    first_cotangents = [torch.randn(x.shape, generator=g, dtype=F64).cuda() for x in leaves]

    def fn(*xs):
        return nanobragg_ops.detector_absorption(*xs, 3, True)

    results = all_orders(fn, leaves, out_cotangent, first_cotangents)
    torch.cuda.synchronize()
    what = ["output"] + [f"d/d{k}" for k in names] + [f"d2/d{k}" for k in names] + ["d2/dgrad_output"]
    assert len(results) == len(what)
    assert results[0].shape == (5, 6)
    for r, w in zip(results, what):
        assert torch.isnan(r).all(), f"{name}={value} on CUDA: {w} not all NaN: {r.cpu()}"
    # A CPU scalar or a Python float is checked on the host: an error naming it.
    for held in (torch.tensor(value, dtype=F64), value):
        call = dict(args, **{name: held})
        with pytest.raises(RuntimeError, match=rf"nanobragg::detector_absorption: argument '{name}'"):
            nanobragg_ops.detector_absorption(**call)
            torch.cuda.synchronize()


def test_cuda_arguments_on_the_other_device_are_clear_errors():
    """Real CPU/CUDA mixes, which the kernels' own checks see (the CPU suites
    can only pair the CPU with the Meta device). PyTorch's scalar rule lets
    0-dim CPU lengths join CUDA data, and nothing else."""
    grid, hkl = tricubic_grid(80), tricubic_points(20, 81)
    for g, h in ((grid.cuda(), hkl), (grid, hkl.cuda())):
        with pytest.raises(RuntimeError, match=r"nanobragg::tricubic_interp: argument 'hkl' must be on the device of 'grid'"):
            nanobragg_ops.tricubic_interp(g, h, INDEX_MIN)
    g_out = torch.ones(20, dtype=F64)
    with pytest.raises(RuntimeError, match=r"nanobragg::tricubic_interp_backward: argument 'grad_output' must be on the device of 'grid'"):
        TRICUBIC_BACKWARD(g_out, grid.cuda(), hkl.cuda(), list(INDEX_MIN), "default", [True, True])
    with pytest.raises(RuntimeError, match=r"nanobragg::tricubic_interp_double_backward: argument 'grad_grad_hkl' must be on the device of 'hkl'"):
        TRICUBIC_DOUBLE_BACKWARD(None, hkl, g_out.cuda(), grid.cuda(), hkl.cuda(), list(INDEX_MIN), "default",
                                 [True, True, True])

    intensity, pixels = absorption_base((5, 6), 82)
    odet = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    data = dict(intensity=intensity.cuda(), pixel_coords=pixels.cuda(), odet=odet.cuda(),
                thickness=torch.tensor(THICKNESS, dtype=F64, device="cuda"),
                attenuation_length=torch.tensor(ATTENUATION, dtype=F64, device="cuda"))
    op = torch.ops.nanobragg.detector_absorption
    wrong = [
        ("pixel_coords", pixels, r"argument 'pixel_coords' must be on the device of 'intensity'"),
        ("odet", odet, r"argument 'odet' must be on the device of 'intensity'"),
        # a [1]-shaped CPU length is not a 0-dim scalar
        ("thickness", torch.tensor([THICKNESS], dtype=F64),
         r"argument 'thickness' must be on the device of 'intensity' \(cuda:0\) or a 0-dim CPU tensor"),
    ]
    for name, value, message in wrong:
        with pytest.raises(RuntimeError, match=rf"nanobragg::detector_absorption: {message}"):
            op(**dict(data, **{name: value}), thicksteps=3, oversample_thick=True)
    # CUDA scalars with CPU data
    cpu = dict(intensity=intensity, pixel_coords=pixels, odet=odet,
               thickness=torch.tensor(THICKNESS, dtype=F64), attenuation_length=torch.tensor(ATTENUATION, dtype=F64))
    with pytest.raises(RuntimeError, match=r"argument 'attenuation_length' must be on the device of 'intensity' \(cpu\)"):
        op(**dict(cpu, attenuation_length=data["attenuation_length"]), thicksteps=3, oversample_thick=True)
    inputs = [data[k] for k in ("intensity", "pixel_coords", "odet", "thickness", "attenuation_length")]
    with pytest.raises(RuntimeError, match=r"nanobragg::detector_absorption_backward: argument 'grad_output' must be on the device of 'intensity'"):
        torch.ops.nanobragg.detector_absorption_backward(torch.ones(5, 6, dtype=F64), *inputs, 3, True, False, [True] * 5)
    with pytest.raises(RuntimeError, match=r"nanobragg::detector_absorption_double_backward: argument 'grad_grad_pixel_coords' must be on the device of 'pixel_coords'"):
        torch.ops.nanobragg.detector_absorption_double_backward(
            None, pixels, None, None, None, torch.ones(5, 6, dtype=F64, device="cuda"), *inputs, 3, True, False, [True] * 6)


# --------------------------------------------------------------------------
# no host synchronisation


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_cuda_ops_do_not_synchronise(det):
    make_t = tricubic_case("contiguous", "nearest", n=2000)
    make_a = absorption_case(per_layer=True, oversample=False, shape=(20, 30))
    make_b = absorption_case(per_layer=False, oversample=True, shape=(20, 30))
    prepared = [make("cuda") for make in (make_t, make_a, make_b)]  # built before the mode is on
    results = []
    with deterministic(det):
        with sync_debug_error():
            for fn, inputs, g, w in prepared:
                results.append(all_orders(fn, inputs, g, w))
    torch.cuda.synchronize()
    # and they are right: against the CPU
    for make, got, name in zip((make_t, make_a, make_b), results, ("tricubic", "absorption per-layer", "absorption")):
        assert_all_close(got, run_on("cpu", make), what=f"{name} under sync debug mode")


# --------------------------------------------------------------------------
# CUDA graphs and torch.compile(mode="reduce-overhead")

S_IMG, F_IMG = 24, 32
N_IMG = S_IMG * F_IMG


def training_step(grid, thickness, hkl, pixels, odet, att, weight):
    F = nanobragg_ops.tricubic_interp(grid, hkl, INDEX_MIN, 0.0, "nearest")
    image = (F**2).reshape(S_IMG, F_IMG)
    out = nanobragg_ops.detector_absorption(image, pixels, odet, thickness, att, 3, True)
    return (out * weight).sum()


def step_data(seed):
    """New (hkl, pixels, weight) for one step, on CUDA."""
    _, pixels = absorption_base((S_IMG, F_IMG), seed)
    hkl = tricubic_points(N_IMG, seed + 1, outside=N_IMG // 10)
    weight = torch.rand(S_IMG, F_IMG, generator=gen(seed + 2), dtype=F64) / N_IMG
    return [hkl.cuda(), pixels.cuda(), weight.cuda()]


def initial_params():
    grid = tricubic_grid(60).cuda().requires_grad_(True)
    thickness = torch.tensor(THICKNESS, dtype=F64, device="cuda", requires_grad=True)
    return grid, thickness


def make_optimizer(grid, thickness):
    # thickness gets a tiny step: its gradient is ~1e4 and it must stay > 0
    return torch.optim.SGD([{"params": [grid], "lr": 0.05}, {"params": [thickness], "lr": 1e-12}])


def constants():
    odet = torch.tensor([0.05, -0.02, 1.0], dtype=F64)
    return (odet / odet.norm()).cuda(), torch.tensor(ATTENUATION, dtype=F64, device="cuda")


def test_cuda_graph_capture_of_a_training_step_matches_eager():
    odet, att = constants()
    grid, thickness = initial_params()
    opt = make_optimizer(grid, thickness)
    static_hkl, static_pixels, static_weight = step_data(61)

    def step():
        return training_step(grid, thickness, static_hkl, static_pixels, odet, att, static_weight)

    # warm-up on a side stream (the documented whole-network capture pattern)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = step()
            loss.backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)

    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        static_loss = step()
        static_loss.backward()
        opt.step()
    torch.cuda.synchronize()

    # eager twin from the same starting parameters (capture ran nothing)
    e_grid = grid.detach().clone().requires_grad_(True)
    e_thickness = thickness.detach().clone().requires_grad_(True)
    e_opt = make_optimizer(e_grid, e_thickness)
    for it in range(3):
        data = step_data(100 + 10 * it)
        static_hkl.copy_(data[0])
        static_pixels.copy_(data[1])
        static_weight.copy_(data[2])
        g.replay()
        torch.cuda.synchronize()
        e_opt.zero_grad(set_to_none=True)
        e_loss = training_step(e_grid, e_thickness, *data[:2], odet, att, data[2])
        e_loss.backward()
        e_opt.step()
        torch.cuda.synchronize()
        assert_close_rel(static_loss, e_loss, rtol=1e-12, what=f"replay {it}: loss")
        assert_close_rel(grid, e_grid, rtol=1e-12, what=f"replay {it}: grid after the step")
        assert_close_rel(thickness, e_thickness, rtol=1e-12, what=f"replay {it}: thickness after the step")
        assert_close_rel(grid.grad, e_grid.grad, rtol=1e-11, what=f"replay {it}: grid gradient")
        assert_close_rel(thickness.grad, e_thickness.grad, rtol=1e-11, what=f"replay {it}: thickness gradient")
    assert e_grid.grad.abs().sum() > 0 and e_thickness.grad.abs() > 0


def test_cuda_torch_compile_reduce_overhead_uses_cudagraphs_and_matches_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    odet, att = constants()
    # fullgraph: a graph break would leave the ops running eagerly, outside any
    # CUDA graph, and this test would still pass.
    compiled = torch.compile(training_step, mode="reduce-overhead", fullgraph=True)
    grid, thickness = initial_params()
    e_grid = grid.detach().clone().requires_grad_(True)
    e_thickness = thickness.detach().clone().requires_grad_(True)
    lr = 0.05
    for it in range(4):
        data = step_data(200 + 10 * it)
        torch.compiler.cudagraph_mark_step_begin()
        loss = compiled(grid, thickness, data[0], data[1], odet, att, data[2])
        loss.backward()
        c_loss = loss.detach().clone()
        e_loss = training_step(e_grid, e_thickness, data[0], data[1], odet, att, data[2])
        e_loss.backward()
        assert_close_rel(c_loss, e_loss, rtol=1e-12, what=f"step {it}: loss")
        assert_close_rel(grid.grad, e_grid.grad, rtol=1e-11, what=f"step {it}: grid gradient")
        assert_close_rel(thickness.grad, e_thickness.grad, rtol=1e-11, what=f"step {it}: thickness gradient")
        with torch.no_grad():  # the optimizer step, eager on both
            for p, q, rate in ((grid, e_grid, lr), (thickness, e_thickness, 1e-12)):
                p -= rate * p.grad
                q -= rate * q.grad
                p.grad = None
                q.grad = None
    skips = counters["inductor"]["cudagraph_skips"]
    assert skips == 0, f"inductor skipped cudagraphs {skips} time(s); see the cudagraphs log"
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])


# --------------------------------------------------------------------------
# reliability: concurrent callers, float32 edges


def test_cuda_concurrent_callers_get_the_serial_results():
    cpu_inputs = stream_inputs(shape=(50, 60), seed=70)
    src = [x.cuda() for x in cpu_inputs]
    serial = forward_backward_both(*[x.clone().requires_grad_(True) for x in src])
    torch.cuda.synchronize()
    results: dict[tuple[int, int], list] = {}
    errors: list[BaseException] = []

    def worker(t):
        try:
            for r in range(4):
                out = forward_backward_both(*[x.clone().requires_grad_(True) for x in src])
                torch.cuda.synchronize()
                results[(t, r)] = out
        except BaseException as e:  # reported below, with the thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, f"a thread raised: {errors[0]!r}"
    assert len(results) == 16
    for key, got in results.items():
        # the grid gradient's atomics may add in another order: a tolerance
        assert_all_close(got, serial, what=f"thread/round {key}", rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["default", "nearest"])
def test_cuda_nonfinite_and_huge_coordinates_get_default(dtype, mode):
    grid = tricubic_grid(80)
    bad = [math.nan, math.inf, -math.inf, 1e30, -1e30]
    if dtype == F64:
        bad += [1e308, -1e308]
    rows = []
    for v in bad:
        for axis in range(3):
            row = [0.5, 0.5, 0.5]
            row[axis] = v
            rows.append(row)
    hkl = torch.tensor(rows, dtype=F64)
    out = nanobragg_ops.tricubic_interp(grid.to("cuda", dtype), hkl.to("cuda", dtype), INDEX_MIN, 42.0, mode)
    assert torch.equal(out.cpu(), torch.full((len(rows),), 42.0, dtype=dtype)), out.cpu()
    gr = grid.to("cuda", dtype).requires_grad_(True)
    h = hkl.to("cuda", dtype).requires_grad_(True)
    gg, gh = torch.autograd.grad(nanobragg_ops.tricubic_interp(gr, h, INDEX_MIN, 42.0, mode).sum(), (gr, h))
    assert gg.abs().max().item() == 0.0 and gh.abs().max().item() == 0.0


def test_cuda_index_min_near_int64_limits_never_indexes_out_of_bounds():
    big, small = 2**63 - 1, -(2**63)
    grid = (torch.rand(5, 5, 5, generator=gen(81), dtype=F64) * 9 + 1).cuda()
    hkl = torch.tensor(
        [[0.5, 0.5, 0.5], [1e19, -1e19, 9.2e18], [-9.2e18, 3.0, 2.0], [2.0**63, 2.0**63, 2.0**63]], dtype=F64
    ).cuda()
    for imin in ((big - 2,) * 3, (small,) * 3, (big, small, 0)):
        for mode in ("default", "nearest"):
            out = nanobragg_ops.tricubic_interp(grid, hkl, imin, -3.0, mode).cpu()
            # every row is out on some axis, 2^63 (exact in double, past
            # int64) included: test_tricubic_forward.cpp works them out
            assert torch.equal(out, torch.full((4,), -3.0, dtype=F64)), f"{imin} {mode}: {out}"
    torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["default", "nearest"])
def test_cuda_float32_integers_and_stencil_boundaries_match_cpu(mode):
    # index_min (0, 0, 0), grid 8^3: the stencil fits for 1 <= x < 5 (n + 2 <= 7)
    grid = torch.rand(8, 8, 8, generator=gen(82)) * 1e3
    last = torch.nextafter(torch.tensor(5.0), torch.tensor(0.0)).item()  # float32's last below 5
    vals = [1.0, 2.0, 4.0, last, 5.0, 0.999999, 1.000001, 4.999999, 6.0, 6.5, 7.0, 7.49, 7.5]
    rows = [[a, b, c] for a in vals for b in (1.0, 3.5, last) for c in (2.0, 4.999999)]
    hkl = torch.tensor(rows, dtype=torch.float32)

    def run(device):
        gr = grid.detach().to(device).requires_grad_(True)
        h = hkl.detach().to(device).requires_grad_(True)
        out = nanobragg_ops.tricubic_interp(gr, h, (0, 0, 0), -1.0, mode)
        w = torch.linspace(-1, 1, out.numel(), device=device)
        return [out] + list(torch.autograd.grad((out * w).sum(), (gr, h)))

    got, want = run("cuda"), run("cpu")
    for a, b, what in zip(got, want, ("value", "grid gradient", "hkl gradient")):
        assert torch.isfinite(a).all(), f"{what}: non-finite on CUDA"
        # float32 sums of 64 terms of up to ~1e3, relative to the largest entry
        assert_close_rel(a, b, rtol=1e-4, floor_frac=1.0, what=f"float32 boundary {what}")
    # which points take the default (the stencil decision) must agree exactly
    assert torch.equal(got[0].cpu() == -1.0, want[0] == -1.0)


# (pixels, thickness, attenuation_length), odet = +z, |p| ~ 0.1 so rho ~ z / 0.1.
# L a = thickness / (attenuation_length rho) is the whole sensor's exponent.
GRAZING_CASES = {
    # rho from 1.4e-3 down to the 1e-10 clamp with thickness / attenuation 1.5:
    # L a >= 1e3, every pixel saturates (capture 1 or 0, and every gradient
    # but intensity's exactly 0); what this tests is that nothing overflows.
    "clamped": ([[0.1, 0.0, 1e-7], [0.1, 0.0, 1e-12], [0.1, 0.0, 0.0], [0.05, 0.05, 1e-4]], 3e-4, 2e-4),
    # rho 8e-3, 2e-3, 5e-4, 2e-4 with thickness / attenuation 0.01: L a = 1.25,
    # 5, 20, 50, grazing but not saturated, so the gradients are numbers.
    "moderate": ([[0.06, 0.08, 8e-4], [0.08, -0.06, 2e-4], [-0.06, 0.08, 5e-5], [-0.08, -0.06, 2e-5]], 3e-4, 3e-2),
}


@pytest.mark.parametrize("case", list(GRAZING_CASES))
@pytest.mark.parametrize("oversample", [True, False])
def test_cuda_float32_grazing_parallax_stays_finite_and_matches_cpu(oversample, case):
    pixels, thickness, attenuation = GRAZING_CASES[case]
    P = torch.tensor(pixels, dtype=torch.float32)
    inputs = [torch.ones(4), P, torch.tensor([0.0, 0.0, 1.0]), torch.tensor(thickness), torch.tensor(attenuation)]

    def run(device):
        xs = [x.detach().to(device).requires_grad_(True) for x in inputs]
        out = nanobragg_ops.detector_absorption(*xs, 4, oversample)
        return [out] + list(torch.autograd.grad(out.sum(), xs))

    got, want = run("cuda"), run("cpu")
    if case == "moderate":
        rho = P[:, 2].double() / P.double().norm(dim=-1)
        La = thickness / (attenuation * rho)
        assert ((1e-4 < rho) & (rho < 1e-2) & (1 < La) & (La < 80)).all(), (rho, La)
        # every entry of every gradient a nonzero float32 number on the CPU
        for i, b in enumerate(want[1:], start=1):
            assert torch.isfinite(b).all() and (b != 0).all(), f"result {i} on the CPU: {b}"
    # moderate: each entry against its own size (the CPU's float32 differs
    # from float64 by 2e-6 at most); clamped: mostly exact zeros
    floor_frac = 0.0 if case == "moderate" else 1e-3
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), f"result {i} non-finite on CUDA: {a.cpu()}"
        assert_close_rel(a, b, rtol=1e-4, floor_frac=floor_frac, what=f"float32 grazing {case} result {i}")
