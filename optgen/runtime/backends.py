"""The runtime backends, by name: one table that ``backend=`` choices, ``"auto"`` and the optimizer read.

A backend is a class with ``name``, ``options`` (the keyword options its constructor takes from the
optimizer, e.g. the Triton backend's launch-configuration ``tuner``), ``check(param, grad, state_dtype)``
(refuse what its kernels cannot take, before any state exists), ``step(items, scratch_of, device_scalars,
reducer)`` and ``invalidate()``. Adding one is a module and an entry here; nothing else branches on names.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # imported on first use: a backend's dependencies (triton) load only when it runs
    cls: str
    refuse: Callable[[torch.device], str | None]  # why it cannot run on a device, or None

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)


def _triton_refuses(device: torch.device) -> str | None:
    if device.type == "cpu" and not triton_interpreting():
        return (
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "triton, or use backend='c' (or 'auto')"
        )
    if device.type not in ("cuda", "cpu"):
        return f"backend='triton' runs on CUDA tensors, not {device.type} ones: use backend='auto'"
    return None


def _c_refuses(device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"backend='c' runs on CPU tensors, not {device.type} ones: use backend='auto'"


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", "optgen.runtime.torch_backend", "TorchBackend", lambda device: None),
    "triton": Backend("triton", "optgen.runtime.triton_backend", "TritonBackend", _triton_refuses),
    "c": Backend("c", "optgen.runtime.c_backend", "CBackend", _c_refuses),
}
# backend="auto": by device type; any other device runs the torch backend
AUTO = {"cuda": "triton", "cpu": "c"}
CHOICES = ("auto", *BACKENDS)


def resolve(choice: str, device: torch.device) -> Backend:
    """The backend ``choice`` ("auto" or a name) runs on ``device``; a RuntimeError says why it cannot."""
    backend = BACKENDS[AUTO.get(device.type, "torch") if choice == "auto" else choice]
    problem = backend.refuse(device)
    if problem:
        raise RuntimeError(problem)
    return backend


def make(backend: Backend, plan, options: dict):
    """An instance of ``backend`` for ``plan``, given the options its class takes."""
    cls = backend.load()
    return cls(plan, **{k: v for k, v in options.items() if k in cls.options})


def eager(plan):
    """The eager torch backend of ``plan``, for the steps a kernel backend hands over (no C compiler; a factored
    plan over several storage-dtype partitions, whose reduce step compiles the states' dtypes in)."""
    return make(BACKENDS["torch"], plan, {})
