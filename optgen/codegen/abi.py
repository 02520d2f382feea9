"""The kernel ABI: the one list of a generated kernel's runtime arguments.

Every target's template prints its kernel signatures from these lists, every launcher builds its argument
tuple from them (by name, from the tables of one step), and ``optgen inspect`` types the Triton signature
with them; nothing else spells an argument list. What a target adds of its own is not here: Triton's
``constexpr`` specialisations (storage dtypes, block sizes) and the grid, C's leading program count and the
chunk size (compile-time in Triton, a runtime integer in C).

A pass kernel covers chunks ``[0, programs)`` of its partition's slice of the chunk table; a reduce kernel runs
``n_segments`` segment programs (one per tensor: its chunks' partials folded in order into ``[tensors,
slots]``) and, when the pass produces global values, one more that folds the rows of ``_fold`` (the chunk
partials, or the all-reduced ``[tensors, slots]`` table when parameters are sharded) into ``_global``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis import Pass, Plan


@dataclass(frozen=True)
class KernelArg:
    """``name`` as in the generated source; ``pointer``: a table of ``dtype`` elements (``i32``, ``i64``,
    ``fp32``, ``fp64``) passed by address, else an ``i64`` passed by value; ``writes``: the kernel stores into
    it; ``doc``: what it holds."""

    name: str
    pointer: bool
    dtype: str
    doc: str
    writes: bool = False


def _table(name: str, dtype: str, doc: str, writes: bool = False) -> KernelArg:
    return KernelArg(name, True, dtype, doc, writes)


def _int(name: str, doc: str) -> KernelArg:
    return KernelArg(name, False, "i64", doc)


def pass_buffers(plan: Plan, p: Pass) -> list[str]:
    """Buffers a pass touches, in the order of its address arguments."""
    used = {ld.buffer for ld in p.loads} | {b for b, _ in p.stores}
    return [b for b in plan.buffers if b in used]


def quantized_buffers(plan: Plan, p: Pass) -> list[str]:
    """Buffers of pass ``p`` that may be 8-bit states (``state_format="8bit"``), in argument order: each brings
    the address table of its block scales, and the pass the maps."""
    quantized = dict(plan.quantized)
    return [b for b in pass_buffers(plan, p) if b in quantized]


def eager_pass_buffers(plan: Plan, p: Pass) -> list[str]:
    """Buffers the generated torch function of pass ``p`` takes (as ``_<name>``): those it touches; a pass that
    only counts elements (``layer_numel()``) touches none and takes the parameter for its shape."""
    return pass_buffers(plan, p) or ["param"]


def layer_state_args(plan: Plan, p: Pass) -> list[str]:
    """Per-layer states pass ``p`` reads or writes, in declaration order (its ``_layer_<name>`` arguments)."""
    used = set(p.layer_state_reads) | {name for name, _ in p.layer_stores}
    return [name for name in plan.ir.layer_state_names if name in used]


def producer_of(plan: Plan, slot_index: int) -> int:
    """The pass that computes a reduction slot (its stage)."""
    return plan.slots[slot_index].stage


def read_tables(plan: Plan, p: Pass) -> list[tuple[int, str]]:
    """(producer pass, "layer" | "global") for every table of finished reductions ``p`` reads, in argument order."""
    scopes: dict[int, set[str]] = {}
    for k in p.consumes:
        if plan.slots[k].scope in ("layer", "global"):
            scopes.setdefault(producer_of(plan, k), set()).add(plan.slots[k].scope)
    return [(producer, scope) for producer in sorted(scopes) for scope in ("layer", "global") if scope in scopes[producer]]


def pass_args(plan: Plan, p: Pass) -> tuple[KernelArg, ...]:
    """Runtime arguments of pass ``p``'s kernel, in order."""
    n_partials = len(p.produces)
    args = [
        _table("_chunk_tensor", "i32", "[chunks]: the tensor of each chunk"),
        _table("_chunk_start", "i64", "[chunks]: the chunk's first element in its tensor"),
        _table("_numel", "i64", "[tensors]: elements"),
        _table("_group", "i32", "[tensors]: param group (row of _hyper)"),
        _table("_step", "fp32", "[chunks]: steps taken so far", writes=p.writes_step),
        _table("_hyper", "fp64", "[groups, hypers]: hyperparameters"),
    ]
    args += [_table(f"_{b}_addr", "i64", f"[tensors]: data_ptr of each tensor's {b}") for b in pass_buffers(plan, p)]
    quantized = quantized_buffers(plan, p)
    args += [_table(f"_{b}_absmax_addr", "i64", f"[tensors]: data_ptr of each tensor's {b} block scales (8-bit state; unused for others)") for b in quantized]
    if quantized:
        args.append(_table("_qmap", "fp32", "[maps * 256 + ...]: the 8-bit maps in quantization.KINDS order, then their search tables (quantization.map_table)"))
    for producer, scope in read_tables(plan, p):
        width = len(plan.passes[producer].produces)
        if scope == "layer":
            args.append(_table(f"_table_{producer}", "fp64", f"[tensors, {width}]: per-layer reductions of pass {producer}"))
        else:
            args.append(_table(f"_global_{producer}", "fp64", f"[{width}]: global reductions of pass {producer}, folded once per step"))
    args += [_table(f"_dev_{name}", "fp32", f"[1]: {name}, read on the device (no host sync)") for name in p.device_scalars]
    written = {name for name, _ in p.layer_stores}
    args += [
        _table(f"_layer_{name}", "fp64", f"[chunks]: per-layer state {name}, each chunk's copy", writes=name in written)
        for name in layer_state_args(plan, p)
    ]
    if n_partials:
        args.append(_table("_partials", "fp64", f"[chunks, {n_partials}]: per-chunk partial reductions", writes=True))
    if plan.ir.factored:
        args += _geometry_args()
        args += [_table(f"_{name}_addr", "i64", f"[tensors]: data_ptr of each tensor's {name} (per {per})") for name, per in p.axis_loads]
        scopes = {plan.slots[k].scope for k, _ in p.produces}
        args += [
            _table("_rowpart", "fp64", "[row partials, row slots]: each chunk's sums of its rows", writes="row" in scopes),
            _table("_colpart", "fp64", "[column slots, column partials]: each chunk's sums of its columns", writes="col" in scopes),
            _table("_rowtot", "fp64", "[rows, row slots]: finished per-row values"),
            _table("_coltot", "fp64", "[column slots, columns]: finished per-column values"),
            _table("_mattot", "fp64", "[matrices, matrix slots]: finished per-matrix values"),
        ]
    args.append(_int("_chunk_offset", "row of this call's first chunk in _partials (partitions share the table)"))
    return tuple(args)


