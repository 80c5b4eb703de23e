"""Memory at scale, on CPU (docs/CONTRACT.md §3: nothing per point or per layer
is materialised; the extra memory is the output and the input gradients plus
a small constant).

Each case runs in a fresh Python process (memory_child.py), so that nothing
this session allocated, cached or freed hides or adds to it. The child builds
the inputs, then measures the growth of its peak resident set over one call.
These are memory tests: no time limits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nanobragg_ops

CHILD = Path(__file__).resolve().parent / "memory_child.py"
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(),
                                reason="measures the resident set through Linux's /proc")
MB = 10**6
MIB = 2**20


def run_child(*args) -> dict:
    env = dict(os.environ)
    # The child loads the same package and library as this process.
    package_root = str(Path(nanobragg_ops.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["NANOBRAGG_OPS_LIBRARY"] = str(nanobragg_ops.library_path)
    proc = subprocess.run([sys.executable, str(CHILD), *map(str, args)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"memory child {args} failed:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(r: dict) -> str:
    how = "" if r["hwm_reset"] else " (VmHWM could not be reset: an upper bound)"
    return f"grew {r['growth_bytes'] / MIB:.1f} MiB{how}; {r}"


def assert_at_most(r: dict, bound: float) -> None:
    """growth <= bound, where the call's own peak could be measured; where
    VmHWM could not be reset the growth includes what the process held at
    its peak before the call, and an upper bound says nothing: skip."""
    if not r["hwm_reset"]:
        pytest.skip("VmHWM could not be reset (/proc/self/clear_refs refused): "
                    "the call's own peak cannot be told from the process's")
    assert r["growth_bytes"] <= bound, f"bound {bound / MIB:.1f} MiB, " + describe(r)


def test_measurement_sees_a_known_allocation():
    # Without this, a blind measurement (always ~0) would pass every bound.
    r = run_child("allocate", 256)
    assert r["allocated_bytes"] == 256 * MIB
    assert 256 * MIB <= r["growth_bytes"], describe(r)
    assert_at_most(r, 256 * MIB + 16 * MB)


def tricubic_bound(r: dict) -> float:
    """The output and both gradients, the grid gradient's workspace (at most
    16 lanes, each a partial grid and half a grid of block sums, within
    256 MiB: tricubic_cpu.cpp, grid_grad_lane_count) and a small constant. A
    copy of the expanded output gradient (4 bytes a point), or any per-point
    array, would not fit."""
    grid = r["grid_grad_bytes"]
    workspace = min(16 * 1.5 * grid, 256 * MIB)
    return r["output_bytes"] + r["hkl_grad_bytes"] + grid + workspace + 64 * MB


def test_tricubic_forward_backward_2048x2048x9_float32():
    # 37.7 M points: output 151 MB, hkl gradient 453 MB.
    r = run_child("tricubic", "fused", 2048, 9)
    assert r["points"] == 2048 * 2048 * 9
    assert_at_most(r, tricubic_bound(r))
    # the bound is below what one more array of a float per point would take
    assert tricubic_bound(r) < r["growth_bytes"] + 4 * r["points"]


def test_tricubic_bound_rejects_a_gathered_neighbourhood():
    # The same bound fails the PyTorch port's formulation ([N, 4, 4, 4]
    # gathered, ~1.5 kB per point with autograd's copies) at 1 M points, far
    # from the scale above: the bound tells materialising from not.
    r = run_child("tricubic", "gather", 1024, 1)
    assert r["hwm_reset"], "VmHWM could not be reset: the growth is only an upper bound"
    bound = tricubic_bound(r)
    assert r["growth_bytes"] > 4 * bound, f"bound {bound / MIB:.1f} MiB, " + describe(r)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("per_layer", [False, True], ids=["shared", "per_layer"])
@pytest.mark.parametrize("oversample_thick", [True, False])
def test_absorption_4096x4096_16_layers_float32(oversample_thick, per_layer, backward):
    # 16.8 M pixels: output 67 MB; nothing per layer (1.1 GB) or per pixel
    # (67 MB) may be materialised beyond the output and the gradients
    # (forward_backward: every input needs one; the intensity's is per layer
    # with per_layer).
    r = run_child("absorption", 4096, 16, int(oversample_thick), int(per_layer), int(backward))
    assert r["pixels"] == 4096 * 4096
    assert (r["grad_bytes"] > 0) == backward
    assert_at_most(r, r["output_bytes"] + r["grad_bytes"] + 32 * MB)
