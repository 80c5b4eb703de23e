"""Fused, differentiable building blocks of nanoBragg's diffraction simulation.

Importing this package loads the compiled operator library into PyTorch
(``torch.ops.load_library``), unless a copy of it is in the process already,
after which the operators are available both as the functions below and as
``torch.ops.nanobragg.<name>`` (usable from eager code, ``torch.jit.script``
and ``torch.compile``). ``library_path`` names the file that serves them.
"""

from __future__ import annotations

import ctypes
import math
import numbers
import operator
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import torch

__all__ = ["tricubic_interp", "detector_absorption", "library_path"]
__version__ = "0.1.0"

_LIBRARY_NAME = "libnanobragg_ops.so"


def _candidate_paths() -> list[Path]:
    here = Path(__file__).resolve().parent
    env = os.environ.get("NANOBRAGG_OPS_LIBRARY")
    if env:
        # What the user named, or nothing: a silent fallback to another copy
        # would run a build they did not ask for.
        if not Path(env).is_file():
            raise ImportError(
                f"nanobragg_ops: NANOBRAGG_OPS_LIBRARY={env} is not a file; point it at a "
                f"built {_LIBRARY_NAME}, or unset it to use the package's own"
            )
        return [Path(env)]
    return [
        here / "lib" / _LIBRARY_NAME,  # an installed wheel
        # An editable install inside the source tree: the CMake build directory.
        here.parent.parent / "build" / "lib" / _LIBRARY_NAME,
    ]


def _check_torch_version(path: Path) -> None:
    # LibTorch has no stable C++ ABI: a library built against another torch
    # fails to load with a bare "undefined symbol", or worse, loads and
    # misbehaves. The build writes the version it used beside the library.
    stamp = path.parent / "libnanobragg_ops.torch_version"
    if not stamp.is_file():
        return
    built = stamp.read_text().strip()
    running = torch.__version__.split("+")[0]
    if built != running:
        raise ImportError(
            f"nanobragg_ops: {path} was built against torch {built}, but this is torch "
            f"{torch.__version__}; rebuild it against this torch (pip install ./torch_extension, "
            f"or scripts/setup.sh)"
        )


def _already_loaded() -> Path | None:
    """The file of the copy of the library that serves the operators, if one
    is in this process already (None when none is, or when it cannot be told).

    A second copy (the build directory's after the wheel's, say) would only
    warn and register nothing (csrc/common/library_init.h), so the package
    uses the copy loaded first: by torch.ops.load_library, by a C++ host that
    links it, or by an earlier import. The copies answer which file that is
    (nanobragg_ops_serving_file).
    """
    files = sorted(torch.ops.loaded_libraries)
    try:  # linked by the host, or loaded some other way: the mapped files
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and Path(fields[5].strip()).name.startswith(_LIBRARY_NAME):
                    files.append(fields[5].strip())
    except OSError:
        pass
    for file in dict.fromkeys(files):  # (maps lists a file once per mapped segment)
        try:  # (already loaded: ctypes gets the same handle, nothing runs again)
            serving_file = ctypes.CDLL(file).nanobragg_ops_serving_file
        except (OSError, AttributeError):
            continue
        serving_file.restype = ctypes.c_char_p
        answer = serving_file()
        if answer:
            return Path(os.fsdecode(answer))
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _load() -> Path | None:
    if hasattr(torch.ops.nanobragg, "tricubic_interp"):
        serving = _already_loaded()
        wanted = os.environ.get("NANOBRAGG_OPS_LIBRARY")
        if serving is None or (wanted and not _same_file(serving, Path(wanted))):
            warnings.warn(
                f"nanobragg_ops: the operators are already registered in this process, by "
                f"{serving or 'a copy of the library that cannot be identified'}; it serves them"
                + (f", not NANOBRAGG_OPS_LIBRARY={wanted}" if wanted else ""),
                stacklevel=3,
            )
        return serving
    candidates = _candidate_paths()
    for path in candidates:
        if path.is_file():
            _check_torch_version(path)
            try:
                torch.ops.load_library(str(path))
            except OSError as e:
                raise ImportError(
                    f"nanobragg_ops: cannot load {path} into torch {torch.__version__}: {e}"
                ) from e
            return path
    tried = "\n  ".join(str(p) for p in candidates)
    raise ImportError(
        f"nanobragg_ops: cannot find {_LIBRARY_NAME}; build it first "
        f"(scripts/run_tests.sh or cmake --build build), or point "
        f"NANOBRAGG_OPS_LIBRARY at it. Tried:\n  {tried}"
    )


# The file the operators come from (None only when they were registered before
# the import by a copy that cannot be found, such as one linked statically).
library_path: Path | None = _load()


