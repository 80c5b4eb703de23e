"""Checks examples/nanobrag_torch_adapter.py against the PyTorch port itself,
by hand (CI cannot import the port: it is not on a package index):

    git clone -b feature/spec-based-2 https://github.com/hoidn/nanoBragg port
    NANOBRAGG_DISABLE_COMPILE=1 PYTHONPATH=port/src:examples .venv/bin/python \\
        examples/check_against_nanobrag_torch.py [--pixels 128] [--mosaic 4]

A float64 port Simulator (tricubic interpolation on, a random HKL grid, a
450 um sensor in 5 layers) runs as shipped and with the adapter installed:
the images, and the gradients of image.sum() to the F grid, the sensor
thickness and the attenuation depth, are compared, and both runs are timed.
Then the fractional call site (fix_rounded_call) is timed against the port's
own polin3 at fractional indices. Results: docs/nanobrag_torch.md.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import nanobrag_torch_adapter as adapter
from nanobrag_torch.config import BeamConfig, CrystalConfig, DetectorConfig
from nanobrag_torch.models.crystal import Crystal
from nanobrag_torch.models.detector import Detector
from nanobrag_torch.simulator import Simulator

DT = torch.float64


def build(pixels: int, mosaic: int, grid: torch.Tensor, thick: torch.Tensor, absorb: torch.Tensor):
    det = Detector(DetectorConfig(distance_mm=100.0, pixel_size_mm=0.1 * 1024 / pixels,
                                  spixels=pixels, fpixels=pixels, detector_thick_um=thick,
                                  detector_abs_um=absorb, detector_thicksteps=5),
                   dtype=DT)
    cfg = CrystalConfig(cell_a=30.0, cell_b=30.0, cell_c=30.0, N_cells=(2, 2, 2), default_F=7.0,
                        mosaic_spread_deg=0.5 if mosaic > 1 else 0.0, mosaic_domains=mosaic)
    crystal = Crystal(cfg, dtype=DT)
    n = grid.shape[0] // 2
    crystal.hkl_data = grid
    crystal.hkl_metadata = dict(h_min=-n, h_max=n, k_min=-n, k_max=n, l_min=-n, l_max=n)
    crystal.interpolate = True
    sim = Simulator(crystal, det, cfg, BeamConfig(wavelength_A=1.0), dtype=DT)
    return sim


def run_once(pixels, mosaic, seed, install=None):
    gen = torch.Generator().manual_seed(seed)
    grid = (torch.rand(51, 51, 51, generator=gen, dtype=DT) * 100).requires_grad_(True)
    thick = torch.tensor(450.0, dtype=DT, requires_grad=True)
    absorb = torch.tensor(234.0, dtype=DT, requires_grad=True)
    sim = build(pixels, mosaic, grid, thick, absorb)
    if install is not None:
        install(sim)
    t0 = time.perf_counter()
    image = sim.run(oversample=1, oversample_thick=True)
    t1 = time.perf_counter()
    image.sum().backward()
    t2 = time.perf_counter()
    grads = {"F grid": grid.grad, "thickness": thick.grad, "attenuation": absorb.grad}
    return image.detach(), grads, t1 - t0, t2 - t1, sim.crystal.interpolate


def rel(a, b):
    if a is None or b is None:
        return float("nan") if (a is None) != (b is None) else 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pixels", type=int, default=128)
    p.add_argument("--mosaic", type=int, default=4)
    p.add_argument("--lookups", type=int, default=2_000_000)
    a = p.parse_args()
    torch.manual_seed(0)

    run_once(8, 1, 1), run_once(8, 1, 1, adapter.install)  # warm-up: first-call costs
    port = run_once(a.pixels, a.mosaic, 1)
    ours = run_once(a.pixels, a.mosaic, 1, adapter.install)
    print(f"{a.pixels}^2 pixels, {a.mosaic} mosaic domains, float64, torch {torch.__version__}")
    print(f"interpolation still on after the run: port {port[4]}, adapter {ours[4]}")
    print(f"image: max relative difference {rel(ours[0], port[0]):.2e} (max |image| {port[0].abs().max():.3e})")
    for name in port[1]:
        print(f"gradient to {name}: max relative difference {rel(ours[1][name], port[1][name]):.2e}")
    print(f"forward: port {port[2]:.3f} s, adapter {ours[2]:.3f} s ({port[2] / ours[2]:.1f}x); "
          f"backward: port {port[3]:.3f} s, adapter {ours[3]:.3f} s ({port[3] / ours[3]:.1f}x)")

    # Fractional indices (what nanoBragg C interpolates at): the port's own
    # Crystal._tricubic_interpolation against the operator, same points.
    gen = torch.Generator().manual_seed(2)
    grid = torch.rand(51, 51, 51, generator=gen, dtype=DT) * 100
    sim = build(8, 1, grid, torch.tensor(450.0, dtype=DT), torch.tensor(234.0, dtype=DT))
    crystal = sim.crystal
    hkl = (torch.rand(a.lookups, 3, generator=gen, dtype=DT) - 0.5) * 30
    h, k, l = hkl.unbind(-1)  # noqa: E741
    t0 = time.perf_counter()
    F_port = crystal._tricubic_interpolation(h, k, l)
    t1 = time.perf_counter()
    F_ops = adapter.tricubic_interpolation(crystal, h, k, l)
    t2 = time.perf_counter()
    print(f"{a.lookups} fractional lookups: port {t1 - t0:.3f} s, operator {t2 - t1:.4f} s "
          f"({(t1 - t0) / (t2 - t1):.0f}x), max relative difference {rel(F_ops, F_port):.2e}")

    # The whole run with the fractional call site fixed (no port reference:
    # the port cannot do it).
    fixed = run_once(a.pixels, a.mosaic, 1, lambda s: adapter.install(
        s, keep_port_fallback=False, out_of_range="nearest", fix_rounded_call=True))
    print(f"fix_rounded_call: forward {fixed[2]:.3f} s, backward {fixed[3]:.3f} s; image differs from "
          f"the rounded lookup by {rel(fixed[0], port[0]):.2e} (relative, max)")


if __name__ == "__main__":
    main()
