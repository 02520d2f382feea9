"""Analysis: classify the IR's nodes and derive the pass plan.

``plan(ir)`` is a pure function from an :class:`~optgen.ir.IR` to a frozen :class:`Plan`.

* Every reduction becomes a *slot* (``red_k``): a per-layer or global sum/max of an element-wise
  expression. Its *stage* is the number of reductions that must complete before its argument exists.
* The stage of an element-wise value is 1 + the largest stage of the slots it reads (0 if none). A pass
  computes everything of its stage: no reductions -> one pass; each reduction level cuts a boundary; a
  global norm of the raw gradient becomes a pre-pass.
* A new state value is written in the pass of its stage, later if an old value is still needed after it.
  Later passes *load* the written value. A value computed in an earlier pass and needed again is either
  recomputed from its leaves or stored into a scratch buffer, whichever moves fewer bytes (ties recompute:
  no extra memory).
* A per-layer state's new value is a per-layer expression: every pass that needs it computes it once per
  program (like a trust ratio) from the old value, and the last pass writes it, as it advances the step count.
* Between a pass producing partial sums and its consumers sits one reduce launch: a segment-reduce into
  per-layer values and/or one program that folds the global values once per step, in a fixed order, into a
  small vector that each consumer reads with one load.

The plan is the one place that knows the pass structure; printers and templates only render it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import sympy
from sympy.core.sorting import default_sort_key

from . import quantization
from .ir import IR
from .spec import (
    PARAM,
    ColStateSymbol,
    DeviceScalarSymbol,
    GradSymbol,
    HyperSymbol,
    LayerStateSymbol,
    NewColStateSymbol,
    NewLayerStateSymbol,
    NewRowStateSymbol,
    NewStateSymbol,
    ParamSymbol,
    Reduction,
    RowStateSymbol,
    SpecError,
    StateSymbol,
    StepSymbol,
    granularity,
)

FP32_BYTES = 4


class ScratchSymbol(sympy.Symbol):
    """A value stored by one pass into a scratch buffer and loaded by a later one."""

    def __new__(cls, name: str):
        return super().__new__(cls, name, real=True)


class SlotSymbol(sympy.Symbol):
    """The finished value of a reduction slot, read by passes after the one that computes it."""

    def __new__(cls, name: str):
        return super().__new__(cls, name, real=True)


class ShapeSymbol(sympy.Symbol):
    """A parameter's row length C (``n_cols``) or column length R (``n_rows``): what ``row_sum``/``col_sum`` of a
    value that does not vary along the row (a count: ``row_sum(1)``) is a multiple of. Read per program."""

    def __new__(cls, name: str):
        return super().__new__(cls, name, positive=True)


N_COLS, N_ROWS = ShapeSymbol("n_cols"), ShapeSymbol("n_rows")


class AxisSlotSymbol(SlotSymbol):
    """The finished value of a per-row or per-column reduction: it varies within a program's elements."""


ELEMENTWISE = (ParamSymbol, GradSymbol, StateSymbol, NewStateSymbol, ScratchSymbol)  # loaded element by element
_ROW = (RowStateSymbol, NewRowStateSymbol)
_COL = (ColStateSymbol, NewColStateSymbol)
# values that vary from element to element of one program: element-wise code computes with them
VARYING = ELEMENTWISE + _ROW + _COL + (AxisSlotSymbol,)


@dataclass(frozen=True)
class Slot:
    """One reduction: ``op`` (sum | max) of ``arg`` over a layer or over all parameters (``scope`` layer,
    global), over the last or second-to-last dimension of an element-wise value (row, col: one value per row or
    column, ``dim`` -1 or -2), or of a per-column or per-row value (matrix: one per matrix, computed at the
    reduce step after pass ``stage`` from values that step finished, not from a pass's elements)."""

    index: int
    op: str
    scope: str
    arg: sympy.Expr
    stage: int
    dim: int | None = None

    @property
    def reduce_time(self) -> bool:
        return self.scope == "matrix"

    @property
    def name(self) -> str:
        return f"red_{self.index}"

    @property
    def identity(self) -> float:
        return 0.0 if self.op == "sum" else float("-inf")


@dataclass(frozen=True)
class Load:
    """``symbol`` (a name in the generated code) is read element-wise from ``buffer``."""

    symbol: str
    buffer: str


