"""LibTorch's CMake convention (issue 16): with only CMAKE_PREFIX_PATH pointing
at LibTorch (the torch wheel's cmake prefix stands in for a LibTorch download)
and a ``python3`` first on the PATH that cannot import torch, the project
configures, builds, installs, and its installed package is consumed by a
program (tests/consumer/) that then runs.

It builds the library CPU-only, without tests and bench, in
``build-libtorch-convention/`` (``$NANOBRAGG_CONVENTION_DIR``): each run
configures from an empty CMake cache, and ninja reuses the objects of an
earlier run whose flags are unchanged (a first run compiles the library:
about 3 minutes on 2 cores, CPU-only; a second, about 1 minute).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.utils

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _torch_has_cuda(prefix: Path) -> bool:
    return "set(CAFFE2_USE_CUDA ON)" in (prefix / "Caffe2" / "Caffe2Config.cmake").read_text()


def _torchless_env(tmp: Path) -> dict[str, str]:
    """A clean environment (env -i style) whose PATH starts with a python3
    that cannot import torch: the interpreter underneath this venv, without
    site-packages (-S) or PYTHON* variables (-E)."""
    shim = tmp / "bin"
    shim.mkdir()
    base = getattr(sys, "_base_executable", None) or sys.executable
    base = os.path.realpath(base)
    for name in ("python3", "python"):
        p = shim / name
        p.write_text(f'#!/bin/sh\nexec "{base}" -S -E "$@"\n')
        p.chmod(0o755)
    path = [str(shim)]
    for tool in ("cmake", "ninja", "c++"):
        found = shutil.which(tool)
        assert found, f"{tool} is not on the PATH"
        path.append(str(Path(found).parent))
    if Path("/usr/local/cuda/bin").is_dir():
        path.append("/usr/local/cuda/bin")  # torch's own CMake package needs it for a CUDA torch
    path += ["/usr/local/bin", "/usr/bin", "/bin"]
    env = {"PATH": os.pathsep.join(dict.fromkeys(path)), "HOME": str(tmp), "LANG": "C.UTF-8"}
    check = subprocess.run(["python3", "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0, "the python3 of the test environment can import torch"
    assert "torch" in check.stderr
    return env


def test_cmake_prefix_path_alone_configures_builds_installs_and_is_consumed(tmp_path):
    torch_prefix = Path(torch.utils.cmake_prefix_path).resolve()
    env = _torchless_env(tmp_path)
    if _torch_has_cuda(torch_prefix) and not any(
        (Path(d) / "nvcc").is_file() for d in env["PATH"].split(os.pathsep)
    ):
        pytest.skip("torch is a CUDA build and no nvcc is found: torch's own CMake package, "
                    "which the installed package's consumer runs, needs the CUDA toolkit")
    build = Path(os.environ.get("NANOBRAGG_CONVENTION_DIR", ROOT / "build-libtorch-convention"))
    build.mkdir(parents=True, exist_ok=True)
    (build / "CMakeCache.txt").unlink(missing_ok=True)  # configure from scratch every time
    prefix = tmp_path / "install"

    out = _run(["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
                "-DCMAKE_BUILD_TYPE=Release", "-DNANOBRAGG_CUDA=OFF",
                "-DNANOBRAGG_BUILD_TESTS=OFF", "-DNANOBRAGG_BUILD_BENCH=OFF",
                f"-DCMAKE_PREFIX_PATH={torch_prefix}"], env)
    assert f"LibTorch from {torch_prefix}/Torch" in out, out
    assert "asking Python" not in out and "cannot import torch" not in out
    cache = (build / "CMakeCache.txt").read_text()
    assert "Python3_EXECUTABLE" not in cache, "the configure asked Python although LibTorch was given"

    _run(["cmake", "--build", str(build), "--target", "nanobragg_ops"], env)
    _run(["cmake", "--install", str(build), "--prefix", str(prefix)], env)
    assert (prefix / "lib" / "cmake" / "nanobragg_ops" / "nanobragg_opsConfig.cmake").is_file()

    consumer = tmp_path / "consumer"
    _run(["cmake", "-S", str(ROOT / "tests" / "consumer"), "-B", str(consumer), "-G", "Ninja",
          "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix};{torch_prefix}"], env)
    _run(["cmake", "--build", str(consumer)], env)
    out = _run([str(consumer / "consumer")], env)
    assert "consumer ok" in out, out


def test_without_any_prefix_python_is_asked_and_its_failure_says_what_to_pass(tmp_path):
    """Nothing given and no torch in python3: the error names the ways out."""
    env = _torchless_env(tmp_path)
    out = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "b"), "-G", "Ninja",
                          "-DNANOBRAGG_CUDA=OFF", "-DNANOBRAGG_BUILD_TESTS=OFF",
                          "-DNANOBRAGG_BUILD_BENCH=OFF"], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    text = " ".join((out.stdout + out.stderr).split())
    assert "cannot import torch" in text and "CMAKE_PREFIX_PATH" in text, text