def _geometry_args() -> list[KernelArg]:
    """A factored plan's chunks are whole rows of one matrix (or one row's columns) of a (B, R, C) parameter."""
    return [
        _table("_chunk_row", "i64", "[chunks]: the chunk's first row, b*R + r"),
        _table("_chunk_col", "i64", "[chunks]: the chunk's first column"),
        _table("_chunk_nrows", "i64", "[chunks]: rows of the chunk"),
        _table("_chunk_ncols", "i64", "[chunks]: columns of the chunk"),
        _table("_chunk_mat", "i64", "[chunks]: the chunk's matrix b"),
        _table("_chunk_rowpart", "i64", "[chunks]: the chunk's first row in _rowpart"),
        _table("_chunk_colpart", "i64", "[chunks]: the chunk's first row in _colpart"),
        _table("_mats", "i64", "[tensors]: matrices B"),
        _table("_rows", "i64", "[tensors]: rows R of each matrix"),
        _table("_cols", "i64", "[tensors]: columns C"),
        _table("_count_rows", "i64", "[tensors]: rows of the whole parameter, what a column mean divides by (R, or more when FSDP2 shards the rows)"),
        _table("_row_base", "i64", "[tensors]: the tensor's first row in _rowtot"),
        _table("_col_base", "i64", "[tensors]: the tensor's first column in _coltot"),
        _table("_mat_base", "i64", "[tensors]: the tensor's first matrix in _mattot"),
        _int("_colpart_rows", "columns of _colpart (it is [column slots, columns]: a slot's sums contiguous)"),
        _int("_coltot_rows", "columns of _coltot ([column slots, columns])"),
    ]


def axis_columns(plan: Plan, scope: str) -> dict[int, int]:
    """Slot index -> column in the plan-wide table of finished per-row (``"row"``), per-column (``"col"``) or
    per-matrix (``"matrix"``) values."""
    return {slot.index: i for i, slot in enumerate(s for s in plan.slots if s.scope == scope)}


