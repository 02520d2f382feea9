"""Rendering: plan -> template context -> source, and loading generated modules.

The context holds names, positions and printer output only; the templates (``templates/*.j2``, jinja2 with
``StrictUndefined``) hold the structure. A target is one entry of ``TARGETS``: its printer, its template and
the few spellings its templates need; adding one touches no other code here. Built-in optimizers load the golden files under
``generated/`` when their source hash matches; anything else is generated into the user's cache directory
(``$OPTGEN_CACHE_DIR`` or ``~/.cache/optgen``) under a name derived from the hash, and imported from there.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import sympy

from .. import quantization, settings
from ..analysis import VARYING, Pass, Plan, SlotSymbol
from ..spec import ColStateSymbol, HyperSymbol, ParamSymbol, RowStateSymbol, SpecError
from ..transforms import AMP_SKIP, STOCHASTIC_ROUND
from .abi import (
    axes_args,
    axes_layer_states,
    axes_states,
    axis_columns,
    eager_pass_buffers,
    global_columns,
    layer_state_args,
    pass_args,
    pass_buffers,
    quantized_buffers,
    reduce_args,
    reduce_item_names,
)
from .printers import CPrinter, TorchPrinter, TritonPrinter


@dataclass(frozen=True)
class Target:
    """A code-generation target: ``render(plan, name)`` prints the plan with ``printer`` into ``template``."""

    name: str
    printer: type
    template: str
    suffix: str  # of generated files
    identity: dict  # a reduction's starting value, by op, as the target writes it
    scalar_settings: dict = field(default_factory=dict)  # printer settings for per-step fp64 scalar code


_PYTHON_IDENTITY = {"sum": "0.0", "max": 'float("-inf")'}

TARGETS: dict[str, Target] = {
    "torch": Target("torch", TorchPrinter, "torch_module.py.j2", ".py", _PYTHON_IDENTITY),
    "triton": Target("triton", TritonPrinter, "triton_module.py.j2", ".py", _PYTHON_IDENTITY),
    # the C template names per-program fp64 values d_<name>; element-wise code reads their casts by name
    "c": Target("c", CPrinter, "c_module.c.j2", ".c", {"sum": "0.0", "max": "(-INFINITY)"}, {"prefix": "d_"}),
}


def _resource_dir(name: str) -> Path:
    """``templates``/``generated``: inside the installed package, else beside it in a source checkout."""
    try:
        from importlib.resources import files

        path = Path(str(files(f"optgen.{name}")))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / name


def templates_dir() -> Path:
    return _resource_dir("templates")


def generated_dir() -> Path:
    return _resource_dir("generated")


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


@functools.cache
def _generator_digest() -> str:
    """Digest of everything that turns an IR into source: templates, planner, printers, this module."""
    package = Path(__file__).resolve().parents[1]
    files = sorted(templates_dir().glob("*.j2")) + [
        package / "analysis.py",
        package / "codegen" / "printers.py",
        package / "codegen" / "render.py",
    ]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes().replace(b"\r\n", b"\n"))
    return digest.hexdigest()


def source_hash(plan: Plan) -> str:
    """Digest of the math and of the generator: what a generated file depends on (cache key, golden check)."""
    return hashlib.sha256((plan.ir.hash + _generator_digest()).encode()).hexdigest()[:16]


def variant_stem(plan: Plan) -> str:
    """File stem of a variant: ``lamb__bias_correction_1__eps_inside_sqrt_0``."""
    parts = [plan.ir.name.lower()] + [f"{k}_{int(v)}" for k, v in plan.ir.flags]
    return "__".join(parts)


def _flags_text(plan: Plan) -> str:
    return ", ".join(f"{k}={v}" for k, v in plan.ir.flags) or "no flags"


def _hyper_columns(plan: Plan) -> dict[str, int]:
    return {h.name: i for i, h in enumerate(plan.ir.hypers)}


def _is_elementwise(expr, elementwise_names) -> bool:
    """Whether ``expr`` varies within a program (element-wise, per row or per column)."""
    return any(isinstance(s, VARYING) or s.name in elementwise_names for s in expr.free_symbols)


def _pass_context(plan: Plan, p: Pass, printer, scalar_printer, identity: dict) -> dict:
    code = printer.doprint
    scalar_code = scalar_printer.doprint
    slots = plan.slots
    produced_columns = {k: col for col, (k, _) in enumerate(p.produces)}
    elementwise_names = {name for name, _ in p.elementwise}
    hyper_columns = _hyper_columns(plan)
    column_of = _produced_at(plan)
    layer_reads, global_reads = [], []
    for k in p.consumes:
        if slots[k].scope not in ("layer", "global"):
            continue  # per-row/column/matrix values: the torch passes take them by name (the kernels: not yet)
        producer, col, width = column_of[k]
        read = {
            "name": slots[k].name,
            "producer": producer,
            "column": col,
            "width": width,
            "op": slots[k].op,
            "identity": identity[slots[k].op],
        }
        (layer_reads if slots[k].scope == "layer" else global_reads).append(read)
    buffers = pass_buffers(plan, p)  # none for a pass that only counts: the kernels need only the chunk tables
    columns = {scope: axis_columns(plan, scope) for scope in ("row", "col", "matrix")}
    axis_reads = {"row": [], "col": [], "matrix": []}
    for k in p.consumes:
        if slots[k].scope in axis_reads:
            axis_reads[slots[k].scope].append({"name": slots[k].name, "column": columns[slots[k].scope][k]})
    state_reads = {"row": [], "column": []}
    for name, per in p.axis_loads:
        state_reads[per].append(name)
    kinds = dict(plan.quantized)
    stored = {b for b, _ in p.stores}
    # bf16 stochastic rounding of the parameter's store: its seed's column in the hyperparameter table
    stochastic = stochastic_round(plan) and "param" in stored
    loaded = {ld.buffer for ld in p.loads}
    group_scalars, casts = _group_scalars(p, [r["name"] for r in global_reads]), _scalar_casts(plan, p)
    quantized = [
        {"buffer": b, "kind": kinds[b], "row": quantization.KINDS.index(kinds[b]), "stored": b in stored, "loaded": b in loaded}
        for b in quantized_buffers(plan, p)
    ]
    return {
        "index": p.index,
        "loads": [{"symbol": ld.symbol, "buffer": ld.buffer, "quantized": ld.buffer in kinds} for ld in p.loads],
        # 8-bit states of the pass (their map row, whether the pass stores them), and those it stores
        "quantized": quantized,
        "quantized_stores": [q for q in quantized if q["stored"]],
        "stochastic": stochastic,
        "sr_seed_column": hyper_columns.get("sr_seed"),
        # GradScaler's skip: a skipped step stores every old value again, but an 8-bit buffer keeps its codes and
        # scales as they are (requantizing its own dequantized values is not the identity: the signed map has no -1)
        "skip_scalar": AMP_SKIP if AMP_SKIP in p.device_scalars else None,
        "scalars": [(name, scalar_code(e)) for name, e in p.scalars],
        "group_scalars": group_scalars,
        "casts": casts,
        # the casts of values the C kernels compute once per group and step (hyperparameters, group scalars)
        "group_casts": [n for n in casts if n in {*p.hypers, *group_scalars}],
        # boolean per-step values (a cse'd ``found_inf == 0``): all of them, and those element-wise code reads
        "bool_scalars": [n for n, e in p.scalars if isinstance(e, sympy.logic.boolalg.Boolean)],
        "bool_casts": [n for n in _element_reads(p) if n in {m for m, e in p.scalars if isinstance(e, sympy.logic.boolalg.Boolean)}],
        "elementwise": [(name, code(e)) for name, e in p.elementwise],
        "stores": [
            {
                "buffer": b,
                "code": code(e),
                "dtype_arg": f"DT_{b}",
                "quantized": b in kinds,
                "scalar": not _is_elementwise(e, elementwise_names),
                # the value is a loaded buffer itself (b := old a): in torch ``.to(dtype)`` may return that
                # buffer, which a store of this pass may overwrite before it is copied
                "aliases_load": isinstance(e, sympy.Symbol) and e.name in {ld.symbol for ld in p.loads},
            }
            for b, e in p.stores
        ],
        "produces": [
            {**_partial_context(slots[k], produced_columns[k], e, code, elementwise_names, identity),
             "scope": slots[k].scope, "axis_column": columns.get(slots[k].scope, {}).get(k)}
            for k, e in p.produces
        ],
        # a tensor of the parameter's shape, for a reduced value that simplified to a per-step scalar
        "shape_donor": p.loads[0].symbol if p.loads else (f"_{p.stores[0][0]}" if p.stores else "_param"),
        "n_partials": len(p.produces),
        "hypers": [{"name": h, "column": hyper_columns[h]} for h in p.hypers],
        "layer_reads": layer_reads,
        "global_reads": global_reads,
        # columns of this pass's partials that are global values: its reduce launch folds them once per step
        "global_columns": global_columns(plan, p),
        "buffers": [{"name": b, "dtype_arg": f"DT_{b}"} for b in buffers],
        "reduce_after": p.reduce_after,
        "writes_step": p.writes_step,
        # per-layer states: old values read once per program, new values written by the last pass
        "layer_state_reads": list(p.layer_state_reads),
        "layer_stores": [{"name": name, "code": scalar_code(e)} for name, e in p.layer_stores],
        # per-row/column states element code reads (broadcast), and what the reduce step after the pass computes
        "axis_loads": [name for name, _ in p.axis_loads],
        "factored": plan.ir.factored,
        "row_reads": axis_reads["row"],  # finished per-row values, read once per row
        "col_reads": axis_reads["col"],  # finished per-column values, read per element
        "mat_reads": axis_reads["matrix"],  # per-matrix values: one per chunk
        "row_state_reads": state_reads["row"],
        "col_state_reads": state_reads["column"],
        "axis_slot_names": [r["name"] for r in axis_reads["row"] + axis_reads["col"]],
        "axes_args": [vars(a) for a in axes_args(plan, p)] if p.axes_after else [],
        "axes_states": axes_states(plan, p) if p.axes_after else [],
        "row_folds": [columns["row"][k] for k, _ in p.produces if slots[k].scope == "row"],
        "col_folds": [columns["col"][k] for k, _ in p.produces if slots[k].scope == "col"],
        "axes_layer_reads": _axes_layer_reads(plan, p),
        "axes_layer_states": axes_layer_states(plan, p),
        "widths": {scope: max(1, len(columns[scope])) for scope in columns},
        "reduce_items": [_reduce_item_context(plan, kind, key, e, scalar_code) for kind, key, e in p.reduce_items],
        "early_items": p.early_items,
        # per-matrix sums of early items that late ones read (the torch reduce step passes them across its calls)
        "early_sums_read_late": sorted(
            {plan.slots[key].name for kind, key, _ in p.early_reduce_items if kind == "slot"}
            & {s.name for _, _, e in p.late_reduce_items for s in e.free_symbols}
        ),
        "reduce_step_args": reduce_step_args(plan, p),
        "device_scalars": list(p.device_scalars),
        "step_advance": scalar_code(p.step_advance),
        # buffers are passed as ``_<name>``: the loaded value of an old state is named like the state
        # the kernel ABI (codegen/abi.py): what every template's signature and every launcher follow
        "kernel_args": [vars(a) for a in pass_args(plan, p)],
        "reduce_args": [vars(a) for a in reduce_args(plan, p)] if p.produces else [],
        "args": [
            *(f"_{b}" for b in eager_pass_buffers(plan, p)), "dtype", "t", *p.hypers, *p.device_scalars,
            *(slots[k].name for k in p.consumes), *(f"_layer_{name}" for name in layer_state_args(plan, p)),
            *(f"_{name}" for name, _ in p.axis_loads), *p.shape_reads,
            *(("_sr_tensor", "sr_seed") if stochastic else ()),
        ],
        "shape_reads": list(p.shape_reads),
    }


def reduce_step_args(plan: Plan, p: Pass) -> list[str]:
    """Arguments of the generated torch function of the reduce step after pass ``p`` (``reduce_<index>``): the
    per-row/column states it reads or writes (as ``_<name>``), then the values its items read."""
    states, values = [], set()
    computed = {plan.slots[key].name for kind, key, _ in p.reduce_items if kind == "slot"}
    for kind, key, expr in p.reduce_items:
        if kind == "state":
            states.append(key)
        for sym in expr.free_symbols:
            if isinstance(sym, (RowStateSymbol, ColStateSymbol)):
                states.append(sym.name)
            elif not (isinstance(sym, SlotSymbol) and sym.name in computed):
                values.add(sym.name)
    order = [s.name for s in plan.ir.states]
    return [f"_{name}" for name in sorted(set(states), key=order.index)] + sorted(values)


def _reduce_item_context(plan: Plan, kind: str, key, expr, scalar_code) -> dict:
    """One computation of a reduce step: a per-row/column state's new value (written in place), or a per-matrix
    reduction of a per-row (per-column) value over the rows (columns). ``axis``: what it runs over (``"row"``:
    the tensor's B*R rows, ``"col"``: its B*C columns), and what it reads there."""
    reads = sorted({s.name for s in expr.free_symbols if isinstance(s, (RowStateSymbol, ColStateSymbol))})
    names = {s.name for s in expr.free_symbols}
    columns = {scope: axis_columns(plan, scope) for scope in ("row", "col", "matrix")}
    slot_reads = {scope: [{"name": plan.slots[k].name, "column": c} for k, c in columns[scope].items() if plan.slots[k].name in names]
                  for scope in columns}  # fmt: skip
    hyper_columns = _hyper_columns(plan)
    context = {
        "reads": reads,
        "code": scalar_code(expr),
        "row_slots": slot_reads["row"],
        "col_slots": slot_reads["col"],
        "mat_slots": slot_reads["matrix"],
        "hypers": [{"name": h, "column": hyper_columns[h]} for h in sorted(names & set(hyper_columns))],
        "device_scalars": [d for d in plan.ir.device_scalars if d in names],
    }
    if kind == "state":
        per = plan.ir.per(key)
        return {**context, "kind": kind, "name": key, "dim": None, "axis": "row" if per == "row" else "col", "column": None}
    slot = plan.slots[key]
    axis = "row" if slot.dim == -2 else "col"  # a column sum of a per-row value runs over rows
    return {**context, "kind": kind, "name": slot.name, "dim": slot.dim, "axis": axis, "column": columns["matrix"][key]}


def _produced_at(plan: Plan) -> dict[int, tuple[int, int, int]]:
    """Per slot a pass produces: (that pass, the slot's column in its table, the table's width)."""
    return {k: (q.index, col, len(q.produces)) for q in plan.passes for col, (k, _) in enumerate(q.produces)}


def _axes_layer_reads(plan: Plan, p: Pass) -> list[dict]:
    """Per-layer values the reduce step after ``p`` reads: (name, producer table, column, width)."""
    names = reduce_item_names(p)
    out = []
    for k, (producer, col, width) in sorted(_produced_at(plan).items(), key=lambda item: item[1]):
        if plan.slots[k].scope == "layer" and plan.slots[k].name in names:
            out.append({"name": plan.slots[k].name, "producer": producer, "column": col, "width": width})
    return out


def _partial_context(slot, column: int, expr, code, elementwise_names, identity: dict) -> dict:
    """A reduction's per-element contribution. Partials accumulate in fp64; a square is formed in fp64 from
    its fp32 base, so ||g||^2 of gradients near 1e30 (or 1e-30) neither overflows nor underflows. ``scalar``:
    the contribution simplified to a per-step value (``Min(0, sign(|x|))`` is 0) and is broadcast to every
    element, so a layer sum of c is c times the element count, as the spec says."""
    square = isinstance(expr, sympy.Pow) and expr.exp == 2
    return {
        "name": slot.name,
        "column": column,
        "dim": slot.dim,  # over the last (-1: rows) or second-to-last (-2: columns) dimension, else all
        "op": slot.op,
        "identity": identity[slot.op],
        "square": square,
        "code": code(expr.base if square else expr),
        "scalar": not _is_elementwise(expr, elementwise_names),
    }


def _element_reads(p: Pass) -> set[str]:
    """Names that element-wise code (values, stores, reduction contributions) reads."""
    elementwise_exprs = [e for _, e in p.elementwise] + [e for _, e in p.stores] + [e for _, e in p.produces]
    return {s.name for e in elementwise_exprs for s in e.free_symbols}


def _group_scalars(p: Pass, global_names: list[str]) -> list[str]:
    """The per-step scalars of ``p`` that depend only on the step count, the group's hyperparameters and values
    fixed for the whole call (global reductions, device scalars), in order: the C kernels compute them once per
    run of chunks of one group and step (the bias corrections' ``pow`` per chunk was most of a small tensor's
    time), not per chunk."""
    known = {"t", *p.hypers, *p.device_scalars, *global_names}
    found = []
    for name, e in p.scalars:
        # booleans stay per chunk (one compare): an int carried from chunk to chunk left the element loops' selects
        # unconverted, and gcc did not vectorise them (Adam amsgrad under GradScaler ran ~3x slower; the review)
        if isinstance(e, sympy.logic.boolalg.Boolean):
            continue
        if {s.name for s in e.free_symbols} <= known:
            known.add(name)
            found.append(name)
    return found


def _scalar_casts(plan: Plan, p: Pass) -> list[str]:
    """Scalars (fp64, like torch's Python-float math) that element-wise fp32 code reads: cast once."""
    used = _element_reads(p)
    # boolean scalars (a cse'd ``found_inf == 0``) stay booleans: only numbers are cast
    numeric = [n for n, e in p.scalars if not isinstance(e, sympy.logic.boolalg.Boolean)]
    scalar_names = ["t", *p.hypers, *p.device_scalars, *(plan.slots[k].name for k in p.consumes), *p.layer_state_reads,
                    *p.shape_reads, *numeric]  # fmt: skip
    return [n for n in scalar_names if n in used]


def _known_signs(plan: Plan) -> dict:
    """Printer settings: the step count t >= 1 and the hyperparameters whose declared range excludes
    negative numbers (or 0 too)."""
    positive, nonnegative = {"t"}, set()
    for h in plan.ir.hypers:
        if h.is_bool:
            nonnegative.add(h.name)
        elif h.lo > 0 or (h.lo == 0 and h.lo_open):
            positive.add(h.name)
        elif h.lo == 0:
            nonnegative.add(h.name)
    return {"positive": frozenset(positive), "nonnegative": frozenset(nonnegative)}


def stochastic_round(plan: Plan) -> bool:
    """Whether bf16 parameters take their new values rounded stochastically (``bf16_stochastic_round``)."""
    return dict(plan.ir.options).get(STOCHASTIC_ROUND, False)


def render(plan: Plan, target: str) -> str:
    """The source of ``plan`` for ``target`` (a key of ``TARGETS``); byte-stable for a given plan."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {tuple(TARGETS)}")
    spec = TARGETS[target]
    signs = _known_signs(plan)
    printer = spec.printer(signs)
    scalar_printer = spec.printer({**signs, "scalar": True, **spec.scalar_settings})
    context = {
        "name": plan.ir.name,
        "prefix": re.sub(r"\W", "_", variant_stem(plan)),
        "flags_text": _flags_text(plan),
        "source_hash": source_hash(plan),
        "n_passes": len(plan.passes),
        "launches": plan.launches_per_step,
        "bytes_per_param": plan.bytes_per_param,
        "buffers": [*plan.buffers, *plan.ir.factored_state_names],
        "quantized": bool(plan.quantized),
        # where the C quantizer's tables lie in the map table, and their bucket geometry (optgen.quantization)
        "qsearch": {name: getattr(quantization, f"SEARCH_{name.upper()}") for name in ("offset", "stride", "e0", "binades")},
        "stochastic": stochastic_round(plan),
        "passes": [_pass_context(plan, p, printer, scalar_printer, spec.identity) for p in plan.passes],
        "states": [_state_context(state, printer) for state in plan.ir.states],
    }
    return _environment().get_template(spec.template).render(**context)


def _state_context(state, printer) -> dict:
    """A state's initial value (constants, hyperparameters and ``w``): the torch module creates new states."""
    hypers = sorted(s.name for s in state.init.free_symbols if isinstance(s, HyperSymbol))
    uses_w = any(isinstance(s, ParamSymbol) for s in state.init.free_symbols)
    return {
        "name": state.name, "code": printer.doprint(state.init), "hypers": hypers, "per": state.per, "uses_w": uses_w,
        "keepdim": state.keepdim,
    }


def check_names(plan: Plan) -> None:
    """Every name the generated code declares for the spec (loads, values, hyperparameters, states) is one
    every target can declare: a SpecError at build, not a compiler error at the first step."""
    exprs = [e for p in plan.passes for _, e in (*p.scalars, *p.elementwise, *p.stores, *p.produces, *p.layer_stores)]
    exprs += [e for p in plan.passes for _, _, e in p.reduce_items]
    names = {s.name for e in exprs for s in e.free_symbols}
    names |= {ld.symbol for p in plan.passes for ld in p.loads} | {h.name for h in plan.ir.hypers} | set(plan.buffers)
    names |= set(plan.ir.state_names)
    names |= {slot.name for slot in plan.slots} | {name for p in plan.passes for name, _ in p.scalars}
    for name in plan.ir.layer_state_names:  # the torch passes take a per-layer state as _layer_<name>
        if f"layer_{name}" in plan.buffers or f"layer_{name}" in plan.ir.state_names:
            raise SpecError(
                f"{plan.ir.name}: a state named 'layer_{name}' beside the per-layer state {name!r}: the generated "
                f"passes would take two arguments '_layer_{name}'; rename one"
            )
    frozen = frozenset(names)
    for target in TARGETS.values():
        for name in sorted(names):
            problem = target.printer.name_problem(name, frozen)
            if problem:
                raise SpecError(f"{plan.ir.name}: {problem}")


def cache_dir() -> Path:
    return settings.path("OPTGEN_CACHE_DIR")


def golden_path(plan: Plan, target: str) -> Path:
    return generated_dir() / target / f"{variant_stem(plan)}{TARGETS[target].suffix}"


_HASH_LINE = re.compile(r"^(?:#| \*) source hash: ([0-9a-f]+)$", re.M)


def _file_hash(path: Path) -> str | None:
    try:
        head = path.read_text()[:2048]
    except OSError:
        return None
    match = _HASH_LINE.search(head)
    return match.group(1) if match else None


@functools.cache
def _import(path: str, module_name: str):
    """Import ``path`` as ``module_name`` and register it in ``sys.modules``: the name carries the content
    hash, so one name is one source; tools that look modules up by name (dynamo tracing ``opt.step()`` inside
    a user's ``torch.compile``, pickle, inspect) find it."""
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def source_path(plan: Plan, target: str) -> Path:
    """A file holding the current source of ``plan`` for ``target``: the golden file if current, else one
    generated into the cache (named by the source hash)."""
    digest = source_hash(plan)
    path = golden_path(plan, target)
    if _file_hash(path) != digest:
        path = cache_dir() / target / f"{variant_stem(plan)}_{digest}{TARGETS[target].suffix}"
        if _file_hash(path) != digest:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(render(plan, target))
            os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
    return path


def load_module(plan: Plan, target: str):
    """Import the generated Python module of ``plan`` for ``target``: the golden file if current, else the cache."""
    path = source_path(plan, target)
    return _import(str(path), f"optgen_generated_{target}_{variant_stem(plan)}_{source_hash(plan)}")
