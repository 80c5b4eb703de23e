"""The measurement scripts whose output the reports cite still run and print
the table the reports quote (one round: a smoke test, no timing checked)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_tricubic_backward_parts_prints_every_part():
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "tricubic_backward_parts.py"), "--rounds", "1"],
        capture_output=True, text=True, env=dict(os.environ),
        timeout=300,  # a hang guard only: one round takes seconds
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [row.split("|")[1].strip() for row in rows[1:]]  # rows[0]: the header
    assert names == [
        "forward",
        "backward op, grid gradient alone",
        "backward op, hkl gradient alone",
        "backward op, both gradients",
        "forward+backward through autograd (`out.sum().backward()`)",
    ]
    for row in rows[1:]:
        ms, forwards = float(row.split("|")[2]), float(row.split("|")[3])
        assert ms > 0 and math.isfinite(forwards)
    assert "262144 lookups" in out.stdout  # the bench's 512², one per pixel
