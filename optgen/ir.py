"""The IR: one variant of a spec with its flags fixed, validated and lowered to plain sympy.

``lower(spec, flags)`` is a pure function from the user's :class:`~optgen.spec.Spec` to a frozen :class:`IR`:

* compile-time flags are substituted (they may appear only in ``where`` conditions);
* ``trust_ratio(a, b)`` is lowered to a ``Piecewise`` gated by the per-group ``layer_adaptation`` option;
* every symbol is checked to be declared, every state to be updated once, reductions to reduce
  element-wise expressions, and the updates to be free of cycles.

Errors are :class:`~optgen.spec.SpecError` naming the problem, the expression and where the user wrote it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import sympy

from .spec import (
    PARAM,
    STATE_SYMBOLS,
    BoolHyperSymbol,
    ColSum,
    FlagSymbol,
    HyperDecl,
    HyperSymbol,
    NewStateSymbol,
    ParamSymbol,
    Reduction,
    Requirement,
    RowSum,
    Spec,
    SpecError,
    StateDecl,
    TrustRatio,
    Where,
    elementwise_leaves,
    granularity,
)


@dataclass(frozen=True)
class IR:
    """One variant of a spec: flags fixed, every update an expression over declared symbols."""

    name: str
    doc: str
    hypers: tuple[HyperDecl, ...]
    flags: tuple[tuple[str, bool], ...]
    states: tuple[StateDecl, ...]
    updates: tuple[tuple[str, sympy.Expr], ...]  # (target, new value); target PARAM is the parameter
    requirements: tuple[Requirement, ...]
    update_locations: tuple[tuple[str, str], ...]
    device_scalars: tuple[str, ...] = ()
    step_advance: sympy.Expr = sympy.S.One  # how far the step count moves (0 when a step is skipped)
    options: tuple[tuple[str, bool], ...] = ()  # runtime options applied by optgen.transforms
    # element-wise states kept in 8 bits (optgen.quantization), with their map: (state, "signed" | "unsigned")
    quantized: tuple[tuple[str, str], ...] = ()

    @functools.cached_property  # the IR is frozen; srepr of the expressions costs milliseconds (per step)
    def hash(self) -> str:
        """A stable digest of the math (not of names of temporaries): keys caches and generated files."""
        parts = [self.name]
        parts += [repr(h) for h in self.hypers]
        parts += [f"flag {k}={v}" for k, v in self.flags]
        parts += [f"state {s.name} per {s.per}{'' if s.keepdim else ' squeezed'} {sympy.srepr(s.init)}" for s in self.states]
        parts += [f"update {k} {sympy.srepr(e)}" for k, e in self.updates]
        parts += [f"device {d}" for d in self.device_scalars]
        parts += [f"advance {sympy.srepr(self.step_advance)}", f"options {self.options}"]
        parts += [f"8-bit {name} {kind}" for name, kind in self.quantized]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def per(self, target: str) -> str:
        """A state's granularity (``"element"``, ``"layer"``, ``"row"``, ``"column"``); the parameter's is element."""
        return next((s.per for s in self.states if s.name == target), "element")

    def new_symbol(self, target: str) -> sympy.Symbol:
        """The symbol of ``target``'s new value (``target``: a state name or PARAM)."""
        return _new_symbol(target, self.per(target))

    def old_symbol(self, target: str) -> sympy.Symbol:
        """The symbol of ``target``'s old value."""
        return ParamSymbol("w") if target == PARAM else STATE_SYMBOLS[self.per(target)][0](target)

    def definition(self, target: str) -> sympy.Expr:
        return dict(self.updates)[target]

    @property
    def state_names(self) -> tuple[str, ...]:
        """Every state (the state dict's entries besides ``step``)."""
        return tuple(s.name for s in self.states)

    @property
    def element_state_names(self) -> tuple[str, ...]:
        """States of the parameter's shape: the element-wise buffers of the kernels."""
        return tuple(s.name for s in self.states if s.per == "element")

    @property
    def layer_state_names(self) -> tuple[str, ...]:
        """States of one number per parameter tensor."""
        return tuple(s.name for s in self.states if s.per == "layer")

    @property
    def factored_state_names(self) -> tuple[str, ...]:
        """States of one number per row or per column."""
        return tuple(s.name for s in self.states if s.per in ("row", "column"))

    @property
    def factored(self) -> bool:
        """The variant reduces over rows or columns: its parameters must have 2+ dimensions."""
        return bool(self.factored_state_names) or any(
            e.has(RowSum, ColSum) for _, e in self.updates
        )


