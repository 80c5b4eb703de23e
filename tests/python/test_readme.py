"""The README's Python examples (```python blocks; ```py marks fragments)
run as written, so that the README stays true."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    readme = Path(__file__).resolve().parents[2] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert blocks, "the README has no Python example"
    scopes = []
    for code in blocks:
        scope: dict = {}
        exec(compile(code, str(readme), "exec"), scope)
        scopes.append(scope)
    # The first example's gradients, the second's second derivatives.
    assert scopes[0]["hkl"].grad is not None and scopes[0]["thickness"].grad is not None
    assert scopes[1]["jac"].shape == (4, 4, 3) and scopes[1]["hessian"].shape == (2, 3, 2, 3)
    assert scopes[1]["hv"].abs().sum() > 0
