"""Printers: the only code that turns sympy expressions into source.

Every target computes in fp32 (fp64 for fp64 parameters) and shares one table of rules (``_FloatRules``);
the Torch and Triton printers extend sympy's Python code printer, the C printer sympy's C99 printer. Each is
a subclass with a function table and one override per construct where the target's semantics differ:

* numbers print as float literals (``1`` -> ``1.0``, ``1/3`` -> ``0.3333333333333333``): Triton follows C,
  where ``1/3`` between integers is integer division;
* small integer powers print as products, ``x**0.5`` as the target's correctly rounded square root,
  ``x**-1`` as a division; other powers as ``exp2(e*log2(b))`` in Triton (no ``**`` on tensors there);
* ``Piecewise`` prints as nested ``where``; ``Max``/``Min`` propagate NaN like torch's ``maximum``;
* ``Mod`` follows Python's sign convention (the divisor's sign), not C's ``fmod``.
"""

from __future__ import annotations

import math

import sympy
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import precedence
from sympy.printing.pycode import PythonCodePrinter

# Settings every printer takes: ``positive`` and ``nonnegative`` name the symbols known to be > 0 / >= 0 (the
# step count, hyperparameters by their declared ranges; they spare guards a general formula needs); ``scalar``
# selects code for per-step fp64 scalars instead of element-wise values.
_SIGN_SETTINGS = dict(positive=frozenset({"t"}), nonnegative=frozenset(), scalar=False)


class _FloatRules:
    """Rules shared by every target, mixed into a sympy printer: float literals, names printed as they are,
    powers by a common decomposition, ``Piecewise``/``where`` as nested selections."""

    sqrt_fn = ""
    where_fn = ""
    known_functions: dict[str, str] = {}

    @classmethod
    def name_problem(cls, name: str, names: frozenset = frozenset()) -> str | None:
        """Why a spec's symbol ``name`` cannot be a name in this target's code (``names``: all the names the
        generated code declares for the spec), or None."""
        return None

    # -- numbers -------------------------------------------------------------------------------------
    def _literal(self, value: float) -> str:
        """A float constant as the target writes it."""
        return repr(value)

    def _print_Float(self, expr):
        return self._literal(float(expr))

    def _print_Integer(self, expr):
        return self._literal(float(int(expr)))

    def _print_Rational(self, expr):
        return self._literal(float(expr))  # correctly rounded, also where p or q alone overflows float64 (1/2**2000 is 0.0)

    _print_Half = _print_Rational

    def _print_Zero(self, expr):
        return self._literal(0.0)

    def _print_One(self, expr):
        return self._literal(1.0)

    def _print_NegativeOne(self, expr):
        return self._literal(-1.0)

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Symbol(self, expr):
        return expr.name

    def _print_UnevaluatedExpr(self, expr):
        return self._paren(expr.args[0])

    def _print_NumberSymbol(self, expr):
        return self._literal(float(expr))

    def _print_known_const(self, expr):  # pi, E: float literals, not math.pi
        return self._literal(float(expr))

    _print_Pi = _print_Exp1 = _print_EulerGamma = _print_GoldenRatio = _print_NumberSymbol

    def _paren(self, expr) -> str:
        """An operand in parentheses unless it is an atom: printed text is spliced into larger code."""
        code = self._print(expr)
        return code if expr.is_Atom and not (expr.is_Number and expr.is_negative) else f"({code})"

    # -- powers --------------------------------------------------------------------------------------
    def _print_Pow(self, expr, rational=False):
        if expr.is_number:  # sqrt(2), 2**(1/3): a constant, printed as its float value
            return self._literal(float(expr))
        base, exp = expr.as_base_exp()
        b = self.parenthesize(base, precedence(expr))
        if exp.is_Float and float(exp).is_integer():
            exp = sympy.Integer(int(exp))
        if exp.is_Integer and 1 <= abs(int(exp)) <= 8:
            product = "*".join([b] * abs(int(exp)))
            if int(exp) > 0:
                return product if int(exp) == 1 else f"({product})"
            return f"({self._literal(1.0)} / ({product}))"
        if exp == sympy.S.Half:
            return f"{self.sqrt_fn}({self._print(base)})"
        if exp == -sympy.S.Half:
            return f"({self._literal(1.0)} / {self.sqrt_fn}({self._print(base)}))"
        return self._print_general_pow(base, exp)

    def _print_general_pow(self, base, exp):
        raise NotImplementedError

    # -- selection -----------------------------------------------------------------------------------
    def _print_Piecewise(self, expr):
        if expr.args[-1].cond is not sympy.true:
            raise ValueError(f"Piecewise without a default branch cannot be printed: {expr}")
        code = self._default_branch(expr)
        for value, cond in reversed(expr.args[:-1]):
            code = f"{self.where_fn}({self._print(cond)}, {self._print(value)}, {code})"
        return code

    def _default_branch(self, expr) -> str:
        """The code of a Piecewise's last (default) branch."""
        return self._print(expr.args[-1].expr)

    def _print_Where(self, expr):  # optgen.spec.Where: a where() inside a reduction
        condition, if_true, if_false = expr.args
        return self._print_Piecewise(sympy.Piecewise((if_true, condition), (if_false, True), evaluate=False))

    def _known_sign(self, expr):
        """``expr`` over stand-ins that carry what is known of each symbol: the step count is >= 1,
        hyperparameters have their declared ranges (``positive``/``nonnegative`` settings), the rest is real."""
        positive, nonnegative = self._settings["positive"], self._settings["nonnegative"]

        def stand_in(symbol):
            if symbol.name in positive:
                return sympy.Dummy(positive=True)
            if symbol.name in nonnegative:
                return sympy.Dummy(nonnegative=True)
            return sympy.Dummy(real=True)

        return expr.xreplace({s: stand_in(s) for s in expr.free_symbols})

    def _print_Relational(self, expr):
        ops = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
        return f"({self._print(expr.lhs)} {ops[expr.rel_op]} {self._print(expr.rhs)})"

    def _print_And(self, expr):
        return "(" + " & ".join(self._print(a) for a in sorted(expr.args, key=sympy.default_sort_key)) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(self._print(a) for a in sorted(expr.args, key=sympy.default_sort_key)) + ")"

    def _fold(self, fn: str, args) -> str:
        code = self._print(args[0])
        for arg in args[1:]:
            code = fn.format(code, self._print(arg))
        return code


