"""Shared fixtures: every device-dependent test runs on CPU and on CUDA; the
CUDA cases skip, saying why, where CUDA cannot run."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

import nanobragg_ops  # noqa: F401  (loads the operator library)

# Tests copy, inspect and pass on the library's file: one that cannot be told
# (operators registered by an unidentified copy) stops the session here.
if nanobragg_ops.library_path is None:
    raise RuntimeError("nanobragg_ops.library_path is None: the operators were registered "
                       "before the import by a copy of the library that cannot be identified")


@pytest.fixture(autouse=True)
def _seeded_global_generator():
    """Every test draws the same numbers from torch's global generator (its own
    draws and gradcheck's cotangents) whichever tests ran before it."""
    torch.manual_seed(0)


@contextlib.contextmanager
def deterministic(on: bool):
    """torch.use_deterministic_algorithms(on) inside the block (on CUDA the
    grid gradient's sorted path instead of atomics), put back as it was,
    warn_only included, after it."""
    prev = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn_only)


def cuda_unavailable_reason(op: str) -> str | None:
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
        return f"CUDA kernels of {op} are not built"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


def _device_for(op: str, param: str) -> str:
    if param == "cuda":
        reason = cuda_unavailable_reason(op)
        if reason:
            pytest.skip(reason)
    return param


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    """For tricubic_interp tests (and tests of both ops: CUDA kernels of both
    are built together)."""
    return _device_for("nanobragg::tricubic_interp", request.param)


@pytest.fixture(params=["cpu", "cuda"])
def absorption_device(request) -> str:
    """For detector_absorption tests: asks about its own CUDA kernels."""
    return _device_for("nanobragg::detector_absorption", request.param)


def require_built(path: Path, how: str) -> Path:
    """A file that another step of the test command builds (the installed-package
    examples, the wheel's venv). Run alone, pytest skips what needs it, saying
    how to build it; under scripts/run_tests.sh (NANOBRAGG_REQUIRE_BUILT=1) a
    missing file is a failure."""
    if not path.exists():
        message = f"{path} is missing: run {how} (scripts/run_tests.sh does)"
        if os.environ.get("NANOBRAGG_REQUIRE_BUILT") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path
