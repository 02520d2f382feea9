"""The printers: exact strings for each construct, and the printed code evaluated -- Triton inside a tiny
@triton.jit kernel under the interpreter, torch with fp32 tensors -- against float64 math."""

import importlib.util
import itertools
import math

import numpy as np
import pytest
import sympy
import torch

from optgen.codegen.printers import TorchPrinter, TritonPrinter, torch_code, triton_code

x, y, z = sympy.symbols("x y z", real=True)

# Operands (fp32-exact). Mod gets negative dividends and divisors; pow and sqrt positive bases.
ANY = [-3.5, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0, 7.25]
ANY_Y = [2.0, -3.0, 0.75, 4.0, -0.5, 1.0, 2.0, -2.5]
POS = [0.5, 1.0, 2.0, 3.75, 1e-3, 100.0, 0.125, 9.0]
POS_Y = [2.0, 0.5, -1.5, 3.0, 0.25, -0.5, 1.0, 2.5]
NONZERO_Y = [2.0, -3.0, 0.75, 4.0, -0.5, 1.0, 3.0, -2.5]
Z = [1.0, -2.0, 0.5, 3.0, -0.25, 2.0, -1.0, 0.0]
# a symbolic power: negative bases to integer and fractional powers, 0**0, 0**2, 0**-1
POW_X = [-2.0, -2.0, -0.5, 0.0, 0.0, 0.0, 1.5, 3.0]
POW_Y = [2.0, 3.0, 0.5, 0.0, 2.0, -1.0, -1.5, 0.25]


def _real_pow(a, b):
    """The real power, as torch.pow and C's pow: NaN for a negative base to a non-integer power."""
    if a < 0 and not float(b).is_integer():
        return math.nan
    if a == 0 and b < 0:
        return math.inf
    return a**b


def _sign(v):
    return (v > 0) - (v < 0)


