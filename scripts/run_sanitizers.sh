#!/usr/bin/env bash
# The GoogleTest suite under AddressSanitizer + UndefinedBehaviorSanitizer:
# the library and the tests instrumented (CPU kernels; LibTorch is not, and
# only its own allocations are suppressed, see tests/sanitizers/), in
# build-asan/. Run by the test command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DIR=build-asan
FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
# -O1 -g1 (line tables): ASan's recommended level, and a build 5-6x faster
# than -O2 -g, whose variable tracking on the SIMD kernels took 5 minutes a
# file; a sanitizer report still names every function and line.
if [[ ! -f "$DIR/CMakeCache.txt" ]]; then
  cmake -S . -B "$DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
    -DPython3_EXECUTABLE="$ROOT/.venv/bin/python" \
    -DNANOBRAGG_CUDA=OFF -DNANOBRAGG_BUILD_BENCH=OFF -DNANOBRAGG_WERROR=ON \
    -DCMAKE_CXX_FLAGS="$FLAGS" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
fi
cmake --build "$DIR" --target nanobragg_tests
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export LSAN_OPTIONS="suppressions=$ROOT/tests/sanitizers/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:suppressions=$ROOT/tests/sanitizers/ubsan.supp"
# The CUDA instances skip on this build; everything else runs instrumented.
"$DIR/tests/cpp/nanobragg_tests" --gtest_brief=1 2>&1 | grep -v -E "Skipped$|CUDA kernels of .* are not built$"
