"""The Triton backend: one launch per pass over every parameter, driven by cached tables.

Tables (built once, rebuilt only when the set of parameters with gradients or their storage changes):

* chunk table: for each chunk of ``CHUNK`` elements, its tensor index and first element (int64);
* per tensor: element count, group index, first chunk and chunk count, and the address (``data_ptr``)
  of each buffer (parameter, gradient, states, scratch) in an int64 ``[buffers, tensors]`` table;
* the step count per chunk (fp32). ``state["step"]`` of each parameter is a 0-d view into it (its first
  chunk), so the last pass advances the step inside the kernel, one writer per entry, no extra launch;
* the group hyperparameters as fp64 ``[groups, hypers]``, re-uploaded only when a value changes.

Between passes, per-layer partial sums live in ``[chunks, slots]`` tables that a segment-reduce launch
folds into ``[tensors, slots]`` (``ReductionTables``): the object that sharded training all-reduces.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch

from ..codegen.render import load_module

_TL_DTYPES = {}


def _tl_dtype(dtype: torch.dtype, what: str = "tensors"):
    if not _TL_DTYPES:
        import triton.language as tl

        _TL_DTYPES.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    if dtype not in _TL_DTYPES:
        hint = " (use backend='torch' for it)" if what == "state_dtype" else ""
        raise TypeError(f"the Triton backend supports fp32, fp16 and bf16 {what}, not {dtype}{hint}")
    return _TL_DTYPES[dtype]


@dataclass(frozen=True)
class LaunchConfig:
    """One step's launch parameters (``optgen.runtime.autotune`` searches them)."""

    chunk: int = 65536  # elements per program; shapes the chunk and partial tables
    block: int = 1024  # elements per loop iteration of a program
    reduce_block: int = 256
    num_warps: int = 4
    num_stages: int = 3


def default_config() -> LaunchConfig:
    """``OPTGEN_CHUNK``/``OPTGEN_BLOCK`` override the defaults (tests use small chunks)."""
    config = LaunchConfig()
    if os.environ.get("OPTGEN_CHUNK"):
        config = replace(config, chunk=int(os.environ["OPTGEN_CHUNK"]))
    if os.environ.get("OPTGEN_BLOCK"):
        config = replace(config, block=int(os.environ["OPTGEN_BLOCK"]))
    if config.chunk % config.block:
        raise ValueError(f"chunk size {config.chunk} must be a multiple of the block size {config.block}")
    return config


