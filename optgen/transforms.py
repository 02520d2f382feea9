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
    states = ir.states + (StateDecl(MASTER, w, "optgen.transforms.master_weights"),)
    order = {name: i for i, name in enumerate([s.name for s in states] + [PARAM])}
    updates.sort(key=lambda item: order[item[0]])
    return _with_option(ir, "master_weights", updates=tuple(updates), states=states)


def amp(ir: IR, unscale: bool) -> IR:
    """GradScaler: unscale by ``grad_scale`` (unless the user already unscaled) and skip on ``found_inf``."""
    found_inf = DeviceScalarSymbol("found_inf")
    ok = sympy.Eq(found_inf, 0)
    device = ["found_inf"]
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


def apply(
    ir: IR, *, maximize_: bool | str = False, max_grad_norm: bool = False, master: bool = False, amp_mode: str | None = None
) -> IR:
    """Apply the optimizer-level options in their fixed order (the order matters: AMP gates last).
    ``maximize_="runtime"``: a per-group switch."""
    if maximize_:
        ir = maximize(ir, runtime=maximize_ == "runtime")
    if max_grad_norm:
        ir = clip_grad_norm(ir)
    if master:
        ir = master_weights(ir)
    if amp_mode is not None:
        ir = amp(ir, unscale=amp_mode == "unscale")
    return ir