@dataclass(frozen=True)
class Pass:
    """One launch over all elements of all parameters.

    ``scalars`` are computed once per program (per-step and per-layer values), ``elementwise`` per element;
    both are (name, expression) in dependency order, as ``sympy.cse`` produced them.
    """

    index: int
    loads: tuple[Load, ...]
    scalars: tuple[tuple[str, sympy.Expr], ...]
    elementwise: tuple[tuple[str, sympy.Expr], ...]
    stores: tuple[tuple[str, sympy.Expr], ...]  # (buffer, value)
    produces: tuple[tuple[int, sympy.Expr], ...]  # (slot index, per-element contribution)
    consumes: tuple[int, ...]  # slots read
    hypers: tuple[str, ...]  # hyperparameters read
    uses_step: bool
    device_scalars: tuple[str, ...]  # 1-element device tensors read (GradScaler's found_inf ...)
    step_advance: sympy.Expr  # the step count moves by this in the last pass
    reduce_after: bool  # a segment-reduce launch turns this pass's partials into per-layer values
    fold_after: bool  # the pass produces global values: its reduce launch folds them once per step
    writes_step: bool  # the last pass advances the step count
    layer_state_reads: tuple[str, ...] = ()  # per-layer states whose old value the pass reads
    layer_stores: tuple[tuple[str, sympy.Expr], ...] = ()  # (per-layer state, new value): the last pass writes them
    axis_loads: tuple[tuple[str, str], ...] = ()  # (state, "row" | "column"): per-row/column states element code reads
    # Computed by the reduce step after this pass, in order, once its partials are folded: ("state", name, new
    # value) writes a per-row/column state, ("slot", slot index, argument) a per-matrix reduction.
    reduce_items: tuple[tuple[str, object, sympy.Expr], ...] = ()
    # the first ``early_items`` of them read nothing partial on an FSDP2 shard before the pass boundary's
    # all-reduce (no column sum, per-layer or global value of this pass): they run before it, the rest after
    early_items: int = 0
    axes_after: bool = False  # a reduce step folds per-row/column partials or computes reduce_items
    shape_reads: tuple[str, ...] = ()  # n_cols / n_rows: the parameter's row and column lengths
    traffic: Fraction = Fraction(0)  # element-wise bytes moved per parameter (8-bit states cost 1 + 4/256)

    @property
    def early_reduce_items(self) -> tuple:
        """The reduce step's items that run before the pass boundary's all-reduce (under FSDP2)."""
        return self.reduce_items[: self.early_items]

    @property
    def late_reduce_items(self) -> tuple:
        """The reduce step's items that run after it."""
        return self.reduce_items[self.early_items :]

    @property
    def bytes_per_param(self) -> int | float:
        return as_number(self.traffic)


