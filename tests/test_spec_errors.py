"""Bad specs raise SpecError naming the problem, the user's expression or symbol, and where it was written;
bad constructor arguments and bad input raise before anything changes."""

import math
import os

import pytest
import sympy
import torch
from conftest import make_params

import optgen
from optgen import Hyper, Spec, SpecError
from optgen.spec import NewStateSymbol

HERE = os.path.basename(__file__)


def _spec():
    spec = Spec("Bad")
    lr = spec.hyper(lr=0.1)
    return spec, lr


def _build_raises(make, *fragments, location=True):
    """``make()`` writes a spec and builds it; a SpecError (at the bad line or at build) names ``fragments``."""
    with pytest.raises(SpecError) as info:
        optgen.build(make())
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if location:
        assert HERE in message, f"the message does not say where the spec was written: {message!r}"
    return message


def test_undefined_symbol():
    def make():
        spec, lr = _spec()
        spec.update(spec.param, spec.param - lr * sympy.Symbol("z") * spec.grad)
        return spec

    _build_raises(make, "undefined symbol z", "-g*lr*z + w", "update of the parameter")


def test_update_of_undeclared_state():
    def make():
        spec, lr = _spec()
        spec.update(sympy.Symbol("q"), spec.grad)  # raises here, at the line that is wrong
        spec.update(spec.param, spec.param - lr * spec.grad)
        return spec

    _build_raises(make, "update() of q", "declared state")


def test_state_never_updated():
    def make():
        spec, lr = _spec()
        spec.state("exp_avg")
        spec.update(spec.param, spec.param - lr * spec.grad)
        return spec

    _build_raises(make, "'exp_avg'", "never updated")


def test_parameter_never_updated():
    def make():
        spec, _ = _spec()
        spec.update(spec.state("m"), spec.grad)
        return spec

    _build_raises(make, "never updates the parameter", location=False)


def test_reduction_of_a_reduction():
    def make():
        spec, lr = _spec()
        spec.update(spec.param, spec.param - lr * optgen.norm(optgen.norm(spec.param)) * spec.grad)
        return spec

    _build_raises(make, "LayerSum(LayerSum(w**2))", "reduces a reduction", "reduction of a reduction")


@pytest.mark.parametrize("position", ["numerator", "denominator", "guard 1"])
def test_trust_ratio_of_an_element_wise_value(position):
    """trust_ratio(norm(w), u) with u element-wise would build an element-wise "ratio": refused where written."""

    def make():
        spec, lr = _spec()
        w, g = spec.param, spec.grad
        m = spec.state("m")
        u = spec.update(m, 0.9 * m + g) + w  # a new state value: element-wise too
        args = {"numerator": (u, optgen.norm(g)), "denominator": (optgen.norm(w), u),
                "guard 1": (optgen.norm(w), optgen.norm(u), u)}[position]  # fmt: skip
        spec.update(w, w - lr * optgen.trust_ratio(*args) * u)
        return spec

    _build_raises(make, "trust_ratio()", f"the {position} ", "is element-wise", "per-layer scalar")


def test_trust_ratio_of_per_layer_scalars_builds():
    """Hyperparameters, the step, constants and reductions (per layer or global) are all per-layer scalars."""
    spec, lr = _spec()
    w, g, t = spec.param, spec.grad, spec.step
    ratio = optgen.trust_ratio(lr * optgen.norm(w) + 2**-t, optgen.norm(g) + optgen.global_norm(g), 1e-3 + lr)
    spec.update(w, w - lr * ratio * g)
    optgen.build(spec)


@pytest.mark.parametrize(
    "value",
    [float("nan"), math.inf, -math.inf, Hyper(math.inf), Hyper(float("nan"))],
    ids=["nan", "inf", "-inf", "Hyper(inf)", "Hyper(nan)"],
)
def test_non_finite_default(value):
    def make():
        spec = Spec("Bad")
        lr = spec.hyper(lr=value)
        spec.update(spec.param, spec.param - lr * spec.grad)
        return spec

    _build_raises(make, "'lr'", "not finite")


