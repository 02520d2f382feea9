r"""Variants from one spec: a layer-wise trust ratio added to any element-wise optimizer.

:func:`layer_adaptive` rewrites a :class:`~optgen.spec.Spec` (its data: hyperparameters, flags, states and
updates are carried over; only the parameter's update changes). If the optimizer updates the parameter as
:math:`w_t = w_{t-1} - \Delta_t`, the result updates it as

.. math::
   w_t = w_{t-1} - r_t \Delta_t, \qquad
   r_t = \frac{\|w_{t-1}\|}{\|\Delta_t / \gamma\|}
   \quad (1 \text{ where either norm is } 0 \text{, or where the group's } \texttt{layer\_adaptation} \text{ is off})

per layer (parameter tensor), with :math:`\gamma` the hyperparameter ``lr``: each layer's step has the norm
:math:`\gamma \|w\|`, LAMB's shape (``layer_adaptive(AdamW)`` is LAMB). With ``layer_adaptation=False`` the
parameter gets the original update expression (``where`` on the option): the original optimizer, bitwise unless
the compiler's common-subexpression elimination re-associates a sum the two branches share (then to rounding).

:math:`\Delta` is derived symbolically: where the update is affine in :math:`w` (every element-wise optimizer
of the catalog), :math:`w - (a w + b)` is formed as :math:`(1 - a) w - b` and divided by :math:`\gamma` term by
term (and branch by branch of a ``where``), so no :math:`w - w(1 - \gamma\lambda)` cancels in floating point
and :math:`\gamma` leaves :math:`\Delta/\gamma`. An update that is not affine in :math:`w` falls back to
:math:`\Delta = w - w_t` as written.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy

from .spec import (
    PARAM,
    BoolHyperSymbol,
    HyperSymbol,
    Spec,
    SpecError,
    TrustRatio,
    UpdateDecl,
    elementwise_leaves,
    norm,
    trust_ratio,
    where,
)

__all__ = ["layer_adaptive", "update_step"]

LAYER_ADAPTATION = BoolHyperSymbol("layer_adaptation")  # the per-group option trust_ratio() adds

DOC = r"""{base} with a layer-wise trust ratio on its step (optgen.layer_adaptive; LAMB's ratio).

{base}'s update :math:`\Delta_t` scaled per layer :math:`l` by a trust ratio,

.. math::
   \begin{{aligned}}
   w_t^l &= w_{{t-1}}^l - r_t^l \Delta_t^l, \qquad
   r_t^l = \frac{{\|w_{{t-1}}^l\|}}{{\|\Delta_t^l / \gamma\|}}
   \quad (1 \text{{ where either norm is }} 0 \text{{ or adaptation is off}})
   \end{{aligned}}

so that every layer's step has the norm :math:`\gamma \|w^l\|` (LAMB's trust ratio, You et al., 2020), where
{base} updates :math:`w_t = w_{{t-1}} - \Delta_t` with learning rate :math:`\gamma`. ``layer_adaptation=False``
gives {base} itself. {base}:

