"""The language users write optimizers in.

A :class:`Spec` collects, with sympy expressions:

* runtime hyperparameters (``spec.hyper``) -- per-group fp32 scalars, validated at construction;
* compile-time flags (``spec.flag``) -- choose a variant of the math; each variant is its own kernel;
* per-parameter state tensors (``spec.state``) with torch's state names;
* the parameter ``w``, its gradient ``g`` and the step count ``t`` (1 on the first step);
* reductions over a layer (one parameter tensor) or over all parameters (``norm``, ``sumsq``,
  ``maxabs``, ``global_norm`` ...);
* the new value of every state and of ``w`` (``spec.update``).

Nothing here computes: the spec is data that :func:`optgen.ir.lower` turns into the IR.
"""

from __future__ import annotations

import builtins
import keyword
import math
import os
import sys
from dataclasses import dataclass

import sympy

__all__ = [
    "Spec",
    "SpecError",
    "Hyper",
    "where",
    "norm",
    "sumsq",
    "maxabs",
    "layer_sum",
    "layer_max",
    "row_sum",
    "col_sum",
    "row_mean",
    "col_mean",
    "global_norm",
    "global_sumsq",
    "global_sum",
    "global_max",
    "trust_ratio",
    "clip",
    "sqrt",
    "sign",
    "Abs",
    "Max",
    "Min",
]


class SpecError(ValueError):
    """A spec the compiler cannot accept. The message names the problem and the user's expression."""


def _caller_location() -> str:
    """File and line of the first frame outside optgen -- where the user wrote the offending spec line."""
    here = os.path.dirname(os.path.abspath(__file__))
    skip = (here + os.sep, os.path.dirname(os.path.abspath(sympy.__file__)) + os.sep)
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(skip):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


# --------------------------------------------------------------------------------------------------
# Symbols. Each kind of leaf is its own Symbol subclass so the compiler can classify expressions by
# the classes of their free symbols alone. All are real: the math is over real fp32 numbers.
# --------------------------------------------------------------------------------------------------


class _SpecSymbol(sympy.Symbol):
    def __new__(cls, name: str, **assumptions):  # pickle/copy pass the assumptions back: always real
        return super().__new__(cls, name, real=True)


class HyperSymbol(_SpecSymbol):
    """A runtime hyperparameter: one fp32 scalar per param group."""


class BoolHyperSymbol(HyperSymbol):
    """A runtime per-group switch (0 or 1), usable as a ``where`` condition."""


class FlagSymbol(_SpecSymbol):
    """A compile-time flag: substituted by True/False before code generation."""

    def _not_a_number(self, other):
        raise SpecError(
            f"compile-time flag {self.name} used in arithmetic or a comparison; it is a boolean: choose with "
            f"where({self.name}, a, b) [{_caller_location()}]"
        )

    __lt__ = __le__ = __gt__ = __ge__ = _not_a_number


class StepSymbol(_SpecSymbol):
    """The step count t (1 on the first step); a per-parameter scalar."""


class ParamSymbol(_SpecSymbol):
    """The parameter's old value w."""


class GradSymbol(_SpecSymbol):
    """The gradient g."""


class StateSymbol(_SpecSymbol):
    """The old value of a state tensor (one value per element of the parameter)."""


class LayerStateSymbol(_SpecSymbol):
    """The old value of a per-layer state: one number per parameter tensor (NovoGrad's second moment), read
    like a per-layer value (a norm), not element-wise."""


class RowStateSymbol(_SpecSymbol):
    """The old value of a per-row state: one number per row (the last dimension reduced), a tensor of the
    parameter's shape with its last dimension 1, as torch.optim.Adafactor's ``row_var``."""


class ColStateSymbol(_SpecSymbol):
    """The old value of a per-column state: one number per column (the second-to-last dimension reduced), a
    tensor of the parameter's shape with its second-to-last dimension 1 (Adafactor's ``col_var``)."""


class DeviceScalarSymbol(_SpecSymbol):
    """A runtime scalar read from a 1-element device tensor at each step (GradScaler's ``found_inf``):
    the step never reads it on the host, so it needs no synchronisation."""


class NewStateSymbol(_SpecSymbol):
    """The new value of a state (or of the parameter), defined by ``spec.update``."""


class NewLayerStateSymbol(_SpecSymbol):
    """The new value of a per-layer state, defined by ``spec.update``: a per-layer value."""


class NewRowStateSymbol(_SpecSymbol):
    """The new value of a per-row state, defined by ``spec.update``."""


class NewColStateSymbol(_SpecSymbol):
    """The new value of a per-column state, defined by ``spec.update``."""