def test_default_outside_its_range():
    def make():
        spec = Spec("Bad")
        lr = spec.hyper(lr=-0.1)
        spec.update(spec.param, spec.param - lr * spec.grad)
        return spec

    _build_raises(make, "'lr'", "-0.1", "outside its range")


def test_hyperparameter_as_where_condition():
    def make():
        spec, lr = _spec()
        spec.update(spec.param, spec.param - optgen.where(lr, spec.grad, -spec.grad))
        return spec

    _build_raises(make, "hyperparameter lr", "compile-time flag")


def test_hyperparameter_as_raw_piecewise_condition():
    def make():
        spec, lr = _spec()
        spec.update(spec.param, spec.param - sympy.Piecewise((spec.grad, lr), (0, True)))
        return spec

    _build_raises(make, "hyperparameter lr", "compile-time flag")


def test_flag_in_arithmetic():
    def make():
        spec, lr = _spec()
        fancy = spec.flag(fancy=True)
        spec.update(spec.param, spec.param - lr * fancy * spec.grad)
        return spec

    _build_raises(make, "flag fancy", "arithmetic", "-fancy*g*lr + w")


def test_flag_in_where_is_fine():
    spec, lr = _spec()
    fancy = spec.flag(fancy=True)
    spec.update(spec.param, spec.param - lr * optgen.where(fancy, 2 * spec.grad, spec.grad))
    cls = optgen.build(spec)
    for fancy_value, factor in ((True, 2.0), (False, 1.0)):
        (p,) = make_params([(3,)])
        before = p.detach().clone()
        p.grad = torch.ones(3)
        cls([p], lr=0.5, fancy=fancy_value, backend="torch").step()
        assert torch.equal(p.detach(), before - 0.5 * factor)


def test_same_state_updated_twice():
    def make():
        spec, lr = _spec()
        m = spec.state("m")
        spec.update(m, spec.grad)
        spec.update(m, 2 * spec.grad)
        spec.update(spec.param, spec.param - lr * spec.grad)
        return spec

    _build_raises(make, "update() of m", "already updated")


def test_parameter_updated_twice():
    def make():
        spec, lr = _spec()
        spec.update(spec.param, spec.param - lr * spec.grad)
        spec.update(spec.param, spec.param)
        return spec

    _build_raises(make, "update() of param", "already updated")


def test_cycle_between_new_values():
    def make():
        spec, lr = _spec()
        a, b = spec.state("a"), spec.state("b")
        a_new = spec.update(a, NewStateSymbol("b_new") + spec.grad)  # b's new value, before b is updated
        spec.update(b, a_new + spec.grad)
        spec.update(spec.param, spec.param - lr * a_new)
        return spec

    _build_raises(make, "cycle", "a -> b -> a", location=False)


def test_new_value_refers_to_itself():
    def make():
        spec, lr = _spec()
        a = spec.state("a")
        a_new = spec.update(a, NewStateSymbol("a_new") + spec.grad)
        spec.update(spec.param, spec.param - lr * a_new)
        return spec

    _build_raises(make, "refers to itself", "a_new")


def test_state_initial_value_must_not_use_the_gradient():
    def make():
        spec, lr = _spec()
        a = spec.state("a", init=spec.grad)
        spec.update(a, spec.grad)
        spec.update(spec.param, spec.param - lr * a)
        return spec

    _build_raises(make, "'a'", "initial value g")


@pytest.mark.parametrize("name", ["w", "g", "t", "lr", "step", "tmp0", "red_1", "_x", "m_new", "not an id"])
def test_reserved_or_taken_names(name):
    spec, _ = _spec()
    with pytest.raises(SpecError, match="name"):
        spec.state(name)


def test_unknown_flag_in_lower():
    from optgen.ir import lower

    with pytest.raises(SpecError, match="no flag 'nesterov'"):
        lower(optgen.BUILTINS["lamb"](), {"nesterov": True})