"""


def _reads(expr: sympy.Basic, w: sympy.Symbol) -> bool:
    """``expr`` reads ``w`` element-wise (a norm of ``w`` inside it is one number per layer: a constant here)."""
    return w in elementwise_leaves(expr)


def _affine(expr: sympy.Expr, w: sympy.Symbol):
    """``(a, b)`` with ``expr == a*w + b`` and neither reading ``w`` element-wise, or None where ``expr`` is not
    affine in ``w`` (or not of a form this recognises)."""
    if not _reads(expr, w):
        return sympy.S.Zero, expr
    if expr == w:
        return sympy.S.One, sympy.S.Zero
    if isinstance(expr, sympy.UnevaluatedExpr):
        return _affine(expr.args[0], w)
    if isinstance(expr, sympy.Add):
        parts = [_affine(term, w) for term in expr.args]
        if any(p is None for p in parts):
            return None
        return sympy.Add(*(a for a, _ in parts)), sympy.Add(*(b for _, b in parts))
    if isinstance(expr, sympy.Mul):
        inner = [f for f in expr.args if _reads(f, w)]
        if len(inner) != 1:
            return None
        rest = sympy.Mul(*(f for f in expr.args if not _reads(f, w)))
        part = _affine(inner[0], w)
        if part is None:
            return None
        return rest * part[0], rest * part[1]
    if isinstance(expr, sympy.Piecewise):
        if any(_reads(cond, w) for _, cond in expr.args):
            return None
        parts = [_affine(value, w) for value, _ in expr.args]
        if any(p is None for p in parts):
            return None
        conds = [cond for _, cond in expr.args]
        return (
            sympy.Piecewise(*((a, c) for (a, _), c in zip(parts, conds))),
            sympy.Piecewise(*((b, c) for (_, b), c in zip(parts, conds))),
        )
    return None


def update_step(spec: Spec) -> tuple[sympy.Expr, sympy.Expr]:
    r"""``(Δ, Δ/lr)`` of ``spec``: its parameter update is :math:`w - \Delta`; ``lr`` is the hyperparameter
    named ``lr``. Raises :class:`SpecError` where the spec has no ``lr`` or no parameter update."""
    lr = spec._symbols.get("lr")
    if not isinstance(lr, HyperSymbol):
        raise SpecError(f"layer_adaptive({spec.name}): the spec has no hyperparameter 'lr' to normalise the step by")
    updates = [u for u in spec.updates if u.target == PARAM]
    if not updates:
        raise SpecError(f"layer_adaptive({spec.name}): the spec never updates the parameter")
    w, new_value = spec.param, updates[0].expr
    parts = _affine(new_value, w)
    if parts is None:
        # not affine in w: the plain difference (it may lose precision to cancellation in fp32)
        delta = w - new_value
        return delta, delta / lr
    a, b = parts
    keep = _inside(lambda x: 1 - x, a)  # 1 - (1 - lr*wd) is lr*wd: the w - w(1 - lr*wd) cancels symbolically
    return keep * w - b, _divide(keep, lr) * w - _divide(b, lr)


def _inside(fn, expr):
    """``fn`` applied to each branch of a (nested) Piecewise, or to ``expr``."""
    if isinstance(expr, sympy.Piecewise):
        return sympy.Piecewise(*((_inside(fn, value), cond) for value, cond in expr.args))
    return fn(expr)


def _divide(expr, lr):
    """``expr / lr`` term by term and branch by branch, so that lr cancels in every term that carries it."""
    if isinstance(expr, sympy.Add):
        return sympy.Add(*(_divide(term, lr) for term in expr.args))
    return _inside(lambda x: _divide(x, lr) if isinstance(x, sympy.Add) else x / lr, expr)


def layer_adaptive(spec: Spec | Callable[[], Spec], name: str | None = None) -> Spec:
    """A new spec: ``spec`` with a layer-wise trust ratio on its step (see the module docstring).

    ``spec`` is a :class:`Spec` or a function returning one (a built-in factory); the result is named ``name``
    (default ``LayerAdaptive<Name>``) and has the per-group option ``layer_adaptation`` (default True).
    """
    if callable(spec) and not isinstance(spec, Spec):
        spec = spec()
    if not isinstance(spec, Spec):
        raise TypeError(f"layer_adaptive() takes an optgen.Spec or a function returning one, got {type(spec).__name__}")
    if any(u.expr.has(TrustRatio) for u in spec.updates) or "layer_adaptation" in spec._symbols:
        raise SpecError(f"layer_adaptive({spec.name}): the spec already has a trust ratio (layer_adaptation)")
    delta, per_lr = update_step(spec)
    w = spec.param
    original = next(u for u in spec.updates if u.target == PARAM)
    # the trust ratio where layer_adaptation is on; the original update expression where it is off
    adapted = where(LAYER_ADAPTATION, w - trust_ratio(norm(w), norm(per_lr)) * delta, original.expr)

    out = Spec(name or f"LayerAdaptive{spec.name}", doc=DOC.format(base=spec.name) + (spec.doc or ""))
    out.hypers = list(spec.hypers)
    out.flags = list(spec.flags)
    out.shape_flags = list(spec.shape_flags)
    out.states = list(spec.states)
    out.requirements = list(spec.requirements)
    out.device_scalars = list(spec.device_scalars)
    out._symbols = dict(spec._symbols)
    out.updates = [
        UpdateDecl(u.target, adapted, out.where) if u.target == PARAM else u for u in spec.updates
    ]
    return out
