"""The fast step's per-tensor checks and reads in compiled code: one call per list of tensors instead of Python
calls per tensor.

A fast step (``StepRunner.fast_step``) must notice a parameter replaced in its group; a parameter's, a
gradient's or a state's metadata changed (dtype, device, dispatch keys, ``requires_grad``, sizes, strides) or
its storage swapped (``.data =``, ``set_``); a gradient missing; and it must gather the gradients' addresses
(new tensors after ``zero_grad(set_to_none=True)``). From Python that is ~250 ns a tensor on the development
machine (a ``.grad`` read, dynamo's ``TensorGuards`` on parameters and gradients, the data pointers): ~250 us
of a 1000-tensor AdamW step whose kernel takes ~30 us. ``host_ptrs.cpp`` does it through torch's C++
accessors (``c10::TensorImpl``), built against the running torch's headers and libc10 with ``$CXX`` (else
``c++``), cached like the kernels (keyed by torch's version too) and loaded with ``ctypes.PyDLL``.

``helper()`` is None where it cannot be built or loaded, or answers otherwise than Python on a probe; and
``OPTGEN_HOST_READS_IN_C=0`` leaves it unused: the fast step then reads the same from Python.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import threading
from pathlib import Path

import torch

from . import cbuild

SOURCE = Path(__file__).with_name("host_ptrs.cpp")
NO_DATA = -3  # og_grads: a non-empty gradient without storage behind it (its other codes: host_ptrs.cpp)


class HostPtrs:
    """The compiled functions (see ``host_ptrs.cpp``); tables are int64 CPU tensors."""

    def __init__(self, library: ctypes.CDLL):
        self._library = library  # keeps the functions' object loaded
        p, n = ctypes.c_void_p, ctypes.c_int64
        for name, argtypes, restype in (
            ("og_cdata", [ctypes.py_object], ctypes.c_int64),
            ("og_same_objects", [ctypes.py_object, p, p, p, n], ctypes.c_int),
            ("og_records", [p, n, ctypes.c_int, p, n, p], ctypes.c_int64),
            ("og_same", [p, n, p, n, p], ctypes.c_int),
            ("og_grads", [p, n, p, n, p, p], ctypes.c_int),
        ):
            fn = getattr(library, name)
            fn.argtypes, fn.restype = argtypes, restype
        self.cdata, self._same_objects, self._records = library.og_cdata, library.og_same_objects, library.og_records
        self._same, self._grads = library.og_same, library.og_grads

    def layout(self, params: list, grads_of: list, states: list) -> Layout | None:
        """What fast steps compare against: ``params`` (every parameter, in order), for each backend the
        indices of the parameters whose gradients it takes (None: all, in order), and ``states``. None when a
        parameter has no gradient, is of a tensor subclass (its ``.grad`` may be overridden in Python), or torch
        cannot read a tensor here (no storage: its accessors throw)."""
        if any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in params):
            return None
        params, states = list(params), list(states)
        param_impls = PointerTable([t._cdata for t in params])
        state_impls = PointerTable([t._cdata for t in states])
        param_ids, state_ids = Objects(params), Objects(states)
        if not self.same_objects(params, param_ids, param_impls) or not self.same_objects(states, state_ids, state_impls):
            return None  # a tensor whose TensorImpl is not where host_ptrs.cpp reads it
        params_seen, states_seen = self.seen(param_impls), self.seen(state_impls)
        if params_seen is None or states_seen is None:
            return None
        backends = []
        for indices in grads_of:
            impls = param_impls if indices is None else PointerTable([param_impls.values[i] for i in indices])
            grads_seen = self.seen(impls, grads=True)
            if grads_seen is None:
                return None
            backends.append((impls, grads_seen[0], torch.empty(impls.count, dtype=torch.int64)))
        return Layout(self, (params, param_ids, param_impls, *params_seen), (states, state_ids, state_impls, *states_seen), backends)

    def seen(self, impls: PointerTable, grads: bool = False) -> tuple[PointerTable, PointerTable] | None:
        """(metadata records, data pointers) of the tensors ``impls`` (``grads``: of their gradients), or None
        (torch threw, or a parameter has no gradient)."""
        ptrs = torch.empty(impls.count, dtype=torch.int64)
        need = self._records(impls.address, impls.count, int(grads), None, 0, ptrs.data_ptr())
        if need < 0:
            return None
        records = torch.empty(need, dtype=torch.int64)
        if self._records(impls.address, impls.count, int(grads), records.data_ptr(), need, ptrs.data_ptr()) != need:
            return None
        return PointerTable(records.tolist()), PointerTable(ptrs.tolist())

    def same_objects(self, objects: list, ids: Objects, impls: PointerTable) -> bool:
        """``objects`` are those of ``ids``, in order, each of its type then and holding the TensorImpl of ``impls``."""
        return self._same_objects(objects, ids.ids.address, ids.types.address, impls.address, ids.ids.count) == 1

    def same(self, impls: PointerTable, records: PointerTable, ptrs: PointerTable) -> bool:
        """The tensors ``impls`` have the metadata ``records`` and data pointers ``ptrs`` (False when torch throws:
        the full path then reads them, and raises). Only for TensorImpls ``same_objects`` found held."""
        return self._same(impls.address, impls.count, records.address, records.count, ptrs.address) == 1

    def grads(self, impls: PointerTable, records: PointerTable, table: torch.Tensor, scratch: torch.Tensor) -> int:
        """The gradients of the parameters ``impls`` written into ``table`` (see ``og_grads``)."""
        n = impls.count
        if table.numel() != n or scratch.numel() != n or table.dtype != torch.int64 or scratch.dtype != torch.int64:
            raise ValueError(f"int64 tables of {table.numel()} and {scratch.numel()} for {n} parameters")
        return self._grads(impls.address, n, records.address, records.count, table.data_ptr(), scratch.data_ptr())


class Layout:
    """A step's layout as fast steps compare it (``HostPtrs.layout``): the parameters and the state tensors
    (each ``(tensors, ids, TensorImpls, metadata records, data pointers)``; it holds them, so their ids stay
    theirs), and per backend its parameters' TensorImpls, their gradients' records and a scratch table."""

    def __init__(self, host: HostPtrs, params: tuple, states: tuple, backends: list):
        self.host, self.params, self.states, self.backends = host, params, states, backends

    def same(self, params: list) -> bool:
        """``params`` are this layout's parameters, every one (and every state) the same object holding the same
        TensorImpl, with its metadata and storage."""
        host = self.host
        _, ids, impls, records, ptrs = self.params
        states, state_ids, state_impls, state_records, state_ptrs = self.states
        return (
            host.same_objects(params, ids, impls)
            and host.same_objects(states, state_ids, state_impls)
            and host.same(impls, records, ptrs)
            and host.same(state_impls, state_records, state_ptrs)
        )

    def grads_writer(self, k: int):
        """For backend ``k``: ``write(table)``, its parameters' gradient addresses written into ``table`` all or
        none (after ``same``): True when any changed, False when none did, None (nothing written) when a
        gradient is missing, changed its metadata or has no storage behind it: the full path says what."""
        impls, records, scratch = self.backends[k]
        grads = self.host.grads

        def write(table: torch.Tensor) -> bool | None:
            changed = grads(impls, records, table, scratch)
            return None if changed < 0 else bool(changed)

        return write


class Objects:
    """The identities (Python's id) and types of a list of objects, as two ``PointerTable``."""

    def __init__(self, objects: list):
        self.ids = PointerTable([id(o) for o in objects])
        self.types = PointerTable([id(type(o)) for o in objects])


class PointerTable:
    """Integers (object ids, TensorImpl and data pointers, metadata records) as an int64 CPU tensor and its
    address, for ``HostPtrs``."""

    def __init__(self, values: list[int]):
        self.values = values
        self.table = torch.tensor(values, dtype=torch.int64)
        self.address = self.table.data_ptr()
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


def torch_flags() -> tuple[str, ...]:
    """Flags to build against the running torch: its headers, its C++ ABI, its libc10, and its version (in
    the object's key: a cached object never meets another torch's layouts)."""
    root = Path(torch.__file__).parent
    version = hashlib.sha256(f"{torch.__version__} {torch.version.git_version}".encode()).hexdigest()[:16]
    return (
        f"-I{root / 'include'}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DOG_TORCH_BUILD={version}",
        f"-L{root / 'lib'}",
        f"-Wl,-rpath,{root / 'lib'}",
        "-lc10",
    )


def _build() -> HostPtrs | None:
    try:
        library = cbuild.load_built(SOURCE, {}, "host_ptrs", python=True, extra=torch_flags())
    except cbuild.BuildError:
        return None  # a compiler that is missing or fails: the reads stay in Python (the kernels' build warns)
    found = HostPtrs(library)
    # a probe: what it reads must be what Python reads
    base = torch.zeros(40)
    probe = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(base[2:].view(2, 19).t())]
    probe[0].grad, probe[1].grad = torch.ones(3), torch.ones(19, 4)[:, 1:3]
    class Subclass(torch.Tensor):
        pass

    others = [torch.zeros(2), torch.zeros(2).as_subclass(Subclass), base[1:3]]
    if any(found.cdata(t) != t._cdata for t in probe + others):
        return None  # a tensor's TensorImpl is not where host_ptrs.cpp reads it (another Python or torch)
    impls = PointerTable([t._cdata for t in probe])
    seen, grads_seen = found.seen(impls), found.seen(impls, grads=True)
    if seen is None or grads_seen is None:
        return None
    if seen[1].values != [t.data_ptr() for t in probe] or grads_seen[1].values != [t.grad.data_ptr() for t in probe]:
        return None
    for (records, _), tensors in ((seen, probe), (grads_seen, [t.grad for t in probe])):
        if _sizes_strides(records.values) != [[*t.shape, *t.stride()] for t in tensors]:
            return None
    return found


def _sizes_strides(records: list[int]) -> list[list[int]]:
    """Each record's sizes and strides (see host_ptrs.cpp)."""
    out, at = [], 0
    while at < len(records):
        out.append(records[at + 6 : at + records[at]])
        at += records[at]
    return out
