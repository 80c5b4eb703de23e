"""What a measurement script prints about the run it made: the git revision
of this tree and the CPU's model, for the header of its table."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def git_revision() -> str:
    """The short revision of the tree this script is in, or 'unknown'."""
    revision = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True,
    ).stdout.strip()
    return revision or "unknown"


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
