#!/usr/bin/env python3
"""Fails when a lower layer of the library includes a higher one.

The library's layers, from the bottom:
  math          per-element math shared by CPU, SIMD and CUDA kernels, and
                the host/device helpers it uses (c10 and the standard library only)
  kernels       backend kernels, their host plumbing and argument checks,
                CPU-capability dispatch, CUDA launch helpers (csrc/)
  registration  schemas, Autograd, Meta, vmap and autocast kernels (ops/)
  api           the public C++ header and its implementation
A file may include files of its own layer or below. Outside the library:
the bench, the fuzzer and the examples use the public API, their own files
and the reference library (tests/reference/); the tests may also include
the math headers, which are written to be tested on their own.

Usage: scripts/check_layers.py [ROOT]   (prints every violation; exit 1 if any)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LAYERS = ["math", "kernels", "registration", "api"]

# First match wins.
LAYER_OF = [
    (r"csrc/include/.*", "api"),
    (r"ops/api\.cpp", "api"),
    (r"ops/.*", "registration"),
    (r"csrc/common/(macros|dual|point_offsets)\.h", "math"),
    (r"csrc/[a-z_]+/[a-z_]+_math\.h", "math"),
    (r"csrc/absorption/absorption_scalars\.h", "math"),
    (r"csrc/.*", "kernels"),
]

# Where quoted includes are looked up (the build's include directories).
INCLUDE_DIRS = ["csrc", "ops", "csrc/include", "tests/reference", "tests/cpp", "bench"]

OUTSIDE = {  # directory: layers it may include (besides its own files)
    "tests": {"api", "math"},
    "bench": {"api"},
    "fuzz": {"api"},
    "examples": {"api"},
}

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
SOURCES = ("*.h", "*.cuh", "*.cpp", "*.cu")


def layer_of(rel: str) -> str | None:
    for pattern, layer in LAYER_OF:
        if re.fullmatch(pattern, rel):
            return layer
    return None


def resolve(root: Path, including: Path, name: str) -> str | None:
    for base in [including.parent] + [root / d for d in INCLUDE_DIRS]:
        candidate = base / name
        if candidate.is_file():
            return candidate.resolve().relative_to(root.resolve()).as_posix()
    return None  # a generated or external header: not ours to check


def violations(root: Path, includes: dict[str, list[str]]) -> list[str]:
    """includes: file -> the repository files it includes (relative paths)."""
    found = []
    for src, targets in sorted(includes.items()):
        top = src.split("/", 1)[0]
        src_layer = layer_of(src)
        for target in targets:
            target_layer = layer_of(target)
            if target_layer is None:
                if top in OUTSIDE and target.startswith(("tests/reference/", top + "/")):
                    continue
                if top in OUTSIDE or src_layer is not None:
                    found.append(f"{src}: includes {target}, which is outside the library "
                                 f"and not {top}'s own or the reference library")
                continue
            if src_layer is not None:
                if LAYERS.index(target_layer) > LAYERS.index(src_layer):
                    found.append(f"{src} ({src_layer}) includes {target} ({target_layer}), "
                                 f"a higher layer")
            elif top in OUTSIDE and target_layer not in OUTSIDE[top]:
                found.append(f"{src} includes {target} ({target_layer}); {top}/ may use only "
                             f"{', '.join(sorted(OUTSIDE[top]))} headers")
    return found


def misplaced_implementations(includes: dict[str, list[str]]) -> list[str]:
    """A source file that implements a header of a lower layer (x.cpp beside
    nothing, including some other directory's x.h) belongs with that header."""
    found = []
    for src, targets in sorted(includes.items()):
        if not src.endswith((".cpp", ".cu")) or layer_of(src) is None:
            continue
        stem = src.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        for target in targets:
            if target.rsplit("/", 1)[-1] == stem + ".h" and target.rsplit("/", 1)[0] != src.rsplit("/", 1)[0]:
                target_layer = layer_of(target)
                if target_layer and LAYERS.index(target_layer) < LAYERS.index(layer_of(src)):
                    found.append(f"{src} implements {target} ({target_layer}) from a higher layer")
    return found


def collect(root: Path) -> dict[str, list[str]]:
    includes = {}
    for top in ["csrc", "ops", *OUTSIDE]:
        for pattern in SOURCES:
            for path in (root / top).rglob(pattern):
                rel = path.relative_to(root).as_posix()
                names = INCLUDE.findall(path.read_text(errors="replace"))
                includes[rel] = [t for t in (resolve(root, path, n) for n in names) if t]
    return includes


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    includes = collect(root)
    found = violations(root, includes) + misplaced_implementations(includes)
    for line in found:
        print(line)
    print(f"check_layers: {len(includes)} files, {sum(map(len, includes.values()))} includes, "
          f"{len(found)} violations")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
