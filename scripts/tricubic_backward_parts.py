#!/usr/bin/env python3
"""What the tricubic backward costs, in forwards, by part: the backward op
called directly for the grid gradient alone, the hkl gradient alone and
both, and forward+backward through autograd as the bench times it.

The bench's goal for the tricubic backward (issue 17: at most 2 forwards,
gradients to hkl and to the grid, `out.sum().backward()`) is measured there
as a whole; this splits it. The lookups are the bench's at 512², one per
pixel (bench/workloads.cpp, make_tricubic_inputs: 0.1 mm pixels at 100 mm,
1 A, a 50 A cell in the same orientation, a 64³ grid), float32. Each round
times every call kCalls times and keeps the median; a part's cost is the
median over the rounds of its time over the same round's forward, so that
the machine's drift between rounds cancels.

  .venv/bin/python scripts/tricubic_backward_parts.py [--threads 1] [--rounds 21]

Prints a Markdown table (with the date, the git revision and the CPU): the
runs kept are in reports/tricubic_backward_parts/.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from datetime import datetime, timezone

import torch

import nanobragg_ops  # noqa: F401  (registers torch.ops.nanobragg)
from run_facts import cpu_model, git_revision

kCalls = 5
kGridSide = 64
kAutograd = "forward+backward through autograd (`out.sum().backward()`)"


def rotation(axis: list[float], angle: float) -> torch.Tensor:
    """Rotation about `axis` by `angle` (radians), as bench/workloads.cpp's."""
    a = torch.tensor(axis, dtype=torch.float64)
    x, y, z = (a / a.norm()).tolist()
    c, s, t = math.cos(angle), math.sin(angle), 1 - math.cos(angle)
    return torch.tensor(
        [
            [t * x * x + c, t * x * y - s * z, t * x * z + s * y],
            [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
            [t * x * z - s * y, t * y * z + s * x, t * z * z + c],
        ],
        dtype=torch.float64,
    )



def bench_lookups(size: int = 512, cell: float = 50.0):
    """The bench's grid and Miller indices at size², one lookup per pixel."""
    torch.manual_seed(7)
    lowest = -kGridSide // 2
    idx = torch.arange(lowest, lowest + kGridSide, dtype=torch.float64)
    r2 = idx.view(-1, 1, 1) ** 2 + idx.view(1, -1, 1) ** 2 + idx.view(1, 1, -1) ** 2
    grid = 100 * torch.exp(-r2 / 800) * (0.5 + torch.rand(kGridSide, kGridSide, kGridSide, dtype=torch.float64))
    pixel, distance = 1e-4, 0.1
    c = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0) * pixel
    p = torch.stack(
        [c.view(1, -1).expand(size, size), c.view(-1, 1).expand(size, size),
         torch.full((size, size), distance, dtype=torch.float64)], -1
    ).view(-1, 3)
    q = p / p.norm(dim=-1, keepdim=True) - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    hkl = cell * q @ rotation([0.3, -0.5, 0.8], 0.7).t()
    return grid.float(), hkl.float().contiguous(), [lowest] * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    grid, hkl, index_min = bench_lookups()
    op = torch.ops.nanobragg
    expanded = torch.ones(()).expand(hkl.shape[0])  # what out.sum().backward() passes
    g = grid.clone().requires_grad_()
    h = hkl.clone().requires_grad_()

    def through_autograd() -> None:
        g.grad = h.grad = None
        op.tricubic_interp(g, h, index_min).sum().backward()

    def backward(mask: list[bool]):
        return lambda: op.tricubic_interp_backward(expanded, grid, hkl, index_min, "default", mask)

    calls = {
        "forward": lambda: op.tricubic_interp(grid, hkl, index_min),
        "backward op, grid gradient alone": backward([True, False]),
        "backward op, hkl gradient alone": backward([False, True]),
        "backward op, both gradients": backward([True, True]),
        kAutograd: through_autograd,
    }
    for call in calls.values():  # first calls of the process, not counted
        call(), call()

    ms: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            times = []
            for _ in range(kCalls):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            ms[name].append(statistics.median(times) * 1e3)

    def in_forwards(name: str) -> list[float]:
        less = 1.0 if name == kAutograd else 0.0  # its backward: less one forward
        return [t / f - less for t, f in zip(ms[name], ms["forward"])]

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"{stamp}, git {git_revision()}, {cpu_model()}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s), "
        f"{hkl.shape[0]} lookups (the bench's 512², float32), {args.rounds} rounds of "
        f"{kCalls} calls each\n"
    )
    print(
        "| call | ms (median over rounds) | in forwards, the median of the rounds' ratios "
        "(through autograd: its time less one forward) | range over rounds |"
    )
    print("|---|---:|---:|---|")
    for name in calls:
        ratios = in_forwards(name)
        print(
            f"| {name} | {statistics.median(ms[name]):.3f} | {statistics.median(ratios):.2f} | "
            f"{min(ratios):.2f} to {max(ratios):.2f} |"
        )


if __name__ == "__main__":
    main()