def tricubic_interp(
    grid: torch.Tensor,
    hkl: torch.Tensor,
    index_min: Union[Sequence[int], int],
    default_value: float = 0.0,
    out_of_range: str = "default",
) -> torch.Tensor:
    """Tricubic (4-point Lagrange) interpolation of a structure-factor grid.

    The closed form of nanoBragg's ``polin3``: with ``n = floor(x)`` and
    ``u = x - n`` on each axis, the value is the sum over the 4x4x4 nodes
    ``n-1 .. n+2`` of ``w_a(u_h) w_b(u_k) w_c(u_l) * grid[...]``.

    Args:
        grid: ``[Nh, Nk, Nl]`` float32/float64 structure factors;
            ``grid[i, j, k]`` is the value at Miller index
            ``(h_min + i, k_min + j, l_min + k)``.
        hkl: ``[..., 3]`` fractional Miller indices (h, k, l last), same
            dtype and device as ``grid``; any leading shape and strides.
        index_min: ``(h_min, k_min, l_min)``, the Miller index of ``grid[0, 0, 0]``
            (one int: the same for all three, as for any ``int[3]`` argument).
        default_value: the value of points whose stencil leaves the grid.
        out_of_range: what such points get, decided per point:
            ``"default"``: ``default_value``;
            ``"nearest"``: the grid value at the nearest node, rounded as
            nanoBragg does (``ceil(x - 0.5)``), or ``default_value`` if that
            node is outside the grid too.

    Returns:
        ``hkl.shape[:-1]``, dtype of ``grid``. Differentiable with respect to
        ``grid`` and ``hkl`` (exact analytic first derivatives).
    """
    return torch.ops.nanobragg.tricubic_interp.default(
        grid,
        hkl,
        _index_triple(index_min, "tricubic_interp"),
        _number(default_value),
        out_of_range,
    )


# Arguments that are not what the schema takes pass through unconverted, so
# that the operator's schema rejects them with a message that names the
# operator and the argument (float(), int() and bool() would raise a bare
# TypeError for a complex number, accept a string, or turn 2.7 into 2).
def _number(value):
    """A real number as a float: Python's, NumPy's scalars and 0-dim arrays,
    Decimal; a string, a complex number or a tensor as given."""
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (str, bytes, torch.Tensor)) or not hasattr(value, "__float__"):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):  # NumPy's complex arrays, ...
        return value


def _wrong_kind(op: str, name: str, expected: str, value: Any) -> RuntimeError:
    """The schema's own message, for a value its parser would convert
    (PyTorch's parser truncates a float tensor given for an int, and takes
    None or a float for a bool)."""
    return RuntimeError(
        f"nanobragg::{op}() Expected a value of type '{expected}' for argument '{name}' but "
        f"instead found type '{type(value).__name__}'.\nValue: {value!r}"
    )