class _Tables:
    """Everything the launches of one step need, for one fixed set of tensors."""

    def __init__(self, plan, items, scratch_of, config: LaunchConfig):
        params = [item[0] for item in items]
        device = params[0].device
        self.device = device
        self.key = _key(items)
        # Buffers: parameter, gradient, states, scratch. Tensors whose buffers share dtypes form a
        # partition: one launch per pass per partition (one partition when the model has one dtype).
        self.buffers: dict[str, list[torch.Tensor]] = {"param": params, "grad": [item[1] for item in items]}
        for name in plan.ir.state_names:
            self.buffers[name] = [item[2][name] for item in items]
        for name in plan.scratch:
            self.buffers[name] = [scratch_of(p, name) for p in params]
        signature = [tuple(self.buffers[name][i].dtype for name in self.buffers) for i in range(len(params))]
        for sig in signature:
            for dtype in sig:
                _tl_dtype(dtype)  # a clear error for unsupported dtypes, before anything runs
        order = [i for sig in dict.fromkeys(signature) for i in range(len(params)) if signature[i] == sig]
        numels = [p.numel() for p in params]
        chunks_of = [(n + config.chunk - 1) // config.chunk for n in numels]
        first = [0] * len(params)
        chunk_tensor, chunk_start = [], []
        self.partitions = []  # (first chunk, chunk count, {buffer: tl dtype}, tensor indices)
        for sig in dict.fromkeys(signature):
            offset = len(chunk_tensor)
            members = [i for i in order if signature[i] == sig]
            for i in members:
                first[i] = len(chunk_tensor)
                chunk_tensor += [i] * chunks_of[i]
                chunk_start += [k * config.chunk for k in range(chunks_of[i])]
            dtypes = {name: _tl_dtype(dtype) for name, dtype in zip(self.buffers, sig)}
            self.partitions.append((offset, len(chunk_tensor) - offset, dtypes, members))
        n_chunks = len(chunk_tensor)
        self.n_chunks = n_chunks
        self.n_tensors = len(params)
        as_long = dict(dtype=torch.int64, device=device)
        self.chunk_tensor = torch.tensor(chunk_tensor, dtype=torch.int32, device=device)
        self.chunk_start = torch.tensor(chunk_start, **as_long)
        self.numel = torch.tensor(numels, **as_long)
        self.first_chunk = torch.tensor(first, **as_long)
        self.n_chunks_of = torch.tensor(chunks_of, **as_long)
        self.values = None
        self.grad_ptrs = None
        self.signature = signature
        self.addr_host = {name: [t.data_ptr() for t in tensors] for name, tensors in self.buffers.items()}
        self.addr = {name: torch.tensor(ptrs, **as_long) for name, ptrs in self.addr_host.items()}
        self._aligned: dict[int, bool] = {}
        self.refresh(items)
        # Steps: per chunk, gathered from the parameters' state, and state["step"] becomes a view.
        steps = [item[2]["step"] for item in items]
        self.step = torch.zeros(max(n_chunks, 1), dtype=torch.float32, device=device)
        self.empty_steps = []
        for i, (s, c) in enumerate(zip(steps, chunks_of)):
            if c == 0:
                self.empty_steps.append(items[i][2])
                continue
            self.step[first[i] : first[i] + c] = s.to(device=device, dtype=torch.float32)
            items[i][2]["step"] = self.step[first[i]]
        self._step_views = [item[2]["step"] for item in items]
        # for sync_steps: each chunk's copy of its tensor's step comes from the tensor's first chunk
        self._first_of_chunk = self.first_chunk[self.chunk_tensor.long()] if n_chunks else None
        self._step_version = self.step._version
        self.partials = {}
        self.layer = {}
        for p in plan.passes:
            if p.produces:
                self.partials[p.index] = torch.empty(max(n_chunks, 1), len(p.produces), dtype=torch.float64, device=device)
                # per-layer values (and, when sharded, the table that is all-reduced)
                self.layer[p.index] = torch.empty(self.n_tensors, len(p.produces), dtype=torch.float64, device=device)

    def still_valid(self, items) -> bool:
        if _key(items) != self.key:
            return False
        grad_dtypes = list(self.buffers).index("grad")
        if any(item[1].dtype != sig[grad_dtypes] for item, sig in zip(items, self.signature)):
            return False  # a gradient changed dtype: it may belong to another partition now
        return all(item[2]["step"] is view for item, view in zip(items, self._step_views))

    def aligned(self, partition: int) -> bool:
        """All buffers of the partition's tensors start on 16 bytes (torch's allocations do; views may not)."""
        if partition not in self._aligned:
            members = self.partitions[partition][3]
            ptrs = [self.addr_host[name][i] for name in self.buffers for i in members]
            self._aligned[partition] = all(ptr % 16 == 0 for ptr in ptrs)
        return self._aligned[partition]

    def sync_steps(self) -> None:
        """Step counts written in place since the last step (``state["step"].zero_()`` to restart the bias
        correction, a checkpoint tool's ``copy_``) are spread to all of their tensor's chunks; the version
        counter tells, without reading the device."""
        if self.step._version != self._step_version and self._first_of_chunk is not None:
            self.step.copy_(self.step[self._first_of_chunk])  # the kernels advance every copy alike: only the first can differ
            self._step_version = self.step._version

    def refresh(self, items) -> None:
        """Per-step updates, decided on the host without reading the device: gradients that moved (autograd
        allocates new ones after ``zero_grad(set_to_none=True)``) and hyperparameters that changed (an lr
        schedule) are re-uploaded; nothing else is rebuilt."""
        grads = [item[1] for item in items]
        grad_ptrs = [g.data_ptr() for g in grads]
        if grad_ptrs != self.grad_ptrs:
            self.buffers["grad"] = grads
            self.addr["grad"] = torch.tensor(grad_ptrs, dtype=torch.int64).to(self.device, non_blocking=True)
            self.addr_host["grad"] = grad_ptrs
            self.grad_ptrs = grad_ptrs
            self._aligned.clear()
        values = [item[3] for item in items]
        if any(isinstance(v, torch.Tensor) for row in values for v in row):
            # Hyperparameters given as device tensors (capturable): gather them on the device every step,
            # a copy kernel instead of a host read; the group structure follows tensor identity.
            groups = list(dict.fromkeys(tuple(id(v) if isinstance(v, torch.Tensor) else v for v in row) for row in values))
            keys = [tuple(id(v) if isinstance(v, torch.Tensor) else v for v in row) for row in values]
            if keys != self.values:
                self.group = torch.tensor([groups.index(k) for k in keys], dtype=torch.int32).to(self.device)
                self.values = keys
            rows = [values[keys.index(g)] for g in groups]
            self.hyper = torch.stack(
                [torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in row]) for row in rows]
            )
            return
        if values == self.values:
            return
        groups = list(dict.fromkeys(values))
        index = [groups.index(v) for v in values]
        self.group = torch.tensor(index, dtype=torch.int32).to(self.device, non_blocking=True)
        self.hyper = torch.tensor(groups, dtype=torch.float64).reshape(len(groups), -1).to(self.device, non_blocking=True)
        self.values = values