# the classes of a state's old and new value, by its granularity (``spec.state(per=...)``)
STATE_SYMBOLS = {
    "element": (StateSymbol, NewStateSymbol),
    "layer": (LayerStateSymbol, NewLayerStateSymbol),
    "row": (RowStateSymbol, NewRowStateSymbol),
    "column": (ColStateSymbol, NewColStateSymbol),
}


ELEMENTWISE_LEAVES = (ParamSymbol, GradSymbol, StateSymbol, NewStateSymbol)


# --------------------------------------------------------------------------------------------------
# Reductions and other function nodes.
# --------------------------------------------------------------------------------------------------


class Where(sympy.Function):
    """``where(c, a, b)`` inside a reduction's argument: an element-wise choice sympy leaves alone.

    sympy folds a ``Piecewise`` found anywhere inside a ``Piecewise`` condition into that condition
    (``ExprCondPair`` calls ``piecewise_fold``), and the fold goes through function arguments: the condition
    ``layer_sum(where(g > 0, g, -g)) > 3`` would become ``ITE(g > 0, LayerSum(g) > 3, LayerSum(-g) > 3)``, an
    element-wise choice between two other reductions. A reduction therefore holds its ``where``s as this node,
    which no sympy rewrite looks into; the printers print it like a ``Piecewise``.
    """

    nargs = 3

    @classmethod
    def eval(cls, condition, if_true, if_false):
        if condition == sympy.true:
            return if_true
        if condition == sympy.false:
            return if_false
        if if_true == if_false:
            return if_true
        return None

    def _eval_is_real(self):
        return sympy.core.logic.fuzzy_and([self.args[1].is_real, self.args[2].is_real])


class Unevaluated(sympy.UnevaluatedExpr):
    """``sympy.UnevaluatedExpr`` of a real value: kept whole (sympy would distribute ``(g/c)**2`` into
    ``g**2/c**2``, which overflows for large g) and known to be real (a ``Max`` around a product that holds a plain
    ``UnevaluatedExpr`` can be refused by sympy as not comparable)."""

    def _eval_is_extended_real(self):
        return True

    def _eval_is_real(self):
        return True


def _as_where(piecewise):
    """A ``Piecewise`` with a default branch as nested :class:`Where` (one without a default is left for
    the IR's check, which names it)."""
    if piecewise.args[-1].cond != sympy.true:
        return piecewise
    code = piecewise.args[-1].expr
    for value, condition in reversed(piecewise.args[:-1]):
        code = Where(condition, value, code)
    return code


class Reduction(sympy.Function):
    """A reduction of an element-wise expression; ``op`` is how partials combine, ``scope`` over what.

    Its argument holds no ``Piecewise``: every ``where`` in it becomes a :class:`Where` (see there why)."""

    op: str = ""
    scope: str = ""
    is_real = True
    nargs = 1

    @classmethod
    def eval(cls, x):
        if isinstance(x, sympy.Basic) and x.has(sympy.Piecewise):
            converted = x.replace(lambda e: isinstance(e, sympy.Piecewise), _as_where)
            if converted != x:  # (a Piecewise without a default stays, for the IR's check to name)
                return cls(converted)
        return None


class LayerSum(Reduction):
    op, scope = "sum", "layer"


class LayerMax(Reduction):
    op, scope = "max", "layer"


class RowSum(Reduction):
    """Over the last dimension: one value per row (a parameter of 2+ dimensions)."""

    op, scope = "sum", "row"


class ColSum(Reduction):
    """Over the second-to-last dimension: one value per column (a parameter of 2+ dimensions)."""

    op, scope = "sum", "col"


class GlobalSum(Reduction):
    op, scope = "sum", "global"


class GlobalMax(Reduction):
    op, scope = "max", "global"


class TrustRatio(sympy.Function):
    """``num/den`` where both (and any extra guards) are positive and ``layer_adaptation`` is on, else 1.

    Lowered by the compiler (it adds the per-group ``layer_adaptation`` option to every spec that uses it).
    """

    is_real = True
    nargs = (2, 3, 4)


def _switches_as_comparisons(condition):
    """``And(on, g < 0)``: a boolean hyperparameter under And/Or/Not is a runtime 0/1 scalar, compared to 0
    like a bare one (both backends would otherwise and a float with a boolean)."""
    args = [
        sympy.Ne(a, 0)
        if isinstance(a, BoolHyperSymbol)
        else _switches_as_comparisons(a)
        if isinstance(a, (sympy.And, sympy.Or, sympy.Not))
        else a
        for a in condition.args
    ]
    return condition.func(*args) if isinstance(condition, (sympy.And, sympy.Or, sympy.Not)) else condition


