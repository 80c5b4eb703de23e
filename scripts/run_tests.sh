#!/usr/bin/env bash
# Every test: GoogleTest (through CTest), then pytest. Sets up first (see
# scripts/setup.sh); exits non-zero when any test fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUILD_DIR="${BUILD_DIR:-build}"

# Each stage's wall time, printed at the end: the whole command must stay
# well under CI's limit on a fresh 2-core clone, and this says where it goes.
stage_names=()
stage_seconds=()
stage_name=""
stage_start=$SECONDS
stage() {
  if [[ -n "$stage_name" ]]; then
    stage_names+=("$stage_name")
    stage_seconds+=($((SECONDS - stage_start)))
  fi
  stage_name="$1"
  stage_start=$SECONDS
  [[ -n "$1" ]] && echo "== $1 =="
  return 0
}

status=0
stage "setup (scripts/setup.sh: packages, .venv, build/)"
"$ROOT/scripts/setup.sh"
stage "format (clang-format, .clang-format) and layers (scripts/check_layers.py)"
"$ROOT/scripts/check_format.sh" || status=1
python3 "$ROOT/scripts/check_layers.py" || status=1
stage "GoogleTest (ctest)"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" || status=1
stage "GoogleTest under AddressSanitizer + UndefinedBehaviorSanitizer"
"$ROOT/scripts/run_sanitizers.sh" || status=1
stage "libFuzzer harness (seed corpus, then ${FUZZ_SECONDS:-60} s of new inputs)"
"$ROOT/scripts/run_fuzz.sh" || status=1
stage "examples against the installed package"
"$ROOT/scripts/build_examples.sh" || status=1
stage "the pip route: a wheel in a fresh venv"
"$ROOT/scripts/build_wheel.sh" || status=1
stage "pytest"
# (What the steps above built must be there: a missing example fails.)
NANOBRAGG_REQUIRE_BUILT=1 "$ROOT/.venv/bin/python" -m pytest tests/python -q -rs || status=1
stage "GPU check script: prepare + CPU dry run"
# scripts/gpu_check.sh: gpu_deps/ for the GPU machine, then its stages with
# CPU-only settings (build-gpu-dryrun/; every CUDA case must skip), so that
# the GPU check cannot rot between GPU sessions.
{ "$ROOT/scripts/gpu_check.sh" --prepare >/dev/null && "$ROOT/scripts/gpu_check.sh" --dry-run; } || status=1
stage ""
echo "== wall time per stage =="
for i in "${!stage_names[@]}"; do
  printf '%6d s  %s\n' "${stage_seconds[$i]}" "${stage_names[$i]}"
done
printf '%6d s  total\n' "$SECONDS"
exit "$status"
