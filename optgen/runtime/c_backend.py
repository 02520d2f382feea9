"""The C backend: generated multi-tensor C kernels for CPU tensors, one call per pass for all parameters.

The plan is printed into C (``templates/c_module.c.j2``), compiled once per storage-dtype signature with the
system compiler (``optgen.runtime.cbuild``: flags probed per machine, objects cached on disk by content) and
called through ctypes over the same tables as the Triton backend (``optgen.runtime.tables``): a pass is one
call that OpenMP spreads over the chunks of every parameter; a pass with per-layer or global values is
followed by one reduce call. Argument tuples follow the kernel ABI (``optgen.codegen.abi``) and are cached
while the tables stand, so a step's host work does not grow with the number of tensors.

If no compiler is found or a build fails, the backend warns once (with the failing command) and runs the
eager torch backend instead; nothing has been modified when that happens (objects are built before any
kernel runs).
"""

from __future__ import annotations

import ctypes
import re
import warnings

import torch

from .. import quantization, settings
from ..codegen.abi import axes_args, pass_args, reduce_args
from ..codegen.render import source_path, variant_stem
from . import backends, cbuild
from .tables import (
    ChunkTables,
    Staging,
    axes_values,
    boundary_all_reduce,
    lacks_data,
    matrix_all_reduce,
    over_partitions,
    pass_values,
    reduce_launches,
    segment_reduce_values,
    split_rows,
)

# storage dtype -> the template's OG_DT_<buffer> code (uint8: an 8-bit state's codes, optgen.quantization)
STORAGE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3, torch.uint8: 4}
_WARNED: set[str] = set()


def storage_code(dtype: torch.dtype) -> int:
    if dtype not in STORAGE_CODES:
        raise TypeError(f"the C backend supports fp32, fp64, bf16 and fp16 tensors, not {dtype}")
    return STORAGE_CODES[dtype]


def _float_code(dtype: torch.dtype) -> int:
    """A parameter's, gradient's or state_dtype's code (uint8 is for 8-bit states only)."""
    if dtype == torch.uint8:
        raise TypeError(f"the C backend supports fp32, fp64, bf16 and fp16 tensors, not {dtype}")
    return storage_code(dtype)


def chunk_size() -> int:
    """``OPTGEN_C_CHUNK``: elements per chunk (default 65536; tests use small chunks; see ``optgen.settings``)."""
    return settings.count("OPTGEN_C_CHUNK")


def parallel_min() -> int:
    """``OPTGEN_C_PARALLEL_MIN``: elements a pass must cover to use several threads (default 2**15)."""
    return settings.count("OPTGEN_C_PARALLEL_MIN")


def block_bytes() -> int:
    """``OPTGEN_C_BLOCK_BYTES``: buffer bytes of one block of tensors in the blocked schedule (see ``_blocks``)."""
    return settings.count("OPTGEN_C_BLOCK_BYTES")


# The C pass functions' leading integers, before the kernel ABI's arguments (the template spells them the same):
# the chunk count of the call, whether to share it among threads, the walking direction, elements per chunk,
# columns of the hyperparameter table.
PASS_HEAD = ("_chunks", "_parallel", "_reverse", "_chunk", "_n_hyper")


def _argtypes(args) -> list:
    return [ctypes.c_void_p if a.pointer else ctypes.c_int64 for a in args]


class _Kernels:
    """The compiled functions of one storage-dtype signature, typed from the kernel ABI."""

    def __init__(self, backend: CBackend, dtypes: dict[str, torch.dtype]):
        plan = backend.plan
        real64 = dtypes["param"] == torch.float64  # math in fp64 for fp64 parameters, as the torch backend
        defines = {f"OG_DT_{b}": STORAGE_CODES[dtypes[b]] for b in (*plan.buffers, *plan.ir.factored_state_names)}
        defines["OG_REAL_F64"] = int(real64)
        library = cbuild.load_built(backend.source, defines, variant_stem(plan))
        self.passes, self.reduces, self.axes = [], [], []
        for p in plan.passes:
            fn = getattr(library, f"{backend.prefix}_pass_{p.index}")
            fn.argtypes = [ctypes.c_int64] * len(PASS_HEAD) + _argtypes(pass_args(plan, p))
            fn.restype = None
            self.passes.append(fn)
            reduce_fn = None
            if p.produces:
                reduce_fn = getattr(library, f"{backend.prefix}_reduce_{p.index}")
                reduce_fn.argtypes = [ctypes.c_int64] + _argtypes(reduce_args(plan, p))
                reduce_fn.restype = None
            self.reduces.append(reduce_fn)
            axes_fn = None
            if p.axes_after:
                axes_fn = getattr(library, f"{backend.prefix}_axes_{p.index}")
                axes_fn.argtypes = [ctypes.c_int64] * 3 + _argtypes(axes_args(plan, p))
                axes_fn.restype = None
            self.axes.append(axes_fn)


