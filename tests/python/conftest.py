"""Shared fixtures: every device-dependent test runs on CPU and on CUDA; the
CUDA cases skip, saying why, where CUDA cannot run."""

from __future__ import annotations

import pytest
import torch

import nanobragg_ops  # noqa: F401  (loads the operator library)


def cuda_unavailable_reason(op: str) -> str | None:
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
        return f"CUDA kernels of {op} are not built"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    if request.param == "cuda":
        reason = cuda_unavailable_reason("nanobragg::tricubic_interp")
        if reason:
            pytest.skip(reason)
    return request.param
