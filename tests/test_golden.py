"""The generated files under generated/ are current, and rendering is byte-stable (also across hash seeds)."""

import os
import subprocess
import sys

import pytest

from optgen import cli
from optgen.analysis import plan
from optgen.catalog import default_plan
from optgen.codegen import render as render_module
from optgen.codegen.render import TARGETS, golden_path, render, source_hash
from optgen.ir import lower
from optgen.specs import BUILTINS


def _all_plans():
    for name, factory in BUILTINS.items():
        spec = factory()
        for flags in cli.variants(spec):
            yield name, flags, default_plan(spec, flags)


def test_generate_check_passes(capsys):
    assert cli.main(["generate", "--check"]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "117 files" in out  # 39 variants (28 + 3 factored + 8 8-bit) x (torch, triton, c)


def test_golden_files_are_the_ones_loaded():
    """Each built-in variant's golden file carries the current source hash, so no cache file is generated."""
    for name, flags, p in _all_plans():
        for target in TARGETS:
            path = golden_path(p, target)
            assert path.is_file(), path
            assert render_module._file_hash(path) == source_hash(p), (name, flags, target)
            assert path.read_text() == render(p, target), (name, flags, target)


def test_rendering_twice_gives_identical_bytes():
    for name, flags, p in _all_plans():
        again = default_plan(BUILTINS[name](), flags)
        for target in TARGETS:
            first = render(p, target).encode()
            assert render(p, target).encode() == first
            assert render(again, target).encode() == first, (name, flags, target)


def test_render_rejects_unknown_target():
    _, _, p = next(_all_plans())
    with pytest.raises(ValueError, match="unknown target"):
        render(p, "cuda")


RENDER_LAMB = """
import sys
from optgen.analysis import plan
from optgen.catalog import default_plan
from optgen.ir import lower
from optgen.specs import BUILTINS
from optgen.codegen.render import render
from optgen.catalog import variants
spec = BUILTINS["lamb"]()
for flags in variants(spec):
    p = plan(lower(spec, flags))
    sys.stdout.write(p.describe() + "\\n" + render(p, "torch") + render(p, "triton"))
"""


def test_rendering_is_independent_of_the_hash_seed():
    outputs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = subprocess.run([sys.executable, "-c", RENDER_LAMB], env=env, capture_output=True, text=True,
                                timeout=300, check=True)
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    spec = BUILTINS["lamb"]()
    expected = ""
    for flags in cli.variants(spec):
        p = plan(lower(spec, flags))
        expected += p.describe() + "\n" + render(p, "torch") + render(p, "triton")
    assert outputs[0] == expected
