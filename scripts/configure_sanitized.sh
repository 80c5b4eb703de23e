#!/usr/bin/env bash
# Configures build-asan/ (once): clang, AddressSanitizer + UndefinedBehaviorSanitizer,
# and libFuzzer's coverage instrumentation, for the GoogleTest suite
# (scripts/run_sanitizers.sh) and the fuzz harness (scripts/run_fuzz.sh) alike:
# one instrumented build of the library serves both, instead of one each.
# Sourced by those scripts; expects ROOT.
SANITIZED_DIR=build-asan
# -O1 -g1 (line tables): ASan's recommended level, and a build 5-6x faster
# than -O2 -g, whose variable tracking on the SIMD kernels took 5 minutes a
# file; a sanitizer report still names every function and line.
# fuzzer-no-link adds libFuzzer's coverage counters to the library; in the test
# binary, which does not link libFuzzer, the sanitizer runtime's default hooks
# take them. Both run the machine's best CPU capability only, so the AVX2 build
# of the kernels is left out (a third less compiling; without AVX-512 they
# would run DEFAULT).
if [[ ! -f "$ROOT/$SANITIZED_DIR/CMakeCache.txt" ]]; then
  cmake -S "$ROOT" -B "$ROOT/$SANITIZED_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DPython3_EXECUTABLE="$ROOT/.venv/bin/python" \
    -DNANOBRAGG_CUDA=OFF -DNANOBRAGG_BUILD_BENCH=OFF -DNANOBRAGG_WERROR=ON \
    -DNANOBRAGG_BUILD_TESTS=ON -DNANOBRAGG_BUILD_FUZZ=ON -DNANOBRAGG_CPU_CAPABILITY_BUILDS=AVX512 \
    -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
fi
