"""Transformations of an IR that any optimizer can be given: variants are data, not special cases.

Each is a pure function ``IR -> IR`` that rewrites the update expressions; the planner then derives the
passes of the result like those of any spec (a global gradient norm becomes a pre-pass, master weights add
a state, skipped steps gate every store).

* ``maximize``: ascend, ``g -> -g`` (torch.optim's ``maximize=True``).
* ``clip_grad_norm``: ``g -> g / max(1, ||g||_global / max_grad_norm)`` inside the step, as apex's
  FusedLAMB and NVLAMB pre-normalise; adds the hyperparameter ``max_grad_norm``.
* ``master_weights``: the math runs on an fp32 copy held as state ``master_param`` (initialised from the
  parameter); the model's low-precision weights are written from it in the same pass (apex
  FusedMixedPrecisionLamb).
* ``amp``: torch.amp.GradScaler's contract for fused optimizers (torch's fused AdamW): gradients are
  divided by the device scalar ``grad_scale``; where the device scalar ``found_inf`` is non-zero every
  store writes back the old value and the step count does not move, with no host synchronisation.
* ``stochastic_round``: ``bf16_stochastic_round=True``: bf16 parameters take their new value rounded
  stochastically (counter-based random bits), so small updates are not lost without fp32 master weights.
* ``quantize_states``: ``state_format="8bit"``: the element-wise states not marked exact are stored as blockwise
  8-bit codes and scales (``optgen.quantization``); the math is unchanged, the storage and the plan's bytes are.
"""

from __future__ import annotations

import dataclasses

import sympy

from .ir import IR, runtime_flag
from .spec import (
    PARAM,
    BoolHyperSymbol,
    DeviceScalarSymbol,
    GlobalSum,
    GradSymbol,
    HyperDecl,
    NewStateSymbol,
    ParamSymbol,
    SpecError,
    StateDecl,
    StateSymbol,
)

GRAD = GradSymbol("g")
MASTER = "master_param"


def _map_updates(ir: IR, fn) -> tuple:
    return tuple((target, fn(target, expr)) for target, expr in ir.updates)


def _with_option(ir: IR, name: str, **changes) -> IR:
    return dataclasses.replace(ir, options=tuple(sorted({**dict(ir.options), name: True}.items())), **changes)


def maximize(ir: IR, runtime: bool = False) -> IR:
    """``g -> -g``; with ``runtime`` a per-group switch instead (param groups that disagree on maximize)."""
    if not runtime:
        return _with_option(ir, "maximize", updates=_map_updates(ir, lambda _, e: e.xreplace({GRAD: -GRAD})))
    switch = sympy.Ne(BoolHyperSymbol("maximize"), 0)
    signed = sympy.Piecewise((-GRAD, switch), (GRAD, True))
    return _with_option(
        ir,
        "maximize_per_group",
        updates=_map_updates(ir, lambda _, e: e.xreplace({GRAD: signed})),
        hypers=ir.hypers + (runtime_flag("maximize", False),),
    )


def clip_grad_norm(ir: IR) -> IR:
    if any(h.name == "max_grad_norm" for h in ir.hypers):
        raise SpecError(f"{ir.name} already has a max_grad_norm hyperparameter; it clips gradients itself")
    from .spec import HyperSymbol, Unevaluated

    max_norm = HyperSymbol("max_grad_norm")
    # Unevaluated: sympy would distribute (g/c)**2 into g**2/c**2, which overflows for large g.
    clipped = Unevaluated(GRAD / sympy.Max(1, sympy.sqrt(GlobalSum(GRAD**2)) / max_norm))
    decl = HyperDecl(
        name="max_grad_norm",
        default=1.0,
        lo=0.0,
        hi=float("inf"),
        lo_open=True,
        hi_open=False,
        is_bool=False,
        key="max_grad_norm",
        index=None,
        doc="gradients of all parameters are divided by max(1, ||g||/max_grad_norm) inside the step",
    )
    return _with_option(
        ir, "clip_grad_norm", updates=_map_updates(ir, lambda _, e: e.xreplace({GRAD: clipped})), hypers=ir.hypers + (decl,)
    )


