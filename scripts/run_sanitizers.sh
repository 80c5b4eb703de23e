#!/usr/bin/env bash
# The GoogleTest suite under AddressSanitizer + UndefinedBehaviorSanitizer:
# the library and the tests instrumented (CPU kernels; LibTorch is not, and
# only its own allocations are suppressed, see tests/sanitizers/), in
# build-asan/ (clang; scripts/configure_sanitized.sh), which the fuzz harness
# shares. Run by the test command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=configure_sanitized.sh
source "$ROOT/scripts/configure_sanitized.sh"
DIR=$SANITIZED_DIR
cmake --build "$DIR" --target nanobragg_tests
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export LSAN_OPTIONS="suppressions=$ROOT/tests/sanitizers/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:suppressions=$ROOT/tests/sanitizers/ubsan.supp"
# The CUDA instances skip on this build; everything else runs instrumented.
"$DIR/tests/cpp/nanobragg_tests" --gtest_brief=1 2>&1 | grep -v -E "Skipped$|CUDA kernels of .* are not built$"