@dataclass(frozen=True)
class Plan:
    ir: IR
    slots: tuple[Slot, ...]
    passes: tuple[Pass, ...]
    scratch: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())
    # 8-bit buffers and their maps: the IR's 8-bit states, and then the scratch buffers (optgen.quantization)
    quantized: tuple[tuple[str, str], ...] = ()

    @property
    def bytes_per_param(self) -> int | float:
        """HBM bytes moved per fp32 parameter per step (element-wise traffic; tables are negligible; an 8-bit
        state's scales count, 4 bytes per 256 elements)."""
        return as_number(sum((p.traffic for p in self.passes), Fraction(0)))

    @property
    def state_bytes_per_param(self) -> int | float:
        """Memory an fp32 parameter costs the optimizer between steps (element-wise states and scratch buffers;
        the step count, per-layer states and tables are negligible), not traffic. Adam 8, AMSGrad 12, SGD 4,
        NovoGrad 4, master weights +4; an 8-bit state 1 + 4/256 (Adam's two moments 2.03)."""
        eight_bit = {name for name, _ in self.quantized}
        weigh = buffer_bytes(self.ir, wide={name for name in self.scratch if name not in eight_bit})
        return as_number(sum((weigh(name) for name in (*self.ir.element_state_names, *self.scratch)), Fraction(0)))

    @property
    def launches_per_step(self) -> int:
        """Unsharded launches: one per pass, one reduce launch after each pass with per-layer values (segment-
        reduce) or global values (fold; the same launch when a pass produces both), and one reduce step after each
        pass with per-row/column sums or values to compute (``axes_after``)."""
        return len(self.passes) + sum((p.reduce_after or p.fold_after) + p.axes_after for p in self.passes)

    @property
    def buffers(self) -> tuple[str, ...]:
        """Element-wise buffers any pass touches, in a canonical order."""
        order = ["param", "grad", *self.ir.state_names, *self.scratch]
        used = {ld.buffer for p in self.passes for ld in p.loads} | {b for p in self.passes for b, _ in p.stores}
        return tuple(b for b in order if b in used)

    def describe(self) -> str:
        lines = [
            f"{self.ir.name} ({', '.join(f'{k}={v}' for k, v in self.ir.flags) or 'no flags'}): "
            f"{len(self.passes)} pass(es), {self.launches_per_step} launch(es)/step, "
            f"{self.bytes_per_param} B/param/step (fp32)"
        ]
        states = ", ".join((*self.ir.element_state_names, *self.scratch)) or "none"
        coarse = "".join(f"; {s.name} per {s.per}" for s in self.ir.states if s.per != "element")
        quantized = "".join(f"; {name} in 8 bits ({kind} map)" for name, kind in self.quantized)
        lines.append(f"  state: {states}{coarse}{quantized} -> {self.state_bytes_per_param} B/param (fp32)")
        for slot in self.slots:
            where = f"at the reduce step after pass {slot.stage}" if slot.reduce_time else f"computed in pass {slot.stage}"
            lines.append(f"  {slot.name} = {slot.scope} {slot.op} of {slot.arg}  [{where}]")
        for p in self.passes:
            loads = ", ".join(f"{ld.buffer}" + ("(new)" if ld.symbol.endswith("_new") else "") for ld in p.loads)
            stores = ", ".join(b for b, _ in p.stores) or "-"
            lines.append(
                f"  pass {p.index}: loads [{loads}] stores [{stores}] "
                f"reduces [{', '.join(f'red_{k}' for k, _ in p.produces) or '-'}] "
                f"reads [{', '.join(f'red_{k}' for k in p.consumes) or '-'}] -> {p.bytes_per_param} B"
                + (" ; then " if p.reduce_after or p.fold_after or p.axes_after else "")
                + " + ".join(w for w, on in (("segment-reduce", p.reduce_after), ("global fold", p.fold_after), ("row/column step", p.axes_after)) if on)
            )
            for kind, name, expr in p.reduce_items:
                what = f"{name} = {expr}" if kind == "state" else f"red_{name} = matrix sum of {expr}"
                lines.append(f"    reduce step after pass {p.index}: {what}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _buffer_of(symbol: sympy.Symbol) -> str:
    if isinstance(symbol, ParamSymbol):
        return "param"
    if isinstance(symbol, GradSymbol):
        return "grad"
    if isinstance(symbol, StateSymbol):
        return symbol.name
    if isinstance(symbol, NewStateSymbol):
        return "param" if symbol.name == "w_new" else symbol.name[: -len("_new")]
    if isinstance(symbol, ScratchSymbol):
        return symbol.name
    raise TypeError(symbol)


def _target_of(symbol: NewStateSymbol) -> str:
    return PARAM if symbol.name == "w_new" else symbol.name[: -len("_new")]


def _extract_slots(updates: dict[str, sympy.Expr]):
    """Replace reductions, innermost first, by slot symbols; identical reductions share a slot. Each slot is
    (op, scope, arg, dim): a row or column sum of an element-wise value is per row/column, of a value of the
    other axis per matrix."""
    slots_raw: list[tuple[str, str, sympy.Expr, int | None]] = []
    known: dict[sympy.Symbol, str] = {}  # slot symbol -> granularity of its value
    exprs = dict(updates)
    while True:
        found = set()
        for expr in exprs.values():
            found |= expr.atoms(Reduction)
        for _, _, arg, _ in slots_raw:
            found |= arg.atoms(Reduction)
        innermost = sorted((r for r in found if not r.args[0].atoms(Reduction)), key=default_sort_key)
        if not innermost:
            break
        mapping = {}
        for red in innermost:
            value = granularity(red, known)
            if red.scope in ("row", "col") and granularity(red.args[0], known) in ("scalar", "layer"):
                # the same value along the whole row (column): C (R) times it, no reduction to run
                mapping[red] = red.args[0] * (N_COLS if red.scope == "row" else N_ROWS)
                continue
            name = f"red_{len(slots_raw)}"
            if red.scope in ("row", "col"):
                scope = "matrix" if value == "matrix" else red.scope
                dim = -1 if red.scope == "row" else -2
            else:
                scope, dim = red.scope, None
            symbol = AxisSlotSymbol(name) if scope in ("row", "col") else SlotSymbol(name)
            known[symbol] = value
            mapping[red] = symbol
            slots_raw.append((red.op, scope, red.args[0], dim))
        exprs = {k: e.xreplace(mapping) for k, e in exprs.items()}
        slots_raw = [(op, scope, arg.xreplace(mapping), dim) for op, scope, arg, dim in slots_raw]
    return exprs, slots_raw


def _inline_layer_values(updates: dict[str, sympy.Expr], layer_targets) -> dict[str, sympy.Expr]:
    """Every new per-layer state value replaced by its definition (per-layer expressions cost a few scalar
    operations per program: each pass that reads one computes it; the IR has no cycles)."""
    definition = {NewLayerStateSymbol(f"{t}_new"): t for t in layer_targets}

    def inline(expr):
        while True:
            found = {s: updates[definition[s]] for s in expr.free_symbols if s in definition}
            if not found:
                return expr
            expr = expr.xreplace(found)

    return {t: inline(e) for t, e in updates.items()}


def _slot_index(symbol: sympy.Symbol) -> int:
    return int(symbol.name.split("_")[1])


def _layout(defs, slots_raw, earliest: dict[int, int], layer_defs=(), axis_defs=None):
    """Stages of every slot and new value, the write pass of every target, the reduce step of every per-row or
    per-column state, and the number of passes.

    ``earliest`` holds a later pass than its natural stage for some slots (see ``plan``); ``layer_defs``, the
    per-layer states' new values, are written by the last pass, which must come after the slots they read;
    ``axis_defs``, the per-row/column states' new values, are computed and written by the reduce step after the
    pass that finishes what they read (a matrix slot's too).
    """
    axis_defs = axis_defs or {}
    target_stage: dict[str, int] = {}
    slot_stage: dict[int, int] = {}
    axis_step: dict[str, int] = {}

    def stage_of(expr: sympy.Expr) -> int:
        """The first pass that can read ``expr``."""
        stage = 0
        for sym in expr.free_symbols:
            if isinstance(sym, SlotSymbol):
                stage = max(stage, stage_slot(_slot_index(sym)) + 1)
            elif isinstance(sym, NewStateSymbol):
                stage = max(stage, stage_target(_target_of(sym)))
            elif isinstance(sym, (NewRowStateSymbol, NewColStateSymbol)):
                stage = max(stage, step_of(_target_of(sym)) + 1)
        return stage

    def stage_slot(k: int) -> int:
        if k not in slot_stage:
            _, scope, arg, _ = slots_raw[k]
            if scope == "matrix":  # at the reduce step after the pass that finishes its argument's values
                slot_stage[k] = max(0, stage_of(arg) - 1)
            else:
                slot_stage[k] = max(earliest.get(k, 0), stage_of(arg))
        return slot_stage[k]

    def stage_target(target: str) -> int:
        if target not in target_stage:
            target_stage[target] = stage_of(defs[target])
        return target_stage[target]

    def step_of(target: str) -> int:
        if target not in axis_step:
            axis_step[target] = max(0, stage_of(axis_defs[target]) - 1)
        return axis_step[target]

    for target in defs:
        stage_target(target)
    for target in axis_defs:
        step_of(target)
    for k in range(len(slots_raw)):
        stage_slot(k)
    slots = tuple(
        Slot(index=k, op=op, scope=scope, arg=arg, stage=slot_stage[k], dim=dim)
        for k, (op, scope, arg, dim) in enumerate(slots_raw)
    )
    n_passes = 1 + max(
        [*target_stage.values(), *slot_stage.values(), *axis_step.values(), *(stage_of(e) for e in layer_defs)]
    )

    # A write waits while a later pass still reads the old value.
    write = dict(target_stage)
    while True:
        conflict = None
        for j in range(n_passes):
            _, _, _, leaves = _program(j, defs, slots, write, {})
            for leaf in sorted(leaves, key=str):
                if isinstance(leaf, (StateSymbol, ParamSymbol)):
                    target = PARAM if isinstance(leaf, ParamSymbol) else leaf.name
                    if write[target] < j:
                        conflict = (target, j)
                        break
            if conflict:
                break
        if not conflict:
            break
        write[conflict[0]] = conflict[1]
    return slots, write, n_passes, axis_step


def as_number(bytes_: Fraction) -> int | float:
    """A byte count as printed: an integer when it is one."""
    return int(bytes_) if bytes_.denominator == 1 else float(bytes_)


def buffer_bytes(ir: IR, wide=()):
    """Bytes per element of each buffer: 4 (fp32), an 8-bit state's code and its share of its block's scale
    (with 8-bit states, scratch buffers are 8-bit too, but those named in ``wide``: divisors, see ``_divides``)."""
    quantized = {name for name, _ in ir.quantized}
    eight_bit = Fraction(quantization.STATE_BYTES)

    def weigh(buffer: str) -> Fraction:
        eight = buffer in quantized or (quantized and buffer.startswith("scratch_") and buffer not in wide)
        return eight_bit if eight else Fraction(FP32_BYTES)

    return weigh


def _divides(symbol, exprs) -> bool:
    """Whether ``symbol`` appears in a denominator of ``exprs`` (a negative power of a term holding it). An 8-bit
    value rounds to 0 below ~1e-7 of its block's largest: a divisor stored so would make the step infinite
    (Adafactor's max(eps^2, v) did), so such a scratch value is kept in fp32."""
    return any(
        isinstance(node, sympy.Pow) and node.exp.is_negative and symbol in node.base.free_symbols
        for expr in exprs for node in sympy.preorder_traversal(expr)
    )  # fmt: skip


def _traffic(weigh, leaves, store_buffers) -> Fraction:
    return sum((weigh(_buffer_of(s)) for s in leaves), Fraction(0)) + sum((weigh(b) for b in store_buffers), Fraction(0))


# A later pass must not re-read an 8-bit state's new value: its codes have lost what the pass that computed it
# used (an element whose second moment rounds to 0 beside a first moment that does not would step by m/eps,
# against the trust ratio LAMB took from the fp32 values). The planner prices such a load out of reach, so what
# the later pass needs of it is stored instead: a scratch value, itself 8-bit in such a plan (LAMB8bit's update u,
# rounded once, ~1% of its block's largest; the trust ratio is the norm of u before that rounding).
_UNREADABLE = Fraction(10**6)


def _planning_cost(weigh, quantized, leaves, store_buffers) -> Fraction:
    rereads = sum(1 for s in leaves if isinstance(s, NewStateSymbol) and _buffer_of(s) in quantized)
    return _traffic(weigh, leaves, store_buffers) + _UNREADABLE * rereads


def _cost(defs, slots, write, n_passes, scratch, weigh, quantized) -> tuple[Fraction, int]:
    """(element-wise bytes per fp32 parameter, launches) of a layout."""
    total, launches = Fraction(0), n_passes
    for j in range(n_passes):
        roots, produces, _, leaves = _program(j, defs, slots, write, scratch)
        stores = [_store_buffer(t) for t, _ in roots] + [sym.name for sym, i in scratch.values() if i == j]
        total += _planning_cost(weigh, quantized, leaves, stores)
        launches += any(slots[k].scope == "layer" for k, _ in produces) + any(slots[k].scope in ("row", "col") for k, _ in produces)
    return total, launches


def plan(ir: IR) -> Plan:
    """Derive the pass plan of ``ir`` (see the module docstring)."""
    layer_targets = set(ir.layer_state_names)
    axis_targets = set(ir.factored_state_names)
    defs, slots_raw = _extract_slots(_inline_layer_values(dict(ir.updates), layer_targets))
    layer_defs = {t: e for t, e in defs.items() if t in layer_targets}
    axis_defs = {t: e for t, e in defs.items() if t in axis_targets}
    defs = {t: e for t, e in defs.items() if t not in layer_targets and t not in axis_targets}
    layer_exprs = tuple(layer_defs.values())

    # A reduction may run in any pass from its natural stage up to the one before its first reader. Put
    # each where it moves the fewest bytes and launches (ties: earliest), never adding a pass: computing
    # ||w|| alongside the moments, not in a pre-pass of its own, saves reading w twice.
    earliest: dict[int, int] = {}
    slots, write, n_passes, axis_step = _layout(defs, slots_raw, earliest, layer_exprs, axis_defs)
    wide: set = set()  # scratch buffers kept in fp32 in a plan with 8-bit states (divisors)
    weigh, quantized = buffer_bytes(ir, wide), {name for name, _ in ir.quantized}
    best_cost = _cost(defs, slots, write, n_passes, {}, weigh, quantized)
    for k in range(len(slots_raw)):
        if slots[k].reduce_time:
            continue
        for p in range(slots[k].stage + 1, n_passes):
            trial = {**earliest, k: p}
            t_slots, t_write, t_passes, t_steps = _layout(defs, slots_raw, trial, layer_exprs, axis_defs)
            if t_passes != n_passes:
                break
            cost = _cost(defs, t_slots, t_write, t_passes, {}, weigh, quantized)
            if cost < best_cost:
                earliest, best_cost = trial, cost
                slots, write, axis_step = t_slots, t_write, t_steps

    # -- recompute or store values crossing a pass boundary ------------------------------------------
    scratch: dict[sympy.Expr, tuple[ScratchSymbol, int]] = {}
    notes = []
    for j in range(1, n_passes):
        for i in range(j):
            while True:
                best = _best_scratch(i, j, n_passes, defs, slots, write, scratch, weigh, quantized, wide)
                if best is None:
                    break
                expr, saving, divisor = best
                symbol = ScratchSymbol(f"scratch_{len(scratch)}")
                scratch[expr] = (symbol, i)
                if divisor:
                    wide.add(symbol.name)
                if saving >= _UNREADABLE / 2:  # (less the bytes the scratch itself moves)
                    what = f"pass {j} would otherwise re-read 8-bit states' new values"
                else:
                    what = f"saves {saving} B/param"
                if divisor:
                    what += "; fp32: a divisor"
                notes.append(f"{symbol} = {expr} is stored by pass {i} for pass {j} ({what})")

    reduce_items = _reduce_items(ir, slots, axis_defs, axis_step)
    passes = []
    for j in range(n_passes):
        roots, produces, local, leaves = _program(j, defs, slots, write, scratch)
        stores = [(_store_buffer(t), _inline_locals(e, local)) for t, e in roots]
        stores += [(sym.name, _inline_locals(expr, local)) for expr, (sym, i) in scratch.items() if i == j]
        produces = [(k, _inline_locals(e, local)) for k, e in produces]
        stores, produces = _read_axis_states(ir, j, stores, produces, axis_step)
        layer_stores = list(layer_defs.items()) if j == n_passes - 1 else []
        passes.append(
            _build_pass(j, n_passes, stores, produces, leaves, slots, ir.step_advance, layer_stores, weigh, *reduce_items.get(j, ((), 0)))
        )
    scratch_names = tuple(s.name for s, _ in scratch.values())
    # with 8-bit states, the values stored for a later pass are 8-bit too (signed map), but divisors
    quantized = ir.quantized + tuple((name, "signed") for name in scratch_names if name not in wide) if ir.quantized else ()
    return Plan(ir=ir, slots=slots, passes=tuple(passes), scratch=scratch_names, notes=tuple(notes), quantized=quantized)


def _reduce_items(ir: IR, slots, axis_defs: dict, axis_step: dict) -> dict[int, tuple]:
    """What each reduce step computes once its pass's partials are folded: per-row/column states' new values
    and per-matrix reductions, in an order where every item comes after the new values it reads and before the
    write of any state whose old value it reads, the early ones first: {step: (items, how many are early)}."""
    steps: dict[int, list] = {}
    for target, expr in axis_defs.items():
        steps.setdefault(axis_step[target], []).append(("state", target, expr))
    for slot in slots:
        if slot.reduce_time:
            steps.setdefault(slot.stage, []).append(("slot", slot.index, slot.arg))
    out, early_counts = {}, {}
    for step, items in steps.items():
        names = {(kind, key) for kind, key, _ in items}
        after: dict[tuple, set] = {(kind, key): set() for kind, key, _ in items}  # item -> items it must follow
        for kind, key, expr in items:
            for sym in expr.free_symbols:
                if isinstance(sym, (NewRowStateSymbol, NewColStateSymbol)) and ("state", _target_of(sym)) in names:
                    after[(kind, key)].add(("state", _target_of(sym)))
                elif isinstance(sym, SlotSymbol) and ("slot", _slot_index(sym)) in names:
                    after[(kind, key)].add(("slot", _slot_index(sym)))
                elif isinstance(sym, (RowStateSymbol, ColStateSymbol)) and ("state", sym.name) in names and key != sym.name:
                    after[("state", sym.name)].add((kind, key))  # the old value is read before the state is written
        # Late: what reads a value that is partial on a shard until the pass boundary's all-reduce (this pass's
        # column sums, per-layer or global values, this step's sums over rows), or must follow a late item. The
        # others (row states, their sums over rows) come first: under FSDP2 they run before that all-reduce and
        # their sums ride it.
        over_rows = set(sums_over_rows(slots, items))  # partial until it too
        partial = {k for k, slot in enumerate(slots) if slot.stage == step and slot.scope in ("col", "layer", "global")} | over_rows
        late = {
            (kind, key)
            for kind, key, expr in items
            if any(isinstance(s, SlotSymbol) and _slot_index(s) in partial for s in expr.free_symbols)
        }
        while True:
            more = {item for item, before in after.items() if before & late} - late
            if not more:
                break
            late |= more
        ordered, placed = [], set()
        pending = list(items)
        while pending:
            ready = [item for item in pending if after[(item[0], item[1])] <= placed]
            early = [item for item in ready if (item[0], item[1]) not in late]
            ready = early or ready
            if not ready:
                states = [key for kind, key, _ in pending if kind == "state"]
                raise SpecError(
                    f"{ir.name}: the per-row/column values of the reduce step after pass {step} read each other's old "
                    f"values ({', '.join(str(key) for _, key, _ in pending)}): each is written in place there, so a "
                    f"state whose update reads another's old value must not be read by that one's update; keep a "
                    f"copy in another state [{_where(ir, states)}]"
                )
            for item in ready:
                ordered.append(item)
                placed.add((item[0], item[1]))
                pending.remove(item)
        early_counts[step] = sum((kind, key) not in late for kind, key, _ in ordered)
        # after a state is written, items read its new value from the state itself
        written = {}
        final = []
        for kind, key, expr in ordered:
            expr = expr.xreplace(written)
            final.append((kind, key, expr))
            if kind == "state":
                written[ir.new_symbol(key)] = ir.old_symbol(key)
        out[step] = tuple(final)
    # a later step reads the state (holding its new value)
    for step, items in out.items():
        fixed = []
        for kind, key, expr in items:
            subs = _axis_reads(ir, expr, step, axis_step, f"the reduce step after pass {step}", [key])
            fixed.append((kind, key, expr.xreplace(subs) if subs else expr))
        out[step] = (tuple(fixed), early_counts[step])
    return out


def sums_over_rows(slots, items) -> list[int]:
    """The slots of the reduce-step ``items`` that sum a per-row value over the rows of a matrix (a column mean
    of a row state): partial on each rank when FSDP2 splits the rows."""
    return [key for kind, key, _ in items if kind == "slot" and slots[key].dim == -2]


def _axis_reads(ir: IR, expr, step: int, axis_step: dict, reader: str, targets) -> dict:
    """Substitutions that make ``expr`` read each per-row/column state from the state itself: its new value once
    the reduce step that writes it has run (before ``step``), its old value before; an old value read after is
    refused (the state holds the new one)."""
    subs = {}
    for sym in expr.free_symbols:
        if isinstance(sym, (NewRowStateSymbol, NewColStateSymbol)):
            subs[sym] = ir.old_symbol(_target_of(sym))
        elif isinstance(sym, (RowStateSymbol, ColStateSymbol)) and axis_step[sym.name] < step:
            raise SpecError(
                f"{ir.name}: {reader} reads the old value of {sym.name}, which the reduce step after pass "
                f"{axis_step[sym.name]} has replaced; read its new value, or keep the old one in a state "
                f"[{_where(ir, targets)}]"
            )
    return subs


def _where(ir: IR, targets) -> str:
    """Where the user wrote the updates of ``targets`` (file:line), for planner errors."""
    locations = dict(ir.update_locations)
    return ", ".join(dict.fromkeys(locations[t] for t in targets if t in locations)) or ir.name


def _read_axis_states(ir: IR, j: int, stores, produces, axis_step: dict):
    """Pass ``j`` reads each per-row/column state from the state itself (see ``_axis_reads``)."""
    subs = {}
    for target, expr in stores + produces:
        subs.update(_axis_reads(ir, expr, j, axis_step, f"pass {j}", [target if isinstance(target, str) else PARAM]))
    if not subs:
        return stores, produces
    return [(b, e.xreplace(subs)) for b, e in stores], [(k, e.xreplace(subs)) for k, e in produces]


def _store_buffer(target: str) -> str:
    return "param" if target == PARAM else target


def _program(j, defs, slots, write, scratch):
    """What pass ``j`` computes, over symbols.

    Returns (stores [(target, expr)], partials [(slot, expr)], locals {target: expr}, element-wise leaves).
    New values written in earlier passes are leaves (loaded); the others the pass needs are *locals*
    (computed here, kept as symbols so values can be matched across passes). Values in ``scratch`` that
    an earlier pass stored are replaced by their scratch symbol.
    """
    replace = {e: s for e, (s, i) in scratch.items() if i < j}

    def sub(expr):
        return expr.xreplace(replace) if replace else expr

    stores = [(t, sub(e)) for t, e in defs.items() if write[t] == j]
    produces = [(s.index, sub(s.arg)) for s in slots if s.stage == j and not s.reduce_time]
    local: dict[str, sympy.Expr] = {}
    pending = [e for _, e in stores + produces]
    while pending:
        expr = pending.pop()
        for sym in expr.free_symbols:
            if isinstance(sym, NewStateSymbol):
                target = _target_of(sym)
                if write[target] >= j and target not in local:
                    local[target] = sub(defs[target])
                    pending.append(local[target])
    leaves = set()
    for expr in [e for _, e in stores + produces] + list(local.values()):
        leaves |= {
            s
            for s in expr.free_symbols
            if isinstance(s, ELEMENTWISE) and not (isinstance(s, NewStateSymbol) and _target_of(s) in local)
        }
    return stores, produces, local, leaves


def _inline_locals(expr, local):
    subs = {}
    for sym in expr.free_symbols:
        if isinstance(sym, NewStateSymbol) and _target_of(sym) in local:
            subs[sym] = _inline_locals(local[_target_of(sym)], local)
    return expr.xreplace(subs) if subs else expr


def _subexpressions(expr):
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Expr) and not node.is_Atom and any(isinstance(s, ELEMENTWISE) for s in node.free_symbols):
            yield node


