"""The CPU kernels are compiled once per capability (default, AVX2, AVX-512),
and the library chooses one at run time. Inline functions of shared headers
are compiled into every build, and the linker keeps one copy of each: if that
were an AVX-512 copy, a CPU without AVX-512 would crash (illegal instruction)
in code that is meant to run everywhere. So: every function of the library
that other code can reach (global or weak) and that uses 256-bit (ymm) or
512-bit (zmm) registers must belong to that capability's build (its name has
AVX2 or AVX512 in it: our kernels' CPU_CAPABILITY namespace, ATen's
at::vec::AVX2/AVX512)."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

import nanobragg_ops

FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
SYMBOL = re.compile(r"^[0-9a-f]+ (.{7}) \S+\s+[0-9a-f]+\s+(.*)$")


def shared_functions_using(lib: str) -> dict[str, set[str]]:
    """register kind ('ymm', 'zmm') -> global/weak functions that use it."""
    table = subprocess.run(["objdump", "-t", "-C", lib], capture_output=True, text=True, check=True).stdout
    shared = set()
    for line in table.splitlines():
        m = SYMBOL.match(line)
        if m and "F" in m.group(1) and (m.group(1)[0] in "gu" or m.group(1)[1] == "w"):
            shared.add(m.group(2).strip())
    code = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", lib],
                          capture_output=True, text=True, check=True).stdout
    found: dict[str, set[str]] = {"ymm": set(), "zmm": set()}
    current = None
    for line in code.splitlines():
        m = FUNCTION.match(line)
        if m:
            current = m.group(1)
            continue
        if current in shared:
            for kind in found:
                if f"%{kind}" in line:
                    found[kind].add(current)
    return found


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="capability builds are x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_vector_code_of_a_capability_is_not_shared_with_lower_ones():
    found = shared_functions_using(str(nanobragg_ops.library_path.resolve()))
    wrong = sorted(f for f in found["zmm"] if "AVX512" not in f)
    wrong += sorted(f for f in found["ymm"] if "AVX512" not in f and "AVX2" not in f)
    assert not wrong, "vector code reachable from every capability:\n" + "\n".join(wrong)
    # and the check sees what it looks for: the AVX-512 builds of the kernels
    assert any("AVX512" in f for f in found["zmm"]), "no AVX-512 kernel found: is the library built for it?"
