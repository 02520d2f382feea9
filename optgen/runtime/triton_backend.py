"""The Triton backend: one launch per pass over every parameter, driven by cached tables.

The tables (chunks, addresses, groups, per-chunk step counts, partial, per-layer and global tables) and the
contiguous staging are ``optgen.runtime.tables``', shared with the C backend; every launch's arguments follow
the kernel ABI (``optgen.codegen.abi``), the list the templates print the signatures from. What is Triton's
own: the launch configuration (chunk, block, warps, stages: ``LaunchConfig``, chosen by ``tuner`` when one is
given), the ``constexpr`` storage dtypes, and launching on the parameters' own CUDA device. Global values are
folded once per step by one more program of a pass's reduce launch (when sharded: a one-program launch after
the all-reduce of the ``[tensors, slots]`` table).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from .. import quantization, settings
from ..codegen.abi import axes_args, axes_states, pass_args, reduce_args
from ..codegen.render import load_module
from . import backends
from .tables import (
    ChunkTables,
    Staging,
    axes_values,
    boundary_all_reduce,
    matrix_all_reduce,
    over_partitions,
    pass_values,
    reduce_launches,
    split_rows,
)

_TL_DTYPES = {}


def _tl_dtype(dtype: torch.dtype, what: str = "tensors"):
    if not _TL_DTYPES:
        import triton.language as tl

        _TL_DTYPES.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    if dtype not in _TL_DTYPES:
        hint = " (use backend='torch' for it)" if what == "state_dtype" else ""
        raise TypeError(f"the Triton backend supports fp32, fp16 and bf16 {what}, not {dtype}{hint}")
    return _TL_DTYPES[dtype]


def _state_tl_dtype(dtype: torch.dtype):
    """A buffer's Triton dtype in the tables: floats, and the uint8 codes of 8-bit states (only here: parameters,
    gradients and state_dtype are floats, ``_tl_dtype``)."""
    if dtype == torch.uint8:
        import triton.language as tl

        return tl.uint8
    return _tl_dtype(dtype)


@dataclass(frozen=True)
class LaunchConfig:
    """One step's launch parameters (``optgen.runtime.autotune`` searches them)."""

    chunk: int = settings.default("OPTGEN_CHUNK")  # elements per program; shapes the chunk and partial tables
    block: int = settings.default("OPTGEN_BLOCK")  # elements per loop iteration of a program
    reduce_block: int = 256
    num_warps: int = 4
    num_stages: int = 3


# 8-bit plans hold each stored block's fp32 values through a reshape, a reduction and ten map lookups per element:
# at 1024 elements per 4 warps LAMB8bit's first pass needs 168 registers and spills 48 B on sm_90; at 512, 126 and
# none there, but AdamW8bit still spills 8 B on sm_80 (56 registers: ptxas's cap); at 256 none spills (measured)
QUANTIZED_MAX_BLOCK = 256