def _new_symbol(target: str, per: str) -> sympy.Symbol:
    return NewStateSymbol("w_new") if target == PARAM else STATE_SYMBOLS[per][1](f"{target}_new")


_NEW_VALUES = tuple(new for _, new in STATE_SYMBOLS.values())
_OLD_VALUES = tuple(old for old, _ in STATE_SYMBOLS.values())
# the granularities a state's new value may have
_FITS = {
    "element": set(("scalar", "layer", "matrix", "row", "col", "element")),
    "layer": {"scalar", "layer"},
    "row": {"scalar", "layer", "matrix", "row"},
    "column": {"scalar", "layer", "matrix", "col"},
}


_SUPPORTED = (
    sympy.Add, sympy.Mul, sympy.Pow, sympy.Symbol, sympy.Piecewise, sympy.core.relational.Relational,
    sympy.And, sympy.Or, sympy.Not, sympy.logic.boolalg.ITE, sympy.logic.boolalg.BooleanAtom, sympy.Abs, sympy.sign, sympy.Max, sympy.Min,
    sympy.Mod, sympy.floor, sympy.ceiling, sympy.exp, sympy.log, sympy.sin, sympy.cos, sympy.UnevaluatedExpr,
    sympy.functions.elementary.piecewise.ExprCondPair, Reduction, TrustRatio, sympy.NumberSymbol, Where,
)


def _fits_float64(number) -> bool:
    """A constant the generated code can hold: finite in float64 (sympy's exact values may be far larger,
    ``exp(1000)``, ``10**400``; tiny ones round to 0.0 and are fine)."""
    try:
        return math.isfinite(float(number))
    except OverflowError:
        return False
    except (TypeError, ValueError):  # no float value (a reduction of a constant): the other checks say why
        return True