def master_weights(ir: IR) -> IR:
    if MASTER in ir.state_names:
        raise SpecError(f"{ir.name} already has a state named {MASTER}")
    w, w_new = ParamSymbol("w"), NewStateSymbol("w_new")
    master, master_new = StateSymbol(MASTER), NewStateSymbol(f"{MASTER}_new")
    swap = {w: master, w_new: master_new}
    updates = []
    for target, expr in ir.updates:
        expr = expr.xreplace(swap)
        updates.append((MASTER if target == PARAM else target, expr))
    updates.append((PARAM, master_new))
    states = ir.states + (StateDecl(MASTER, w, "optgen.transforms.master_weights", quantize="exact"),)
    order = {name: i for i, name in enumerate([s.name for s in states] + [PARAM])}
    updates.sort(key=lambda item: order[item[0]])
    return _with_option(ir, "master_weights", updates=tuple(updates), states=states)


AMP_SKIP = "found_inf"  # the device scalar whose non-zero value skips the step


def amp(ir: IR, unscale: bool) -> IR:
    """GradScaler: unscale by ``grad_scale`` (unless the user already unscaled) and skip on ``found_inf``."""
    found_inf = DeviceScalarSymbol(AMP_SKIP)
    ok = sympy.Eq(found_inf, 0)
    device = [AMP_SKIP]
    updates = ir.updates
    if unscale:
        scale = DeviceScalarSymbol("grad_scale")
        updates = tuple((t, e.xreplace({GRAD: GRAD / scale})) for t, e in updates)
        device.insert(0, "grad_scale")

    gated = tuple((t, sympy.Piecewise((e, ok), (ir.old_symbol(t), True))) for t, e in updates)
    return _with_option(
        ir,
        "amp_unscale" if unscale else "amp",
        updates=gated,
        device_scalars=tuple(dict.fromkeys(ir.device_scalars + tuple(device))),
        step_advance=sympy.Piecewise((ir.step_advance, ok), (0, True)),
    )


def eight_bit_states(states, names=None) -> tuple[tuple[str, str], ...]:
    """(state, map) of the ``states`` that 8-bit state covers: element-wise, not marked exact, and among ``names``
    (None: all of them)."""
    return tuple(
        (s.name, s.quantize) for s in states
        if s.per == "element" and s.quantize != "exact" and (names is None or s.name in names)
    )


def quantize_states(ir: IR, names=None) -> IR:
    """``state_format="8bit"``: the element-wise states ``names`` (None: all that the spec does not mark exact)
    are kept in 8 bits (``optgen.quantization``; the kernels dequantize on load and requantize each block on
    store). A state of this variant not in ``names`` (another variant's, Adafactor's vectors) is skipped."""
    chosen = eight_bit_states(ir.states, names)
    if not chosen:
        return ir
    return _with_option(ir, "state_8bit", quantized=chosen)


STOCHASTIC_ROUND = "bf16_stochastic_round"


def stochastic_round(ir: IR) -> IR:
    """``bf16_stochastic_round=True``: a bf16 parameter's new value is rounded to bf16 stochastically (up with the
    probability of its distance from the value below, so the expected stored value is the fp32 one), with random
    bits from a counter-based hash of (``sr_seed``, step, tensor, element): two runs, and a resumed run, are
    bitwise equal. ``sr_seed`` is a per-group value (saved in the state dict; changing it never recompiles)."""
    if any(h.name == "sr_seed" for h in ir.hypers):
        raise SpecError(f"{ir.name} already has a hyperparameter sr_seed")
    seed = HyperDecl(
        name="sr_seed", default=0.0, lo=0.0, hi=float(2**32 - 1), lo_open=False, hi_open=False, is_bool=False,
        key="sr_seed", index=None, doc="seed of the stochastic rounding of bf16 parameters (an integer)",
        integer=True,
    )
    return _with_option(ir, STOCHASTIC_ROUND, hypers=ir.hypers + (seed,))


def apply(
    ir: IR, *, maximize_: bool | str = False, max_grad_norm: bool = False, master: bool = False, amp_mode: str | None = None,
    quantized: tuple[str, ...] | None = (), stochastic: bool = False,
) -> IR:
    """Apply the optimizer-level options in their fixed order (the order matters: AMP gates last).
    ``maximize_="runtime"``: a per-group switch."""
    if maximize_:
        ir = maximize(ir, runtime=maximize_ == "runtime")
    if max_grad_norm:
        ir = clip_grad_norm(ir)
    if master:
        ir = master_weights(ir)
    if quantized is None or quantized:  # None: every state that may be 8-bit
        ir = quantize_states(ir, quantized)
    if stochastic:
        ir = stochastic_round(ir)
    if amp_mode is not None:
        ir = amp(ir, unscale=amp_mode == "unscale")
    return ir