def where(condition, if_true, if_false):
    """``if_true`` where ``condition`` holds, else ``if_false`` (element-wise, per layer or per step).

    ``condition`` is a comparison, a boolean combination of comparisons, a boolean hyperparameter or a
    compile-time flag.
    """
    try:
        condition = sympy.sympify(condition)
    except (sympy.SympifyError, TypeError) as exc:
        raise SpecError(f"where(): condition {condition!r} is not an expression ({exc}) [{_caller_location()}]") from None
    if isinstance(condition, BoolHyperSymbol):
        condition = sympy.Ne(condition, 0)  # a per-group switch: a runtime 0/1 scalar
    elif isinstance(condition, sympy.logic.boolalg.BooleanFunction):
        condition = _switches_as_comparisons(condition)
    elif isinstance(condition, HyperSymbol):
        raise SpecError(
            f"where(): hyperparameter {condition} used where only a compile-time flag (spec.flag), a "
            f"boolean hyperparameter or a comparison can go [{_caller_location()}]"
        )
    elif (isinstance(condition, sympy.Symbol) and not isinstance(condition, FlagSymbol)) or not isinstance(
        condition, (sympy.logic.boolalg.Boolean, FlagSymbol)
    ):
        raise SpecError(
            f"where(): condition {condition} must be a comparison, a boolean hyperparameter or a "
            f"compile-time flag (spec.flag) [{_caller_location()}]"
        )
    return sympy.Piecewise((sympy.sympify(if_true), condition), (sympy.sympify(if_false), True))


def layer_sum(x):
    """:math:`\\sum_i x_i` over one parameter tensor."""
    return LayerSum(sympy.sympify(x))


def layer_max(x):
    """:math:`\\max_i x_i` over one parameter tensor."""
    return LayerMax(sympy.sympify(x))


def layer_numel():
    """The element count of one parameter tensor: ``layer_sum(1)`` (a per-step scalar is reduced as the value of
    every element). Under FSDP2 it counts the whole parameter, as every per-layer reduction does."""
    return LayerSum(sympy.S.One)


def layer_mean(x):
    r""":math:`\frac{1}{n} \sum_i x_i` over one parameter tensor of :math:`n` elements."""
    return layer_sum(x) / layer_numel()


def rms(x):
    r""":math:`\sqrt{\frac{1}{n} \sum_i x_i^2}` over one parameter tensor (Adafactor's RMS)."""
    return sympy.sqrt(layer_mean(sympy.sympify(x) ** 2))


def row_sum(x):
    r""":math:`\sum_j x_{ij}` over the last dimension of a parameter of 2+ dimensions: one value per row, read by
    element :math:`(i, j)` as its row's. Of a per-column value it is one value per matrix (the sum over its
    columns)."""
    return RowSum(sympy.sympify(x))


def col_sum(x):
    r""":math:`\sum_i x_{ij}` over the second-to-last dimension of a parameter of 2+ dimensions: one value per
    column (a (B, R, C) tensor has B x C of them). Of a per-row value it is one value per matrix (the sum over
    its rows)."""
    return ColSum(sympy.sympify(x))


def row_mean(x):
    """The mean over the last dimension (``x.mean(-1)``): one value per row."""
    return row_sum(x) / row_sum(1)


def col_mean(x):
    """The mean over the second-to-last dimension (``x.mean(-2)``): one value per column; of a per-row value, its
    mean over the matrix's rows."""
    return col_sum(x) / col_sum(1)


def sumsq(x):
    """:math:`\\|x\\|_2^2` over one parameter tensor."""
    return LayerSum(sympy.sympify(x) ** 2)


def norm(x):
    """:math:`\\|x\\|_2` over one parameter tensor (a layer)."""
    return sympy.sqrt(sumsq(x))


def maxabs(x):
    """:math:`\\|x\\|_\\infty` over one parameter tensor."""
    return LayerMax(sympy.Abs(sympy.sympify(x)))


def global_sum(x):
    """:math:`\\sum` over all parameters of the optimizer (all groups)."""
    return GlobalSum(sympy.sympify(x))


def global_max(x):
    """:math:`\\max` over all parameters of the optimizer (all groups)."""
    return GlobalMax(sympy.sympify(x))


def global_sumsq(x):
    return GlobalSum(sympy.sympify(x) ** 2)


def global_norm(x):
    """:math:`\\|x\\|_2` over all parameters of the optimizer (all groups)."""
    return sympy.sqrt(global_sumsq(x))


