"""nanobragg_ops inside the PyTorch port of nanoBragg (``nanobrag_torch``,
hoidn/nanoBragg, branch feature/spec-based-2): both slow steps of a port
``Simulator`` swapped for the fused operators.

    import nanobrag_torch_adapter as adapter
    sim = Simulator(crystal, detector, crystal_config, beam_config, dtype=torch.float64)
    adapter.install(sim)                      # the port's images, faster
    image = sim.run()

* ``Crystal._tricubic_interpolation`` becomes ``nanobragg_ops.tricubic_interp``
  on the crystal's HKL grid. ``keep_port_fallback=True`` (the default) keeps
  the port's rule: when any point's 4x4x4 stencil leaves the grid, the whole
  batch gets ``default_F`` and the crystal switches interpolation off for
  the rest of the run (nearest-neighbour lookups). ``False``: the operator's
  per-point rule (``out_of_range="default"``: only those points get
  ``default_F``; ``"nearest"``: they get the nearest grid value, as nanoBragg
  C's lookup without interpolation).
* ``Simulator._apply_detector_absorption`` becomes
  ``nanobragg_ops.detector_absorption`` with the port's thickness, attenuation
  depth (micrometres, converted to metres as the port does), thicksteps and
  detector normal.
* ``fix_rounded_call=True``: the port looks up F at the *rounded* Miller
  indices (``compute_physics_for_position``: ``F_cell =
  get_structure_factor(round(h), ...)``), so its "interpolation" returns grid
  values. This option hands the lookup the fractional indices, as nanoBragg
  C does, while the rest of the port keeps the rounded ones. It needs the
  port's eager path (it sets the simulator's compiled physics function back
  to the plain one).

How it was checked against the port, and the measured speed-up:
docs/nanobrag_torch.md. This module imports nothing from the port, so it can
be tested without it (tests/python/test_nanobrag_torch_adapter.py).
"""

from __future__ import annotations

import collections
import sys
import types
from typing import Sequence

import torch

import nanobragg_ops

__all__ = [
    "install",
    "stencil_leaves_grid",
    "tricubic_arguments",
    "tricubic_interpolation",
    "absorption_arguments",
    "apply_detector_absorption",
]


# --------------------------------------------------------------------------
# Structure factors


def stencil_leaves_grid(hkl: torch.Tensor, index_min: Sequence[int], index_max: Sequence[int]) -> torch.Tensor:
    """Per point, whether the 4x4x4 stencil ``floor(x) - 1 .. floor(x) + 2``
    leaves the grid ``index_min .. index_max`` (inclusive) on some axis: the
    port's test in ``Crystal._tricubic_interpolation``, and the operator's
    (a NaN index leaves it too)."""
    n = torch.floor(hkl.detach())
    lo = torch.tensor(index_min, dtype=n.dtype, device=n.device)
    hi = torch.tensor(index_max, dtype=n.dtype, device=n.device)
    inside = (n - 1 >= lo) & (n + 2 <= hi)
    return ~inside.all(dim=-1)


def tricubic_arguments(crystal, h, k, l):  # noqa: E741
    """(grid, hkl, index_min, index_max, default_F) of the operator for the
    port's ``crystal`` and query indices: ``hkl`` stacks h, k, l (broadcast,
    in the grid's dtype and device, as the port casts them)."""
    grid = crystal.hkl_data
    meta = crystal.hkl_metadata
    index_min = (int(meta["h_min"]), int(meta["k_min"]), int(meta["l_min"]))
    index_max = (int(meta["h_max"]), int(meta["k_max"]), int(meta["l_max"]))
    hkl = torch.stack(
        torch.broadcast_tensors(*(torch.as_tensor(x, dtype=grid.dtype, device=grid.device) for x in (h, k, l))),
        dim=-1,
    )
    return grid, hkl, index_min, index_max, float(crystal.config.default_F)


def tricubic_interpolation(crystal, h, k, l, *, keep_port_fallback: bool = True,  # noqa: E741
                           out_of_range: str = "default") -> torch.Tensor:
    """The port's ``Crystal._tricubic_interpolation(h, k, l)`` on the operator."""
    if crystal.hkl_data is None or crystal.hkl_metadata is None:
        return torch.full_like(torch.as_tensor(h), float(crystal.config.default_F),
                               dtype=crystal.dtype, device=crystal.device)
    grid, hkl, index_min, index_max, default_F = tricubic_arguments(crystal, h, k, l)
    if keep_port_fallback and bool(stencil_leaves_grid(hkl, index_min, index_max).any()):
        # As the port: one warning, the whole batch default_F, and no more
        # interpolation in this crystal (later lookups are nearest-neighbour).
        if not getattr(crystal, "_interpolation_warning_shown", False):
            print("WARNING: out of range for three point interpolation")
            print("WARNING: further warnings will not be printed!")
            crystal._interpolation_warning_shown = True
        crystal.interpolate = False
        return torch.full(hkl.shape[:-1], default_F, dtype=crystal.dtype, device=hkl.device)
    return nanobragg_ops.tricubic_interp(grid, hkl, index_min, default_F, out_of_range).to(crystal.dtype)