class CBackend:
    name = "c"
    options = ()  # constructor options the optimizer may pass (runtime/backends.py)

    def __init__(self, plan, chunk: int | None = None):
        self.plan = plan
        self.source = source_path(plan, "c")
        self.prefix = re.sub(r"\W", "_", variant_stem(plan))
        self.chunk = chunk or chunk_size()
        if plan.ir.quantized:  # chunks start on an 8-bit state's block
            self.chunk = -(-self.chunk // quantization.BLOCK) * quantization.BLOCK
        self.parallel_min = parallel_min()
        self.block_bytes = block_bytes()
        self._tables: ChunkTables | None = None
        self._staging = Staging()
        self._kernels: dict[tuple, _Kernels] = {}
        self._calls: tuple | None = None  # (key, [(fn, args), ...] in call order: see _calls_for) while the tables stand
        self._fallback = None
        self.launches = 0  # kernel calls issued (tests count them)
        self.fast_steps = 0  # steps that came through fast_step

    @staticmethod
    def check(param: torch.Tensor, grad: torch.Tensor, state_dtype: torch.dtype | None = None) -> None:
        """Refuse what the kernels cannot take, before the optimizer creates any state."""
        for tensor in (param, grad):
            _float_code(tensor.dtype)
        if state_dtype is not None:
            _float_code(state_dtype)

    def invalidate(self) -> None:
        self._tables = None
        self._calls = None

    @property
    def fallback(self):
        """The eager torch backend, when the C kernels could not be built (else None)."""
        return self._fallback

    def _tables_for(self, items, scratch_of) -> ChunkTables:
        tables = self._tables
        if tables is None or not tables.still_valid(items):
            tables = ChunkTables(self.plan, items, scratch_of, self.chunk, storage_code)
            self._tables = tables
            self._calls = None
        else:
            tables.refresh(items)
            tables.sync_scalars()
        return tables

    def _kernels_for(self, tables: ChunkTables) -> list[_Kernels]:
        out = []
        for partition in tables.partitions:
            dtypes = partition[4]
            key = tuple(dtypes[b] for b in self.plan.buffers)
            if key not in self._kernels:
                self._kernels[key] = _Kernels(self, dtypes)
            out.append(self._kernels[key])
        return out

    def step(self, items, scratch_of, device_scalars=None, reducer=None) -> None:
        if self._fallback is None:
            try:
                cbuild.toolchain()
            except cbuild.BuildError as exc:
                self._fall_back(exc)
        if self._fallback is not None:
            self._fallback.step(items, scratch_of, device_scalars, reducer)
            return
        device_scalars = device_scalars or {}
        staged_items, staged = self._staging.contiguous(items)
        tables = self._tables_for(staged_items, scratch_of)
        if over_partitions(tables, self.plan):
            self._eager().step(items, scratch_of, device_scalars, reducer)
            return
        try:
            kernels = self._kernels_for(tables)  # every build happens here, before any kernel runs
        except cbuild.BuildError as exc:
            self._fall_back(exc)
            self.invalidate()
            self._fallback.step(items, scratch_of, device_scalars, reducer)
            return
        self._run(tables, kernels, device_scalars, reducer)
        for original, twin in staged:
            original.copy_(twin)

    def prepare_fast(self, group_of: list[int], rows: list[tuple]) -> bool:
        """After a step: the optimizer's layout is stable; later steps may come through ``fast_step``."""
        t = self._tables
        if t is None or self._fallback is not None or self._staging.staged or over_partitions(t, self.plan):
            return False
        t.use_group_rows(group_of, rows)
        return True

    def fast_grads(self, grads: list) -> bool:
        """A step of the layout of the last one (same tensors, storage, dtypes, groups; checked by the
        optimizer), first half: the gradients' addresses, written in place into the table (the cached calls
        stay valid). False, with nothing written, when a non-empty gradient has no data (its storage freed in
        place): the full path refuses it by name."""
        t = self._tables
        ptrs = list(map(torch.Tensor.data_ptr, grads))
        if ptrs != t.grad_ptrs:
            if any(map(lacks_data, grads)):
                return False
            t.set_grads(ptrs)
        return True

    def fast_grads_written(self, write) -> bool:
        """``fast_grads`` with the addresses read and written by ``write(table)`` (compiled:
        ``host_ptrs.Layout.grads_writer``), which checks the gradients too: False when it refused them."""
        t = self._tables
        changed = write(t.addr["grad"])
        if changed is None:
            return False
        if changed:
            t.grads_written()
        return True

    def fast_step(self, rows: list[tuple]) -> None:
        """Second half: the hyperparameter rows written in place, then the cached calls."""
        t = self._tables
        t.set_group_rows(rows)
        t.sync_scalars()
        self._run(t, self._kernels_for(t), {}, None)
        self.fast_steps += 1

    def _eager(self):
        """The eager torch backend of this plan (no compiler; a factored plan over several partitions)."""
        if getattr(self, "_eager_backend", None) is None:
            self._eager_backend = backends.eager(self.plan)
        return self._eager_backend

    def _fall_back(self, exc: Exception) -> None:
        message = str(exc)
        if message not in _WARNED:
            _WARNED.add(message)
            warnings.warn(
                f"optgen: C kernels unavailable, using the eager torch path: {message}",
                cbuild.CKernelsUnavailable,
                stacklevel=4,
            )
        self._fallback = self._eager()

    def _run(self, t: ChunkTables, kernels: list[_Kernels], device_scalars: dict, reducer) -> None:
        plan = self.plan
        key = (
            id(t),
            t.version,
            tuple(sorted((k, v.data_ptr()) for k, v in device_scalars.items())),
            reducer is not None,
        )
        if self._calls is None or self._calls[0] != key:
            self._calls = (key, self._calls_for(t, kernels, device_scalars, reducer))
        for fn, args in self._calls[1]:
            if fn is None:  # sharded: an all-reduce, (its function, the pass)
                collective, p = args
                collective(t, plan, p, reducer)
                continue
            fn(*args)
            self.launches += 1

    def _calls_for(self, t: ChunkTables, kernels: list[_Kernels], device_scalars: dict, reducer) -> list[tuple]:
        """The step as calls, each a function and its argument tuple in the kernel ABI's order (tensors by
        address; ``(None, (collective, pass))`` stands for an all-reduce of sharded training), cached while the tables
        stand: the tables' contents change in place, their addresses do not.

        Pass by pass over all parameters (one call per pass per partition, one reduce call after a pass with
        reductions); or, for plans whose reductions are all per layer (LAMB, LARS), block by block
        (``_blocks``): every pass and reduce over a block of whole tensors that fits in cache, then the next
        block, so later passes re-read a block from cache. Each per-layer value is folded from the same partials
        in the same order either way: the results are bitwise the same."""
        plan = self.plan
        blocks = self._blocks(t) if reducer is None else None
        calls = []
        if blocks is None:
            for p in plan.passes:
                for (offset, count, _, members, _), kernel in zip(t.partitions, kernels):
                    if count:
                        calls.append(self._pass_call(t, kernel, p, offset, count, sum(t.numels[i] for i in members), device_scalars))
                split = reducer is not None and split_rows(t, plan)  # the reduce step's folds, an all-reduce, its items
                if p.produces and kernels:
                    fn = kernels[0].reduces[p.index]  # reduce functions do not depend on storage dtypes
                    before, after = reduce_launches(t, p, reducer is not None)
                    calls += [self._reduce_call(fn, p, programs, values) for programs, values in before]
                    if split and p.axes_after:
                        calls.append(self._axes_call(t, kernels[0], p, 0, t.n_tensors, device_scalars, phases=1))
                    if reducer is not None:
                        calls.append((None, (boundary_all_reduce, p)))
                    calls += [self._reduce_call(fn, p, programs, values) for programs, values in after]
                if p.axes_after:  # one partition (see step)
                    calls.append(self._axes_call(t, kernels[0], p, 0, t.n_tensors, device_scalars, phases=2 if split else 3))
                    if split:
                        calls.append((None, (matrix_all_reduce, p)))
            return calls
        (kernel,) = kernels
        for offset, count, (first, end) in blocks:
            numel = sum(t.numels[first:end])
            for p in plan.passes:
                calls.append(self._pass_call(t, kernel, p, offset, count, numel, device_scalars))
                if p.reduce_after:
                    calls.append(self._reduce_call(kernel.reduces[p.index], p, end - first, segment_reduce_values(t, p, first, end)))
                if p.axes_after:
                    calls.append(self._axes_call(t, kernel, p, first, end - first, device_scalars))
        return calls

    def _axes_call(self, t: ChunkTables, kernel: _Kernels, p, first: int, count: int, device_scalars: dict, phases: int = 3) -> tuple:
        """The reduce step after pass ``p`` for tensors ``[first, first + count)`` (``phases``: see axes_values)."""
        values = axes_values(t, self.plan, p, device_scalars, phases)
        args = [count, first, len(self.plan.ir.hypers)] + [_address(values[a.name]) for a in axes_args(self.plan, p)]
        return kernel.axes[p.index], tuple(args)

    def _reduce_call(self, fn, p, programs: int, values: dict) -> tuple:
        return fn, (programs, *(_address(values[a.name]) for a in reduce_args(self.plan, p)))

    def _pass_call(self, t: ChunkTables, kernel: _Kernels, p, offset: int, count: int, numel: int, device_scalars: dict):
        values = pass_values(t, self.plan, p, offset, count, device_scalars)
        # Odd passes walk their chunks backwards: a pass then starts on what the one before touched last (still in
        # cache when a block of tensors outgrows it). Partials are stored by chunk, so the results do not change.
        reverse = p.index % 2
        head = [count, int(numel >= self.parallel_min), reverse, t.chunk, len(self.plan.ir.hypers)]
        return kernel.passes[p.index], tuple(head + [_address(values[a.name]) for a in pass_args(self.plan, p)])

    def _blocks(self, t: ChunkTables) -> list[tuple] | None:
        """Blocks of whole tensors, ``(first chunk, chunk count, (first tensor, end tensor))``, each spanning about
        ``OPTGEN_C_BLOCK_BYTES`` of buffers (a larger tensor is a block of its own), when blocking can help and
        is exact: several passes, reductions that are all within a tensor (per layer, row, column or matrix: a
        global value needs every tensor before any consumer), one partition (its tensors are then 0..n-1 with
        their chunks in order), unsharded."""
        plan = self.plan
        if len(plan.passes) < 2 or len(t.partitions) != 1 or any(slot.scope == "global" for slot in plan.slots):
            return None
        dtypes = t.partitions[0][4]
        element_bytes = sum(dtypes[b].itemsize for b in plan.buffers)
        blocks, first, size = [], 0, 0
        chunks = t.n_chunks_of.tolist()
        first_chunk = t.first_chunk.tolist()
        for i, numel in enumerate(t.numels):
            size += numel * element_bytes
            if size >= self.block_bytes or i == t.n_tensors - 1:
                count = sum(chunks[first : i + 1])
                if count:
                    start = next(first_chunk[k] for k in range(first, i + 1) if chunks[k])
                    blocks.append((start, count, (first, i + 1)))
                first, size = i + 1, 0
        if len(blocks) < 2:
            return None  # one block: the plain schedule is the same calls
        return blocks


def _address(value):
    """A kernel argument as ctypes takes it: a tensor by its address, an integer as it is."""
    return value.data_ptr() if isinstance(value, torch.Tensor) else value