# --------------------------------------------------------------------------------------------------
# Constructor errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls", [optgen.SGD, optgen.Adam, optgen.AdamW, optgen.LARS, optgen.LAMB, optgen.NVLAMB], ids=lambda c: c.__name__
)
def test_negative_lr(cls):
    with pytest.raises(ValueError, match=r"Invalid learning rate: -0\.1"):
        cls(make_params([(3,)]), lr=-0.1)


@pytest.mark.parametrize(
    "betas,bad",
    [((0.9, 1.0), r"beta parameter at index 1"), ((-0.1, 0.99), r"beta parameter at index 0"), ((1.5, 0.99), r"beta parameter at index 0"), ((0.9,), "betas")],
)
@pytest.mark.parametrize("cls", [optgen.Adam, optgen.AdamW, optgen.LAMB, optgen.NVLAMB], ids=lambda c: c.__name__)
def test_betas_outside_unit_interval(cls, betas, bad):
    with pytest.raises(ValueError, match=f"Invalid {bad}"):
        cls(make_params([(3,)]), betas=betas)


def test_bad_values_in_a_param_group():
    (p,) = make_params([(3,)])
    with pytest.raises(ValueError, match="Invalid weight_decay value"):
        optgen.AdamW([dict(params=[p], weight_decay=-1.0)])
    with pytest.raises(ValueError, match="Invalid epsilon value"):
        optgen.LAMB([dict(params=[p], eps=float("inf"))])
    with pytest.raises(ValueError, match="Invalid layer_adaptation value"):
        optgen.LAMB([dict(params=[p], layer_adaptation=0.5)])
    with pytest.raises(ValueError, match="Invalid max_grad_norm value"):
        optgen.NVLAMB([p], max_grad_norm=0.0)


@pytest.mark.parametrize(
    "kwargs", [dict(momentum=0.0), dict(momentum=0.9, dampening=0.1)], ids=["no_momentum", "dampening"]
)
def test_sgd_bad_nesterov(kwargs):
    params = make_params([(3,)])
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
        optgen.SGD(params, lr=0.1, nesterov=True, **kwargs)
    # also when a param group brings the bad combination
    opt = optgen.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
        opt.add_param_group(dict(params=make_params([(2,)]), **kwargs))
    optgen.SGD(params, lr=0.1, nesterov=False, **kwargs)  # fine without nesterov


def test_flags_and_backend_checked():
    params = make_params([(3,)])
    with pytest.raises(ValueError, match="Invalid bias_correction value"):
        optgen.LAMB(params, bias_correction=0.5)  # flags take True/False (or 1/0, as torch.optim's do)
    with pytest.raises(ValueError, match="Invalid bias_correction value: 'yes'"):
        optgen.LAMB(params, bias_correction="yes")
    with pytest.raises(ValueError, match="Invalid backend"):
        optgen.LAMB(params, backend="cuda")
    with pytest.raises(TypeError):
        optgen.LAMB(params, momentum=0.9)  # not an argument of LAMB


def test_empty_param_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        optgen.AdamW([])


def test_integer_and_bool_parameters_rejected():
    """torch.optim fails at the first step with an integer gradient; optgen says so when the group is added."""
    for dtype in (torch.int64, torch.bool):
        with pytest.raises(TypeError, match=f"floating point and complex tensors, got one of dtype {dtype}"):
            optgen.AdamW([torch.zeros(3, dtype=dtype)])


# --------------------------------------------------------------------------------------------------
# Bad input at step time raises before anything changes
# --------------------------------------------------------------------------------------------------


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


@pytest.mark.parametrize("cls", [optgen.AdamW, optgen.LAMB], ids=lambda c: c.__name__)
def test_sparse_gradient_raises_before_anything_changes(cls, backend):
    params = make_params([(4,), (5, 3), (7,)], zero=())
    opt = cls(params, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()  # states exist now
    values, states = _snapshot(opt, params)
    for p in params:
        p.grad = torch.randn(p.shape)
    params[1].grad = torch.randn(5, 3).to_sparse()  # the first parameter's gradient is fine: still nothing moves
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), values[i])
        assert set(opt.state[p]) == set(states[i])
        for k, v in states[i].items():
            assert torch.equal(opt.state[p][k], v), (i, k)