# --------------------------------------------------------------------------
# Detector absorption


def _length_m(micrometres):
    """A port length in micrometres (a float or a tensor, possibly [1]) as
    metres: a float, or a 0-dim tensor that keeps its dtype, device and
    autograd history (the operator takes any floating dtype, and a 0-dim
    CPU tensor with data on a GPU)."""
    if isinstance(micrometres, torch.Tensor):
        return micrometres.reshape(()) * 1e-6
    return float(micrometres) * 1e-6


def absorption_arguments(detector_config, odet: torch.Tensor, intensity: torch.Tensor,
                         pixel_coords_meters: torch.Tensor, oversample_thick: bool):
    """The operator's arguments for the port's ``_apply_detector_absorption``:
    (intensity, pixel_coords, odet, thickness, attenuation_length, thicksteps,
    oversample_thick). Only thickness and attenuation length need one unit
    (metres here); the pixel positions only give each pixel's direction."""
    return (
        intensity,
        pixel_coords_meters.to(intensity.dtype),
        odet.to(intensity.device),
        _length_m(detector_config.detector_thick_um),
        _length_m(detector_config.detector_abs_um),
        int(detector_config.detector_thicksteps),
        bool(oversample_thick),
    )


def apply_detector_absorption(simulator, intensity, pixel_coords_meters, oversample_thick):
    """The port's ``Simulator._apply_detector_absorption`` on the operator."""
    args = absorption_arguments(simulator.detector.config, simulator.detector.odet_vec, intensity,
                                pixel_coords_meters, oversample_thick)
    return nanobragg_ops.detector_absorption(*args)


# --------------------------------------------------------------------------
# The rounded call site


class _RoundMemo:
    """Stands in for ``torch`` in the port's simulator module during a run:
    every ``torch.round(x)`` is remembered (the last three), so that the
    structure-factor lookup called with those very rounded tensors can be
    given the fractional ones instead. Everything else is torch itself."""

    def __init__(self):
        self.recent = collections.deque(maxlen=3)

    def __getattr__(self, name):
        return getattr(torch, name)

    def round(self, x, *args, **kwargs):
        r = torch.round(x, *args, **kwargs)
        self.recent.append((r, x))
        return r

    def fractional(self, rounded: torch.Tensor):
        for r, x in self.recent:
            if r is rounded:
                return x
        return None


def fractional_lookup(get_structure_factor, memo: _RoundMemo):
    """``get_structure_factor`` called with the fractional indices whenever it
    is given exactly the rounded tensors the port just made."""

    def lookup(h0, k0, l0):
        frac = [memo.fractional(x) for x in (h0, k0, l0)]
        if all(f is not None for f in frac):
            return get_structure_factor(*frac)
        return get_structure_factor(h0, k0, l0)

    return lookup


# --------------------------------------------------------------------------


def install(simulator, *, keep_port_fallback: bool = True, out_of_range: str = "default",
            fix_rounded_call: bool = False):
    """Swaps both steps of a port ``Simulator`` (and its crystal) for the
    operators; returns the simulator."""
    crystal = simulator.crystal
    crystal._tricubic_interpolation = types.MethodType(
        lambda self, h, k, l: tricubic_interpolation(  # noqa: E741
            self, h, k, l, keep_port_fallback=keep_port_fallback, out_of_range=out_of_range),
        crystal)
    simulator._apply_detector_absorption = types.MethodType(apply_detector_absorption, simulator)
    if fix_rounded_call:
        module = sys.modules[type(simulator).__module__]
        simulator._compiled_compute_physics = module.compute_physics_for_position  # eager
        plain_lookup = crystal.get_structure_factor
        plain_run = simulator.run

        def run(*args, **kwargs):
            memo = _RoundMemo()
            saved = module.torch
            module.torch = memo
            crystal.get_structure_factor = fractional_lookup(plain_lookup, memo)
            try:
                return plain_run(*args, **kwargs)
            finally:
                module.torch = saved
                crystal.get_structure_factor = plain_lookup

        simulator.run = run
    return simulator