# name: (expression, Triton string, torch string, float64 reference, (x, y, z) operands)
CASES = {
    "square": (x**2, "(x*x)", "(x*x)", lambda a, b, c: a * a, (ANY, ANY_Y, Z)),
    "cube": (x**3, "(x*x*x)", "(x*x*x)", lambda a, b, c: a**3, (ANY, ANY_Y, Z)),
    "reciprocal": (1 / x, "(1.0 / (x))", "(1.0 / (x))", lambda a, b, c: 1 / a, (POS, POS_Y, Z)),
    "inverse_square": (x**-2, "(1.0 / (x*x))", "(1.0 / (x*x))", lambda a, b, c: a**-2, (ANY_Y, ANY, Z)),
    "sqrt": (sympy.sqrt(x), "tl.sqrt_rn(x)", "torch.sqrt(x)", lambda a, b, c: math.sqrt(a), (POS, POS_Y, Z)),
    "rsqrt": (x ** sympy.Rational(-1, 2), "(1.0 / tl.sqrt_rn(x))", "(1.0 / torch.sqrt(x))",
              lambda a, b, c: a**-0.5, (POS, POS_Y, Z)),
    "pow_float": (x**1.5, "tl.exp2(1.5 * tl.log2(x))", "torch.pow(x, 1.5)", lambda a, b, c: a**1.5, (POS, POS_Y, Z)),
    "pow_symbol": (x**y, "tl.where(y == 0.0, 1.0, tl.where(x < 0.0, tl.where(y == tl.floor(y), tl.where((y - 2.0 * "
                   "tl.floor(0.5 * y) == 1.0), -tl.exp2(y * tl.log2(tl.abs(x))), tl.exp2(y * tl.log2(tl.abs(x)))), "
                   "float('nan')), tl.exp2(y * tl.log2(tl.abs(x)))))", "torch.pow(x, y)", lambda a, b, c: _real_pow(a, b),
                   (POW_X, POW_Y, Z)),
    "pow_third": (x ** sympy.Rational(1, 3), "tl.exp2(0.3333333333333333 * tl.log2(x))",
                  "torch.pow(x, 0.3333333333333333)", lambda a, b, c: a ** (1 / 3), (POS, POS_Y, Z)),
    "rational": (sympy.Rational(1, 3), "0.3333333333333333", "0.3333333333333333", lambda a, b, c: 1 / 3,
                 (ANY, ANY_Y, Z)),
    "rational_times": (x / 3, "(0.3333333333333333)*x", "(0.3333333333333333)*x",
                       lambda a, b, c: a / 3, (ANY, ANY_Y, Z)),
    "integer": (sympy.Integer(2), "2.0", "2.0", lambda a, b, c: 2.0, (ANY, ANY_Y, Z)),
    "integer_times": (2 * x + 1, "2.0*x + 1.0", "2.0*x + 1.0", lambda a, b, c: 2 * a + 1, (ANY, ANY_Y, Z)),
    "max": (sympy.Max(x, y), "tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)", "torch.maximum(x, y)",
            lambda a, b, c: max(a, b), (ANY, ANY_Y, Z)),
    "min_const": (sympy.Min(x, 1), "tl.minimum(1.0, x, propagate_nan=tl.PropagateNan.ALL)",
                  "torch.clamp(x, max=1.0)", lambda a, b, c: min(a, 1.0), (ANY, ANY_Y, Z)),
    "max3": (sympy.Max(x, y, z),
             "tl.maximum(tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL), z, propagate_nan=tl.PropagateNan.ALL)",
             "torch.maximum(torch.maximum(x, y), z)", lambda a, b, c: max(a, b, c), (ANY, ANY_Y, Z)),
    "piecewise": (sympy.Piecewise((x, x > 0), (y, True)), "tl.where((x > 0.0), x, y)", "torch.where((x > 0.0), x, y)",
                  lambda a, b, c: a if a > 0 else b, (ANY, ANY_Y, Z)),
    "piecewise3": (sympy.Piecewise((x, y > 1), (z, y < 0), (x * z, True)),
                   "tl.where((y > 1.0), x, tl.where((y < 0.0), z, x*z))",
                   "torch.where((y > 1.0), x, torch.where((y < 0.0), z, x*z))",
                   lambda a, b, c: a if b > 1 else (c if b < 0 else a * c), (ANY, ANY_Y, Z)),
    "sign": (sympy.sign(x), "tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))", "torch.sign(x)",
             lambda a, b, c: _sign(a), (ANY, ANY_Y, Z)),
    "abs": (sympy.Abs(x), "tl.abs(x)", "torch.abs(x)", lambda a, b, c: abs(a), (ANY, ANY_Y, Z)),
    "mod": (sympy.Mod(x, y), "(x - y * tl.floor(x / y))", "torch.remainder(x, y)", lambda a, b, c: a % b,
            (ANY, NONZERO_Y, Z)),
    "eq": (sympy.Eq(x, y), "(x == y)", "(x == y)", lambda a, b, c: a == b, (ANY, ANY_Y, Z)),
    "ne": (sympy.Ne(x, y), "(x != y)", "(x != y)", lambda a, b, c: a != b, (ANY, ANY_Y, Z)),
    "and": (sympy.And(x > 0, y > 0), "tl.where((x > 0.0), (y > 0.0), False)", "((x > 0.0) & (y > 0.0))",
            lambda a, b, c: a > 0 and b > 0, (ANY, ANY_Y, Z)),
    "or": (sympy.Or(x > 0, y < 0), "tl.where((x > 0.0), True, (y < 0.0))", "((x > 0.0) | (y < 0.0))",
           lambda a, b, c: a > 0 or b < 0, (ANY, ANY_Y, Z)),
    "where_and": (sympy.Piecewise((x, sympy.And(x > 0, y > 0)), (z, True)),
                  "tl.where(tl.where((x > 0.0), (y > 0.0), False), x, z)", "torch.where(((x > 0.0) & (y > 0.0)), x, z)",
                  lambda a, b, c: a if (a > 0 and b > 0) else c, (ANY, ANY_Y, Z)),
}
BOOLEAN = {"eq", "ne", "and", "or"}


# --------------------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------------------

KERNEL_TEMPLATE = '''\
import triton
import triton.language as tl


@triton.jit
def kernel(X, Y, Z, OUT, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=1.0)
    y = tl.load(Y + offs, mask=mask, other=1.0)
    z = tl.load(Z + offs, mask=mask, other=1.0)
    out = {body}
    tl.store(OUT + offs, out, mask=mask)
'''


class TritonEvaluator:
    """Templates printed Triton code into a kernel file (triton.jit reads its source from a file) and runs it."""

    def __init__(self, directory):
        self.directory = directory
        self.kernels = {}
        self.count = itertools.count()

    def kernel(self, code, boolean):
        key = (code, boolean)
        if key not in self.kernels:
            body = f"tl.where({code}, 1.0, 0.0)" if boolean else f"({code}) + tl.zeros([BLOCK], tl.float32)"
            name = f"printed_kernel_{next(self.count)}"
            path = self.directory / f"{name}.py"
            path.write_text(KERNEL_TEMPLATE.format(body=body))
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self.kernels[key] = module.kernel
        return self.kernels[key]

    def __call__(self, code, operands, boolean=False):
        xs = [torch.tensor(v, dtype=torch.float32) for v in operands]
        out = torch.full_like(xs[0], float("nan"))
        self.kernel(code, boolean)[(1,)](*xs, out, len(out), BLOCK=16)
        return out


