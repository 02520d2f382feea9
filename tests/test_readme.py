"""Every ```python block of README.md runs as pasted, in order, in a fresh directory (```python no-run blocks
are skipped); and every built-in's docstring carries its algorithm in LaTeX."""

import os
import re
from pathlib import Path

import pytest

import optgen

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert blocks, "README.md has no runnable python block"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for number, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {number} failed: {exc!r}\n{block}")
    assert os.getcwd() == str(tmp_path)


@pytest.mark.parametrize("name", sorted(optgen.BUILTINS))
def test_builtin_docstrings_carry_the_algorithm(name):
    cls = getattr(optgen, optgen.BUILTINS[name]().name)
    assert "math::" in cls.__doc__ and r"\begin{aligned}" in cls.__doc__, name
    assert "Args:" in cls.__doc__
