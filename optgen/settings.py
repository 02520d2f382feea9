"""Every ``OPTGEN_*`` environment switch in one table, and its typed reader.

A switch is read when the reader is called, never at import: tests (``monkeypatch.setenv``) and the benchmark
change them inside one process. A set but empty variable means its default. A bad value is a ``ValueError``
that names the variable and the value (``OPTGEN_C_CHUNK='abc': expected a number of elements``).

This module imports nothing from optgen, so that every layer (codegen, runtime, the command line) may read it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    """One switch: its variable, its kind (which reader parses it), its default and what it does."""

    name: str
    kind: str  # "flag" (1/0, true/false, yes/no, on/off), "count" (elements, >= 1), "choice" or "path"
    default: object
    doc: str
    choices: tuple[str, ...] = ()  # the values of a "choice", lower case


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("OPTGEN_AUTOTUNE", "flag", False,
                "the default of the optimizers' autotune= argument: time the Triton launch configurations"),
        Setting("OPTGEN_AUTOTUNE_SEARCH", "choice", "descent",
                "autotune's search: descent (12 to 21 of the 72 candidates timed) or grid (all of them)",
                choices=("descent", "grid")),
        Setting("OPTGEN_AUTOTUNE_MAX_ELEMENTS", "count", 2**27,
                "elements autotune copies for its trials (the largest tensors first)"),
        Setting("OPTGEN_CACHE_DIR", "path", "~/.cache/optgen",
                "where generated modules, C objects and autotune results are cached"),
        Setting("OPTGEN_CHUNK", "count", 65536,
                "elements per Triton program: shapes the chunk and partial tables (tests use small chunks)"),
        Setting("OPTGEN_BLOCK", "count", 1024,
                "elements per loop iteration of a Triton program; must divide OPTGEN_CHUNK"),
        # 256 KiB of each fp32 buffer: a unit of OpenMP work.
        Setting("OPTGEN_C_CHUNK", "count", 65536, "elements per chunk of the C kernels (tests use small chunks)"),
        # Below it a pass runs on the calling thread: an OpenMP fork/join costs microseconds on a quiet machine
        # and milliseconds on a busy one (threads wait for a core), more than such a pass takes.
        Setting("OPTGEN_C_PARALLEL_MIN", "count", 1 << 15,
                "elements a C pass must cover to run on several threads"),
        # A plan with per-layer reductions only runs all its passes over a block of whole tensors before the next
        # block: the later passes re-read the block from cache instead of memory (a huge value: one block).
        Setting("OPTGEN_C_BLOCK_BYTES", "count", 8 << 20,
                "bytes of buffers a block of tensors spans when the C kernels run all passes block by block"),
        # The compiled checks read torch's C++ objects (c10::TensorImpl): a switch to do without them, and the
        # benchmark's comparison.
        Setting("OPTGEN_HOST_READS_IN_C", "flag", True,
                "fast steps check tensors' identities, metadata and storage and gather gradients' addresses in "
                "compiled code (runtime/host_ptrs.cpp, built against torch's headers); 0: from Python (dynamo's "
                "TensorGuards and Python reads). Read when a step sets up the fast path"),
        Setting("OPTGEN_INSPECT_CHILD", "flag", False,
                "internal: set by `optgen inspect` on the clean process it starts when TRITON_INTERPRET is set"),
    )
}  # fmt: skip


def default(name: str):
    """The default of ``name`` (what the reader returns while the variable is unset)."""
    return SETTINGS[name].default


def _raw(name: str, kind: str) -> str | None:
    """The variable's text, None when unset or empty. ``name`` must be in the table with this ``kind``: a
    misspelt name or a wrong reader fails loudly instead of reading nothing."""
    setting = SETTINGS[name]
    if setting.kind != kind:
        raise TypeError(f"{name} is a {setting.kind} setting, not a {kind}")
    text = os.environ.get(name, "")
    if kind != "path":  # a path is taken as given; numbers and words may carry blanks
        text = text.strip()
    return text or None


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def flag(name: str) -> bool:
    """A switch: 1/true/yes/on or 0/false/no/off (any case); unset or empty is its default."""
    text = _raw(name, "flag")
    if text is None:
        return SETTINGS[name].default
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={text!r}: expected 1 or 0 (true/false, yes/no, on/off)")


def count(name: str) -> int:
    """A positive whole number of elements: ``65536`` or ``1e6``."""
    text = _raw(name, "count")
    if text is None:
        return SETTINGS[name].default
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a number of elements") from None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{name}={text!r}: expected a whole number of elements")
    if value < 1:
        raise ValueError(f"{name}={text!r}: expected a positive number of elements")
    return int(value)


def choice(name: str) -> str:
    """One of the setting's ``choices`` (any case, surrounding blanks ignored), lower case."""
    text = _raw(name, "choice")
    if text is None:
        return SETTINGS[name].default
    value = text.lower()
    choices = SETTINGS[name].choices
    if value not in choices:
        expected = " or ".join(filter(None, [", ".join(map(repr, choices[:-1])), repr(choices[-1])]))
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return value


def path(name: str) -> Path:
    """A directory, as given; the default's ``~`` is the user's home."""
    text = _raw(name, "path")
    return Path(text) if text is not None else Path(SETTINGS[name].default).expanduser()