@pytest.fixture(scope="module")
def triton_eval(tmp_path_factory):
    return TritonEvaluator(tmp_path_factory.mktemp("printed_kernels"))


def torch_eval(code, operands, boolean=False):
    env = {"torch": torch}
    env.update({name: torch.tensor(v, dtype=torch.float32) for name, v in zip("xyz", operands)})
    out = eval(code, env)  # printer output over x, y, z only
    out = torch.as_tensor(out)
    if boolean:
        out = out.to(torch.float32)
    return torch.broadcast_to(out, (len(operands[0]),)).to(torch.float32)


def reference(fn, operands):
    return torch.tensor([float(fn(*vals)) for vals in zip(*operands)], dtype=torch.float64)


def assert_matches(actual, expected, rtol):
    actual = actual.to(torch.float64)
    assert torch.allclose(actual, expected, rtol=rtol, atol=1e-6, equal_nan=True), (
        f"\nactual   {actual.tolist()}\nexpected {expected.tolist()}"
    )


def _rtol(name):
    # exp2(e*log2(b)) in fp32: relative error ~ |e*log2(b)| * 2**-24 plus the two rounded functions
    return 1e-5 if name.startswith("pow") else 1e-6


# --------------------------------------------------------------------------------------------------
# Exact strings
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_triton_string(name):
    expr, expected, _, _, _ = CASES[name]
    assert triton_code(expr) == expected
    assert TritonPrinter().doprint(expr) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_torch_string(name):
    expr, _, expected, _, _ = CASES[name]
    assert torch_code(expr) == expected
    assert TorchPrinter().doprint(expr) == expected


def test_symbolic_power_guards_only_what_the_signs_leave_open():
    # beta**t with beta >= 0 declared and t >= 1: no guard; a positive base: none either
    assert triton_code(x**y, positive=frozenset({"y"}), nonnegative=frozenset({"x"})) == "tl.exp2(y * tl.log2(x))"
    assert triton_code(x**y, positive=frozenset({"x"})) == "tl.exp2(y * tl.log2(x))"
    assert triton_code((1 + x**2) ** y) == "tl.exp2(y * tl.log2((x*x) + 1.0))"
    # a base >= 0 to an exponent that may be 0: 0**0 = 1
    assert triton_code(x**y, nonnegative=frozenset({"x"})) == "tl.where(y == 0.0, 1.0, tl.exp2(y * tl.log2(x)))"


def test_triton_scalar_printer_uses_tl_sqrt():
    assert triton_code(sympy.sqrt(x), scalar=True) == "tl.sqrt(x)"
    assert triton_code(1 / sympy.sqrt(x), scalar=True) == "(1.0 / tl.sqrt(x))"


def test_piecewise_without_default_is_refused():
    with pytest.raises(ValueError, match="default branch"):
        triton_code(sympy.Piecewise((x, x > 0)))


def test_numbers_are_float_literals():
    # Triton follows C: 1/3 between integers would be integer division
    for printer in (triton_code, torch_code):
        assert printer(sympy.Integer(0)) == "0.0"
        assert printer(sympy.Integer(1)) == "1.0"
        assert printer(sympy.Integer(-1)) == "-1.0"
        assert printer(sympy.S.Half) == "0.5"
        assert printer(sympy.Float(0.1)) == "0.1"
        assert printer(sympy.Rational(2, 3)) == repr(2 / 3)


# --------------------------------------------------------------------------------------------------
# Numeric checks against float64
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_triton_numeric(name, triton_eval):
    expr, _, _, fn, operands = CASES[name]
    actual = triton_eval(triton_code(expr), operands, boolean=name in BOOLEAN)
    assert_matches(actual, reference(fn, operands), _rtol(name))


@pytest.mark.parametrize("name", list(CASES))
def test_torch_numeric(name):
    expr, _, _, fn, operands = CASES[name]
    actual = torch_eval(torch_code(expr), operands, boolean=name in BOOLEAN)
    assert_matches(actual, reference(fn, operands), _rtol(name))