def elementwise_leaves(expr: sympy.Basic) -> set[sympy.Symbol]:
    """The element-wise leaves (parameter, gradient, states) of ``expr`` that no reduction encloses: empty exactly
    when ``expr`` is one number per layer (what trust_ratio's arguments must be; what a reduction's argument is
    unless it reduces a per-step scalar)."""
    if isinstance(expr, Reduction):
        return set()
    if isinstance(expr, ELEMENTWISE_LEAVES):
        return {expr}
    return set().union(*(elementwise_leaves(arg) for arg in expr.args))


# Granularity of a value: how many distinct values it has over a parameter of shape (B, R, C) (B the leading
# dimensions). A coarser value is read by finer code broadcast; two that vary along different axes (a per-row
# and a per-column value) make an element-wise one.
GRANULARITIES = ("scalar", "layer", "matrix", "row", "col", "element")


def _join(a: str, b: str) -> str:
    if {a, b} == {"row", "col"}:
        return "element"
    return max(a, b, key=GRANULARITIES.index)


def granularity(expr: sympy.Basic, known: dict | None = None) -> str:
    """``"element"`` (one value per element), ``"row"``, ``"col"``, ``"matrix"`` (one per (R, C) matrix),
    ``"layer"`` (one per parameter tensor: per-layer and global reductions, per-layer states) or ``"scalar"``
    (hyperparameters, the step): what ``expr`` varies with. ``row_sum`` of an element-wise or coarser value is
    per row, of a per-column value per matrix (and ``col_sum`` alike); other reductions are per layer.
    ``known``: the granularity of other symbols (the compiler's reduction slots)."""
    if known and expr in known:
        return known[expr]
    if isinstance(expr, (RowSum, ColSum)):
        inner = granularity(expr.args[0], known)
        axis, other = ("row", "col") if isinstance(expr, RowSum) else ("col", "row")
        if inner in ("scalar", "layer"):
            return "layer"  # every row (column) sums the same C (R) values: row_sum(1) is C
        return "matrix" if inner == other else axis
    if isinstance(expr, Reduction):
        return "layer"
    if isinstance(expr, ELEMENTWISE_LEAVES):
        return "element"
    if isinstance(expr, (RowStateSymbol, NewRowStateSymbol)):
        return "row"
    if isinstance(expr, (ColStateSymbol, NewColStateSymbol)):
        return "col"
    if isinstance(expr, (LayerStateSymbol, NewLayerStateSymbol)):
        return "layer"
    out = "scalar"
    for arg in expr.args:
        out = _join(out, granularity(arg, known))
        if out == "element":
            break
    return out


def trust_ratio(numerator, denominator, *guards):
    """The layer-wise trust ratio ``numerator/denominator``.

    It is 1 where the numerator, the denominator or any of ``guards`` is not positive (a zero-initialised
    bias would otherwise never move), and where the group's ``layer_adaptation`` option is False.
    Every argument is one number per layer (``norm(w)``, a hyperparameter), never an element-wise value.
    """
    args = [sympy.sympify(a) for a in (numerator, denominator, *guards)]
    roles = ["numerator", "denominator"] + [f"guard {i + 1}" for i in range(len(guards))]
    for role, arg in zip(roles, args):
        # An element-wise argument would make the "per-layer" ratio, and its 1-where-not-positive guard,
        # element-wise: a different optimizer that builds without complaint. Refuse it where it is written.
        leaves = elementwise_leaves(arg)
        if leaves or granularity(arg) not in ("scalar", "layer"):
            names = ", ".join(sorted(str(leaf) for leaf in leaves)) or f"per-{granularity(arg)} values"
            raise SpecError(
                f"trust_ratio(): the {role} {arg} is element-wise (it uses {names} outside a reduction); every "
                f"argument must be a per-layer scalar, such as norm({arg}) [{_caller_location()}]"
            )
    return TrustRatio(*args)


def clip(x, lo, hi):
    """``min(max(x, lo), hi)``."""
    return sympy.Min(sympy.Max(x, lo), hi)


sqrt = sympy.sqrt
sign = sympy.sign
Abs = sympy.Abs
Max = sympy.Max
Min = sympy.Min


