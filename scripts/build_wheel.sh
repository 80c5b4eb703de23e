#!/usr/bin/env bash
# The pip route, as a user takes it: builds a wheel of torch_extension (the C++
# library compiled by CMake through scikit-build-core against the torch of
# .venv, CPU kernels only to keep it quick) and installs it into a fresh venv,
# build/pip-venv, which sees .venv's torch but not the source tree.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUILD_DIR="${BUILD_DIR:-build}"
rm -rf "$BUILD_DIR/wheel" "$BUILD_DIR/pip-venv"
"$ROOT/.venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps \
  -w "$BUILD_DIR/wheel" \
  -C build-dir="$ROOT/$BUILD_DIR/pip-build" \
  -C cmake.define.NANOBRAGG_CUDA=OFF \
  ./torch_extension
python3 -m venv "$BUILD_DIR/pip-venv"
# torch (4.7 GB) from .venv by a plain path entry; .venv's own .pth files,
# the source-tree package among them, are not processed from there.
torch_site="$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
venv_site="$("$BUILD_DIR/pip-venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$torch_site" >"$venv_site/torch_from_dev_venv.pth"
"$BUILD_DIR/pip-venv/bin/python" -m pip install -q --no-deps --no-index "$BUILD_DIR"/wheel/nanobragg_ops-*.whl
echo "wheel: $(ls "$BUILD_DIR"/wheel/*.whl)"
