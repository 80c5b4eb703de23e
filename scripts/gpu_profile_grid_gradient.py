#!/usr/bin/env python3
"""Where the CUDA grid gradient's time goes, kernel by kernel (a stage of
scripts/gpu_check.sh): the GPU goals' lookups (2048² × 9 detector lookups into
a 64³ grid, a 30 Å cell, float32, built as bench/workloads.cpp builds them),
the grid gradient alone through the backward op, atomic and deterministic,
each timed with CUDA events and then run under torch.profiler, whose CUDA
kernel times are summed per kernel. Prints a Markdown report (and writes it to
--out). Without a GPU it says so and exits 0.

  python3 scripts/gpu_profile_grid_gradient.py [--size 2048] [--per-pixel 9] [--out FILE]
  python3 scripts/gpu_profile_grid_gradient.py --device cpu --size 64   (the script's own
      check without a GPU: the same steps on the CPU kernels)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

GRID_SIDE = 64
INDEX_MIN = [-GRID_SIDE // 2] * 3


def rotation(axis, angle):
    x, y, z = (a / math.sqrt(sum(c * c for c in axis)) for a in axis)
    c, s = math.cos(angle), math.sin(angle)
    t = 1 - c
    return torch.tensor([[t * x * x + c, t * x * y - s * z, t * x * z + s * y],
                         [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
                         [t * x * z - s * y, t * y * z + s * x, t * z * z + c]], dtype=torch.float64)


def clustered_lookups(size: int, per_pixel: int, cell: float, device) -> torch.Tensor:
    """Pixel-major hkl of a size² detector (0.1 mm pixels at 100 mm, 1 Å), per_pixel
    mosaic domains each: the geometry of the bench's tricubic inputs."""
    c = (torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0) * 1e-4
    p = torch.stack([c.view(1, size).expand(size, size), c.view(size, 1).expand(size, size),
                     torch.full((size, size), 0.1, dtype=torch.float64, device=device)], -1).view(-1, 3)
    q = p / p.norm(dim=-1, keepdim=True) - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=device)
    u = rotation([0.3, -0.5, 0.8], 0.7)
    domains = []
    for d in range(per_pixel):
        mosaic = torch.eye(3, dtype=torch.float64) if d == 0 else rotation(
            [math.cos(d * 1.3), math.sin(d * 2.1), 0.4], 0.005 * d)
        domains.append(cell * (q @ (mosaic @ u).t().to(device)))
    return torch.stack(domains, 1).reshape(-1, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--per-pixel", type=int, default=9)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = ap.parse_args()
    lines = ["# The CUDA grid gradient, kernel by kernel", ""]

    def emit():
        text = "\n".join(lines) + "\n"
        print(text, end="")
        if args.out:
            args.out.write_text(text)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        lines.append("No CUDA device: nothing to profile.")
        emit()
        return 0
    import nanobragg_ops  # noqa: F401  (registers torch.ops.nanobragg; NANOBRAGG_OPS_LIBRARY picks the build)

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    torch.manual_seed(7)
    idx = torch.arange(INDEX_MIN[0], INDEX_MIN[0] + GRID_SIDE, dtype=torch.float64)
    r2 = idx.view(-1, 1, 1) ** 2 + idx.view(1, -1, 1) ** 2 + idx.view(1, 1, -1) ** 2
    grid = (100 * torch.exp(-r2 / 800) * (0.5 + torch.rand(GRID_SIDE, GRID_SIDE, GRID_SIDE,
                                                           dtype=torch.float64))).float().to(dev)
    hkl = clustered_lookups(args.size, args.per_pixel, 30.0, dev).float()
    n = hkl.shape[0]
    ones = torch.ones(n, device=dev)
    backward = torch.ops.nanobragg.tricubic_interp_backward

    def grid_gradient():
        return backward(ones, grid, hkl, INDEX_MIN, "default", [True, False])[0]

    results, times, tables = {}, {}, {}
    for mode, deterministic in (("atomic", False), ("deterministic", True)):
        torch.use_deterministic_algorithms(deterministic)
        try:
            for _ in range(2):
                results[mode] = grid_gradient()
            sync()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                grid_gradient()
            if cuda:
                end.record()
            sync()
            times[mode] = (start.elapsed_time(end) if cuda else 1000 * (time.perf_counter() - t0)) / args.calls
            with torch.profiler.profile(activities=[activity]) as prof:
                for _ in range(args.calls):
                    grid_gradient()
                sync()
        finally:
            torch.use_deterministic_algorithms(False)
        rows = []
        for e in prof.key_averages():
            if cuda:
                t = getattr(e, "device_time_total", None)
                if t is None:
                    t = getattr(e, "cuda_time_total", 0.0)
            else:
                t = e.self_cpu_time_total
            if t > 0:
                rows.append((t / args.calls / 1000.0, e.count // args.calls, e.key))
        tables[mode] = sorted(rows, reverse=True)

    a, d = results["atomic"].double(), results["deterministic"].double()
    diff = ((a - d).abs().max() / a.abs().max().clamp_min(1e-30)).item()
    where = torch.cuda.get_device_name() if cuda else "CPU (the script's own check)"
    lines += [f"{where}, torch {torch.__version__}; {args.size}² × "
              f"{args.per_pixel} = {n:,} lookups, float32, output_mask [grid]; "
              f"{args.calls} calls each, after 2 warm-up calls.", "",
              f"* atomic: {times['atomic']:.3f} ms a call ({'CUDA events' if cuda else 'wall clock'})",
              f"* deterministic: {times['deterministic']:.3f} ms a call, "
              f"{times['deterministic'] / times['atomic']:.2f} × the atomic (goal ≤ 2)",
              f"* largest difference between the two, over the largest node: {diff:.2e}", ""]
    for mode in ("atomic", "deterministic"):
        lines += [f"## {mode}", "", "| ms a call | launches a call | kernel |", "|---:|---:|---|"]
        for ms, count, key in tables[mode][:14]:
            lines.append(f"| {ms:.3f} | {count} | `{key[:110]}` |")
        lines.append("")
    emit()
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
