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


def test_readme_tutorial_commands_run_on_the_users_spec(tmp_path):
    """The tutorial's command-line block (the lines naming ``my_lamb.py``) runs on the tutorial's spec saved as
    ``my_lamb.py``, as the README says."""
    import shlex
    import subprocess
    import sys

    spec_block = next(b for b in python_blocks() if 'optgen.Spec("MyLAMB")' in b)
    (tmp_path / "my_lamb.py").write_text(spec_block)
    bash = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M)
    tutorial = next(b for b in bash if "my_lamb.py" in b)
    commands = [line.split("#")[0].strip() for line in tutorial.splitlines() if line.strip()]
    assert any(c.startswith("optgen bench") for c in commands) and any(c.startswith("optgen inspect") for c in commands)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "optgen"
        if argv[1] == "bench":
            argv += ["--rounds", "2", "--sample-ms", "0"]  # a smoke run: the command as written, fewer samples
        done = subprocess.run(
            [sys.executable, "-m", "optgen.cli", *argv[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        if argv[1] == "show" and "--plan" in argv:
            assert "MyLAMB" in done.stdout and "40 B/param" in done.stdout
        if argv[1] == "show" and "triton" in argv:
            assert "@triton.jit" in done.stdout
        if argv[1] == "inspect":
            assert "sm_90" in done.stdout
    assert (tmp_path / "r.json").exists() and (tmp_path / "r.png").exists()


def test_readme_cites_the_papers_not_a_local_path():
    """LARS and LAMB are cited by paper (a reader has no ``../shared/seed``)."""
    text = " ".join(README.read_text().split())  # titles may wrap across lines
    assert "shared/seed" not in text
    assert "Large Batch Training of Convolutional Networks" in text and "arXiv:1708.03888" in text
    assert "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes" in text
    assert "arXiv:1904.00962" in text


def test_gitignore_covers_the_demo_output(monkeypatch):
    """``optgen demo`` run in a checkout writes its default folder there: git should not offer to add it."""
    from optgen import cli, demo

    seen = {}
    monkeypatch.setattr(demo, "run", lambda out_dir, **kwargs: seen.setdefault("out", out_dir))  # no training
    assert cli.main(["demo"]) == 0
    ignored = (README.parent / ".gitignore").read_text().split()
    assert f"{seen['out']}/" in ignored or f"/{seen['out']}/" in ignored, seen


def test_demo_seeds_train_each_split_and_report_mean_and_lowest(monkeypatch, tmp_path, capsys):
    """``optgen demo --seeds 3`` trains every recipe on seeds 0, 1, 2 (each its own data split and model) and prints
    their mean and lowest accuracy; ``--seeds 0`` is refused by the parser."""
    import sys

    from optgen import cli, demo

    calls = []

    def fake_train(name, steps, backend, state_format=None, seed=0):
        calls.append((name, seed))
        return [1.0, 0.5], [0.90, 0.80, 0.97][seed], 0.1

    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no plot
    assert cli.main(["demo", "--seeds", "3", "--out", str(tmp_path), "--steps", "2"]) == 0
    assert calls == [(name, seed) for name in demo.RECIPES for seed in range(3)]
    out = capsys.readouterr().out
    assert "test accuracy  89.0% (lowest 80.0%)" in out, out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--seeds", "0"])
    assert "--seeds: must be at least 1" in capsys.readouterr().err


# the README's table of the built-ins' plans, by row: the built-in and its shape flag's values (matrices / vectors)
PLAN_ROWS = {
    "Adam, AdamW": [("adamw", {})],
    "LARS": [("lars", {})],
    "LAMB": [("lamb", {})],
    "NVLAMB": [("nvlamb", {})],
    "LARSOptax": [("lars_optax", {})],
    "NovoGrad": [("novograd", {})],
    "Lion": [("lion", {})],
    "LayerAdaptiveLion": [("layer_adaptive_lion", {})],
    "AdaBelief": [("adabelief", {})],
    "Adafactor (matrices / vectors)": [("adafactor", {"factored": True}), ("adafactor", {"factored": False})],
    "CAME (matrices / vectors)": [("came", {"factored": True}), ("came", {"factored": False})],
}


def test_readme_plan_table_is_the_planners():
    """Passes, launches per step and bytes per parameter in the README's table are the planner's figures."""
    from optgen.analysis import plan
    from optgen.ir import lower
    from optgen.specs import BUILTINS

    text = README.read_text()
    table = text[text.index("## Plans of the built-ins") :].split("\n\n")[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        numbers = [[int(n) for n in re.findall(r"\d+", cell.split("(")[0])] for cell in cells[1:4]]
        rows[cells[0]] = numbers
    assert set(PLAN_ROWS) <= set(rows), set(PLAN_ROWS) - set(rows)
    for name, variants in PLAN_ROWS.items():
        plans = [plan(lower(BUILTINS[key](), flags)) for key, flags in variants]
        expected = [[len(p.passes) for p in plans], [p.launches_per_step for p in plans], [p.bytes_per_param for p in plans]]
        assert rows[name] == expected, (name, rows[name], expected)