class _FloatPrinter(_FloatRules, PythonCodePrinter):
    """The Python-syntax targets (torch, Triton)."""

    _default_settings = dict(PythonCodePrinter._default_settings, **_SIGN_SETTINGS)

    def __init__(self, settings=None):
        super().__init__(dict(settings or {}, fully_qualified_modules=False))
        # sympy's tables map to math.*; the subclass tables replace them wholesale.
        self.known_functions = dict(type(self).known_functions)

    def _module_format(self, fqn, register=True):
        return fqn


class TritonPrinter(_FloatPrinter):
    """Prints Triton code. Element-wise values are fp32 ``tl`` tensors (``sqrt_rn``: correctly rounded, as
    torch's); with ``scalar=True`` the code is for per-program fp64 scalars, where ``tl.sqrt`` is already
    correctly rounded (``sqrt.rn.f64``)."""

    sqrt_fn = "tl.sqrt_rn"

    def __init__(self, settings=None):
        super().__init__(settings)
        if self._settings["scalar"]:
            self.sqrt_fn = "tl.sqrt"
    where_fn = "tl.where"
    known_functions = {
        "Abs": "tl.abs",
        "exp": "tl.exp",
        "log": "tl.log",
        "floor": "tl.floor",
        "ceiling": "tl.ceil",
        "sin": "tl.sin",
        "cos": "tl.cos",
    }

    def _print_general_pow(self, base, exp):
        # Triton has no ``**`` on tensors and libdevice.pow does not run in the interpreter: exp2/log2 of
        # |base|, with the sign restored for odd integer exponents -- the real power torch.pow and C's pow
        # give: a negative base to an integer-valued exponent is real (g**p with p = 2.0, g**t), to any other
        # exponent NaN; anything to the power 0 is 1. What the declared ranges rule out is not guarded
        # (beta**t: beta >= 0, t >= 1 is plain exp2(t*log2(beta)), 0 for beta = 0).
        b, e = self._paren(base), self._paren(exp)
        magnitude = f"tl.exp2({e} * tl.log2(tl.abs({self._print(base)})))"
        if exp.is_Integer:
            return f"tl.where({b} < 0.0, -{magnitude}, {magnitude})" if int(exp) % 2 else magnitude
        plain = f"tl.exp2({e} * tl.log2({self._print(base)}))"
        base_sign, exp_sign = self._known_sign(base), self._known_sign(exp)
        zero_power = f"tl.where({e} == 0.0, 1.0, {{}})"  # 0**0 = 1 where exp2(0 * log2(0)) is NaN
        if exp.is_number or base_sign.is_positive:  # a constant non-integer exponent: NaN for a base < 0
            return plain
        if base_sign.is_nonnegative:
            return plain if exp_sign.is_nonzero else zero_power.format(plain)
        odd = f"({e} - 2.0 * tl.floor(0.5 * {e}) == 1.0)"
        negative = f"tl.where({e} == tl.floor({e}), tl.where({odd}, -{magnitude}, {magnitude}), float('nan'))"
        signed = f"tl.where({b} < 0.0, {negative}, {magnitude})"
        return signed if exp_sign.is_nonzero else zero_power.format(signed)

    def _print_Max(self, expr):
        return self._fold("tl.maximum({}, {}, propagate_nan=tl.PropagateNan.ALL)", expr.args)

    def _print_Min(self, expr):
        return self._fold("tl.minimum({}, {}, propagate_nan=tl.PropagateNan.ALL)", expr.args)

    def _print_sign(self, expr):
        x = self._paren(expr.args[0])
        # 0 for 0 and for NaN, as torch.sign does
        return f"tl.where({x} > 0.0, 1.0, tl.where({x} < 0.0, -1.0, 0.0))"

    def _print_Mod(self, expr):
        # Python's convention (the result has the divisor's sign), not C's fmod
        a, b = (self._paren(x) for x in expr.args)
        return f"({a} - {b} * tl.floor({a} / {b}))"

    def _print_Not(self, expr):
        return f"({self._print(expr.args[0])} == 0)"

    # And/Or as selections: ``&`` of an element-wise and a per-program comparison (g > 0 and lr > 0.05) is
    # refused by the interpreter (numpy's bitwise_and of a bool array and a bool scalar); where() broadcasts,
    # and the compiler turns a select of booleans back into and/or.
    def _print_And(self, expr):
        return self._selections(expr, "tl.where({}, {}, False)")

    def _print_Or(self, expr):
        return self._selections(expr, "tl.where({0}, True, {1})")

    def _selections(self, expr, form: str) -> str:
        """The operands in canonical order, each selecting between the rest and its short-circuit value."""
        args = sorted(expr.args, key=sympy.default_sort_key)
        code = self._print(args[-1])
        for arg in reversed(args[:-1]):
            code = form.format(self._print(arg), code)
        return code


