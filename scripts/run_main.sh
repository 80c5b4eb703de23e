#!/usr/bin/env bash
# The main job: sets up (see scripts/setup.sh), then runs the demo, which
# loads the library and prints tricubic values and gradients.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" examples/tricubic_demo.py "$@"