class _StagedState(dict):
    """A parameter's state with contiguous twins in place of non-contiguous tensors; ``step`` writes through
    (the step-table view must land in the real state)."""

    def __init__(self, state: dict):
        super().__init__(state)
        self.state = state

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.state[key] = value


def _key(items):
    """What the tables depend on: the tensors and the storage of parameters and states (gradients and
    hyperparameters are refreshed in place, see ``_Tables.refresh``)."""
    return tuple(
        (id(p), p.data_ptr(), p.numel(), tuple(state[k].data_ptr() for k in sorted(state) if k != "step"))
        for p, _, state, _ in items
    )


class TritonBackend:
    name = "triton"

    def __init__(self, plan, config: LaunchConfig | None = None, autotune: bool = False):
        self.plan = plan
        self.module = load_module(plan, "triton")
        self.config = config or default_config()
        self.autotune = autotune  # choose self.config by timing candidates whenever the tables are rebuilt
        self._tables: _Tables | None = None
        self._staging: dict[int, tuple] = {}
        self.launches = 0  # kernel launches issued (tests count them)

    @staticmethod
    def check(param: torch.Tensor, grad: torch.Tensor, state_dtype: torch.dtype | None = None) -> None:
        """Refuse what the kernels cannot take, before the optimizer creates any state."""
        for tensor in (param, grad):
            _tl_dtype(tensor.dtype)
        if state_dtype is not None:
            _tl_dtype(state_dtype, "state_dtype")

    def invalidate(self) -> None:
        self._tables = None

    def _tables_for(self, items, scratch_of, device_scalars=None) -> _Tables:
        tables = self._tables
        if tables is None or not tables.still_valid(items):
            if self.autotune:
                from . import autotune

                self.config = autotune.tune(self.plan, items, default_config(), device_scalars=device_scalars)
            tables = _Tables(self.plan, items, scratch_of, self.config)
            self._tables = tables
        else:
            tables.refresh(items)
            tables.sync_steps()
        return tables

    def _stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """A persistent contiguous twin of a non-contiguous tensor (a transposed or sliced view)."""
        buf = self._staging.get(id(tensor))
        if buf is None or buf[0] is not tensor:
            buf = (tensor, torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device))
            self._staging[id(tensor)] = buf
        buf[1].copy_(tensor)
        return buf[1]

    def _contiguous(self, items):
        """Kernels address flat memory: non-contiguous parameters and states run on contiguous twins that are
        copied back after the launches (extra copy kernels for those tensors only); gradients are copied."""
        staged, out = [], []
        for p, grad, state, values in items:
            if not p.is_contiguous():
                twin = self._stage(p)
                staged.append((p, twin))
                p = twin
            if not grad.is_contiguous():
                grad = grad.contiguous()
            if any(isinstance(v, torch.Tensor) and k != "step" and not v.is_contiguous() for k, v in state.items()):
                view = _StagedState(state)
                for k, v in state.items():
                    if k != "step" and isinstance(v, torch.Tensor) and not v.is_contiguous():
                        twin = self._stage(v)
                        staged.append((v, twin))
                        dict.__setitem__(view, k, twin)
                state = view
            out.append((p, grad, state, values))
        return out, staged

    def step(self, items, scratch_of, device_scalars=None, reducer=None) -> None:
        # Triton launches on the current CUDA device: parameters on cuda:1 while cuda:0 is current would be
        # addressed from the wrong GPU. The optimizer makes one backend per device; launch on that one.
        device = items[0][0].device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self._step(items, scratch_of, device_scalars, reducer)

    def _step(self, items, scratch_of, device_scalars=None, reducer=None) -> None:
        items, staged = self._contiguous(items)
        device_scalars = device_scalars or {}
        t = self._tables_for(items, scratch_of, device_scalars)
        cfg = self.config
        plan = self.plan
        reduced = set()  # passes whose partials were folded into [tensors, slots] this step
        for p, kernel, reduce_kernel in zip(plan.passes, self.module.PASSES, self.module.REDUCES):
            buffers = _pass_buffers(p, plan)
            tables = []
            for producer in sorted({_producer(plan, k) for k in p.consumes}):
                if producer in reduced:
                    tables += [t.layer[producer], t.n_tensors]
                else:
                    tables += [t.partials[producer], t.n_chunks]
            for partition, (offset, count, dtypes, _) in enumerate(t.partitions):
                if count == 0:
                    continue
                span = slice(offset, offset + count)
                args = [t.chunk_tensor[span], t.chunk_start[span], t.numel, t.group, t.step[span], t.hyper]
                args += [t.addr[b] for b in buffers]
                args += tables
                args += [device_scalars[name] for name in p.device_scalars]
                if p.produces:
                    args.append(t.partials[p.index])
                args.append(offset)
                kernel[(count,)](
                    *args,
                    **{f"DT_{b}": dtypes[b] for b in buffers},
                    N_HYPER=len(plan.ir.hypers),
                    CHUNK=cfg.chunk,
                    BLOCK=cfg.block,
                    ALIGNED=t.aligned(partition),
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                )
                self.launches += 1
            # Sharded: every pass with partials is folded per tensor and all-reduced (one collective), so
            # global values are exact too; otherwise only per-layer partials need the segment-reduce.
            if p.produces and (p.reduce_after or reducer is not None):
                if t.n_tensors:
                    reduce_kernel[(t.n_tensors,)](
                        t.partials[p.index], t.first_chunk, t.n_chunks_of, t.layer[p.index], BLOCK=cfg.reduce_block
                    )
                    self.launches += 1
                if reducer is not None:
                    reducer(t.layer[p.index], [plan.slots[k].op for k, _ in p.produces])
                reduced.add(p.index)
        for original, twin in staged:
            original.copy_(twin)
        if t.empty_steps:  # zero-size parameters: no chunk, no kernel; the step still advances
            advance = load_module(plan, "torch").step_advance(
                **{d: device_scalars[d].reshape(()) for d in plan.passes[-1].device_scalars}
            )
            for state in t.empty_steps:
                state["step"].add_(advance)


def _pass_buffers(p, plan) -> list[str]:
    """Buffers a pass touches, in the order of its kernel's address arguments."""
    used = {ld.buffer for ld in p.loads} | {b for b, _ in p.stores}
    return [b for b in plan.buffers if b in used]


def _producer(plan, slot_index: int) -> int:
    return plan.slots[slot_index].stage
