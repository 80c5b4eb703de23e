"""tricubic_interp from Python: gradcheck, opcheck, TorchScript, torch.compile."""

from __future__ import annotations


import pytest
import torch

import nanobragg_ops
from conftest import deterministic as deterministic_algorithms

# torch 2.11 deprecates TorchScript (the design card still supports it); its
# tests expect the warning instead of hiding it.
JIT_DEPRECATION = r"`torch\.jit\.script` is deprecated"

INDEX_MIN = (-3, 1, 2)
OP = torch.ops.nanobragg.tricubic_interp.default
BACKWARD_OP = torch.ops.nanobragg.tricubic_interp_backward.default


def make_inputs(device, dtype=torch.float64, n=40, outside=8, seed=0):
    """A grid and points whose coordinates stay >= 0.1 away from integers (the
    derivative jumps there); the first `outside` points leave the grid on h.
    Of those, the first half (at least one) lie within 0.4 of the first or the
    last node: outside the stencil's range but inside "nearest"'s, which gives
    them the nearest node's value (`default` gives them default_value); their
    k and l stay >= 0.1 from x.5, where nearest rounding (ceil(x - 0.5)) jumps,
    so a finite-difference step never crosses a jump. The rest lie beyond the
    nearest range too (default_value in both modes)."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(7, 8, 9, generator=gen, dtype=torch.float64) * 9 + 1
    cols = []
    for d, size in enumerate(grid.shape):
        ints = torch.randint(INDEX_MIN[d] + 1, INDEX_MIN[d] + size - 2, (n,), generator=gen)
        frac = torch.rand(n, generator=gen, dtype=torch.float64) * 0.8 + 0.1
        cols.append(ints + frac)
    hkl = torch.stack(cols, dim=-1)
    hkl[:outside, 0] += grid.shape[0] + 0.5
    near = (outside + 1) // 2
    if near:
        # h = first or last node + [-0.4, 0.4] (alternating): the stencil needs
        # first + 1 <= h < last - 1, the nearest node is inside for |offset| < 0.5
        first, last = INDEX_MIN[0], INDEX_MIN[0] + grid.shape[0] - 1
        node = torch.tensor([first if i % 2 == 0 else last for i in range(near)], dtype=torch.float64)
        hkl[:near, 0] = node + torch.rand(near, generator=gen, dtype=torch.float64) * 0.8 - 0.4
        hkl[:near, 1:] = hkl[:near, 1:].floor() + 0.1 + torch.rand(near, 2, generator=gen, dtype=torch.float64) * 0.3
    return grid.to(device, dtype), hkl.to(device, dtype)


def assert_nearest_differs(grid, hkl, default_value=0.0):
    """The inputs hold points where "nearest" and "default" differ, so that a
    test run in "nearest" mode checks nearest-mode points."""
    near = OP(grid.detach(), hkl.detach(), list(INDEX_MIN), default_value, "nearest")
    dflt = OP(grid.detach(), hkl.detach(), list(INDEX_MIN), default_value, "default")
    assert (near != dflt).any(), "no point where nearest and default differ"


def test_op_is_registered():
    assert nanobragg_ops.tricubic_interp.__doc__
    for key in ("CPU", "Meta", "Autograd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("nanobragg::tricubic_interp", key)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            "nanobragg::tricubic_interp_backward", key
        )


@pytest.mark.parametrize("mode", ["default", "nearest"])
def test_gradcheck(device, mode):
    grid, hkl = make_inputs(device)
    if mode == "nearest":
        assert_nearest_differs(grid, hkl, -1.0)
    grid.requires_grad_(True)
    hkl.requires_grad_(True)

    def f(g, h):
        return nanobragg_ops.tricubic_interp(g, h, INDEX_MIN, -1.0, mode)

    assert torch.autograd.gradcheck(f, (grid, hkl), eps=1e-6, atol=1e-7, rtol=1e-6, check_forward_ad=True)


@pytest.mark.parametrize("mode", ["default", "nearest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, mode, dtype, requires_grad):
    grid, hkl = make_inputs(device, dtype)
    if mode == "nearest":
        assert_nearest_differs(grid, hkl, 0.5)
    grid.requires_grad_(requires_grad)
    hkl.requires_grad_(requires_grad)
    torch.library.opcheck(OP, (grid, hkl, list(INDEX_MIN), 0.5, mode))


@pytest.mark.parametrize("mask", [[True, True], [True, False], [False, True]])
def test_opcheck_backward(device, mask):
    grid, hkl = make_inputs(device)
    assert_nearest_differs(grid, hkl)
    grad = torch.randn(hkl.shape[:-1], dtype=grid.dtype, device=device)
    torch.library.opcheck(BACKWARD_OP, (grad, grid, hkl, list(INDEX_MIN), "nearest", mask))


def test_wrapper_matches_torch_ops(device):
    grid, hkl = make_inputs(device)
    assert_nearest_differs(grid, hkl, 2.0)
    a = nanobragg_ops.tricubic_interp(grid, hkl, INDEX_MIN, 2.0, "nearest")
    b = torch.ops.nanobragg.tricubic_interp(grid, hkl, list(INDEX_MIN), 2.0, "nearest")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("deterministic", [False, True])
def test_torchscript_values_and_gradients(device, deterministic):
    def f(grid: torch.Tensor, hkl: torch.Tensor) -> torch.Tensor:
        return torch.ops.nanobragg.tricubic_interp(grid, hkl, [-3, 1, 2], 0.0, "nearest")

    with pytest.warns(DeprecationWarning, match=JIT_DEPRECATION):  # PyTorch 2.11's, not ours
        scripted = torch.jit.script(f)
    grid, hkl = make_inputs(device)
    assert_nearest_differs(grid, hkl)
    g1, h1 = grid.clone().requires_grad_(), hkl.clone().requires_grad_()
    g2, h2 = grid.clone().requires_grad_(), hkl.clone().requires_grad_()
    out_eager = f(g1, h1)
    out_script = scripted(g2, h2)
    torch.testing.assert_close(out_script, out_eager, rtol=0, atol=0)
    weights = torch.linspace(-1, 1, out_eager.numel(), dtype=grid.dtype, device=device)
    with deterministic_algorithms(deterministic):
        (out_eager * weights).sum().backward()
        (out_script * weights).sum().backward()
    if device == "cuda" and not deterministic:
        # CUDA's default grid gradient scatters with atomicAdd, whose order of
        # addition varies from run to run: equal up to rounding only.
        torch.testing.assert_close(g2.grad, g1.grad, rtol=1e-12, atol=1e-12)
    else:  # the CPU kernel and CUDA's sorted gather are deterministic
        torch.testing.assert_close(g2.grad, g1.grad, rtol=0, atol=0)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=0)  # per point
    assert h1.grad.abs().sum() > 0


def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()

    def loss(grid, hkl, scale):
        values = nanobragg_ops.tricubic_interp(grid, hkl * scale, INDEX_MIN, 0.0, "default")
        return (values**2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    grid, hkl = make_inputs(device, torch.float32)
    scale = torch.tensor(1.0, device=device)
    g1, s1 = grid.clone().requires_grad_(), scale.clone().requires_grad_()
    g2, s2 = grid.clone().requires_grad_(), scale.clone().requires_grad_()
    eager = loss(g1, hkl, s1)
    comp = compiled(g2, hkl, s2)
    torch.testing.assert_close(comp, eager)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(g2.grad, g1.grad)
    torch.testing.assert_close(s2.grad, s1.grad)
    assert g1.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["default", "nearest"])
def test_eleven_unmergeable_point_dims_match_the_flat_points(device, mode):
    """Points over 11 dims of size 2, permuted so that no two neighbouring
    dims merge (hkl and the incoming gradient), more than the kernels' point
    offsets hold (kMaxPointDims, csrc/common/point_offsets.h): values, both
    gradients and the double backward the same, to the bit, as for the same
    points flattened in that order. (The values themselves: polin3 in
    test_tricubic_forward.cpp.)"""
    grid, flat = make_inputs(device, n=2**11, outside=100, seed=5)
    dims = 11
    order = list(reversed(range(dims)))
    hkl = flat.view(*[2] * dims, 3).permute(*order, dims)
    gen = torch.Generator().manual_seed(6)
    grad = torch.rand([2] * dims, generator=gen, dtype=torch.float64).to(device).permute(*order)
    assert not hkl.is_contiguous() and not grad.is_contiguous()
    hkl_flat, grad_flat = hkl.reshape(-1, 3), grad.reshape(-1)

    out = OP(grid, hkl, INDEX_MIN, -2.0, mode)
    assert torch.equal(out.reshape(-1), OP(grid, hkl_flat, INDEX_MIN, -2.0, mode))
    g_grid, g_hkl = BACKWARD_OP(grad, grid, hkl, INDEX_MIN, mode, [True, True])
    f_grid, f_hkl = BACKWARD_OP(grad_flat, grid, hkl_flat, INDEX_MIN, mode, [True, True])
    if device == "cpu":  # (CUDA's grid gradient adds atomically: compared with a tolerance)
        assert torch.equal(g_grid, f_grid)
    torch.testing.assert_close(g_grid, f_grid, rtol=1e-13, atol=1e-13)
    assert torch.equal(g_hkl.reshape(-1, 3), f_hkl)

    double_backward = torch.ops.nanobragg.tricubic_interp_double_backward.default
    gg_hkl = torch.rand(hkl.shape, generator=gen, dtype=torch.float64).to(device).permute(*order, dims)
    gg_grid = torch.rand(grid.shape, generator=gen, dtype=torch.float64).to(device)
    permuted = double_backward(gg_grid, gg_hkl, grad, grid, hkl, INDEX_MIN, mode, [True, True, True])
    flat_ones = double_backward(
        gg_grid, gg_hkl.reshape(-1, 3), grad_flat, grid, hkl_flat, INDEX_MIN, mode, [True, True, True]
    )
    assert torch.equal(permuted[0].reshape(-1), flat_ones[0])
    torch.testing.assert_close(permuted[1], flat_ones[1], rtol=1e-13, atol=1e-13)
    assert torch.equal(permuted[2].reshape(-1, 3), flat_ones[2])


def test_errors_name_the_operator_and_argument(device):
    grid, hkl = make_inputs(device)
    with pytest.raises(RuntimeError, match=r"nanobragg::tricubic_interp: argument 'hkl'.*\[40, 2\]"):
        nanobragg_ops.tricubic_interp(grid, hkl[:, :2], INDEX_MIN)
    with pytest.raises(RuntimeError, match=r"nanobragg::tricubic_interp: argument 'grid'.*float32 or float64"):
        nanobragg_ops.tricubic_interp(grid.long(), hkl, INDEX_MIN)
    with pytest.raises(RuntimeError, match=r"argument 'hkl' must have the dtype of 'grid'"):
        nanobragg_ops.tricubic_interp(grid, hkl.float(), INDEX_MIN)
    with pytest.raises(RuntimeError, match=r"argument 'out_of_range'.*\"sideways\""):
        nanobragg_ops.tricubic_interp(grid, hkl, INDEX_MIN, out_of_range="sideways")
    with pytest.raises(RuntimeError, match=r"argument 'index_min' must have 3 entries"):
        nanobragg_ops.tricubic_interp(grid, hkl, (0, 0))
    # What the wrapper does not convert reaches the schema, whose message
    # names the operator and the argument (no bare TypeError, no truncation).
    with pytest.raises(RuntimeError, match=r"nanobragg::tricubic_interp\(\) .* argument 'index_min'"):
        nanobragg_ops.tricubic_interp(grid, hkl, 1.5)
    for bad in (1j, "0"):
        with pytest.raises(RuntimeError, match=r"nanobragg::tricubic_interp\(\) .* argument 'default_value'"):
            nanobragg_ops.tricubic_interp(grid, hkl, INDEX_MIN, bad)


def test_half_precision_hint_only_where_autocast_helps(device):
    # autocast has kernels for the forward ops only: the backward op's error
    # for a half-precision incoming gradient does not send the user there.
    grid, hkl = make_inputs(device)
    with pytest.raises(RuntimeError, match=r"tricubic_interp: argument 'grid' .*Half .*torch\.autocast"):
        OP(grid.half(), hkl.half(), INDEX_MIN, 0.0, "default")
    half_grad = torch.ones(hkl.shape[0], dtype=torch.half, device=device)
    with pytest.raises(RuntimeError, match=r"tricubic_interp_backward: argument 'grad_output' .*Half") as error:
        BACKWARD_OP(half_grad, grid, hkl, INDEX_MIN, "default", [True, True])
    assert "autocast" not in str(error.value)


def test_wrapper_takes_one_int_index_min_and_numpy_numbers(device):
    # int[3] takes one int for all three, as torch.ops does; NumPy scalars
    # are numbers like Python's.
    np = pytest.importorskip("numpy")
    grid, hkl = make_inputs(device)
    hkl = hkl - torch.tensor(INDEX_MIN, dtype=hkl.dtype, device=device) + 2  # index_min (2, 2, 2)
    expected = OP(grid, hkl, [2, 2, 2], -1.0, "default")
    assert torch.equal(nanobragg_ops.tricubic_interp(grid, hkl, 2, -1.0), expected)
    assert torch.equal(nanobragg_ops.tricubic_interp(grid, hkl, np.int64(2), np.float32(-1.0)), expected)
    assert torch.equal(nanobragg_ops.tricubic_interp(grid, hkl, np.array([2, 2, 2]), np.array(-1.0)), expected)
    assert torch.equal(nanobragg_ops.tricubic_interp(grid, hkl, torch.tensor(2), -1), expected)


@pytest.mark.parametrize("index_min", ["tensor", "tensor entry", "array", "array entry"])
def test_wrapper_rejects_a_fractional_index_min(index_min):
    # PyTorch's argument parser truncates a float tensor's entries given for
    # int[3] (0.7 -> 0, -0.9 -> 0: the grid moved by a node, no error); the
    # wrapper rejects every float tensor or array with the schema's message.
    np = pytest.importorskip("numpy")
    grid, hkl = make_inputs("cpu")
    value = {
        "tensor": torch.tensor([-2.9, 1.0, 2.0]),
        "tensor entry": [torch.tensor(-2.9), 1, 2],
        # float32: np.float64 is a Python float, which the schema rejects
        # itself; np.float32 it would truncate.
        "array": np.array([-2.9, 1.0, 2.0], dtype=np.float32),
        "array entry": [np.float32(-2.9), 1, 2],
    }[index_min]
    with pytest.raises(RuntimeError, match=r"nanobragg::tricubic_interp\(\) .* argument 'index_min'"):
        nanobragg_ops.tricubic_interp(grid, hkl, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["default", "nearest"])
def test_a_point_does_not_depend_on_its_neighbours(mode, dtype):
    """The CPU kernels work on batches of a vector's lanes (8 or 16 points),
    with points whose stencil leaves the grid, NaNs and points on the grid's
    edges mixed in: each point's value and hkl gradient must be the same, to
    the last bit, alone (a batch of one) as among 53 others, wherever in the
    batch it falls."""
    grid, hkl = make_inputs("cpu", dtype, n=53, outside=11, seed=3)
    hkl[20] = float("nan")
    hkl[21, 1] = INDEX_MIN[1] + 1.0  # first point whose stencil fits
    hkl[22, 2] = INDEX_MIN[2] + grid.shape[2] - 2.0  # first that does not
    hkl[23, 0] = INDEX_MIN[0] + 0.5  # nearest node inside, stencil outside
    grad = torch.linspace(-1, 2, hkl.shape[0], dtype=dtype)
    together = OP(grid, hkl, INDEX_MIN, -3.0, mode)
    _, hkl_grad = BACKWARD_OP(grad, grid, hkl, INDEX_MIN, mode, [True, True])
    _, hkl_grad_only = BACKWARD_OP(grad, grid, hkl, INDEX_MIN, mode, [False, True])
    # the NaN point is a default point: default_value, and no hkl gradient
    assert together[20] == -3.0 and hkl_grad[20].tolist() == [0.0, 0.0, 0.0]
    for p in range(hkl.shape[0]):
        alone = OP(grid, hkl[p : p + 1], INDEX_MIN, -3.0, mode)
        assert torch.equal(alone, together[p : p + 1]), p
        _, g = BACKWARD_OP(grad[p : p + 1], grid, hkl[p : p + 1], INDEX_MIN, mode, [True, True])
        assert torch.equal(g, hkl_grad[p : p + 1]), p
    assert torch.equal(hkl_grad, hkl_grad_only)
    # both kinds of point are there (polin3 checks the values: test_tricubic_forward.cpp)
    inside = (hkl[:, 0] >= INDEX_MIN[0] + 1) & (hkl[:, 0] < INDEX_MIN[0] + grid.shape[0] - 2)
    assert 30 < int(inside.sum()) < 50
    # points that took default_value (grid values lie in [1, 10]) and points that did not
    assert int((together == -3.0).sum()) >= 5 and int((together != -3.0).sum()) > 30


def lagrange_weights_f64(u):
    """The 4 Lagrange weights of nodes n-1..n+2 at u, [N, 4] (an independent
    spelling of the formula, for the reference below)."""
    return torch.stack(
        [-u * (u - 1) * (u - 2) / 6, (u + 1) * (u - 1) * (u - 2) / 2,
         -(u + 1) * u * (u - 2) / 2, (u + 1) * u * (u - 1) / 6], dim=-1)


def grid_gradient_reference(grid_shape, hkl, grad):
    """sum_p grad_p w_a w_b w_c scattered into the grid, float64, with
    index_add_: points whose stencil leaves the grid add nothing."""
    hkl = hkl.double()
    n = torch.floor(hkl)
    w = lagrange_weights_f64(hkl - n)  # [N, 3, 4]
    first = (n - 1 - torch.tensor(INDEX_MIN, dtype=torch.float64)).long()
    size = torch.tensor(grid_shape)
    inside = ((first >= 0) & (first + 3 <= size - 1)).all(dim=1)
    out = torch.zeros(grid_shape, dtype=torch.float64)
    offs = torch.arange(4)
    for a in range(4):
        for b in range(4):
            idx = ((first[:, 0] + a) * grid_shape[1] + first[:, 1] + b) * grid_shape[2]
            idx = idx[:, None] + first[:, 2:3] + offs  # [N, 4]
            val = (grad.double() * w[:, 0, a] * w[:, 1, b])[:, None] * w[:, 2, :]
            out.view(-1).index_add_(0, idx[inside].reshape(-1), val[inside].reshape(-1))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_gradient_of_runs_of_points_in_one_cell(dtype):
    """Detector lookups come in runs: neighbouring points fall in the same
    cell, and the CPU kernels sum a run's taps before adding them to the grid
    gradient. Runs of 1 to 40 points in a few cells, with points outside the
    grid and NaNs between them, over several lanes of the deterministic
    reduction: the gradient matches an independent float64 scatter and is
    the same, bitwise, on 1 and on 2 threads."""
    gen = torch.Generator().manual_seed(11)
    grid = torch.rand(7, 8, 9, generator=gen, dtype=torch.float64).to(dtype)
    cells = torch.tensor([[-1.0, 3.0, 4.0], [0.0, 4.0, 5.0], [1.0, 3.0, 6.0], [-1.0, 5.0, 4.0]])
    runs = []
    while sum(len(r) for r in runs) < 30000:
        length = int(torch.randint(1, 41, (1,), generator=gen))
        cell = cells[int(torch.randint(0, 4, (1,), generator=gen))]
        runs.append(cell + torch.rand(length, 3, generator=gen, dtype=torch.float64) * 0.98 + 0.01)
        if int(torch.randint(0, 5, (1,), generator=gen)) == 0:
            runs.append(torch.tensor([[40.0, 4.0, 5.0], [float("nan"), 4.0, 5.0]]))
    hkl = torch.cat(runs).to(dtype)
    grad = (torch.rand(hkl.shape[0], generator=gen, dtype=torch.float64) - 0.3).to(dtype)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append(BACKWARD_OP(grad, grid, hkl, INDEX_MIN, "default", [True, True]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    expected = grid_gradient_reference(tuple(grid.shape), hkl, grad)
    assert float(expected.abs().max()) > 10  # the runs pile up
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(results[0][0].double(), expected, rtol=tol, atol=tol * 1e3)
    grid_only, _ = BACKWARD_OP(grad, grid, hkl, INDEX_MIN, "default", [True, False])
    torch.testing.assert_close(grid_only.double(), expected, rtol=tol, atol=tol * 1e3)