def _best_scratch(i, j, n_passes, defs, slots, write, scratch, weigh, quantized, wide):
    """The value computed in pass i whose storing saves the most bytes in pass j, if any saves any: (value,
    saving, whether a pass after i divides by it: every later pass reads the stored value in its place).
    ``weigh`` prices the scratch buffers named in ``wide`` as fp32."""
    roots_i, produces_i, local_i, _ = _program(i, defs, slots, write, scratch)
    roots_j, produces_j, local_j, leaves_j = _program(j, defs, slots, write, scratch)
    computed_i = set()
    for expr in [e for _, e in roots_i + produces_i] + list(local_i.values()):
        computed_i |= set(_subexpressions(expr))
    candidates = set()
    for expr in [e for _, e in roots_j + produces_j] + list(local_j.values()):
        candidates |= {e for e in _subexpressions(expr) if e in computed_i}
    best = None
    base = _planning_cost(weigh, quantized, leaves_j, ())
    for expr in sorted(candidates, key=lambda e: (-sympy.count_ops(e), default_sort_key(e))):
        trial = dict(scratch)
        symbol = ScratchSymbol(f"scratch_{len(scratch)}")
        trial[expr] = (symbol, i)
        _, _, _, leaves = _program(j, defs, slots, write, trial)
        divisor = bool(quantized) and any(
            _divides(symbol, [e for _, e in roots + produces] + list(local.values()))
            for roots, produces, local, _ in (_program(k, defs, slots, write, trial) for k in range(i + 1, n_passes))
        )  # fmt: skip
        if divisor:
            wide.add(symbol.name)
        # storing costs one write in pass i and one read in pass j (the read is one of ``leaves``)
        saving = as_number(base - _planning_cost(weigh, quantized, leaves, ()) - weigh(symbol.name))
        wide.discard(symbol.name)
        if saving > 0 and (best is None or saving > best[1]):
            best = (expr, saving, divisor)
    return best


