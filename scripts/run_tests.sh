#!/usr/bin/env bash
# Every test: GoogleTest (through CTest), then pytest. Sets up first (see
# scripts/setup.sh); exits non-zero when any test fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
BUILD_DIR="${BUILD_DIR:-build}"

status=0
echo "== format (clang-format, .clang-format) and layers (scripts/check_layers.py) =="
"$ROOT/scripts/check_format.sh" || status=1
python3 "$ROOT/scripts/check_layers.py" || status=1
echo "== GoogleTest (ctest) =="
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" || status=1
echo "== GoogleTest under AddressSanitizer + UndefinedBehaviorSanitizer =="
"$ROOT/scripts/run_sanitizers.sh" || status=1
echo "== libFuzzer harness (seed corpus, then ${FUZZ_SECONDS:-60} s of new inputs) =="
"$ROOT/scripts/run_fuzz.sh" || status=1
echo "== examples against the installed package =="
"$ROOT/scripts/build_examples.sh" || status=1
echo "== the pip route: a wheel in a fresh venv =="
"$ROOT/scripts/build_wheel.sh" || status=1
echo "== pytest =="
# (What the steps above built must be there: a missing example fails.)
NANOBRAGG_REQUIRE_BUILT=1 "$ROOT/.venv/bin/python" -m pytest tests/python -q -rs || status=1
echo "== GPU check script: prepare + CPU dry run =="
# scripts/gpu_check.sh: gpu_deps/ for the GPU machine, then its stages with
# CPU-only settings (build-gpu-dryrun/; every CUDA case must skip), so that
# the GPU check cannot rot between GPU sessions.
{ "$ROOT/scripts/gpu_check.sh" --prepare >/dev/null && "$ROOT/scripts/gpu_check.sh" --dry-run; } || status=1
exit "$status"
