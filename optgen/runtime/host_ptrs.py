"""The fast step's per-tensor reads in C: object identities and data pointers of whole lists of tensors compared
(or gathered into a pointer table) in one call each, instead of a Python call per tensor.

A fast step (``StepRunner.fast_step``) must notice a parameter replaced in its group, a parameter's or a
state's storage swapped (``.data =``, ``set_``) and gradients reallocated (``zero_grad(set_to_none=True)``).
Read from Python that is ~100 ns a tensor per read on the development machine: ~95 us of a 200-tensor AdamW
step whose kernel takes ~25 us. ``host_ptrs.c`` reads them through torch's own data-pointer accessor (the one
Inductor's C++ wrappers call), built once per machine like the kernels and loaded with ``ctypes.PyDLL``.

``helper()`` is None where that accessor is missing (it is private to torch) or nothing can be compiled: the
fast step then reads the same values from Python.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from . import cbuild

SOURCE = Path(__file__).with_name("host_ptrs.c")


class HostPtrs:
    """The compiled functions; lists hold only tensors (see ``host_ptrs.c``), tables are int64 CPU tensors."""

    def __init__(self, library: ctypes.CDLL):
        self._library = library  # keeps the functions' object loaded
        for name, argtypes in (
            ("og_same_tensors", [ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]),
            ("og_same_ptrs", [ctypes.py_object, ctypes.c_void_p, ctypes.c_int64]),
            ("og_update_ptrs", [ctypes.py_object, ctypes.c_void_p, ctypes.c_int64]),
        ):
            fn = getattr(library, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        self._same_tensors = library.og_same_tensors
        self._same_ptrs = library.og_same_ptrs
        self._update_ptrs = library.og_update_ptrs

    def same_tensors(self, tensors: list, ids: PointerTable, ptrs: PointerTable) -> bool:
        """``tensors`` are the objects of ``ids`` in order, with the data pointers ``ptrs``."""
        return bool(self._same_tensors(tensors, ids.address, ptrs.address, ids.count))

    def same_ptrs(self, tensors: list, ptrs: PointerTable) -> bool:
        return bool(self._same_ptrs(tensors, ptrs.address, ptrs.count))

    def update_ptrs(self, tensors: list, table: torch.Tensor) -> bool:
        """Writes the tensors' data pointers into ``table`` (an int64 CPU tensor of one slot each); True when any
        differed."""
        changed = self._update_ptrs(tensors, table.data_ptr(), table.numel())
        if changed < 0:
            raise ValueError(f"{len(tensors)} tensors for a pointer table of {table.numel()}")
        return bool(changed)


class PointerTable:
    """Integers (object ids, data pointers) as an int64 CPU tensor and its address, for ``HostPtrs``."""

    def __init__(self, values: list[int]):
        self.values = torch.tensor(values, dtype=torch.int64)
        self.address = self.values.data_ptr()
        self.count = len(values)


@functools.cache
def helper() -> HostPtrs | None:
    """The compiled helper, or None (see the module's docstring); built and checked once per process."""
    try:
        from torch._C._dynamo.guards import _torchinductor_pyobject_tensor_data_ptr as accessor
    except ImportError:
        return None
    try:
        library = cbuild.load_built(SOURCE, {}, "host_ptrs", python=True)
    except cbuild.BuildError:
        return None  # the kernels' own build says why, once
    library.og_set_accessor.argtypes = [ctypes.c_void_p]
    library.og_set_accessor.restype = None
    library.og_set_accessor(accessor)
    found = HostPtrs(library)
    probe = [torch.zeros(3), torch.zeros(5)[2:]]  # a view: its pointer includes the storage offset
    table = torch.zeros(2, dtype=torch.int64)
    expected = [t.data_ptr() for t in probe]
    if not found.update_ptrs(probe, table) or table.tolist() != expected:
        return None  # an accessor that does not answer as Tensor.data_ptr: not used
    return found