def _is_elementwise(expr, elementwise_names) -> bool:
    """Whether ``expr`` varies within a program (element-wise, per row or per column): not a per-program scalar."""
    return any(isinstance(s, VARYING) or s.name in elementwise_names for s in expr.free_symbols)


class _Lifter:
    """Loop-invariant code motion and power bases, after ``sympy.cse``.

    Maximal scalar subexpressions of element-wise code (``1 - beta1**t``), and the per-program factors of a
    product (terms of a sum) together, become scalar temporaries computed once per program; the base of a
    small integer power becomes a temporary, so printing ``(u)**2`` as a product ``u*u`` never evaluates ``u``
    twice.
    """

    def __init__(self, start: int, elementwise_names: set[str]):
        self.names = sympy.numbered_symbols("tmp", real=True, start=start)
        self.elementwise_names = elementwise_names
        self.scalars: list[tuple[str, sympy.Expr]] = []
        self.elementwise: list[tuple[str, sympy.Expr]] = []
        self._seen: dict[sympy.Expr, sympy.Symbol] = {}

    def _temp(self, expr, into) -> sympy.Symbol:
        if expr not in self._seen:
            symbol = next(self.names)
            self._seen[expr] = symbol
            into.append((symbol.name, expr))
            if into is self.elementwise:
                self.elementwise_names.add(symbol.name)
        return self._seen[expr]

    def lift(self, expr):
        if expr.is_Atom or isinstance(expr, sympy.logic.boolalg.BooleanAtom):
            return expr
        if not _is_elementwise(expr, self.elementwise_names):
            if isinstance(expr, sympy.Expr) and not expr.is_number:
                return self._temp(expr, self.scalars)
            return expr
        args = [self.lift(a) for a in expr.args]
        if isinstance(expr, (sympy.Mul, sympy.Add)):
            # the per-program factors of a product (terms of a sum) as one scalar temporary: g*lr*c/d is
            # g*(lr*c/d), one multiplication per element where the printed left-to-right product made three
            invariant = [a for a in args if not _is_elementwise(a, self.elementwise_names)]
            if len(invariant) >= 2 and not all(a.is_number for a in invariant):
                varying = [a for a in args if _is_elementwise(a, self.elementwise_names)]
                args = [self._temp(expr.func(*invariant), self.scalars), *varying]
        if isinstance(expr, sympy.Pow) and expr.exp.is_number and float(expr.exp).is_integer() and 2 <= abs(float(expr.exp)) <= 8 and not args[0].is_Atom:
            args[0] = self._temp(args[0], self.elementwise)
        return expr.func(*args, evaluate=False) if isinstance(expr, (sympy.Add, sympy.Mul, sympy.Pow)) else expr.func(*args)


