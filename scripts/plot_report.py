#!/usr/bin/env python3
"""Pictures of one bench report: reads REPORT_DIR/perf_results.json, writes
REPORT_DIR/throughput.png (points per second of every implementation, forward
and forward+backward, per op, size and thread count) and REPORT_DIR/scaling.png
(tricubic throughput against the number of points, main and --scale rows).

usage: scripts/plot_report.py REPORT_DIR
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

IMPL_ORDER = [
    "fused",
    "scalar_reference",
    "aten_composite",
    "grid_sample_trilinear",
    "grid_sample_split",
]
COLOURS = {
    "fused": "#1b6ca8",
    "scalar_reference": "#8c8c8c",
    "aten_composite": "#d1495b",
    "grid_sample_trilinear": "#edae49",
    "grid_sample_split": "#66a182",
}
PASSES = ["forward", "forward_backward"]
OPS = ["tricubic_interp", "detector_absorption"]


def timed(rows):
    return [r for r in rows if r.get("points_per_second")]


def throughput_figure(rows, out: Path) -> bool:
    main = [r for r in timed(rows) if not r.get("scale") and not r.get("cuda_goal")]
    if not main:
        return False
    ops = [op for op in OPS if any(r["op"] == op for r in main)]
    fig, axes = plt.subplots(len(ops), 2, figsize=(12, 3.6 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, pass_ in enumerate(PASSES):
            ax = axes[i][j]
            sel = [r for r in main if r["op"] == op and r["pass"] == pass_]
            groups = sorted({(r["size"], r.get("threads", 1), r["device"]) for r in sel})
            impls = [m for m in IMPL_ORDER if any(r["impl"] == m for r in sel)]
            width = 0.8 / max(len(impls), 1)
            for k, impl in enumerate(impls):
                xs, ys = [], []
                for g, (size, threads, device) in enumerate(groups):
                    for r in sel:
                        if (r["impl"], r["size"], r.get("threads", 1), r["device"]) == (
                            impl,
                            size,
                            threads,
                            device,
                        ):
                            xs.append(g + (k - (len(impls) - 1) / 2) * width)
                            ys.append(r["points_per_second"] / 1e6)
                ax.bar(xs, ys, width, label=impl, color=COLOURS.get(impl))
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels(
                [
                    f"{s}²\n{t} thread{'s' if t > 1 else ''}" if d == "cpu" else f"{s}²\n{d}"
                    for s, t, d in groups
                ]
            )
            ax.set_yscale("log")
            ax.set_ylabel("M points/s (log)")
            ax.set_title(f"{op} {pass_.replace('_', '+')}")
            ax.grid(axis="y", which="both", alpha=0.3)
            # Room above the tallest bar for the legend, which would hide it:
            # 35% more of the axis' span in decades, the legend in two columns
            # where it has more than three entries.
            if ys_all := [r["points_per_second"] / 1e6 for r in sel]:
                lo, hi = ax.get_ylim()
                ax.set_ylim(lo, max(ys_all) * (hi / lo) ** 0.35)
            ax.legend(fontsize=7, loc="upper right", ncol=2 if len(impls) > 3 else 1)
    fig.suptitle("Throughput, higher is better (one run of the bench, same inputs for all)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def scaling_figure(rows, out: Path) -> bool:
    sel = [r for r in timed(rows) if r["op"] == "tricubic_interp" and not r.get("cuda_goal")]
    if not sel:
        return False
    series = defaultdict(list)
    for r in sel:
        key = (r["impl"], r["pass"], r.get("threads", 1), r["device"])
        series[key].append((r["points"], r["points_per_second"] / 1e6))
    fig, ax = plt.subplots(figsize=(8, 5))
    for (impl, pass_, threads, device), pts in sorted(series.items()):
        if len(pts) < 2:
            continue
        pts.sort()
        style = "-" if pass_ == "forward" else "--"
        where = f"{threads} thr" if device == "cpu" else device
        ax.plot(
            [p for p, _ in pts],
            [v for _, v in pts],
            style,
            marker="o",
            color=COLOURS.get(impl),
            alpha=1.0 if threads > 1 or device != "cpu" else 0.55,
            label=f"{impl} {pass_.replace('_', '+')} ({where})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("points (lookups)")
    ax.set_ylabel("M points/s")
    ax.set_title("tricubic_interp: throughput against problem size")
    ax.grid(which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[1])
    rows = json.loads((folder / "perf_results.json").read_text())
    if isinstance(rows, dict):  # {"results": [...], ...}
        rows = rows.get("results", [])
    made = []
    if throughput_figure(rows, folder / "throughput.png"):
        made.append("throughput.png")
    if scaling_figure(rows, folder / "scaling.png"):
        made.append("scaling.png")
    print(f"plot_report: {folder}: {', '.join(made) or 'no timed rows, no pictures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
