#!/usr/bin/env python3
"""How the CUDA grid gradient's work spreads over grid nodes, counted on the CPU.

The deterministic path (csrc/tricubic/tricubic_cuda.cu) gives each grid node
one warp, whose 32 lanes walk the points of the 64 stencils that cover the
node; the atomic path adds each point's 64 taps with atomicAdd. Detector
lookups cluster, so some nodes take far more taps than others. This counts,
for the bench's CUDA workload (bench/workloads.cpp: a 2048² detector, 9
mosaic domains per pixel, a 64³ grid, the cell the GPU goals use), the taps
per node: the gather's warp iterations (a node's taps / 32, rounded up) and
the atomic path's adds to its hottest address, which an L2 slice applies one
after another. No GPU needed; it says where the time can go, not how long it
takes (the GPU bench measures that: `grid_gradient_deterministic` against
`grid_gradient_atomic`).

    .venv/bin/python scripts/gather_work.py   # writes reports/gather_work/<UTC stamp>.md
"""

from __future__ import annotations

import argparse
import math
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GRID = 64  # nodes per axis; Miller indices -32 .. 31
H200_RESIDENT_WARPS = 132 * 64  # SMs × resident warps per SM: the warps that run at once


def rotation(axis: list[float], angle: float) -> torch.Tensor:
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    k = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def points_per_cell(size: int, per_pixel: int, cell: float) -> torch.Tensor:
    """Points per stencil start (cell), [GRID]*3, for workloads.cpp's lookups."""
    c = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2) * 1e-4  # 0.1 mm pixels
    x, y = c.view(1, size).expand(size, size), c.view(size, 1).expand(size, size)
    p = torch.stack([x, y, torch.full((size, size), 0.1, dtype=torch.float64)], -1).view(-1, 3)
    q = p / p.norm(dim=-1, keepdim=True) - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # 1 A
    u = rotation([0.3, -0.5, 0.8], 0.7)
    counts = torch.zeros(GRID**3, dtype=torch.int64)
    for d in range(per_pixel):
        mosaic = torch.eye(3, dtype=torch.float64) if d == 0 else rotation(
            [math.cos(d * 1.3), math.sin(d * 2.1), 0.4], 0.005 * d)
        hkl = cell * q @ (mosaic @ u).t()
        first = torch.floor(hkl).long() - 1 + GRID // 2  # the stencil's first node
        first = first[((first >= 0) & (first <= GRID - 4)).all(-1)]
        counts += torch.bincount((first[:, 0] * GRID + first[:, 1]) * GRID + first[:, 2],
                                 minlength=GRID**3)
    return counts.view(GRID, GRID, GRID)


def taps_per_node(counts: torch.Tensor) -> torch.Tensor:
    """Each node's taps: the points of the 64 cells whose stencils cover it."""
    taps = torch.zeros(GRID + 3, GRID + 3, GRID + 3, dtype=torch.int64)
    for a in range(4):
        for b in range(4):
            for c in range(4):
                taps[a:a + GRID, b:b + GRID, c:c + GRID] += counts
    return taps[:GRID, :GRID, :GRID]  # stencils end inside the grid: nothing beyond


def row(name: str, counts: torch.Tensor) -> str:
    taps = taps_per_node(counts)
    n = int(counts.sum())
    assert int(taps.sum()) == 64 * n  # every point's 64 taps land on a node
    iterations = (taps + 31) // 32
    total, hottest = int(iterations.sum()), int(iterations.max())
    fair = total / H200_RESIDENT_WARPS
    return (f"| {name} | {n:,} | {int((counts > 0).sum()):,} | {int(counts.max()):,} | "
            f"{int((taps > 0).sum()):,} | {total:,} | {hottest:,} | {hottest / fair:.1f} | "
            f"{int(taps.max()):,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "gather_work")
    args = parser.parse_args()
    start = time.time()
    lines = [
        "| workload | points inside | cells used | most points in a cell | nodes with taps | "
        "gather: warp iterations, all nodes | gather: the busiest node's | busiest ÷ fair share "
        "of an H200's resident warps | atomic: adds to the hottest node |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        row("GPU goals: 2048² × 9, 30 A cell", points_per_cell(2048, 9, 30.0)),
        row("2048² × 9, 50 A cell", points_per_cell(2048, 9, 50.0)),
        row("512² × 1, 30 A cell", points_per_cell(512, 1, 30.0)),
    ]
    one_cell = torch.zeros(GRID, GRID, GRID, dtype=torch.int64)
    one_cell[30, 30, 30] = 2048 * 2048 * 9
    lines.append(row("worst case: 2048² × 9 in one cell", one_cell))
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = "\n".join([
        f"# The CUDA grid gradient's work per node ({stamp}, revision {rev})", "",
        "Counted on the CPU by `scripts/gather_work.py` from the bench's lookups "
        "(`bench/workloads.cpp`); a fair share is all nodes' warp iterations divided by "
        f"{H200_RESIDENT_WARPS} resident warps (132 SMs × 64).", "", *lines, "",
        f"({time.time() - start:.0f} s)", ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
