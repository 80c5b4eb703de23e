#!/usr/bin/env python3
"""How much longer the first call after an idle pause takes than the calls
after it, for the absorption forward and for an ATen op of about the same
duration (torch.exp of 1 M floats), on the same threads.

The bench's "cold" time is such a first call: its case starts after the
previous cases ran for seconds, while the pool's other threads slept. A
ratio that ATen's own elementwise op shows too is the cost of waking the
threads, not of the operator.

  .venv/bin/python scripts/first_call_after_idle.py [--threads 2] [--rounds 5] [--idle 2]

Prints a Markdown table (with the date and the git revision): the runs kept
are in reports/first_call_after_idle/.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone

import torch

import nanobragg_ops
from run_facts import git_revision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of pause before a first call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    n = 512  # the bench's 512² detector, float32
    gen = torch.Generator().manual_seed(0)
    coords = torch.randn(n, n, 3, generator=gen) * 0.01 + torch.tensor([0.0, 0.0, 0.1])
    intensity = torch.rand(n, n, generator=gen)
    odet = torch.tensor([0.0, 0.0, 1.0])
    x = torch.rand(4 * n * n, generator=gen)
    calls = {
        "detector_absorption forward": lambda: nanobragg_ops.detector_absorption(
            intensity, coords, odet, 450e-6, 234e-6, 5, False
        ),
        "torch.exp (1 M floats)": lambda: torch.exp(x),
    }
    for call in calls.values():  # first calls of the process, not counted
        for _ in range(20):
            call()

    ratios: dict[str, list[float]] = {name: [] for name in calls}
    warm_ms: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):  # the two interleaved, round by round
        for name, call in calls.items():
            time.sleep(args.idle)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            warm = statistics.median(times[1:])
            ratios[name].append(times[0] / warm)
            warm_ms[name].append(warm * 1e3)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{stamp}, git {git_revision()}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"{args.idle:g} s idle before each first call\n")
    print("| call | warm ms (median) | first call / warm, each round | median |")
    print("|---|---:|---|---:|")
    for name in calls:
        each = ", ".join(f"{r:.2f}" for r in ratios[name])
        print(
            f"| {name} | {statistics.median(warm_ms[name]):.3f} | {each} | "
            f"{statistics.median(ratios[name]):.2f}× |"
        )


if __name__ == "__main__":
    main()