def test_sparse_gradient_on_first_step_creates_no_state(backend):
    params = make_params([(4,), (5, 3)], zero=())
    values = [p.detach().clone() for p in params]
    opt = optgen.AdamW(params, backend=backend)
    params[0].grad = torch.randn(4)
    params[1].grad = torch.randn(5, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))


@pytest.mark.parametrize(
    "cls,key,value,message",
    [
        (
            optgen.NVLAMB,
            "max_grad_norm",
            0.0,
            r"Invalid max_grad_norm value: 0\.0 \(must be in \(0\.0, inf\]\) \(param group 1, at step\)",
        ),
        (optgen.AdamW, "lr", -1e-3, r"Invalid learning rate: -0\.001 .*\(param group 1, at step\)"),
        (optgen.AdamW, "betas", (0.9, 1.0), r"Invalid beta parameter at index 1: 1\.0 .*\(param group 1, at step\)"),
        (optgen.LAMB, "layer_adaptation", 0.5, r"Invalid layer_adaptation value"),
        (
            optgen.SGD,
            "dampening",
            0.5,
            r"Nesterov momentum requires a momentum and zero dampening \(param group 1, at step\)",
        ),
    ],
    ids=["nvlamb_max_grad_norm", "adamw_lr", "adamw_betas", "lamb_flag", "sgd_requirement"],
)
def test_values_changed_between_steps_are_checked_before_anything_changes(cls, key, value, message, backend):
    """A scheduler or the user may set any value between steps: the kernels rely on the declared ranges (a
    power of a base declared positive, a requirement such as Nesterov's), so step() checks the values again
    when they changed, and a bad one raises before any parameter, state or step count moves."""
    params = make_params([(4,), (5, 3), (7,)], zero=())
    kwargs = dict(lr=0.1, momentum=0.9, nesterov=True) if cls is optgen.SGD else dict(lr=0.1)
    opt = cls([dict(params=params[:1]), dict(params=params[1:])], backend=backend, **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    values, states = _snapshot(opt, params)
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=message):
        opt.step()
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), values[i])
        for k, v in states[i].items():
            assert torch.equal(opt.state[p][k], v), (i, k)
    opt.param_groups[1][key] = good  # set back: the step runs again
    opt.step()
    assert not torch.equal(params[1].detach(), values[1])