def _check_supported(expr, where_, what):
    """Only constructs both printers implement, and only finite real numbers."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Number):
            if not node.is_finite or not node.is_real:
                raise SpecError(f"{what}: {node} is not a finite real number, in {expr} [{where_}]")
        if isinstance(node, sympy.Expr) and node.is_number and node.is_real is not False and not _fits_float64(node):
            text = str(node) if len(str(node)) <= 40 else f"{str(node)[:20]}... ({len(str(node))} characters)"
            raise SpecError(f"{what}: the constant {text} does not fit in float64 [{where_}]")
        if isinstance(node, sympy.Number):
            continue
        if node is sympy.I or (isinstance(node, sympy.Expr) and node.is_number and node.is_real is False):
            raise SpecError(f"{what}: {node} is not real, in {expr} [{where_}]")
        if not isinstance(node, _SUPPORTED):
            raise SpecError(
                f"{what}: {type(node).__name__} ({node}) is not supported in optimizer specs, in {expr} [{where_}]"
            )
        if isinstance(node, sympy.Piecewise) and node.args[-1].cond is not sympy.true:
            raise SpecError(f"{what}: {node} has no default branch; use where(condition, a, b) [{where_}]")


def _check_flags_only_in_conditions(expr, where_, what):
    def walk(node, in_condition):
        if isinstance(node, FlagSymbol) and not in_condition:
            raise SpecError(
                f"{what}: compile-time flag {node} used in arithmetic in {expr}; flags select between "
                f"expressions with where(flag, a, b) [{where_}]"
            )
        if isinstance(node, sympy.Piecewise):
            for value, condition in node.args:
                walk(value, in_condition)
                walk(condition, True)
            return
        if isinstance(node, Where):
            condition, if_true, if_false = node.args
            walk(condition, True)
            walk(if_true, in_condition)
            walk(if_false, in_condition)
            return
        # inside a condition a flag may stand alone or under And/Or/Not, not inside a comparison
        # (sympy writes a where() inside a comparison, where(g > 0, g, w) > 0, as ITE(g > 0, g > 0, w > 0))
        nested = in_condition and isinstance(node, (sympy.And, sympy.Or, sympy.Not, sympy.logic.boolalg.ITE))
        for arg in node.args:
            walk(arg, nested)

    walk(expr, False)


def _check_conditions(expr, where_, what):
    """A float hyperparameter alone is no condition (where() rejects it too; this catches raw Piecewise)."""
    choices = [p.args for p in expr.atoms(sympy.Piecewise)] + [[(None, w.args[0])] for w in expr.atoms(Where)]
    for pairs in choices:
        for _, condition in pairs:
            if isinstance(condition, HyperSymbol) and not isinstance(condition, BoolHyperSymbol):
                raise SpecError(
                    f"{what}: hyperparameter {condition} used where only a compile-time flag can go [{where_}]"
                )


def _fold_constants(expr):
    """Constant subexpressions that sympy keeps symbolic (``sqrt(3)``, ``1 + sqrt(3)``, ``Max(1, sqrt(2))``) as
    floats: otherwise sympy.cse may name one and the printers would apply tensor functions to a Python float."""
    return expr.replace(
        lambda e: isinstance(e, sympy.Expr) and not e.is_Atom and e.is_number and not e.has(Reduction, TrustRatio, Where),
        lambda e: sympy.Float(e.evalf(20)),
    )


def lower(spec: Spec, flags: dict | None = None, runtime: tuple[str, ...] = ()) -> IR:
    """Validate ``spec`` and lower the variant selected by ``flags`` (defaults for those not given).

    The flags named in ``runtime`` are not fixed: each becomes a boolean hyperparameter of the same name, read
    per param group at run time (param groups that disagree on a flag share one variant, one launch per pass).
    """
    flag_values = {f.name: f.default for f in spec.flags}
    flag_values.update({f.name: True for f in spec.shape_flags})  # by default the variant of the largest shapes
    for name, value in (flags or {}).items():
        if name not in flag_values:
            raise SpecError(f"{spec.name} has no flag {name!r} (flags: {sorted(flag_values) or 'none'})")
        if not isinstance(value, bool):
            raise SpecError(f"{spec.name}: flag {name!r} must be True or False, got {value!r}")
        flag_values[name] = value
    for name in runtime:
        if name not in flag_values:
            raise SpecError(f"{spec.name} has no flag {name!r} (flags: {sorted(flag_values) or 'none'})")
    flag_subs = {
        FlagSymbol(name): sympy.Ne(BoolHyperSymbol(name), 0) if name in runtime else sympy.true if value else sympy.false
        for name, value in flag_values.items()
    }

    hypers = list(spec.hypers) + [runtime_flag(f.name, f.default) for f in spec.flags if f.name in runtime]
    hypers_by_name = {h.name: h for h in hypers}
    declared = set(spec._symbols.values()) | {BoolHyperSymbol(name) for name in runtime}
    # states that exist only where a shape flag holds: gone from the variants where it does not
    absent = {s.name for s in spec.states if s.when is not None and flag_values[s.when[0]] != s.when[1]}
    spec_states = [s for s in spec.states if s.name not in absent]
    spec_updates = [u for u in spec.updates if u.target not in absent]
    absent_symbols = {sym for sym in spec._symbols.values() if sym.name in absent}
    per = {s.name: s.per for s in spec.states}
    updated = {u.target for u in spec.updates}
    new_symbols = {_new_symbol(t, per.get(t, "element")): t for t in updated}
    absent_symbols |= {sym for sym, t in new_symbols.items() if t in absent}
    uses_trust_ratio = any(u.expr.atoms(TrustRatio) for u in spec_updates)
    if uses_trust_ratio and "layer_adaptation" not in hypers_by_name:
        hypers.append(LAYER_ADAPTATION)
    layer_adaptation = BoolHyperSymbol("layer_adaptation")

    def lower_trust_ratio(num, den, *guards):
        positive = [a > 0 for a in (num, den, *guards)]
        return sympy.Piecewise((num / den, sympy.And(*positive, sympy.Ne(layer_adaptation, 0))), (sympy.S.One, True))

    # -- every state updated once, the parameter updated ----------------------------------------------
    state_names = [s.name for s in spec_states]
    if PARAM not in updated:
        raise SpecError(f"spec {spec.name} never updates the parameter: add spec.update(spec.param, ...)")
    for state in spec_states:
        if state.name not in updated:
            raise SpecError(
                f"state {state.name!r} of spec {spec.name} is never updated: give its new value with "
                f"spec.update(...) [{state.where}]"
            )

    lowered = []
    for upd in spec_updates:
        what = f"update of {'the parameter' if upd.target == PARAM else upd.target}"
        expr = upd.expr
        _check_flags_only_in_conditions(expr, upd.where, what)
        _check_conditions(expr, upd.where, what)
        _check_supported(expr, upd.where, what)
        expr = _fold_constants(expr.xreplace(flag_subs))
        expr = expr.replace(TrustRatio, lower_trust_ratio)
        gone = sorted(str(s) for s in expr.free_symbols if s in absent_symbols)
        if gone:
            raise SpecError(
                f"{what}: {', '.join(gone)} exists only where its shape flag holds (spec.state(when=...)), but "
                f"this variant ({_flags_text(flag_values)}) reads it: read it under where(flag, ...) [{upd.where}]"
            )
        for sym in sorted(expr.free_symbols, key=str):
            if sym in declared or sym in new_symbols or sym == layer_adaptation:
                continue
            if isinstance(sym, _NEW_VALUES):
                raise SpecError(
                    f"{what}: {sym} is the new value of a state that is never updated in {expr} [{upd.where}]"
                )
            raise SpecError(
                f"{what}: undefined symbol {sym!r} in {expr}; declare it with spec.hyper/spec.state "
                f"or use spec.param/spec.grad/spec.step [{upd.where}]"
            )
        for red in expr.atoms(Reduction):
            _check_reduction(red, what, upd.where)
        for sym in expr.free_symbols:
            if isinstance(sym, _NEW_VALUES) and new_symbols[sym] == upd.target:
                raise SpecError(f"{what}: its new value refers to itself ({sym}) in {expr} [{upd.where}]")
        kind = per.get(upd.target, "element")
        if granularity(expr) not in _FITS[kind]:
            leaves = ", ".join(sorted(str(s) for s in elementwise_leaves(expr))) or f"per-{granularity(expr)} values"
            one = "one number per layer" if kind == "layer" else f"one number per {kind}"
            raise SpecError(
                f"{what}: a per-{kind} state's new value must be {one} (reductions, hyperparameters, the step, "
                f"states as coarse), but {expr} reads {leaves} [{upd.where}]"
            )
        lowered.append((upd.target, expr))

    # -- no cycles between new values -----------------------------------------------------------------
    deps = {target: {new_symbols[s] for s in e.free_symbols if isinstance(s, _NEW_VALUES)} for target, e in lowered}
    visiting, done = set(), set()

    def visit(node, chain):
        if node in done:
            return
        if node in visiting:
            raise SpecError(f"spec {spec.name}: the new values depend on each other in a cycle: {' -> '.join(chain)}")
        visiting.add(node)
        for dep in sorted(deps[node]):
            visit(dep, chain + [dep])
        visiting.discard(node)
        done.add(node)

    for target in sorted(deps):
        visit(target, [target])

    # -- state initial values: constants, hyperparameters and w ------------------------------------------
    states = []
    for state in spec_states:
        init = state.init.xreplace(flag_subs)
        _check_supported(init, state.where, f"state {state.name!r} initial value")
        allowed = (HyperSymbol, ParamSymbol) if state.per == "element" else HyperSymbol
        bad = [s for s in init.free_symbols if not isinstance(s, allowed)]
        if bad or init.atoms(Reduction):
            raise SpecError(
                f"state {state.name!r}: initial value {state.init} may use only constants, "
                f"hyperparameters{' and the parameter w' if state.per == 'element' else ''} [{state.where}]"
            )
        states.append(StateDecl(state.name, init, state.where, state.per, state.when, state.keepdim, state.quantize))

    requirements = []
    for req in spec.requirements:
        cond = req.condition.xreplace(flag_subs)
        if cond is sympy.true:
            continue
        bad = [s for s in cond.free_symbols if not isinstance(s, HyperSymbol)]
        if bad:
            raise SpecError(f"require(): {req.condition} may use only hyperparameters and flags [{req.where}]")
        requirements.append(Requirement(cond, req.message, req.where))

    # Order updates by target declaration order (states, then the parameter) so the IR is canonical.
    order = {name: i for i, name in enumerate(state_names + [PARAM])}
    lowered.sort(key=lambda item: order[item[0]])
    states, lowered = _without_idle_states(states, lowered)
    locations = tuple((u.target, u.where) for u in spec_updates)
    return IR(
        name=spec.name,
        doc=spec.doc,
        hypers=tuple(hypers),
        flags=tuple(sorted((k, v) for k, v in flag_values.items() if k not in runtime)),
        states=tuple(states),
        updates=tuple(lowered),
        requirements=tuple(requirements),
        update_locations=locations,
        device_scalars=tuple(spec.device_scalars),
    )


def _flags_text(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items())) or "no flags"


def _check_reduction(red, what: str, where_: str) -> None:
    """A reduction's argument is element-wise or a per-step scalar (reduced as the value of every element:
    ``layer_sum(1)`` is the element count), or for ``row_sum``/``col_sum`` a value of the other axis (a
    per-column value's sum over a row is one per matrix). (An element-wise value that reads a reduction,
    ``sumsq(g / norm(g))``, is reduced a stage later.)"""
    arg = red.args[0]
    inner = granularity(arg)
    name = type(red).__name__
    if isinstance(red, (RowSum, ColSum)):
        axis, other = ("row", "col") if isinstance(red, RowSum) else ("col", "row")
        if inner in (axis, "matrix") or (inner == "layer" and arg.has(Reduction) and not elementwise_leaves(arg)):
            raise SpecError(
                f"{what}: {name}({arg}) reduces a per-{inner} value over the {'columns' if axis == 'row' else 'rows'}: "
                f"reduce an element-wise value, or a per-{other} one [{where_}]"
            )
        return
    if inner in ("row", "col", "matrix"):
        raise SpecError(
            f"{what}: {name}({arg}) reduces a per-{inner} value over a whole parameter: not supported; reduce an "
            f"element-wise value [{where_}]"
        )
    if arg.has(Reduction) and not elementwise_leaves(arg):
        raise SpecError(
            f"{what}: {name}({arg}) reduces a reduction (a per-layer or global value, not an element-wise one): "
            f"a reduction of a reduction is not supported [{where_}]"
        )


def runtime_flag(name: str, default: bool, doc: str = "compile-time flag, here read per param group") -> HyperDecl:
    """A per-group boolean hyperparameter: what a flag becomes when param groups may disagree on it
    (``lower(runtime=)``), and trust_ratio's ``layer_adaptation`` option."""
    return HyperDecl(
        name=name,
        default=default,
        lo=0.0,
        hi=1.0,
        lo_open=False,
        hi_open=False,
        is_bool=True,
        key=name,
        index=None,
        doc=doc,
    )


LAYER_ADAPTATION = runtime_flag(
    "layer_adaptation", True, doc="False fixes the trust ratio of the group to 1 (biases, normalisation weights)."
)


def _without_idle_states(states: list[StateDecl], updates: list) -> tuple[list, list]:
    """Drop the states a variant neither changes nor reads (AMSGrad's running maximum without ``amsgrad``):
    no memory, no traffic, and no entry in the state dict, as torch.optim keeps none."""
    while True:
        read = set()
        for target, expr in updates:
            read |= {s.name for s in expr.free_symbols if isinstance(s, _OLD_VALUES) and s.name != target}
            read |= {s.name[: -len("_new")] for s in expr.free_symbols if isinstance(s, _NEW_VALUES)}
        old = {s.name: STATE_SYMBOLS[s.per][0](s.name) for s in states}
        idle = {s.name for s in states if s.name not in read and dict(updates)[s.name] == old[s.name]}
        if not idle:
            return states, updates
        states = [s for s in states if s.name not in idle]
        updates = [(t, e) for t, e in updates if t not in idle]
