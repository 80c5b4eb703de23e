"""The library's layers point one way (scripts/check_layers.py): public API,
then registration, then kernels, then per-element math; the bench, fuzzer and
examples use only the public API (and the tests the math headers too)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_layers.py"


def load_checker():
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tree_has_no_upward_include():
    out = subprocess.run([sys.executable, str(SCRIPT), str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # "check_layers: <files> files, <includes> includes, 0 violations": the
    # scan found the tree (a scan that saw nothing would also say 0).
    files, includes = (int(w) for w in re.search(r"(\d+) files, (\d+) includes, 0 violations", out.stdout).groups())
    assert files >= 60 and includes >= 100, out.stdout


def test_the_checker_sees_each_kind_of_violation():
    check = load_checker()
    planted = {
        "csrc/tricubic/tricubic_math.h": ["csrc/common/cuda_launch.h"],  # math -> kernels
        "csrc/tricubic/tricubic_cpu.cpp": ["ops/checks.h"],  # kernels -> registration
        "ops/meta.cpp": ["csrc/include/nanobragg_ops/ops.h"],  # registration -> api
        "bench/main.cpp": ["csrc/tricubic/tricubic_layout.h"],  # bench -> kernels
        "bench/workloads.cpp": ["tests/cpp/test_utils.h"],  # bench -> the tests' own files
        "tests/cpp/test_x.cpp": ["ops/dispatch.h"],  # tests -> registration
    }
    found = check.violations(ROOT, planted)
    assert len(found) == len(planted), "\n".join(found)
    allowed = {
        "ops/meta.cpp": ["csrc/tricubic/tricubic_math.h", "ops/dispatch.h"],
        "csrc/tricubic/tricubic_cpu.cpp": ["csrc/tricubic/tricubic_math.h"],
        "tests/cpp/test_x.cpp": ["csrc/tricubic/tricubic_math.h", "tests/reference/tricubic_reference.h",
                                 "csrc/include/nanobragg_ops/ops.h", "tests/cpp/test_utils.h"],
        "bench/workloads.cpp": ["tests/reference/tricubic_reference.h", "csrc/include/nanobragg_ops/ops.h"],
    }
    assert check.violations(ROOT, allowed) == []
    misplaced = check.misplaced_implementations({"ops/cpu_kernels.cpp": ["csrc/common/cpu_kernels.h"]})
    assert len(misplaced) == 1, misplaced
