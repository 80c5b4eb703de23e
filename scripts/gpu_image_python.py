#!/usr/bin/env python3
"""A Python with what the GPU machine's image has, and nothing more, for the
GPU check's dry run (scripts/gpu_check.sh --dry-run).

The GPU image brings python3 with torch and pytest; this project's venv also
holds NumPy, matplotlib, expecttest, build tools and an editable install of
the package. A dry run under the venv would not notice a test module that
imports one of those. This makes a venv at DEST, without pip, whose
site-packages links (not copies) only torch, pytest and what they require,
from the site-packages of the interpreter that runs it:

    .venv/bin/python scripts/gpu_image_python.py DEST   # prints DEST/bin/python
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOTS = ("torch", "pytest")


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...]) -> list[md.Distribution]:
    """The distributions of `roots` and everything they require, with the
    extras asked for (requirements whose markers do not hold here left out)."""
    from packaging.requirements import Requirement  # (in the venv: pytest requires it)

    found: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(name, "") for name in roots]
    while todo:
        name, extra = todo.pop()
        name = normalised(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        dist = found.setdefault(name, md.distribution(name))
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, e) for e in ("", *req.extras)]
    return list(found.values())


def top_level_entries(dist: md.Distribution) -> set[str]:
    """The names directly under site-packages that the distribution installed."""
    names = set()
    for f in dist.files or []:
        parts = Path(f).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].endswith(".pth"):
            names.add(parts[0])
    return names


def main() -> None:
    dest = Path(sys.argv[1]).resolve()
    site = Path(sysconfig.get_paths()["purelib"])
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", "--clear", str(dest)],
                   check=True)
    out = Path(subprocess.run([str(dest / "bin" / "python"), "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip())
    for dist in closure(ROOTS):
        for name in top_level_entries(dist):
            if (site / name).exists() and not (out / name).exists():
                (out / name).symlink_to(site / name)
    print(dest / "bin" / "python")


if __name__ == "__main__":
    main()