def axes_args(plan: Plan, p: Pass) -> tuple[KernelArg, ...]:
    """Runtime arguments of the per-row/column reduce step after pass ``p`` (one program per tensor): it folds
    the pass's row and column partials, then computes its ``reduce_items`` (new per-row/column states, written
    in place; per-matrix sums)."""
    args = [
        _table("_first_chunk", "i64", "[tensors]: first chunk of each tensor"),
        _table("_n_chunks", "i64", "[tensors]: chunks of each tensor"),
        _table("_group", "i32", "[tensors]: param group (row of _hyper)"),
        _table("_hyper", "fp64", "[groups, hypers]: hyperparameters"),
        _table("_step", "fp32", "[chunks]: steps taken so far"),
        *_geometry_args(),
        _table("_rowpart", "fp64", "[row partials, row slots]"),
        _table("_colpart", "fp64", "[column slots, column partials]"),
        _table("_rowtot", "fp64", "[rows, row slots]: finished per-row values", writes=True),
        _table("_coltot", "fp64", "[column slots, columns]: finished per-column values", writes=True),
        _table("_mattot", "fp64", "[matrices, matrix slots]: finished per-matrix values", writes=True),
        _int("_phases", "1: fold the partials, then the early items; 2: the late items; 3: all (sharded: the boundary's all-reduce between)"),
    ]
    args += [
        _table(f"_{name}_addr", "i64", f"[tensors]: data_ptr of each tensor's {name}", writes=False)
        for name in axes_states(plan, p)
    ]
    args += [_table(f"_table_{producer}", "fp64", f"per-layer reductions of pass {producer}") for producer in axes_layer_tables(plan, p)]
    args += [_table(f"_layer_{name}", "fp64", f"[chunks]: per-layer state {name}") for name in axes_layer_states(plan, p)]
    args += [_table(f"_dev_{name}", "fp32", f"[1]: {name}") for name in axes_device_scalars(plan, p)]
    return tuple(args)


def axes_states(plan: Plan, p: Pass) -> list[str]:
    """Per-row/column states the reduce step after ``p`` reads or writes, in declaration order."""
    used = set()
    for kind, key, expr in p.reduce_items:
        if kind == "state":
            used.add(key)
        used |= {s.name for s in expr.free_symbols if s.name in plan.ir.factored_state_names}
    return [name for name in plan.ir.factored_state_names if name in used]


def reduce_item_names(p: Pass) -> set[str]:
    """Names of the symbols the reduce step after ``p`` reads."""
    return {s.name for _, _, expr in p.reduce_items for s in expr.free_symbols}


def axes_layer_tables(plan: Plan, p: Pass) -> list[int]:
    """Passes whose per-layer values the reduce step after ``p`` reads."""
    names = reduce_item_names(p)
    return sorted({plan.slots[k].stage for k in range(len(plan.slots)) if plan.slots[k].name in names and plan.slots[k].scope == "layer"})


def axes_layer_states(plan: Plan, p: Pass) -> list[str]:
    """Per-layer states (old values) the reduce step after ``p`` reads."""
    names = reduce_item_names(p)
    return [name for name in plan.ir.layer_state_names if name in names]


def axes_device_scalars(plan: Plan, p: Pass) -> list[str]:
    """Device scalars (GradScaler's found_inf) the reduce step after ``p`` reads."""
    names = reduce_item_names(p)
    return [d for d in plan.ir.device_scalars if d in names]


def reduce_args(plan: Plan, p: Pass) -> tuple[KernelArg, ...]:
    """Runtime arguments of pass ``p``'s reduce kernel (a pass that produces partials), in order."""
    n_partials = len(p.produces)
    args = [
        _table("_partials", "fp64", f"[chunks, {n_partials}]"),
        _table("_first_chunk", "i64", "[tensors]: first chunk of each tensor"),
        _table("_n_chunks", "i64", "[tensors]: chunks of each tensor"),
        _table("_out", "fp64", f"[tensors, {n_partials}]: per-tensor values", writes=True),
    ]
    if global_columns(plan, p):
        args += [
            _int("_n_segments", "programs [0, _n_segments) fold one tensor's chunks each; program _n_segments the globals"),
            _table("_fold", "fp64", f"[_fold_rows, {n_partials}]: the chunk partials, or (sharded) the all-reduced [tensors, {n_partials}] table"),
            _int("_fold_rows", "rows of _fold"),
            _table("_global", "fp64", f"[{n_partials}]: the global values, at their slot's column", writes=True),
        ]
    return tuple(args)


def global_columns(plan: Plan, p: Pass) -> list[int]:
    """Columns of ``p``'s partials that are global values."""
    return [col for col, (k, _) in enumerate(p.produces) if plan.slots[k].scope == "global"]