# --------------------------------------------------------------------------------------------------
# Declarations.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    """A hyperparameter default with its valid interval (closed unless ``*_open``).

    Plain floats given to ``spec.hyper`` mean ``Hyper(value)``: finite and >= 0.
    """

    default: float | bool | tuple
    lo: float = 0.0
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    doc: str = ""
    finite: bool = True  # False admits +-inf (a clip bound that is off by default)
    none: float | None = None  # None is accepted and stands for this value (torch.optim.Adafactor's eps=(None, ...))


@dataclass(frozen=True)
class HyperDecl:
    """One scalar hyperparameter. ``key``/``index`` locate it in the param group (``betas``[1])."""

    name: str
    default: float
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    is_bool: bool
    key: str
    index: int | None
    doc: str
    finite: bool = True
    none: float | None = None  # the value None stands for (None is refused when this is None)
    default_none: bool = False  # the constructor's default is None (standing for ``none``)
    integer: bool = False  # only whole numbers (a seed)

    @property
    def label(self) -> str:
        """How messages name it: ``lr``, ``betas[1]``."""
        return self.key if self.index is None else f"{self.key}[{self.index}]"

    def check(self, value) -> str | None:
        """Why ``value`` is invalid, or None; torch.optim's phrasing for the keys it names ("Invalid learning
        rate: -1", "Invalid beta parameter at index 0: 1.0"), so that messages match torch's."""
        label = self.label
        torch_label = _TORCH_LABELS.get(self.key)
        prefix = (
            f"Invalid {torch_label.format(index=self.index)}: {value!r}" if torch_label else f"Invalid {label} value: {value!r}"
        )
        if value is None and self.none is not None:
            return None
        if self.is_bool:
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                return f"{prefix} (expected True or False)"
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"{prefix} (expected a real number)"
        if isinstance(value, complex):
            return f"{prefix} (expected a real number)"
        if math.isnan(number) or (self.finite and not math.isfinite(number)):
            return f"{prefix} (must be finite)"
        if self.integer and not number.is_integer():
            return f"{prefix} (expected an integer)"
        below = number <= self.lo if self.lo_open else number < self.lo
        above = number >= self.hi if self.hi_open else number > self.hi
        if below or above:
            left = "(" if self.lo_open else "["
            right = ")" if self.hi_open else "]"
            return f"{prefix} (must be in {left}{self.lo}, {self.hi}{right})"
        return None


# torch.optim's words for some group keys in its "Invalid ...: value" messages
_TORCH_LABELS = {"lr": "learning rate", "eps": "epsilon value", "betas": "beta parameter at index {index}"}


@dataclass(frozen=True)
class FlagDecl:
    name: str
    default: bool
    doc: str


STATE_GRANULARITIES = tuple(STATE_SYMBOLS)


@dataclass(frozen=True)
class ShapeFlagDecl:
    """A compile-time flag each parameter sets from its shape: true for parameters of ``min_ndim`` or more
    dimensions (Adafactor factors only matrices). Parameters are partitioned by it, like dtypes."""

    name: str
    min_ndim: int
    where: str


@dataclass(frozen=True)
class StateDecl:
    """A per-parameter state. ``per="element"``: a tensor of the parameter's shape, ``init`` an expression of
    constants, hyperparameters and ``w``; ``per="layer"``: one number per parameter tensor (a 0-d tensor in the
    state dict); ``per="row"``/``"column"``: one number per row/column, a tensor of the parameter's shape with
    its last/second-to-last dimension 1; these take ``init`` of constants and hyperparameters. ``when``: (shape
    flag, value); the state exists only in the variants where the flag has that value (Adafactor's factored
    moments for matrices, its full second moment for vectors)."""

    name: str
    init: sympy.Expr
    where: str
    per: str = "element"
    when: tuple[str, bool] | None = None
    keepdim: bool = True  # per row/column: the reduced dimension kept as 1 (torch's Adafactor) or dropped (CAME)
    quantize: str = "signed"  # in 8 bits (state_format="8bit"): the map ("signed", "unsigned", "square"), or "exact"


@dataclass(frozen=True)
class UpdateDecl:
    target: str  # state name, or PARAM for the parameter itself
    expr: sympy.Expr
    where: str


@dataclass(frozen=True)
class Requirement:
    condition: sympy.Basic
    message: str
    where: str


PARAM = "param"
QUANTIZE_CHOICES = ("signed", "unsigned", "square", "exact")
QUANT_SUFFIX = "_absmax"  # an 8-bit state's scales are the state dict's entry <state>_absmax
QUANT_MAP_SUFFIX = "_qmap"  # and a saved one's map <state>_qmap
QUANT_ROW_SUFFIX = "_qrow"  # and the row its blocks lie within, <state>_qrow (0: blocks of the flat tensor)
_RESERVED = {"w", "g", "t", PARAM, "params", "grad", "step", "backend", "defaults", "layer_adaptation", "tl", "torch"}
_RESERVED_PREFIXES = ("_", "tmp", "red_", "scratch_")
# names the generated code or the constructor uses: a spec cannot take them
_RESERVED |= {"dtype", "self", "triton", "math", "BLOCK", "CHUNK", "N_HYPER", "ALIGNED", "maximize", "autotune",
              "master_weights", "state_dtype", "state_format", "bf16_stochastic_round"}


