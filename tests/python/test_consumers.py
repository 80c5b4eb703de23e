"""Users outside the repository: a C++ program built against the *installed*
package (examples/, built by scripts/build_examples.sh) runs a TorchScript
module saved here and matches Python's numbers; the refinement example
recovers its parameters; the import refuses a library built for another
torch."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

import nanobragg_ops
from conftest import require_built

# torch 2.11 deprecates TorchScript (the design card still supports it); its
# tests expect the warning instead of hiding it.
JIT_DEPRECATION = r"`torch\.jit\.script` is deprecated"

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "build" / "examples"


def example(name: str) -> Path:
    return require_built(EXAMPLES / name, "scripts/build_examples.sh")


class RefinementLoss(torch.nn.Module):
    """A scaled structure-factor grid seen through a thick sensor, against an
    observed image: both operators, two parameters."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        dt = torch.float64
        self.scale = torch.nn.Parameter(torch.tensor(1.3, dtype=dt))
        self.thickness = torch.nn.Parameter(torch.tensor(80e-6, dtype=dt))
        self.register_buffer("grid", torch.rand(12, 12, 12, generator=gen, dtype=dt) + 1)
        self.register_buffer("hkl", torch.rand(6, 7, 3, generator=gen, dtype=dt) * 6 - 3)
        pixels = torch.rand(6, 7, 3, generator=gen, dtype=dt) * 0.1 - 0.05
        pixels[..., 2] = 0.1
        self.register_buffer("pixels", pixels)
        self.register_buffer("odet", torch.tensor([0.1, 0.0, 1.0], dtype=dt) / (1.01**0.5))
        self.register_buffer("attenuation_length", torch.tensor(234e-6, dtype=dt))
        self.register_buffer("observed", torch.rand(6, 7, generator=gen, dtype=dt) * 10)

    def forward(self) -> torch.Tensor:
        F = torch.ops.nanobragg.tricubic_interp(self.scale * self.grid, self.hkl, [-6, -6, -6], 0.0, "default")
        image = torch.ops.nanobragg.detector_absorption(
            F * F, self.pixels, self.odet, self.thickness, self.attenuation_length, 3, True, False
        )
        return ((image - self.observed) ** 2).mean()


def test_torchscript_module_runs_in_cpp_with_python_numbers(tmp_path):
    module = RefinementLoss()
    with pytest.warns(DeprecationWarning, match=JIT_DEPRECATION):  # PyTorch 2.11's, not ours
        scripted = torch.jit.script(module)
        path = tmp_path / "refinement_loss.pt"
        scripted.save(str(path))
    loss = module()
    loss.backward()
    assert module.scale.grad.abs() > 0 and module.thickness.grad.abs() > 0

    out = subprocess.run([str(example("run_scripted")), str(path)], capture_output=True, text=True, check=True)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith("loss"))
    assert float(lines["loss"]) == pytest.approx(loss.item(), rel=1e-12)
    got = {line.split()[1]: float(line.split()[2]) for line in out.stdout.splitlines() if line.startswith("grad ")}
    assert set(got) == {"scale", "thickness"}, out.stdout
    assert got["scale"] == pytest.approx(module.scale.grad.item(), rel=1e-12)
    assert got["thickness"] == pytest.approx(module.thickness.grad.item(), rel=1e-12)


def test_refine_example_recovers_its_parameters():
    out = subprocess.run([str(example("refine"))], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "recovered" in out.stdout.splitlines()[-1]


def test_import_refuses_a_library_built_for_another_torch(tmp_path, monkeypatch):
    # A copy of the library whose stamp names another torch version.
    lib = tmp_path / "libnanobragg_ops.so"
    lib.write_bytes(nanobragg_ops.library_path.read_bytes())
    (tmp_path / "libnanobragg_ops.torch_version").write_text("1.0.0\n")
    code = "import nanobragg_ops"
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        env={"NANOBRAGG_OPS_LIBRARY": str(lib), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode != 0
    assert "built against torch 1.0.0" in out.stderr and torch.__version__ in out.stderr


def test_pip_installed_wheel_in_a_fresh_venv(tmp_path):
    # build/pip-venv: a fresh venv with only the wheel of ./torch_extension
    # installed (scripts/build_wheel.sh, run by the test command); run from
    # outside the repository so that nothing of the source tree is on the path.
    python = ROOT / "build" / "pip-venv" / "bin" / "python"
    require_built(python, "scripts/build_wheel.sh")
    code = (
        "import torch, nanobragg_ops\n"
        "assert 'pip-venv' in str(nanobragg_ops.library_path), nanobragg_ops.library_path\n"
        "g = torch.arange(216.0).view(6, 6, 6)\n"
        "h = torch.tensor([[2.5, 2.0, 2.25]], requires_grad=True)\n"
        "F = nanobragg_ops.tricubic_interp(g, h, (0, 0, 0))\n"
        "F.sum().backward()\n"
        "I = nanobragg_ops.detector_absorption(torch.ones(1), torch.tensor([[0.0, 0.0, 1.0]]),\n"
        "    torch.tensor([0.0, 0.0, 1.0]), 1.0, 2.0, 3, True)\n"
        "import json\n"
        "print(json.dumps([F.item(), h.grad.tolist(), I.item()]))\n"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    F, h_grad, I = json.loads(out.stdout.strip().splitlines()[-1])
    # A linear grid (value = 36 h + 6 k + l) is interpolated exactly, with
    # gradient (36, 6, 1); capture of 1 - exp(-1/2) at normal incidence.
    assert F == pytest.approx(36 * 2.5 + 6 * 2.0 + 2.25, rel=1e-6)
    assert h_grad[0] == pytest.approx([36.0, 6.0, 1.0], rel=1e-5)
    assert I == pytest.approx(1 - math.exp(-0.5), rel=1e-6)
