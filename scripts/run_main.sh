#!/usr/bin/env bash
# The main job: sets up (see scripts/setup.sh), then runs the bench driver
# with its defaults (sizes 256 and 512, every CPU case on 1 thread and on all,
# 200 warm repeats, float32, CPU) and its scale section (--scale: tricubic
# forward+backward over 2048² × 9 points); about 4-5 minutes on 2 cores
# (3 min 43 s to 5 min 16 s in the runs of 2026-12-02, rebuilding the CPU
# kernels first). It writes
# reports/perf/<UTC stamp>/ (perf_results.json, env.json, perf_summary.md),
# and its pictures (scripts/plot_report.py: throughput.png, scaling.png).
# Extra arguments go to the driver, e.g.
#   scripts/run_main.sh --device cuda --sizes 512 1024 --points-per-pixel 9
#   scripts/run_main.sh --no-scale
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
BUILD_DIR="${BUILD_DIR:-build}"
dir="$("$BUILD_DIR/bench/nanobragg_bench" --outdir reports/perf --scale "$@")"
"$ROOT/.venv/bin/python" "$ROOT/scripts/plot_report.py" "$dir"
echo "report: $dir/perf_summary.md"
sed -n '/^## Targets/,/^## Interpretation/p' "$dir/perf_summary.md" | sed '$d'
