"""The README's Python examples (```python blocks; ```py marks fragments)
run as written, so that the README stays true."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    readme = Path(__file__).resolve().parents[2] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert blocks, "the README has no Python example"
    for code in blocks:
        scope: dict = {}
        exec(compile(code, str(readme), "exec"), scope)
    assert scope["hkl"].grad is not None and scope["thickness"].grad is not None