def _build_pass(j, n_passes, stores, produces, leaves, slots, step_advance, layer_stores, weigh, reduce_items, early_items) -> Pass:
    roots = [e for _, e in stores] + [e for _, e in produces] + [e for _, e in layer_stores]
    replacements, reduced = sympy.cse(roots, symbols=sympy.numbered_symbols("tmp", real=True), optimizations=None)
    elementwise_names: set[str] = set()
    lifter = _Lifter(len(replacements), elementwise_names)
    scalars, elementwise = lifter.scalars, lifter.elementwise
    for sym, expr in replacements:
        if _is_elementwise(expr, elementwise_names):
            expr = lifter.lift(expr)
            elementwise_names.add(sym.name)
            elementwise.append((sym.name, expr))
        else:
            scalars.append((sym.name, expr))
    reduced = [lifter.lift(e) for e in reduced]
    reduced_stores = tuple((buf, reduced[k]) for k, (buf, _) in enumerate(stores))
    reduced_produces = tuple((slot, reduced[len(stores) + k]) for k, (slot, _) in enumerate(produces))
    reduced_layer = tuple((name, reduced[len(stores) + len(produces) + k]) for k, (name, _) in enumerate(layer_stores))

    all_exprs = [e for _, e in scalars + elementwise] + list(reduced)
    free = set().union(*(e.free_symbols for e in all_exprs)) if all_exprs else set()
    writes_step = j == n_passes - 1
    advance = step_advance if writes_step else sympy.S.Zero
    free |= advance.free_symbols
    consumes = tuple(sorted(_slot_index(s) for s in free if isinstance(s, SlotSymbol)))
    device_scalars = tuple(sorted(s.name for s in free if isinstance(s, DeviceScalarSymbol)))
    hypers = tuple(sorted(s.name for s in free if isinstance(s, HyperSymbol)))
    loads = tuple(
        Load(symbol=s.name, buffer=_buffer_of(s))
        for s in sorted(leaves, key=lambda s: (_load_rank(s), s.name))
    )
    return Pass(
        index=j,
        loads=loads,
        scalars=tuple(scalars),
        elementwise=tuple(elementwise),
        stores=reduced_stores,
        produces=reduced_produces,
        consumes=consumes,
        hypers=hypers,
        uses_step=any(isinstance(s, StepSymbol) for s in free) or writes_step,
        device_scalars=device_scalars,
        step_advance=advance,
        reduce_after=any(slots[k].scope == "layer" for k, _ in produces),
        fold_after=any(slots[k].scope == "global" for k, _ in produces),
        writes_step=writes_step,
        layer_state_reads=tuple(sorted(s.name for s in free if isinstance(s, LayerStateSymbol))),
        shape_reads=tuple(sorted(s.name for s in free if isinstance(s, ShapeSymbol))),
        layer_stores=reduced_layer,
        axis_loads=tuple(sorted((s.name, "row" if isinstance(s, RowStateSymbol) else "column") for s in free if isinstance(s, _ROW + _COL))),
        reduce_items=tuple(reduce_items),
        early_items=early_items,
        axes_after=bool(reduce_items) or any(slots[k].scope in ("row", "col") for k, _ in produces),
        traffic=sum((weigh(ld.buffer) for ld in loads), Fraction(0)) + sum((weigh(b) for b, _ in reduced_stores), Fraction(0)),
    )


def _load_rank(symbol) -> int:
    for rank, kind in enumerate((ParamSymbol, GradSymbol, StateSymbol, NewStateSymbol, ScratchSymbol)):
        if isinstance(symbol, kind):
            return rank
    return len(ELEMENTWISE)