class TorchPrinter(_FloatPrinter):
    """Prints torch code; every symbol is a tensor (0-d for scalars), constants are Python floats.

    Element-wise code computes in the module's ``dtype`` (fp32, fp64 for fp64 parameters); with
    ``scalar=True`` the code is for per-step scalars, computed in fp64 like torch.optim's Python floats."""

    sqrt_fn = "torch.sqrt"
    where_fn = "torch.where"

    def _default_branch(self, expr) -> str:
        default = expr.args[-1].expr
        if len(expr.args) < 2 or not all(value.is_number for value, _ in expr.args):
            return self._print(default)
        # torch.where of Python floats only makes a tensor of torch's default dtype (fp32): the default
        # branch is made in the compute dtype so the others promote to it
        dtype = "torch.float64" if self._settings["scalar"] else "dtype"
        return f"torch.full_like({self._print(expr.args[0].cond)}, {self._print(default)}, dtype={dtype})"
    known_functions = {
        "Abs": "torch.abs",
        "sign": "torch.sign",
        "exp": "torch.exp",
        "log": "torch.log",
        "floor": "torch.floor",
        "ceiling": "torch.ceil",
        "sin": "torch.sin",
        "cos": "torch.cos",
    }

    def _print_general_pow(self, base, exp):
        return f"torch.pow({self._print(base)}, {self._print(exp)})"

    def _minmax(self, expr, fn, bound):
        numbers = [a for a in expr.args if a.is_number]
        others = [a for a in expr.args if not a.is_number]
        code = self._fold(fn + "({}, {})", others)
        for number in numbers:  # torch.maximum takes tensors only; clamp takes a Python bound
            code = f"torch.clamp({code}, {bound}={self._print(number)})"
        return code

    def _print_Max(self, expr):
        return self._minmax(expr, "torch.maximum", "min")

    def _print_Min(self, expr):
        return self._minmax(expr, "torch.minimum", "max")

    def _print_Mod(self, expr):
        a, b = (self._print(x) for x in expr.args)
        return f"torch.remainder({a}, {b})"

    def _print_Not(self, expr):
        return f"torch.logical_not({self._print(expr.args[0])})"

    def _print_sign(self, expr):
        return f"torch.sign({self._print(expr.args[0])})"


