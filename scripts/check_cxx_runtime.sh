#!/usr/bin/env bash
# Whether a built libnanobragg_ops.so runs on the shared C++ runtime, as torch
# does: it needs libstdc++.so and defines none of libstdc++'s own code
# (std::ostream::_M_insert<long>, an instantiation libstdc++ ships, stands for
# it). A library with a static copy of the runtime beside torch's crashed
# Python on every operator error message (reports/gpu/20261204T122607Z).
#   scripts/check_cxx_runtime.sh LIBRARY   exit 0 if so, else 1 and why
set -uo pipefail
lib="${1:?usage: check_cxx_runtime.sh LIBRARY}"
[[ -e $lib ]] || { echo "check_cxx_runtime: no $lib" >&2; exit 1; }
needed="$(readelf -d "$lib" 2>/dev/null || objdump -p "$lib" 2>/dev/null)"
if [[ -z $needed ]]; then
  echo "check_cxx_runtime: neither readelf nor objdump could read $lib" >&2
  exit 1
fi
if ! grep -q 'NEEDED.*libstdc++' <<<"$needed"; then
  echo "check_cxx_runtime: $lib does not load libstdc++.so (a static copy of the C++ runtime?)" >&2
  exit 1
fi
# (The symbols read whole first: `nm | grep -q` would end nm early, and under
# pipefail its SIGPIPE would read as "not found".)
symbols="$(nm -D --defined-only "$lib" 2>/dev/null)"
if grep -q '_ZNSo9_M_insertIlEERSoT_' <<<"$symbols"; then
  echo "check_cxx_runtime: $lib holds a copy of libstdc++'s code (std::ostream::_M_insert<long>)" >&2
  exit 1
fi
echo "check_cxx_runtime: $lib loads libstdc++.so and holds none of its code"
