"""Two copies of the library in one process (a wheel's and a build
directory's, say): torch aborts the process when a namespace is defined
twice, so the second copy registers nothing and warns, and the package uses
the copy that was loaded first (csrc/common/library_init.h)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nanobragg_ops

# A linear grid (value 36 h + 6 k + l) is interpolated exactly, with
# gradient (36, 6, 1): an answer that needs the forward and the Autograd
# kernels of whichever copy serves the calls.
USE_THE_OPS = (
    "g = torch.arange(216.0, dtype=torch.float64).view(6, 6, 6)\n"
    "h = torch.tensor([[2.5, 2.0, 2.25]], dtype=torch.float64, requires_grad=True)\n"
    "F = nanobragg_ops.tricubic_interp(g, h, (0, 0, 0))\n"
    "F.sum().backward()\n"
    "assert F.item() == 36 * 2.5 + 6 * 2.0 + 2.25, F.item()\n"
    "want = torch.tensor([[36.0, 6.0, 1.0]], dtype=torch.float64)\n"
    "assert torch.allclose(h.grad, want, rtol=1e-12, atol=0), h.grad.tolist()\n"
)
WARNING = "registers nothing, and the earlier copy's operators stay in use"
OVERRIDE = "Overriding a previously registered kernel"  # torch's, were any registered again
NOT_THE_ONE_ASKED_FOR = "it serves them, not NANOBRAGG_OPS_LIBRARY="


def copy_of_library(folder: Path, name: str) -> Path:
    # Another file (not a link: the loader would see the same one).
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / name
    shutil.copyfile(nanobragg_ops.library_path, copy)
    return copy


def run(code: str, library_env: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("NANOBRAGG_OPS_LIBRARY", None)
    if library_env:
        env["NANOBRAGG_OPS_LIBRARY"] = str(nanobragg_ops.library_path)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_import_uses_a_copy_loaded_before_it(tmp_path):
    # A name of its own, as torch.ops.load_library allows.
    copy = copy_of_library(tmp_path, "copy_of_nanobragg_ops.so")
    out = run(
        "import torch\n"
        f"torch.ops.load_library({str(copy)!r})\n"
        "import nanobragg_ops\n"
        f"assert nanobragg_ops.library_path.samefile({str(copy)!r}), nanobragg_ops.library_path\n"
        + USE_THE_OPS
        + "print('ok')\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok"]
    assert WARNING not in out.stderr and OVERRIDE not in out.stderr  # no second copy loaded
    # NANOBRAGG_OPS_LIBRARY named the build's file: the import says it is not the one used.
    assert NOT_THE_ONE_ASKED_FOR in out.stderr


def test_import_finds_a_copy_loaded_without_torch(tmp_path):
    # Loaded by plain dlopen (as a C++ host's linker would): not in
    # torch.ops.loaded_libraries, found among the process's mapped files.
    copy = copy_of_library(tmp_path / "elsewhere", "libnanobragg_ops.so")
    out = run(
        "import ctypes, torch\n"
        f"ctypes.CDLL({str(copy)!r})\n"
        "import nanobragg_ops\n"
        f"assert nanobragg_ops.library_path.samefile({str(copy)!r}), nanobragg_ops.library_path\n"
        + USE_THE_OPS
        + "print('ok')\n",
        library_env=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok"]
    assert WARNING not in out.stderr and OVERRIDE not in out.stderr
    assert NOT_THE_ONE_ASKED_FOR not in out.stderr


def test_a_copy_loaded_after_import_registers_nothing(tmp_path):
    copy = copy_of_library(tmp_path, "copy_of_nanobragg_ops.so")
    out = run(
        "import ctypes, torch, nanobragg_ops\n"
        "first = nanobragg_ops.library_path\n"
        f"torch.ops.load_library({str(copy)!r})\n"
        + USE_THE_OPS
        + "def serving_file(path):\n"
        "    fn = ctypes.CDLL(str(path)).nanobragg_ops_serving_file\n"
        "    fn.restype = ctypes.c_char_p\n"
        "    return fn()\n"
        f"print(serving_file({str(copy)!r}))\n"
        "print(first.samefile(serving_file(first).decode()))\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "True"]
    assert WARNING in out.stderr and str(copy) in out.stderr
    assert OVERRIDE not in out.stderr


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_a_library_variable_that_names_no_file_fails_the_import(tmp_path, what):
    # Not a silent fallback to the package's own copy, which would run a
    # build the user did not ask for.
    named = tmp_path / "libnanobragg_ops.so"
    if what == "directory":
        named.mkdir()
    env = dict(os.environ, NANOBRAGG_OPS_LIBRARY=str(named))
    out = subprocess.run(
        [sys.executable, "-c", "import nanobragg_ops"], capture_output=True, text=True, env=env
    )
    assert out.returncode != 0
    assert f"ImportError: nanobragg_ops: NANOBRAGG_OPS_LIBRARY={named} is not a file" in out.stderr