class CPrinter(_FloatRules, C99CodePrinter):
    """Prints C99 for the C target (``templates/c_module.c.j2``).

    Element-wise code computes in ``real`` (the template's typedef: float, double for fp64 parameters):
    constants print as ``OG_R(0.9)``, a cast to ``real``, so ``0.9 * x`` stays single precision as in torch;
    with ``scalar=True`` the code is for per-step fp64 scalars and constants are plain doubles. Functions are
    the type-generic ones of ``<tgmath.h>`` (``sqrt`` is ``sqrtf`` on floats, correctly rounded, vectorised with
    ``-fno-math-errno``); ``pow`` is C's, which is the real power torch.pow gives. ``OG_WHERE``, ``OG_MAX``,
    ``OG_MIN`` and ``OG_SIGN`` are the template's macros (NaN-propagating max/min, torch's sign). ``prefix``
    is prepended to every name (the template names per-program fp64 values ``d_<name>``)."""

    _default_settings = dict(C99CodePrinter._default_settings, **_SIGN_SETTINGS, prefix="", strict=True)
    sqrt_fn = "sqrt"
    where_fn = "OG_WHERE"
    known_functions = {
        "Abs": "fabs",
        "exp": "exp",
        "log": "log",
        "floor": "floor",
        "ceiling": "ceil",
        "sin": "sin",
        "cos": "cos",
    }

    def __init__(self, settings=None):
        super().__init__(settings)
        self.known_functions = dict(type(self).known_functions)

    def _literal(self, value: float) -> str:
        if math.isnan(value):
            text = "NAN"
        elif math.isinf(value):
            text = "INFINITY" if value > 0 else "(-INFINITY)"
        else:
            text = repr(value)
        return text if self._settings["scalar"] else f"OG_R({text})"

    # names the generated C declares or calls itself: a spec symbol of that name would shadow them
    _taken_names = frozenset({"real", "sqrt", "pow", "fabs", "exp", "log", "floor", "ceil", "sin", "cos", "NAN", "INFINITY"})

    @classmethod
    def name_problem(cls, name: str, names: frozenset = frozenset()) -> str | None:
        reserved = (
            name in cls.reserved_words
            or name in cls._taken_names
            or name.startswith(("OG_", "og_"))  # the template's macros, types and helpers
            or name.endswith("_t")  # C's and POSIX's type names (int64_t, intptr_t, ...)
            or (len(name) > 1 and name.isupper())  # the macro name space (HUGE_VAL, EOF, M_PI ...)
        )
        if reserved:
            return f"the name {name!r} is reserved in C (the C kernels could not declare it): rename it"
        if name.startswith("d_") and (name[2:] in names or name[2:] == "t"):
            # the template declares each per-program value x as d_x
            return f"the name {name!r} collides with the C kernels' name for {name[2:]!r}: rename it"
        return None

    def _print_Symbol(self, expr):
        problem = self.name_problem(expr.name)
        if problem:
            raise ValueError(problem)
        return self._settings["prefix"] + expr.name

    def _print_BooleanTrue(self, expr):
        return "1"

    def _print_BooleanFalse(self, expr):
        return "0"

    def _print_Function(self, expr):
        name = self.known_functions.get(type(expr).__name__)
        if name is None:
            raise ValueError(f"the C printer cannot express {type(expr).__name__}: {expr}")
        return f"{name}({', '.join(self._print(a) for a in expr.args)})"

    _print_Abs = _print_exp = _print_log = _print_floor = _print_ceiling = _print_sin = _print_cos = _print_Function

    def _print_general_pow(self, base, exp):
        return f"pow({self._print(base)}, {self._print(exp)})"

    def _print_Max(self, expr):
        return self._fold("OG_MAX({}, {})", expr.args)

    def _print_Min(self, expr):
        return self._fold("OG_MIN({}, {})", expr.args)

    def _print_sign(self, expr):
        return f"OG_SIGN({self._print(expr.args[0])})"

    def _print_Mod(self, expr):
        # Python's convention (the result has the divisor's sign), not C's fmod
        a, b = (self._paren(x) for x in expr.args)
        return f"({a} - {b} * floor({a} / {b}))"

    def _print_And(self, expr):
        return "(" + " && ".join(self._print(a) for a in sorted(expr.args, key=sympy.default_sort_key)) + ")"

    def _print_Or(self, expr):
        return "(" + " || ".join(self._print(a) for a in sorted(expr.args, key=sympy.default_sort_key)) + ")"

    def _print_Not(self, expr):
        return f"(!{self._paren(expr.args[0])})"


def triton_code(expr, scalar: bool = False, **settings) -> str:
    return TritonPrinter({"scalar": scalar, **settings}).doprint(expr)


def torch_code(expr, scalar: bool = False) -> str:
    return TorchPrinter({"scalar": scalar}).doprint(expr)


def c_code(expr, scalar: bool = False, **settings) -> str:
    return CPrinter({"scalar": scalar, **settings}).doprint(expr)
