#!/usr/bin/env bash
# Fails when a C++/CUDA source of the repository differs from what
# clang-format makes of it with .clang-format; --fix rewrites them instead.
# The formatting is that of clang-format 14 (Debian 12's, which
# scripts/setup.sh installs); other versions format some constructs
# differently, so another version is an error, not a silent pass.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if ! command -v clang-format >/dev/null; then
  echo "check_format: clang-format is not installed (scripts/setup.sh installs it)" >&2
  exit 1
fi
version="$(clang-format --version | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1)"
if [[ "${version%%.*}" != 14 ]]; then
  echo "check_format: clang-format $version found; the repository is formatted with version 14" >&2
  exit 1
fi
# Tracked files and new ones not yet added (not the ignored: build trees,
# vendored sources), so that a file is checked before its first commit.
# (A tracked file deleted in the work tree is left out.)
mapfile -t listed < <(git ls-files --cached --others --exclude-standard '*.h' '*.cpp' '*.cu' '*.cuh')
files=()
for f in "${listed[@]}"; do [[ -f $f ]] && files+=("$f"); done
if [[ "${1:-}" == "--fix" ]]; then
  clang-format -i "${files[@]}"
  exit 0
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! clang-format --dry-run --Werror "${files[@]}" 2>"$log"; then
  drifted="$(grep -E '^[^ ].*(warning|error):' "$log" | cut -d: -f1 | sort -u)" || true
  if [[ -z $drifted ]]; then  # clang-format itself failed: say how
    cat "$log" >&2
    echo "check_format: clang-format failed" >&2
    exit 1
  fi
  sed 's/^/  /' <<<"$drifted" >&2
  echo "check_format: the files above drift from .clang-format; scripts/check_format.sh --fix" >&2
  exit 1
fi
echo "check_format: ${#files[@]} files formatted as .clang-format says"
