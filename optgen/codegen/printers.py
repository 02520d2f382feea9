"""Printers: the only code that turns sympy expressions into source.

Both targets compute in fp32 and share sympy's Python code printer; each is a subclass with a function
table and one override per construct where the target's semantics differ from Python's:

* numbers print as float literals (``1`` -> ``1.0``, ``1/3`` -> ``0.3333333333333333``): Triton follows C,
  where ``1/3`` between integers is integer division;
* small integer powers print as products, ``x**0.5`` as the target's correctly rounded square root,
  ``x**-1`` as a division; other powers as ``exp2(e*log2(b))`` in Triton (no ``**`` on tensors there);
* ``Piecewise`` prints as nested ``where``; ``Max``/``Min`` propagate NaN like torch's ``maximum``;
* ``Mod`` follows Python's sign convention (the divisor's sign), not C's ``fmod``.
"""

from __future__ import annotations

import sympy
from sympy.printing.precedence import precedence
from sympy.printing.pycode import PythonCodePrinter


class _FloatPrinter(PythonCodePrinter):
    """Shared rules: fp32 float literals, names printed as they are, powers by a common decomposition."""

    sqrt_fn = ""
    where_fn = ""
    known_functions: dict[str, str] = {}

    def __init__(self, settings=None):
        super().__init__(dict(settings or {}, fully_qualified_modules=False))
        # sympy's tables map to math.*; the subclass tables replace them wholesale.
        self.known_functions = dict(type(self).known_functions)

    def _module_format(self, fqn, register=True):
        return fqn

    # -- numbers -------------------------------------------------------------------------------------
    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Integer(self, expr):
        return repr(float(int(expr)))

    def _print_Rational(self, expr):
        return repr(float(expr.p) / float(expr.q))

    _print_Half = _print_Rational

    def _print_Zero(self, expr):
        return "0.0"

    def _print_One(self, expr):
        return "1.0"

    def _print_NegativeOne(self, expr):
        return "-1.0"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Symbol(self, expr):
        return expr.name

    def _print_UnevaluatedExpr(self, expr):
        return self._paren(expr.args[0])

    def _print_NumberSymbol(self, expr):
        return repr(float(expr))

    def _print_known_const(self, expr):  # pi, E: float literals, not math.pi
        return repr(float(expr))

    _print_Pi = _print_Exp1 = _print_EulerGamma = _print_GoldenRatio = _print_NumberSymbol

    def _paren(self, expr) -> str:
        """An operand in parentheses unless it is an atom: printed text is spliced into larger code."""
        code = self._print(expr)
        return code if expr.is_Atom and not (expr.is_Number and expr.is_negative) else f"({code})"

    # -- powers --------------------------------------------------------------------------------------
    def _print_Pow(self, expr, rational=False):
        if expr.is_number:  # sqrt(2), 2**(1/3): a constant, printed as its float value
            return repr(float(expr))
        base, exp = expr.as_base_exp()
        b = self.parenthesize(base, precedence(expr))
        if exp.is_Float and float(exp).is_integer():
            exp = sympy.Integer(int(exp))
        if exp.is_Integer and 1 <= abs(int(exp)) <= 8:
            product = "*".join([b] * abs(int(exp)))
            if int(exp) > 0:
                return product if int(exp) == 1 else f"({product})"
            return f"(1.0 / ({product}))"
        if exp == sympy.S.Half:
            return f"{self.sqrt_fn}({self._print(base)})"
        if exp == -sympy.S.Half:
            return f"(1.0 / {self.sqrt_fn}({self._print(base)}))"
        return self._print_general_pow(base, exp)

    def _print_general_pow(self, base, exp):
        raise NotImplementedError

    # -- selection -----------------------------------------------------------------------------------
    def _print_Piecewise(self, expr):
        if expr.args[-1].cond is not sympy.true:
            raise ValueError(f"Piecewise without a default branch cannot be printed: {expr}")
        code = self._print(expr.args[-1].expr)
        for value, cond in reversed(expr.args[:-1]):
            code = f"{self.where_fn}({self._print(cond)}, {self._print(value)}, {code})"
        return code

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


class TritonPrinter(_FloatPrinter):
    """Prints Triton code. Element-wise values are fp32 ``tl`` tensors (``sqrt_rn``: correctly rounded, as
    torch's); with ``scalar=True`` the code is for per-program fp64 scalars, where ``tl.sqrt`` is already
    correctly rounded (``sqrt.rn.f64``)."""

    _default_settings = dict(_FloatPrinter._default_settings, scalar=False)
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
        # |base|, with the sign restored for odd integer exponents; other exponents need a base > 0 (as
        # beta ** t has), like C's pow.
        if exp.is_Integer:
            magnitude = f"tl.exp2({self._paren(exp)} * tl.log2(tl.abs({self._print(base)})))"
            if int(exp) % 2:
                return f"tl.where({self._paren(base)} < 0.0, -{magnitude}, {magnitude})"
            return magnitude
        return f"tl.exp2({self._paren(exp)} * tl.log2({self._print(base)}))"

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


class TorchPrinter(_FloatPrinter):
    """Prints fp32 torch code; every symbol is a tensor (0-d for scalars), constants are Python floats."""

    sqrt_fn = "torch.sqrt"
    where_fn = "torch.where"
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


def triton_code(expr, scalar: bool = False) -> str:
    return TritonPrinter({"scalar": scalar}).doprint(expr)


def torch_code(expr) -> str:
    return TorchPrinter().doprint(expr)
