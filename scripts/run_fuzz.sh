#!/usr/bin/env bash
# The libFuzzer harness (fuzz/fuzz_ops.cpp), built with clang, libFuzzer,
# AddressSanitizer and UndefinedBehaviorSanitizer in build-asan/ (shared with
# scripts/run_sanitizers.sh, see scripts/configure_sanitized.sh): first every
# input of the seed corpus (fuzz/corpus, a regression run), then new inputs
# for FUZZ_SECONDS (default 60). Run by the test command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=configure_sanitized.sh
source "$ROOT/scripts/configure_sanitized.sh"
DIR=$SANITIZED_DIR
cmake --build "$DIR" --target fuzz_ops
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export LSAN_OPTIONS="suppressions=$ROOT/tests/sanitizers/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# One thread per process keeps runs reproducible and fast.
export OMP_NUM_THREADS=1
"$DIR/fuzz/fuzz_ops" -runs=0 fuzz/corpus 2>&1 | tail -2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/corpus"
cp fuzz/corpus/* "$work/corpus/"
set +e
# Crash inputs land in $work (artifact_prefix); a failure prints the log.
"$DIR/fuzz/fuzz_ops" -max_total_time="${FUZZ_SECONDS:-60}" -timeout=20 -rss_limit_mb=6144 \
  -print_final_stats=1 -artifact_prefix="$work/" "$work/corpus" >"$work/log" 2>&1
status=$?
set -e
if [[ $status -ne 0 ]]; then
  tail -60 "$work/log"
  for f in "$work"/crash-* "$work"/timeout-* "$work"/oom-* "$work"/leak-*; do
    [[ -f "$f" ]] && { echo "reproducer: $f (base64)"; base64 -w0 "$f"; echo; }
  done
fi
grep -E "DONE|stat::number_of_executed_units" "$work/log" || true
exit "$status"
