#!/usr/bin/env bash
# Brings a fresh machine to a built tree, and does nothing twice:
#   1. system packages (apt) that are missing,
#   2. .venv with the pinned Python packages (requirements.txt),
#   3. the nanobragg_ops Python package, installed editable,
#   4. the CMake build in build/ (library, tests).
# Environment: NANOBRAGG_CUDA=AUTO|ON|OFF (default AUTO), BUILD_DIR (build).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUILD_DIR="${BUILD_DIR:-build}"
VENV="$ROOT/.venv"
log() { echo "[setup] $*" >&2; }

# 1. System packages.
APT_PACKAGES=(cmake ninja-build g++ libgtest-dev nlohmann-json3-dev python3-venv clang libclang-rt-14-dev
              clang-format binutils)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. The virtual environment, re-synced whenever requirements.txt changes.
PYTHON="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.nanobragg-requirements"
want="$(sha256sum requirements.txt torch_extension/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  log "installing requirements.txt into .venv (torch is about 4.7 GB the first time)"
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  # 3. The Python package from the source tree (a .pth entry): it loads the
  # library from build/lib. (`pip install ./torch_extension` would build a
  # second copy of the library; scripts/build_wheel.sh tests that route.)
  "$VENV/bin/python" -m pip uninstall -q -y nanobragg_ops >/dev/null 2>&1 || true
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$ROOT/torch_extension" >"$site/nanobragg_ops_source_tree.pth"
  echo "$want" >"$stamp"
fi

# 4. Configure once, then build incrementally.
if [[ -d /usr/local/cuda/bin && ":$PATH:" != *":/usr/local/cuda/bin:"* ]]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  log "configuring $BUILD_DIR"
  cmake -S . -B "$BUILD_DIR" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DPython3_EXECUTABLE="$VENV/bin/python" \
    -DNANOBRAGG_CUDA="${NANOBRAGG_CUDA:-AUTO}" \
    -DNANOBRAGG_WERROR=ON
fi
log "building $BUILD_DIR"
cmake --build "$BUILD_DIR"