def test_mod_follows_python_sign_convention(triton_eval):
    dividends = [-7.0, -7.0, 7.0, 7.0, -0.5, 5.5, -5.5, 0.0]
    divisors = [3.0, -3.0, 3.0, -3.0, 2.0, -2.0, -2.0, -1.0]
    expected = reference(lambda a, b, c: a % b, (dividends, divisors, Z))
    assert expected.tolist() == [2.0, -1.0, 1.0, -2.0, 1.5, -0.5, -1.5, 0.0]  # not C's fmod
    operands = (dividends, divisors, Z)
    assert_matches(triton_eval(triton_code(sympy.Mod(x, y)), operands), expected, 0)
    assert_matches(torch_eval(torch_code(sympy.Mod(x, y)), operands), expected, 0)


@pytest.mark.parametrize("expr", [sympy.Max(x, y), sympy.Min(x, y), sympy.Max(1, x), sympy.Min(x, 1)],
                         ids=["max", "min", "max_const", "min_const"])
def test_max_min_propagate_nan(expr, triton_eval):
    operands = ([float("nan"), 1.0, float("nan"), -2.0], [0.0, float("nan"), float("nan"), 3.0], [0.0] * 4)
    f = sympy.lambdify((x, y), expr, modules="math")
    expected = [float("nan") if (math.isnan(a) or math.isnan(b)) and (expr.has(y) or math.isnan(a)) else f(a, b)
                for a, b in zip(*operands[:2])]
    expected = torch.tensor(expected, dtype=torch.float64)
    assert_matches(triton_eval(triton_code(expr), operands), expected, 1e-6)
    assert_matches(torch_eval(torch_code(expr), operands), expected, 1e-6)


def test_triton_sign_of_nan_is_zero_like_torch(triton_eval):
    operands = ([float("nan"), -0.0, 3.0], [0.0] * 3, [0.0] * 3)
    expected = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert_matches(triton_eval(triton_code(sympy.sign(x)), operands), expected, 0)


def test_sign_of_nan_agrees_between_backends(triton_eval):
    operands = ([float("nan"), -0.0, 3.0], [0.0] * 3, [0.0] * 3)
    triton_value = triton_eval(triton_code(sympy.sign(x)), operands).to(torch.float64)
    torch_value = torch_eval(torch_code(sympy.sign(x)), operands).to(torch.float64)
    assert torch.allclose(triton_value, torch_value, equal_nan=True), (triton_value, torch_value)


# --------------------------------------------------------------------------------------------------
# Compound operands: printed code must keep the expression's grouping
# --------------------------------------------------------------------------------------------------

COMPOUND = {
    "mod_compound": (sympy.Mod(x + 1, y + z), lambda a, b, c: (a + 1) % (b + c), (ANY, ANY_Y, [1.5] * 8)),
    "sign_compound": (sympy.sign(x - 1), lambda a, b, c: _sign(a - 1), (ANY, ANY_Y, Z)),
    "pow_compound_exponent": (x ** (y + 1), lambda a, b, c: a ** (b + 1), (POS, POS_Y, Z)),
    "pow_compound_base": ((x + 1) ** y, lambda a, b, c: (a + 1) ** b, (POS, POS_Y, Z)),
    "pow_integer_5_negative_base": (x**5, lambda a, b, c: a**5, (ANY, ANY_Y, Z)),
    "pow_float_2_negative_base": (x**2.0, lambda a, b, c: a**2, (ANY, ANY_Y, Z)),
}


@pytest.mark.parametrize("name", list(COMPOUND))
def test_triton_compound_numeric(name, triton_eval):
    expr, fn, operands = COMPOUND[name]
    with np.errstate(all="ignore"):
        actual = triton_eval(triton_code(expr), operands)
    assert_matches(actual, reference(fn, operands), 1e-5)


@pytest.mark.parametrize("name", list(COMPOUND))
def test_torch_compound_numeric(name):
    expr, fn, operands = COMPOUND[name]
    assert_matches(torch_eval(torch_code(expr), operands), reference(fn, operands), 1e-5)


def test_torch_constant_sqrt():
    expr = sympy.sqrt(2) * x
    operands = (ANY, ANY_Y, Z)
    assert_matches(torch_eval(torch_code(expr), operands), reference(lambda a, b, c: math.sqrt(2) * a, operands), 1e-6)


def test_triton_constant_sqrt(triton_eval):
    expr = sympy.sqrt(2) * x
    operands = (ANY, ANY_Y, Z)
    assert_matches(triton_eval(triton_code(expr), operands), reference(lambda a, b, c: math.sqrt(2) * a, operands),
                   1e-6)