def _integer(value, op: str, name: str):
    """An integer as an int: Python's, NumPy's scalars, integer 0-dim arrays
    and tensors, SymInts; a string as given (the schema rejects it); any
    other number or tensor that is no integer (2.7, Decimal, a float tensor,
    which PyTorch's parser would truncate) is an error here."""
    if isinstance(value, (str, bytes)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        if isinstance(value, numbers.Number) or hasattr(value, "__float__"):  # tensors, arrays too
            raise _wrong_kind(op, name, "int", value) from None
        return value


def _flag(value, op: str, name: str):
    """A bool: Python's, NumPy's, an integer (Python's, NumPy's scalars and
    0-dim arrays, 0-dim integer or bool tensors), a SymBool as given; a
    string as given (the schema rejects it); anything else (None, 0.3, a
    one-element tensor of another shape) is an error here, which PyTorch's
    parser would take as a bool."""
    if isinstance(value, (str, bytes, torch.SymBool)):
        return value
    if getattr(value, "ndim", 0) == 0:
        if not isinstance(value, torch.Tensor) and getattr(getattr(value, "dtype", None), "kind", None) == "b":
            return bool(value)  # NumPy's bools, which have no __index__
        try:
            return bool(operator.index(value))
        except TypeError:
            pass
    raise _wrong_kind(op, name, "bool", value)


def _index_triple(value, op: str):
    """index_min as a list of ints, or one integer for all three."""
    if isinstance(value, Iterable) and getattr(value, "ndim", 1) != 0:
        return [_integer(v, op, "index_min") for v in value]
    return _integer(value, op, "index_min")


def _scalar_like(
    value: Union[float, torch.Tensor], like: torch.Tensor, valid: Callable[[float], bool]
) -> Any:
    """A real number (_number) as a 0-dim tensor for the operator; tensors pass
    as given (no copy, wherever they live), and so does what is no number (for
    the schema to reject)."""
    number = _number(value)
    if not isinstance(number, float):
        return value
    if not valid(number):
        # Outside the contract (thickness finite and >= 0, attenuation length
        # > 0): as a CPU tensor, which the operator reads on the host and
        # rejects with its error. On a GPU it could only give NaN.
        return torch.tensor(number, dtype=torch.float64)
    # In float64, as a 0-dim float64 tensor would be: the operator reads the
    # scalars in double and combines them there (thickness / (L att)), so a
    # number is not rounded to intensity's dtype first (1e-50 is a valid
    # attenuation length; in float32 it would be 0). torch.full writes the
    # value on the device (a fill kernel); torch.tensor would copy it from
    # host memory, which waits for the GPU and cannot be captured in a CUDA
    # graph.
    return torch.full((), number, dtype=torch.float64, device=like.device)


def detector_absorption(
    intensity: torch.Tensor,
    pixel_coords: torch.Tensor,
    odet: torch.Tensor,
    thickness: Union[float, torch.Tensor],
    attenuation_length: Union[float, torch.Tensor],
    thicksteps: int,
    oversample_thick: bool,
    per_layer: bool = False,
) -> torch.Tensor:
    """Capture fraction of a thick sensor, as nanoBragg's ``-detector_thick``,
    ``-detector_abs``, ``-thicksteps`` and ``-oversample_thick``.

    The sensor of ``thickness`` is split into ``L = thicksteps`` layers of
    ``dz = thickness / L``; with ``mu = 1 / attenuation_length`` and the
    parallax ``rho_t = odet . p_t / |p_t|`` (``|rho_t|`` kept >= 1e-10), layer
    ``t`` captures ``c_t = exp(-t dz mu / rho_t) - exp(-(t+1) dz mu / rho_t)``,
    and the result is ``sum_t c_t I_t`` (``oversample_thick=True``) or
    ``c_{L-1} * mean_t I_t`` (``False``, nanoBragg's "last value").

    Units: only ``thickness`` and ``attenuation_length`` share one length
    unit (any: metres, mm, um; only their ratio matters); ``pixel_coords``
    may be in any unit, since a pixel's position only gives its direction
    ``p / |p|``.

    Args:
        intensity: pixel intensities, float32/float64.
        pixel_coords: ``[..., 3]`` pixel positions relative to the sample,
            dtype of ``intensity``.
        odet: ``[3]`` detector normal (unit vector, pointing away from the
            sample in the usual geometry; a flipped one gives negative
            fractions, as in both references); any floating dtype, on
            ``intensity``'s device.
        thickness: sensor thickness, >= 0; 0 means no thickness modelling
            (``mean_t I_t`` is returned). A Python number, or a 0-dim tensor
            of any floating dtype on ``intensity``'s device or on the CPU.
        attenuation_length: ``1 / mu``, > 0; ``inf`` means nothing is absorbed
            (every fraction, and the output, is 0). Taken like ``thickness``.
        thicksteps: number of layers ``L`` >= 1.
        oversample_thick: sum the layers (True) or take the last one (False).
        per_layer: False: the same ``intensity`` and ``pixel_coords`` serve
            every layer and broadcast to the pixel shape ``P``. True:
            dimension 0 of both is the layer dimension, of size L or 1.

    ``odet``, ``thickness`` and ``attenuation_length`` are read and combined
    in float64 whatever their dtype (a Python number as a float64 value), the
    per-pixel math runs in ``intensity``'s dtype, and each gradient comes
    back in its argument's own dtype and device.

    nanoBragg C's ``-thicksteps N`` uses ``dz = T / (N - 1)``; to reproduce
    its layering pass ``thickness = N * T / (N - 1)``. C's last-value mode
    also multiplies the *sum* of the layers' intensities (L times the
    ``False`` branch here), and its ``-oversample_thick`` weights a running
    sum; this operator follows the PyTorch port (docs/CONTRACT.md §2).

    Returns:
        ``P``, dtype of ``intensity``; differentiable in ``intensity``,
        ``pixel_coords``, ``odet``, ``thickness`` and ``attenuation_length``.
    """
    return torch.ops.nanobragg.detector_absorption.default(
        intensity,
        pixel_coords,
        odet,
        _scalar_like(thickness, intensity, lambda t: 0 <= t < math.inf),
        _scalar_like(attenuation_length, intensity, lambda a: a > 0),
        _integer(thicksteps, "detector_absorption", "thicksteps"),
        _flag(oversample_thick, "detector_absorption", "oversample_thick"),
        _flag(per_layer, "detector_absorption", "per_layer"),
    )
