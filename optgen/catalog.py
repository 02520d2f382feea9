"""The optimizers a command can name: the built-ins and a user's ``path/file.py:VARIABLE``, the flag
variants of a spec, and the one-paragraph plain-text summary ``optgen list`` shows.

Here, not in ``cli``, so that the commands' modules (``bench``, ``inspect_kernels``) and ``cli`` all import
one module that imports none of them.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from pathlib import Path

from . import transforms
from .analysis import plan as make_plan
from .ir import lower
from .spec import Spec
from .specs import BUILTINS


def resolve_spec(name: str) -> Spec:
    """A built-in name (``lamb``) or ``path/to/file.py:VARIABLE`` (a Spec, or a function returning one)."""
    if name.lower() in BUILTINS:
        return BUILTINS[name.lower()]()
    if ":" in name:
        path, _, variable = name.rpartition(":")
        file = Path(path)
        if not file.is_file():
            raise SystemExit(f"optgen: no such file: {path}")
        module_spec = importlib.util.spec_from_file_location(f"optgen_user_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        # as `python file.py` does: the file's folder first on sys.path, so it can import its neighbours
        folder = str(file.resolve().parent)
        sys.path.insert(0, folder)
        try:
            module_spec.loader.exec_module(module)
        finally:
            sys.path.remove(folder)
        if not hasattr(module, variable):
            raise SystemExit(f"optgen: {path} has no {variable!r}")
        value = getattr(module, variable)
        if isinstance(value, type) and hasattr(value, "_spec"):  # a class made by optgen.build
            value = value._spec
        elif callable(value) and not isinstance(value, Spec):
            value = value()
        if not isinstance(value, Spec):
            raise SystemExit(f"optgen: {name} is a {type(value).__name__}, not an optgen.Spec")
        return value
    raise SystemExit(f"optgen: unknown optimizer {name!r}; built-ins: {', '.join(BUILTINS)} (or path/file.py:SPEC)")


def default_plan(spec: Spec, flags: dict | None = None):
    """The plan of ``spec``'s variant ``flags`` as its class runs it by default: with its default state format
    (AdamW8bit's and LAMB8bit's 8-bit states)."""
    ir = lower(spec, flags or {})
    if spec.state_format == "8bit":
        ir = transforms.apply(ir, quantized=None)
    return make_plan(ir)


def variants(spec: Spec):
    """Every flag combination of ``spec`` (shape flags too: true for the largest parameters), defaults first."""
    names = [f.name for f in spec.flags] + [f.name for f in spec.shape_flags]
    defaults = tuple(f.default for f in spec.flags) + tuple(True for _ in spec.shape_flags)
    combos = sorted(itertools.product((False, True), repeat=len(names)), key=lambda c: (c != defaults, c))
    return [dict(zip(names, combo)) for combo in combos]


# The reStructuredText of the built-ins' docstrings, as a terminal should show it: roles (:math:, :class:) and
# double- or single-backquoted literals lose their markup, and math keeps its symbols without LaTeX commands.
_RST_ROLE = re.compile(r":[\w.+-]+:`([^`]*)`")
_RST_LITERAL = re.compile(r"``(.+?)``")
_RST_INTERPRETED = re.compile(r"`([^`]+)`")
_TEX_SYMBOLS = {
    r"\|": "‖",
    r"\,": " ",
    r"\!": "",
    r"\alpha": "α",
    r"\beta": "β",
    r"\gamma": "γ",
    r"\epsilon": "ε",
    r"\eta": "η",
    r"\lambda": "λ",
    r"\mu": "μ",
    r"\phi": "φ",
    r"\tau": "τ",
    r"\Delta": "Δ",
}


def _plain_math(tex: str) -> str:
    for command, text in _TEX_SYMBOLS.items():
        tex = tex.replace(command, text)
    return re.sub(r"\\([A-Za-z]+)", r"\1", tex).replace("{", "").replace("}", "")


def summary(doc: str | None) -> str:
    """The first paragraph of a spec's docstring as one line of plain text (RST roles and literals unwrapped),
    whole: what ``optgen list`` prints, wrapped to the terminal."""
    lines = []
    for line in (doc or "").strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
    text = " ".join(lines)
    text = _RST_ROLE.sub(lambda m: _plain_math(m.group(1)), text)
    text = _RST_LITERAL.sub(r"\1", text)
    text = _RST_INTERPRETED.sub(r"\1", text)
    # A paragraph that ends in ':' introduces the formula below it, which a one-line summary does not show.
    return text[:-1].rstrip() + "." if text.endswith(":") else text
