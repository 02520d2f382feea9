"""The fast step's per-tensor reads in compiled code: object identities and data pointers of whole lists of tensors
compared (or gathered into a pointer table) in one call each, instead of a Python call per tensor.

A fast step (``StepRunner.fast_step``) must notice a parameter replaced in its group, a parameter's or a
state's storage swapped (``.data =``, ``set_``) and gradients reallocated (``zero_grad(set_to_none=True)``).
Read from Python that is ~90 ns a tensor per read on the development machine: ~95 us of a 200-tensor AdamW
step whose kernel takes ~25 us. ``host_ptrs.cpp`` reads them through torch's own data-pointer accessor (the one
Inductor's C++ wrappers call), built once per machine with ``$CXX`` (else ``c++``) and cached like the kernels,
loaded with ``ctypes.PyDLL``. It is C++ to catch what that accessor throws (a tensor whose storage was freed in
place): such a list is then read from Python, where torch raises its own error.

``helper()`` is None where that accessor is missing (it is private to torch), where nothing can be compiled, or
with ``OPTGEN_HOST_READS_IN_C=0``'s caller: the fast step then reads the same values from Python.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

import torch

from . import cbuild

SOURCE = Path(__file__).with_name("host_ptrs.cpp")
UNREADABLE, NO_DATA = -2, -3  # the accessor threw; a non-empty tensor without data (see host_ptrs.cpp)


class HostPtrs:
    """The compiled functions; lists hold only tensors (see ``host_ptrs.cpp``), tables are int64 CPU tensors."""

    def __init__(self, library: ctypes.CDLL):
        self._library = library  # keeps the functions' object loaded
        for name, argtypes in (
            ("og_same_tensors", [ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]),
            ("og_same_ptrs", [ctypes.py_object, ctypes.c_void_p, ctypes.c_int64]),
            ("og_update_ptrs", [ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]),
        ):
            fn = getattr(library, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        self._same_tensors = library.og_same_tensors
        self._same_ptrs = library.og_same_ptrs
        self._update_ptrs = library.og_update_ptrs
        self._scratch = torch.empty(0, dtype=torch.int64)

    def same_tensors(self, tensors: list, ids: PointerTable, ptrs: PointerTable) -> bool:
        """``tensors`` are the objects of ``ids`` in order, with the data pointers ``ptrs``."""
        same = self._same_tensors(tensors, ids.address, ptrs.address, ids.count)
        if same == UNREADABLE:
            return list(map(id, tensors)) == ids.values.tolist() and _python_ptrs(tensors) == ptrs.values.tolist()
        return bool(same)

    def same_ptrs(self, tensors: list, ptrs: PointerTable) -> bool:
        same = self._same_ptrs(tensors, ptrs.address, ptrs.count)
        if same == UNREADABLE:
            return _python_ptrs(tensors) == ptrs.values.tolist()
        return bool(same)

    def update_ptrs(self, tensors: list, table: torch.Tensor, numel: torch.Tensor) -> bool | None:
        """Writes the tensors' data pointers into ``table`` (an int64 CPU tensor of one slot each), all or none:
        True when any differed; None (nothing written) when a tensor of ``numel`` > 0 elements has no data."""
        n = table.numel()
        if numel.numel() != n or numel.dtype != torch.int64:
            raise ValueError(f"a numel table of {numel.numel()} {numel.dtype} for a pointer table of {n}")
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.int64)
        changed = self._update_ptrs(tensors, table.data_ptr(), self._scratch.data_ptr(), numel.data_ptr(), n)
        if changed == UNREADABLE:
            ptrs = _python_ptrs(tensors)
            if any(ptr == 0 and count for ptr, count in zip(ptrs, numel.tolist())):
                return None
            changed = int(ptrs != table.tolist())
            table.copy_(torch.tensor(ptrs, dtype=torch.int64))
        if changed == NO_DATA:
            return None
        if changed < 0:
            raise ValueError(f"{len(tensors)} tensors for a pointer table of {n}")
        return bool(changed)


def _python_ptrs(tensors: list) -> list[int]:
    """The data pointers read from Python: where the compiled reads cannot (torch raises here, with its message)."""
    return list(map(torch.Tensor.data_ptr, tensors))


class PointerTable:
    """Integers (object ids, data pointers) as an int64 CPU tensor and its address, for ``HostPtrs``."""

    def __init__(self, values: list[int]):
        self.values = torch.tensor(values, dtype=torch.int64)
        self.address = self.values.data_ptr()
        self.count = len(values)


_LOCK = threading.Lock()


@functools.cache
def helper() -> HostPtrs | None:
    """The compiled helper, or None (see the module's docstring); built and checked once per process, by one
    thread (the others wait for it)."""
    with _LOCK:
        try:
            return _build()
        except Exception:  # noqa: BLE001 - whatever fails (a missing source, a foreign object), Python reads
            return None


def _build() -> HostPtrs | None:
    try:
        from torch._C._dynamo.guards import _torchinductor_pyobject_tensor_data_ptr as accessor
    except ImportError:
        return None
    try:
        library = cbuild.load_built(SOURCE, {}, "host_ptrs", python=True)
    except cbuild.BuildError:
        return None  # a compiler that is missing or fails: the reads stay in Python (the kernels' build warns)
    library.og_set_accessor.argtypes = [ctypes.c_void_p]
    library.og_set_accessor.restype = None
    library.og_set_accessor(accessor)
    found = HostPtrs(library)
    probe = [torch.zeros(3), torch.zeros(5)[2:]]  # a view: its pointer includes the storage offset
    table = torch.zeros(2, dtype=torch.int64)
    expected = [t.data_ptr() for t in probe]
    if not found.update_ptrs(probe, table, torch.tensor([3, 3])) or table.tolist() != expected:
        return None  # an accessor that does not answer as Tensor.data_ptr: not used
    return found