def test_unchanged_values_are_checked_once(backend, monkeypatch):
    params = make_params([(4,), (5, 3)], zero=())
    opt = optgen.LAMB(params, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    calls = []
    original = type(opt)._check_requirements
    monkeypatch.setattr(type(opt), "_check_requirements", lambda self, *a: calls.append(a) or original(self, *a))
    opt.step()
    opt.step()
    assert calls == []  # nothing changed: no sympy work per step
    opt.param_groups[0]["lr"] = 0.05  # what a scheduler does
    opt.step()
    assert len(calls) == 1
    lr = torch.tensor(0.02)  # a tensor lr is never read on the host: checked by shape only, kept by identity
    opt.param_groups[0]["lr"] = lr
    opt.step()
    lr.fill_(0.01)
    opt.step()
    assert len(calls) == 2


def test_triton_on_cpu_without_interpreter_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        optgen.AdamW(make_params([(3,)]), backend="triton")


def test_triton_on_cpu_without_interpreter_function(monkeypatch):
    from optgen.runtime import backends

    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        optgen.LAMB(make_params([(3,)]), backend="triton")
    optgen.LAMB(make_params([(3,)]), backend="auto")  # auto picks the C kernels on CPU
    optgen.LAMB(make_params([(3,)]), backend="torch")


def test_triton_interpreter_turned_off_before_step(monkeypatch):
    params = make_params([(3,)], zero=())
    before = params[0].detach().clone()
    opt = optgen.AdamW(params, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "")
    params[0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        opt.step()
    assert torch.equal(params[0].detach(), before)


@pytest.mark.parametrize("cls", [optgen.LAMB, optgen.LARS], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "clip,message",
    [((math.inf, math.inf), r"Invalid trust_clip\[0\] value: inf \(must be finite\)"),
     ((5.0, 1.0), r"trust_clip=\(lo, hi\) needs lo <= hi"),
     ((-1.0, 2.0), r"Invalid trust_clip\[0\] value: -1\.0")],
)  # fmt: skip
def test_trust_clip_bounds(cls, clip, message):
    """An infinite lower bound turned every parameter into -inf; lo > hi clipped nothing sensible."""
    with pytest.raises(ValueError, match=message):
        cls(make_params([(3,)]), trust_clip=clip)
    cls(make_params([(3,)]), trust_clip=(1.0, 1.0))  # a fixed phi is fine
    cls(make_params([(3,)]), trust_clip=(0.5, math.inf))


def test_a_parameter_twice_in_one_group_warns_like_torch_and_steps_once(backend):
    """torch warns (and its for-loop steps the tensor twice); optgen warns with torch's message and keeps the
    parameter once: one launch updates each tensor once."""
    (p,) = make_params([(3,)])
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        opt = optgen.AdamW([p, p], backend=backend)
    assert opt.param_groups[0]["params"] == [p]
    twin = p.detach().clone().requires_grad_()
    reference = torch.optim.AdamW([twin])
    p.grad, twin.grad = torch.ones(3), torch.ones(3)
    opt.step()
    reference.step()
    torch.testing.assert_close(p, twin)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt.add_param_group(dict(params=[q := make_params([(2,)])[0], q]))
    assert opt.param_groups[1]["params"] == [q]


@pytest.mark.parametrize(
    "constant,message",
    [(sympy.exp(1000), r"the constant exp\(1000\) does not fit in float64"),
     (sympy.Integer(10) ** 400, r"the constant 10000000000000000000\.\.\. \(401 characters\) does not fit in float64"),
     (sympy.Integer(2) ** 1024, "does not fit in float64")],
)  # fmt: skip
def test_constants_beyond_float64_are_spec_errors(constant, message):
    """sympy holds them exactly; the generated code printed inf (a NameError at the first step) or overflowed."""

    def make():
        spec, lr = _spec()
        spec.update(spec.param, spec.param - lr * spec.grad / (1 + constant * spec.grad**2))
        return spec

    with pytest.raises(SpecError, match=message):
        optgen.build(make())


def test_a_tiny_rational_constant_rounds_to_zero_on_both_backends(backend):
    """1/2**2000 is 0.0 in float64: its numerator and denominator alone overflowed the printer."""
    spec, lr = _spec()
    spec.update(spec.param, spec.param - lr * spec.grad * (1 + sympy.Rational(1, 2**2000)))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    optgen.build(spec)([p], lr=0.1, backend=backend).step()
    assert torch.equal(p.detach(), torch.full((3,), 0.9))


def test_a_non_ascii_spec_name_is_refused():
    """Python accepts it, and so do the interpreter and the torch backend; Triton's compiler rejects the kernel
    name it becomes (``optgen inspect`` and every GPU run failed)."""
    with pytest.raises(SpecError, match="Spec name must be an ASCII Python identifier, got 'Ωmega'"):
        Spec("Ωmega")
    spec = Spec("Omega")
    eta = spec.hyper(η=0.1)  # non-ASCII hyperparameter and state names compile: they are not kernel names
    spec.update(spec.param, spec.param - eta * spec.grad)
    optgen.build(spec)


def test_defaults_that_break_the_specs_own_requirement_fail_at_build():
    """Before, build() succeeded and every optimizer made without arguments raised ValueError (defaults)."""

    def make():
        spec = Spec("Req")
        lr, momentum = spec.hyper(lr=0.1, momentum=0.0)
        spec.require(momentum > 0, "momentum must be positive")
        spec.update(spec.param, spec.param - lr * (1 + momentum) * spec.grad)
        return spec

    with pytest.raises(
        SpecError, match=r"Req: the defaults do not meet require\(\): momentum must be positive \[.*test_spec_errors.py"
    ):
        optgen.build(make())
