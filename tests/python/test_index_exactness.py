"""Where a point falls is decided exactly, for any coordinate and index_min
(docs/CONTRACT.md §1 and §3): in float32 along axes longer than 2^24 nodes
(where float32 subtraction of node numbers rounds) and 2^31 (where an int32
node index overflows), and with index_min or coordinates beyond 2^52 (where
double arithmetic on node numbers rounds). The grids are stride-0 views, so
long axes cost little memory; expected values come from Python integers.
The vector path takes batches of points and the per-point path single ones,
so each case runs with 1 and with 40 copies of its point; every case runs on
CPU and on CUDA (where the compiler may fuse a multiply and an add, so the
device's index arithmetic needs the same proof)."""

from __future__ import annotations

import pytest
import torch

import nanobragg_ops

COPIES = [1, 40]


def long_h_axis(size: int, base: int, directory, device: str) -> torch.Tensor:
    """A float32 [size, 4, 4] grid whose value at node h >= base is
    (h - base)^2 (planes constant in k and l). On the CPU its storage maps a
    sparse file in `directory` and only the nodes from `base` are written, so
    an axis of 2^31 nodes takes a few pages of memory and disk, whatever the
    machine's overcommit rules; on a GPU it is `size` floats of device memory
    (8 GiB for 2^31 nodes; the case skips where less is free)."""
    if device == "cpu":
        path = directory / "long_h_axis.f32"
        with open(path, "wb") as f:
            f.truncate(size * 4)
        storage = torch.from_file(str(path), shared=True, size=size, dtype=torch.float32)
    else:
        torch.cuda.empty_cache()  # the caching allocator's blocks count as used
        free, _ = torch.cuda.mem_get_info()
        if free < size * 4 + 2**30:
            pytest.skip(f"{size * 4 / 2**30:.1f} GiB of GPU memory needed, {free / 2**30:.1f} GiB free")
        storage = torch.zeros(size, dtype=torch.float32, device=device)
    storage[base:] = torch.arange(size - base, dtype=torch.float32, device=device) ** 2
    return storage.as_strided((size, 4, 4), (1, 0, 0))


@pytest.mark.parametrize("copies", COPIES)
@pytest.mark.parametrize(
    "size, h",
    [
        (2**24 + 8, 2**24 + 2),  # floor(h) - (h_min + 1) rounds in float32 beyond 2^24
        (2**24 + 8, 2**24 + 4),
        (2**31 + 258, 2**31),  # an int32 first node overflows (it crashed)
        (2**31 + 258, 2**31 - 512),
    ],
    ids=["2^24+2", "2^24+4", "2^31", "2^31-512"],
)
def test_float32_long_axis_picks_the_right_node(size, h, copies, tmp_path, device):
    base = h - 600
    grid = long_h_axis(size, base, tmp_path, device)
    # h is an integer exact in float32: the interpolation is the node's value
    # (the weights are exactly 0, 1, 0, 0 there).
    hkl = torch.tensor([[float(h), 1.5, 1.5]] * copies, dtype=torch.float32, device=device, requires_grad=True)
    out = nanobragg_ops.tricubic_interp(grid, hkl, [0, 0, 0], default_value=-1.0)
    assert out.tolist() == [float((h - base) ** 2)] * copies
    # Cubic Lagrange interpolation reproduces a quadratic: the hkl gradient is
    # (2 (h - base), 0, 0), 2 more than a node too low would give.
    (grad_hkl,) = torch.autograd.grad(out.sum(), hkl)
    want = torch.tensor([[2.0 * (h - base), 0.0, 0.0]] * copies, device=device)
    torch.testing.assert_close(grad_hkl, want, rtol=0, atol=0.1)


@pytest.mark.parametrize("copies", COPIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_index_min_near_2_to_62(dtype, copies, device):
    """index_min = 2^62 and h = 2^62: the stencil would need node 2^62 - 1,
    below the grid, so the point is out of range (in double, 2^62 - 1 is
    2^62 and it looked inside); its nearest node is the grid's first."""
    lo = 2**62
    grid = torch.arange(6 * 6 * 6, dtype=dtype, device=device).reshape(6, 6, 6)
    hkl = torch.tensor([[float(lo), 2.0, 3.0]] * copies, dtype=dtype, device=device)
    default = nanobragg_ops.tricubic_interp(grid, hkl, [lo, 0, 0], default_value=-9.0)
    assert default.tolist() == [-9.0] * copies
    nearest = nanobragg_ops.tricubic_interp(grid, hkl, [lo, 0, 0], default_value=-9.0, out_of_range="nearest")
    assert nearest.tolist() == [float(grid[0, 2, 3])] * copies
    # With the grid one node lower, node 2^62 - 1 is its first: inside, and
    # at an integer h the value is node 2^62's.
    inside = nanobragg_ops.tricubic_interp(grid, hkl, [lo - 1, 0, 0], default_value=-9.0)
    assert inside.tolist() == [float(grid[1, 2, 3])] * copies


@pytest.mark.parametrize("copies", COPIES)
@pytest.mark.parametrize(
    "dtype, x, lo, node",
    [
        # An odd integer between 2^52 and 2^53, the grid's last node: x - 0.5
        # rounds to the even x - 1, whose ceiling is not x. (float32: 2^23.)
        (torch.float64, 2**52 + 5, 2**52, 2**52 + 5),
        (torch.float32, 2**23 + 5, 2**23, 2**23 + 5),
        # Just above -0.5, nearest 0: x - 0.5 rounds to -1.0 in double.
        (torch.float64, -0.49999999999999994, -5, 0),
        (torch.float32, -0.4999999701976776, -5, 0),  # float32's next above -0.5
        # -0.5 itself goes down, as nanoBragg's ceil(x - 0.5).
        (torch.float64, -0.5, -5, -1),
        (torch.float32, -0.5, -5, -1),
        (torch.float64, 1.5, -4, 1),
        (torch.float32, 1.5, -4, 1),
    ],
    ids=[
        "2^52+5-float64",
        "2^23+5-float32",
        "just-above-minus-half-float64",
        "just-above-minus-half-float32",
        "minus-half-float64",
        "minus-half-float32",
        "one-and-a-half-float64",
        "one-and-a-half-float32",
    ],
)
def test_nearest_node_is_exact(dtype, x, lo, node, copies, device):
    """The nearest node ceil(x - 0.5), exactly, for points outside the
    stencil range along h (the grid's h nodes are lo .. lo + 5)."""
    assert torch.tensor(x, dtype=dtype).item() == x  # the coordinate as written
    grid = torch.arange(6 * 6 * 6, dtype=dtype, device=device).reshape(6, 6, 6)
    # Put the point outside the stencil range along k, so only nearest applies.
    hkl = torch.tensor([[x, 5.0, 2.0]] * copies, dtype=dtype, device=device)
    out = nanobragg_ops.tricubic_interp(grid, hkl, [lo, 0, 0], default_value=-9.0, out_of_range="nearest")
    assert out.tolist() == [float(grid[node - lo, 5, 2])] * copies