def fit_config(plan, config: LaunchConfig) -> LaunchConfig:
    """``config`` made fit for ``plan``: with 8-bit buffers a block holds whole quantization blocks (a multiple of
    256 elements: the absmax of each is a reduction within the block), at most ``QUANTIZED_MAX_BLOCK``, and a
    chunk whole blocks."""
    if not plan.quantized:
        return config
    size = quantization.BLOCK
    block = min(max(size, -(-config.block // size) * size), max(size, QUANTIZED_MAX_BLOCK))
    return dataclasses.replace(config, block=block, chunk=-(-config.chunk // block) * block)


def default_config() -> LaunchConfig:
    """``OPTGEN_CHUNK``/``OPTGEN_BLOCK`` override the defaults (tests use small chunks)."""
    config = LaunchConfig(chunk=settings.count("OPTGEN_CHUNK"), block=settings.count("OPTGEN_BLOCK"))
    if config.chunk % config.block:
        raise ValueError(f"chunk size {config.chunk} must be a multiple of the block size {config.block}")
    return config


class TritonBackend:
    name = "triton"
    options = ("tuner",)  # constructor options the optimizer may pass (runtime/backends.py)

    def __init__(self, plan, config: LaunchConfig | None = None, tuner=None):
        """``tuner(plan, items, default_config, device_scalars=...)`` -> LaunchConfig chooses the configuration
        whenever the tables are rebuilt (``optgen.runtime.autotune.tune``); None keeps ``config``."""
        self.plan = plan
        self.module = load_module(plan, "triton")
        self.config = fit_config(plan, config or default_config())
        self.tuner = tuner
        self._tables: ChunkTables | None = None
        self._staging = Staging()
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

    def _axes(self, t: ChunkTables, p, kernel, device_scalars: dict, phases: int) -> None:
        """The reduce step after pass ``p``: one program per tensor (``phases``: see tables.axes_values)."""
        plan = self.plan
        values = axes_values(t, plan, p, device_scalars, phases)
        dtypes = t.partitions[0][2]
        kernel[(t.n_tensors,)](
            *[values[a.name] for a in axes_args(plan, p)],
            **{f"DT_{name}": dtypes[name] for name in axes_states(plan, p)},
            N_HYPER=len(plan.ir.hypers),
            BLOCK=self.config.block,
        )
        self.launches += 1

    def _eager(self):
        """The eager torch backend of this plan (a factored plan over several storage-dtype partitions)."""
        if getattr(self, "_eager_backend", None) is None:
            self._eager_backend = backends.eager(self.plan)
        return self._eager_backend

    def _tables_for(self, items, scratch_of, device_scalars=None) -> ChunkTables:
        tables = self._tables
        if tables is None or not tables.still_valid(items):
            if self.tuner is not None:
                self.config = fit_config(self.plan, self.tuner(self.plan, items, fit_config(self.plan, default_config()), device_scalars=device_scalars))
            # a factored plan's tiles are at most a block wide: a program holds a tile's row in one block
            tables = ChunkTables(self.plan, items, scratch_of, self.config.chunk, _state_tl_dtype, max_cols=self.config.block)
            self._tables = tables
        else:
            tables.refresh(items)
            tables.sync_scalars()
        return tables

    def step(self, items, scratch_of, device_scalars=None, reducer=None) -> None:
        # Triton launches on the current CUDA device: parameters on cuda:1 while cuda:0 is current would be
        # addressed from the wrong GPU. The optimizer makes one backend per device; launch on that one.
        device = items[0][0].device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self._step(items, scratch_of, device_scalars, reducer)

    def _step(self, items, scratch_of, device_scalars=None, reducer=None) -> None:
        staged_items, staged = self._staging.contiguous(items)
        device_scalars = device_scalars or {}
        t = self._tables_for(staged_items, scratch_of, device_scalars)
        if over_partitions(t, self.plan):
            self._eager().step(items, scratch_of, device_scalars, reducer)
            return
        cfg = self.config
        plan = self.plan
        for p, kernel, reduce_kernel, axes_kernel in zip(plan.passes, self.module.PASSES, self.module.REDUCES, self.module.AXES):
            names = [a.name for a in pass_args(plan, p)]
            for partition, (offset, count, dtypes, _, _) in enumerate(t.partitions):
                if count == 0:
                    continue
                values = pass_values(t, plan, p, offset, count, device_scalars)
                kernel[(count,)](
                    *[values[n] for n in names],
                    **{f"DT_{b}": dtypes[b] for b in (*plan.buffers, *plan.ir.factored_state_names) if f"_{b}_addr" in names},
                    N_HYPER=len(plan.ir.hypers),
                    CHUNK=cfg.chunk,
                    BLOCK=cfg.block,
                    ALIGNED=t.aligned(partition),
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                )
                self.launches += 1
            split = reducer is not None and split_rows(t, plan)  # the reduce step's folds, an all-reduce, its items
            if p.produces:
                reduce_names = [a.name for a in reduce_args(plan, p)]
                before, after = reduce_launches(t, p, reducer is not None)
                for programs, values in before:
                    reduce_kernel[(programs,)](*[values[n] for n in reduce_names], BLOCK=cfg.reduce_block)
                if split and p.axes_after:
                    self._axes(t, p, axes_kernel, device_scalars, phases=1)
                if reducer is not None:  # sharded: one all-reduce of the [tensors, slots] table (and split column sums)
                    boundary_all_reduce(t, plan, p, reducer)
                for programs, values in after:
                    reduce_kernel[(programs,)](*[values[n] for n in reduce_names], BLOCK=cfg.reduce_block)
                self.launches += len(before) + len(after)
            if p.axes_after:
                self._axes(t, p, axes_kernel, device_scalars, phases=2 if split else 3)
                if split:
                    matrix_all_reduce(t, plan, p, reducer)
        for original, twin in staged:
            original.copy_(twin)
