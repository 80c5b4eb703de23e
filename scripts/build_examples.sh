#!/usr/bin/env bash
# Installs the library from the build tree into build/install (cmake --install)
# and builds examples/ against that installed package, as a user's project
# would: build/examples/refine, build/examples/run_scripted and
# build/examples/run_aoti (tests/python/test_consumers.py and test_export.py
# run them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUILD_DIR="${BUILD_DIR:-build}"
PREFIX="$ROOT/$BUILD_DIR/install"
cmake --install "$BUILD_DIR" --prefix "$PREFIX" >/dev/null
TORCH_PREFIX="$("$ROOT/.venv/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
if [[ -d /usr/local/cuda/bin && ":$PATH:" != *":/usr/local/cuda/bin:"* ]]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi
if [[ ! -f "$BUILD_DIR/examples/CMakeCache.txt" ]]; then
  cmake -S examples -B "$BUILD_DIR/examples" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$PREFIX;$TORCH_PREFIX" >/dev/null
fi
cmake --build "$BUILD_DIR/examples"
