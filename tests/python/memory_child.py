"""One memory case of test_memory.py, run in a fresh process:

    python memory_child.py allocate MIB
    python memory_child.py tricubic fused|gather SIDE PER_PIXEL
    python memory_child.py absorption SIDE THICKSTEPS OVERSAMPLE(0|1) [PER_LAYER(0|1) [BACKWARD(0|1)]]

It builds the case's inputs, then measures one call: the growth of the
process's peak resident set (VmHWM) over its resident set (VmRSS) just
before the call. It prints one JSON line: growth_bytes, hwm_reset (False
where /proc/self/clear_refs refused to reset VmHWM, so that an earlier peak
may count: an upper bound) and the sizes that the test's bound is made of.
"""

from __future__ import annotations

import ctypes
import json
import sys

import torch

import nanobragg_ops


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def measure(call) -> dict:
    # Freed heap pages that stay resident could absorb part of the call's
    # allocations and hide them: hand them back to the kernel first.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    hwm_reset = reset_hwm()
    before = status_kb("VmRSS:")
    result = call()
    growth = (status_kb("VmHWM:") - before) * 1024
    return {"growth_bytes": growth, "hwm_reset": hwm_reset, **result}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def allocate(mib: int) -> dict:
    """A deliberate allocation of known size, every page written."""
    keep = []

    def call():
        keep.append(torch.ones(mib * 2**20 // 4, dtype=torch.float32))
        return {"allocated_bytes": nbytes(keep[0])}

    return measure(call)


def gather_tricubic(grid, hkl, index_min):
    """The PyTorch port's formulation (bench/workloads.cpp's aten_composite):
    a gathered [N, 4, 4, 4] neighbourhood and Lagrange weights as tensors."""
    n = torch.floor(hkl.detach())
    u = hkl - n
    offsets = torch.arange(-1, 3)
    idx = [(n[:, d].long() - index_min[d]).unsqueeze(1) + offsets for d in range(3)]
    sub = grid[idx[0].view(-1, 4, 1, 1), idx[1].view(-1, 1, 4, 1), idx[2].view(-1, 1, 1, 4)]

    def weights(t):
        return torch.stack([-t * (t - 1) * (t - 2) / 6, (t + 1) * (t - 1) * (t - 2) / 2,
                            -(t + 1) * t * (t - 2) / 2, (t + 1) * t * (t - 1) / 6], -1)

    return torch.einsum("na,nb,nc,nabc->n", weights(u[:, 0]), weights(u[:, 1]),
                        weights(u[:, 2]), sub)


def tricubic(impl: str, side: int, per_pixel: int) -> dict:
    # A 50 A cell to 1 A resolution: h, k, l in [-50, 50], a 101^3 float32
    # grid (4 MB). Points inside it, so that every one does the full work.
    def inputs(n):
        grid = torch.rand(101, 101, 101, dtype=torch.float32).requires_grad_()
        hkl = torch.empty(n, 3, dtype=torch.float32).uniform_(-45, 45).requires_grad_()
        return grid, hkl

    op = nanobragg_ops.tricubic_interp if impl == "fused" else gather_tricubic

    def forward_backward(grid, hkl):
        out = op(grid, hkl, (-50, -50, -50))
        out.sum().backward()
        return out

    # One small call first: what a process does once (code paged in, the
    # thread pool, autograd's engine) is not the call's memory.
    forward_backward(*inputs(1000))
    grid, hkl = inputs(side * side * per_pixel)  # made in place: no temporaries

    def call():
        out = forward_backward(grid, hkl)
        return {"output_bytes": nbytes(out), "hkl_grad_bytes": nbytes(hkl.grad),
                "grid_grad_bytes": nbytes(grid.grad), "points": hkl.shape[0]}

    return measure(call)


def absorption(side: int, thicksteps: int, oversample: bool, per_layer: bool = False,
               backward: bool = False) -> dict:
    """per_layer: an intensity per layer, [L, side, side], with the pixels
    shared ([1, side, side, 3]). backward: every input needs a gradient, and
    the call is forward + out.sum().backward()."""
    def inputs(s):
        # Pixels 0.1 mm apart at 100 mm, written in place: no temporaries.
        c = (torch.arange(s, dtype=torch.float32) - (s - 1) / 2) * 1e-4
        pixels = torch.empty(s, s, 3, dtype=torch.float32)
        pixels[..., 0] = c.view(1, s)
        pixels[..., 1] = c.view(s, 1)
        pixels[..., 2] = 0.1
        intensity = torch.rand((thicksteps, s, s) if per_layer else (s, s), dtype=torch.float32)
        pixels = pixels[None] if per_layer else pixels
        return intensity.requires_grad_(backward), pixels.requires_grad_(backward)

    odet = torch.tensor([0.02, -0.01, 1.0], dtype=torch.float32)
    odet /= odet.norm()
    thickness = torch.tensor(450e-6)
    attenuation = torch.tensor(234e-6)
    if backward:
        odet, thickness, attenuation = (x.requires_grad_() for x in (odet, thickness, attenuation))

    def call_once(intensity, pixels):
        out = nanobragg_ops.detector_absorption(
            intensity, pixels, odet, thickness, attenuation, thicksteps=thicksteps,
            oversample_thick=oversample, per_layer=per_layer)
        if backward:
            out.sum().backward()
        return out

    call_once(*inputs(16))  # what a process does once, as above
    intensity, pixels = inputs(side)

    def call():
        out = call_once(intensity, pixels)
        grads = sum(nbytes(x.grad) for x in (intensity, pixels)) if backward else 0
        return {"output_bytes": nbytes(out), "grad_bytes": grads, "pixels": out.numel()}

    return measure(call)


def main(argv):
    kind, *args = argv
    if kind == "allocate":
        result = allocate(int(args[0]))
    elif kind == "tricubic":
        result = tricubic(args[0], int(args[1]), int(args[2]))
    elif kind == "absorption":
        result = absorption(int(args[0]), int(args[1]), *(bool(int(a)) for a in args[2:]))
    else:
        raise SystemExit(f"unknown case {kind}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