class Spec:
    """An optimizer written as math. See the module docstring; ``optgen.build(spec)`` compiles it.

    Example (LAMB)::

        spec = optgen.Spec("LAMB")
        lr, beta1, beta2, eps, wd = spec.hyper(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
        w, g, t = spec.param, spec.grad, spec.step
        m, v = spec.state("exp_avg"), spec.state("exp_avg_sq")
        m1 = spec.update(m, beta1 * m + (1 - beta1) * g)
        v1 = spec.update(v, beta2 * v + (1 - beta2) * g**2)
        u = (m1 / (1 - beta1**t)) / (sqrt(v1 / (1 - beta2**t)) + eps) + wd * w
        spec.update(w, w - lr * trust_ratio(norm(w), norm(u)) * u)
    """

    def __init__(self, name: str, doc: str = ""):
        if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
            # ASCII: the name becomes kernel and file names, and Triton's compiler takes ASCII identifiers only
            raise SpecError(f"Spec name must be an ASCII Python identifier, got {name!r}")
        self.name = name
        self.doc = doc
        self.param = ParamSymbol("w")
        self.grad = GradSymbol("g")
        self.step = StepSymbol("t")
        self.hypers: list[HyperDecl] = []
        self.flags: list[FlagDecl] = []
        self.shape_flags: list[ShapeFlagDecl] = []
        self.states: list[StateDecl] = []
        self.updates: list[UpdateDecl] = []
        self.requirements: list[Requirement] = []
        self.device_scalars: list[str] = []
        self._symbols: dict[str, sympy.Symbol] = {"w": self.param, "g": self.grad, "t": self.step}
        self.where = _caller_location()
        # torch.optim's Adam family refuses tensor hyperparameters with foreach=True and capturable=False (its
        # foreach code reads them on the host); a spec standing in for such a class says so, to refuse the same
        self.torch_foreach_refuses_tensors = False
        # group values torch.optim's class forces on every load (torch.optim.AdamW: decoupled_weight_decay=True)
        self.torch_forced_on_load: dict[str, object] = {}
        # the constructor's default ``state_format`` (AdamW8bit, LAMB8bit: "8bit"; None: fp32)
        self.state_format: str | None = None

    # -- declarations ------------------------------------------------------------------------------

    def _claim(self, name: str, kind: str) -> None:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise SpecError(f"{kind} name must be a Python identifier, got {name!r} [{_caller_location()}]")
        if hasattr(builtins, name):
            raise SpecError(f"{kind} name {name!r} is a Python builtin; choose another name [{_caller_location()}]")
        if (name in self._symbols or name in _RESERVED or name.endswith(("_new", QUANT_SUFFIX, QUANT_MAP_SUFFIX, QUANT_ROW_SUFFIX))
                or name.startswith(_RESERVED_PREFIXES)):  # fmt: skip
            raise SpecError(
                f"{kind} name {name!r} is already used or reserved in spec {self.name} [{_caller_location()}]"
            )

    def hyper(self, /, **defaults):
        """Declare runtime hyperparameters; returns their symbols in order (tuples are flattened).

        A value is a float default (finite, >= 0), a bool (a per-group switch), a :class:`Hyper` with a
        range, or a tuple of those (stored under one key, like torch's ``betas``; its symbols are named
        ``beta1, beta2`` for ``betas`` and ``<key>_0, <key>_1`` otherwise).
        """
        out = []
        for key, value in defaults.items():
            if any(h.key == key for h in self.hypers):
                raise SpecError(
                    f"hyperparameter name {key!r} is already used or reserved in spec {self.name} [{_caller_location()}]"
                )
            items = value.default if isinstance(value, Hyper) and isinstance(value.default, tuple) else value
            if isinstance(items, tuple):
                base = value if isinstance(value, Hyper) else None
                for index, item in enumerate(items):
                    name = f"beta{index + 1}" if key == "betas" else f"{key}_{index}"
                    if base is not None and not isinstance(item, Hyper):
                        item = Hyper(item, base.lo, base.hi, base.lo_open, base.hi_open, base.doc, base.finite, base.none)
                    out.append(self._declare_hyper(name, key, index, item))
            else:
                out.append(self._declare_hyper(key, key, None, value))
        return out[0] if len(out) == 1 else tuple(out)

    def _declare_hyper(self, name, key, index, value) -> HyperSymbol:
        self._claim(name, "hyperparameter")
        decl = value if isinstance(value, Hyper) else Hyper(value)
        default_none = decl.default is None
        if default_none:
            if decl.none is None:
                raise SpecError(
                    f"hyperparameter {name!r}: default None is not a number (Hyper(None, none=<value>) makes None "
                    f"stand for a value) [{_caller_location()}]"
                )
            decl = Hyper(decl.none, decl.lo, decl.hi, decl.lo_open, decl.hi_open, decl.doc, decl.finite, decl.none)
        is_bool = isinstance(decl.default, bool)
        if not is_bool:
            if not isinstance(decl.default, (int, float)):
                raise SpecError(
                    f"hyperparameter {name!r}: default {decl.default!r} is not a number [{_caller_location()}]"
                )
            try:
                float(decl.default)
            except OverflowError:
                raise SpecError(
                    f"hyperparameter {name!r}: default {decl.default!r} is not finite in floating point "
                    f"[{_caller_location()}]"
                ) from None
            if math.isnan(decl.default) or (decl.finite and not math.isfinite(decl.default)):
                raise SpecError(
                    f"hyperparameter {name!r}: default {decl.default!r} is not finite [{_caller_location()}]"
                )
        hyper = HyperDecl(
            name=name,
            default=decl.default if is_bool else float(decl.default),
            lo=0.0 if is_bool else float(decl.lo),
            hi=1.0 if is_bool else float(decl.hi),
            lo_open=decl.lo_open,
            hi_open=decl.hi_open,
            is_bool=is_bool,
            key=key,
            index=index,
            doc=decl.doc,
            finite=decl.finite,
            none=None if decl.none is None else float(decl.none),
            default_none=default_none,
        )
        problem = hyper.check(hyper.default)
        if problem:
            raise SpecError(f"hyperparameter {name!r}: default outside its range: {problem} [{_caller_location()}]")
        self.hypers.append(hyper)
        symbol = BoolHyperSymbol(name) if is_bool else HyperSymbol(name)
        self._symbols[name] = symbol
        return symbol

    def flag(self, /, **defaults):
        """Declare compile-time flags (constructor keywords that select a variant of the math)."""
        out = []
        for name, default in defaults.items():
            self._claim(name, "flag")
            if not isinstance(default, bool):
                raise SpecError(f"flag {name!r}: default must be True or False, got {default!r}")
            self.flags.append(FlagDecl(name, default, ""))
            symbol = FlagSymbol(name)
            self._symbols[name] = symbol
            out.append(symbol)
        return out[0] if len(out) == 1 else tuple(out)

    def device_scalar(self, name: str) -> DeviceScalarSymbol:
        """Declare a scalar the runtime supplies as a 1-element device tensor at each step."""
        self._claim(name, "device scalar")
        self.device_scalars.append(name)
        symbol = DeviceScalarSymbol(name)
        self._symbols[name] = symbol
        return symbol

    def state(self, name: str, init=0, per: str = "element", when=None, keepdim: bool = True, quantize: str = "signed"):
        """Declare a state with torch's state name (``exp_avg``...) and its initial value (default 0).

        ``per="element"`` (default): one value per element of the parameter; ``per="layer"``: one number per
        parameter tensor (NovoGrad's second moment); ``per="row"``/``"column"``: one number per row/column of a
        parameter of 2+ dimensions (Adafactor's factored second moment). A coarser state's new value must be of
        its granularity (reductions, hyperparameters, the step, states as coarse) and element-wise code reads it
        broadcast. ``when``: a shape flag (``spec.shape_flag``) or its negation ``~flag``; the state exists only for
        the parameters where it holds, and only code under ``where(flag, ...)`` may read it. ``keepdim`` (per
        row/column): the state dict's tensor keeps the reduced dimension as 1 (torch.optim.Adafactor's
        ``row_var``) or drops it (came-pytorch's ``exp_avg_sq_row``); the values are the same. ``quantize``: how an
        element-wise state is kept when the optimizer is built with ``state_format="8bit"``: ``"signed"``
        (default), ``"unsigned"`` (a state never negative: torchao's map for Adam's second moment) or
        ``"square"`` (a mean of squares kept with the precision of its square root: LAMB's second moment) selects
        the 8-bit map (``optgen.quantization``), ``"exact"`` keeps it in full precision (a state the update cannot
        afford to round, e.g. a running sum that must stay exact)."""
        self._claim(name, "state")
        if quantize not in QUANTIZE_CHOICES:
            raise SpecError(f"state {name!r}: quantize={quantize!r}; expected one of {QUANTIZE_CHOICES} [{_caller_location()}]")
        if per not in STATE_GRANULARITIES:
            raise SpecError(f"state {name!r}: per={per!r}; expected one of {STATE_GRANULARITIES} [{_caller_location()}]")
        condition = None
        if when is not None:
            negated = isinstance(when, sympy.Not)
            flag = when.args[0] if negated else when
            if not (isinstance(flag, FlagSymbol) and flag.name in {f.name for f in self.shape_flags}):
                raise SpecError(
                    f"state {name!r}: when={when!r} must be a shape flag of this spec (spec.shape_flag) or its "
                    f"negation (~flag) [{_caller_location()}]"
                )
            condition = (flag.name, not negated)
        try:
            init = sympy.sympify(init)
        except (sympy.SympifyError, TypeError) as exc:
            raise SpecError(f"state {name!r}: initial value {init!r} is not an expression ({exc}) [{_caller_location()}]") from None
        if not isinstance(init, sympy.Expr):
            raise SpecError(f"state {name!r}: initial value {init!r} is not a scalar expression [{_caller_location()}]")
        if not keepdim and per not in ("row", "column"):
            raise SpecError(f"state {name!r}: keepdim=False is for per-row or per-column states, not per={per!r} [{_caller_location()}]")
        self.states.append(StateDecl(name, init, _caller_location(), per, condition, bool(keepdim), quantize))
        symbol = STATE_SYMBOLS[per][0](name)
        self._symbols[name] = symbol
        return symbol

    def shape_flag(self, name: str, min_ndim: int):
        """Declare a compile-time flag that each parameter sets from its shape: true where the parameter has at
        least ``min_ndim`` dimensions (``factored = spec.shape_flag("factored", min_ndim=2)``). Use it in
        ``where(flag, a, b)`` and ``spec.state(..., when=flag)``; parameters run the variant of their value."""
        self._claim(name, "shape flag")
        if not isinstance(min_ndim, int) or isinstance(min_ndim, bool) or min_ndim < 1:
            raise SpecError(f"shape flag {name!r}: min_ndim must be a positive integer, got {min_ndim!r} [{_caller_location()}]")
        self.shape_flags.append(ShapeFlagDecl(name, min_ndim, _caller_location()))
        symbol = FlagSymbol(name)
        self._symbols[name] = symbol
        return symbol

    def update(self, target, expr):
        """Give the new value of a state or of the parameter; returns a symbol for that new value."""
        where_ = _caller_location()
        if target is self.param or (isinstance(target, ParamSymbol)):
            name = PARAM
        elif isinstance(target, tuple(old for old, _ in STATE_SYMBOLS.values())) and self._symbols.get(target.name) == target:
            name = target.name
        else:
            raise SpecError(
                f"update() of {target!r}: only the parameter (spec.param) or a declared state "
                f"(spec.state) can be updated [{where_}]"
            )
        try:
            expr = sympy.sympify(expr)
        except (sympy.SympifyError, TypeError) as exc:
            raise SpecError(f"update() of {name}: {expr!r} is not an expression ({exc}) [{where_}]") from None
        if not isinstance(expr, sympy.Expr):
            raise SpecError(f"update() of {name}: {expr!r} is not a scalar expression [{where_}]")
        if any(u.target == name for u in self.updates):
            raise SpecError(f"update() of {name}: it is already updated; give each new value once [{where_}]")
        self.updates.append(UpdateDecl(name, expr, where_))
        if name == PARAM:
            return NewStateSymbol("w_new")
        per = next(decl.per for decl in self.states if decl.name == name)
        return STATE_SYMBOLS[per][1](f"{name}_new")

    def require(self, condition, message: str) -> None:
        """A constraint between hyperparameters and flags, checked per param group at construction."""
        try:
            condition = sympy.sympify(condition)
        except (sympy.SympifyError, TypeError) as exc:
            raise SpecError(f"require(): {condition!r} is not a condition ({exc}) [{_caller_location()}]") from None
        if not isinstance(condition, sympy.logic.boolalg.Boolean):
            raise SpecError(f"require(): {condition} is not a condition (a comparison or a boolean) [{_caller_location()}]")
        self.requirements.append(Requirement(condition, message, _caller_location()))

    def __repr__(self) -> str:
        return f"Spec({self.name!r}, hypers={[h.name for h in self.hypers]}, states={[s.name for s in self.states]})"
