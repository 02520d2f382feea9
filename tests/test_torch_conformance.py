"""optgen.SGD, optgen.Adam and optgen.AdamW as drop-in replacements of torch.optim's classes.

Driven by the optimizer database PyTorch ships in its wheel (``torch.testing._internal.common_optimizers``):
``optim_inputs_func`` gives the constructor kwargs torch tests its own classes with, the helper
``_get_optim_inputs_including_global_cliquey_kwargs`` adds the foreach/fused/differentiable variants torch
runs on this device, and ``optim_error_inputs_func`` gives the inputs that must fail and how.

1. Step-by-step equality: torch's class and optgen's class of the same name, made with the same kwargs on
   copies of the same parameters (odd shapes, a 0-d one, a zero-size one, a non-contiguous one; complex ones in
   a test of their own), fed the same gradients (one step leaves a parameter without gradient, one step has
   none at all); parameters and every state tensor torch keeps are compared after each step, on every optgen
   backend, in float32 and float64. ``fused=True`` selects optgen's fused backend for the device by itself:
   those cases pass no ``backend=``. ``foreach=True``, which torch's classes take on CPU though the helper yields
   it only for GPUs, is added to every input. Where torch refuses kwargs, optgen must refuse them alike.
   ``differentiable=True`` is refused by optgen, clearly.
2. State dicts: torch -> optgen and optgen -> torch round trips continue equal; the group keys torch keeps
   (maximize, nesterov, amsgrad, decoupled_weight_decay, foreach, fused, ...) are in optgen's state dicts;
   state dicts as older torch versions wrote them resume like torch; ``optgen.Adam`` loading a
   ``torch.optim.AdamW`` state dict steps like AdamW (or refuses, naming why).
3. Error inputs: every entry of ``optim_error_inputs_func``, checked the way torch's own ``test_errors`` does
   (and checked against torch's class first, so the harness itself is known to be right).
4. Direct checks: a nesterov SGD state dict resumed by torch.optim.SGD, meta-device parameters (also a fused
   optimizer made before to_empty()), a string lr, integer and bool parameters, a bare tensor as params, mixed
   float/tensor betas, per-group maximize, nesterov and amsgrad.

Tolerances are conftest's ``TOL`` (normwise relative, by dtype). The table has no float64 row: float64 uses
the float32 row scaled by the ratio of the two machine epsilons (~2e-15, near-exact).
"""

import copy
import re

import pytest
import torch
from conftest import BACKENDS, TOL, assert_close_rel
from torch.nn import Parameter

# torch's test utilities freeze the torch.backends flags when imported (torch.backends.disable_global_flags());
# give them back as they were, so this module changes nothing for the rest of the session.
_BACKEND_FLAGS_WERE_FROZEN = torch.backends.flags_frozen()
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

if not _BACKEND_FLAGS_WERE_FROZEN:
    setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)

import optgen  # noqa: E402

DEVICE = "cpu"
OPTIMIZER_NAMES = ("SGD", "Adam", "AdamW")
OPTIM_INFOS = {info.name: info for info in optim_db if info.name in OPTIMIZER_NAMES}
DTYPES = (torch.float32, torch.float64)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)

STEPS = 8
STEP_WITH_A_PARAMETER_WITHOUT_GRAD = 3  # parameter PARAMETER_WITHOUT_GRAD has no .grad at this step
PARAMETER_WITHOUT_GRAD = 1
STEP_WITHOUT_GRADS = 5  # no parameter has a gradient: the step must change nothing
PRIME_STEPS = 3  # state dict tests: steps before the state dict is taken ...
RESUMED_STEPS = 5  # ... and after it is loaded

# Keys of torch's param groups that select the algorithm: optgen must keep them, with torch's values (as it must
# keep every hyperparameter).
ALGORITHM_KEYS = ("maximize", "nesterov", "amsgrad", "decoupled_weight_decay")
# Implementation switches torch keeps in its param groups: optgen must keep them (a state dict torch loads must
# have them), whatever their value.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")

# What a constructor raises for kwargs it refuses.
REFUSALS = (ValueError, RuntimeError, TypeError)

TRITON_FLOAT64 = "the Triton backend computes in fp32 and refuses float64 tensors (README: kernel policies)"


# -- parameters and gradients ------------------------------------------------------------------------------------


def away_from_cancellation(value):
    """A single-element real tensor made positive and >= 0.5, else ``value`` as it is.

    The normwise error of a one-element tensor is its elementwise relative error: where its momentum or decayed
    gradient nearly cancels (0.9 * b + g ~ 0), one ulp of rounding difference between two correct implementations
    (torch's fused kernels use fused multiply-adds, its for-loop does not) grows by orders of magnitude, past
    TOL -- torch's fused and for-loop SGD differ by up to ~200 ulps that way. Values of one sign, away from zero,
    keep those comparisons at a few ulps; the larger tensors keep random signs."""
    if value.numel() == 1 and not value.is_complex():
        return value.abs() + 0.5
    return value


def make_parameter_set(dtype, seed=0, complex_dtype=None):
    """Parameters with odd shapes: (5,3), (7,), (2,3,4), 0-d, (1,), zero-size (0,) and a non-contiguous (3,4)
    (a transposed (4,3)); with ``complex_dtype`` two complex parameters after them."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 3, 4), (), (1,), (0,)]
    values = [away_from_cancellation(torch.randn(shape, generator=gen, dtype=dtype)) for shape in shapes]
    values.append(torch.randn(4, 3, generator=gen, dtype=dtype).t())
    if complex_dtype is not None:
        values += [torch.randn(shape, generator=gen, dtype=complex_dtype) for shape in [(4, 3), (5,)]]
    return [Parameter(v) for v in values]


def copy_parameters(params):
    """Equal, independent parameters (same strides: clone keeps a dense layout)."""
    return [Parameter(p.detach().clone()) for p in params]


def make_gradients(params, steps=STEPS, seed=1):
    """gradients[step][i] for parameter i (None: no gradient at that step), laid out like their parameters as
    autograd makes them (torch's fused kernels rely on it)."""
    gen = torch.Generator().manual_seed(seed)
    gradients = []
    for step in range(steps):
        row = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        row = [torch.empty_like(p).copy_(away_from_cancellation(g)) for p, g in zip(params, row)]
        if step == STEP_WITH_A_PARAMETER_WITHOUT_GRAD:
            row[PARAMETER_WITHOUT_GRAD] = None
        if step == STEP_WITHOUT_GRADS:
            row = [None] * len(params)
        gradients.append(row)
    return gradients


def split_into_groups(params, group_options):
    """Param groups over consecutive slices of ``params``: one slice per options dict."""
    size = -(-len(params) // len(group_options))
    return [{"params": params[i * size : (i + 1) * size], **options} for i, options in enumerate(group_options)]


# -- optimizers ------------------------------------------------------------------------------------------------------


def torch_class(name):
    return getattr(torch.optim, name)


def optgen_class(name):
    return getattr(optgen, name)


def make_torch_optimizer(name, params, kwargs):
    return torch_class(name)(params, **copy.deepcopy(kwargs))


def make_optgen_optimizer(name, params, kwargs, backend):
    """optgen's class with torch's kwargs (tensors cloned); ``backend=None`` passes none (``fused=True`` chooses the
    fused backend for the device itself)."""
    extra = {} if backend is None else {"backend": backend}
    return optgen_class(name)(params, **copy.deepcopy(kwargs), **extra)


def make_torch_optimizer_or_skip(name, params, kwargs):
    """torch's class, or a skip where torch itself refuses these kwargs (test_steps_match_torch checks that optgen
    refuses them alike)."""
    try:
        return make_torch_optimizer(name, params, kwargs)
    except REFUSALS as exc:
        pytest.skip(f"torch.optim.{name} refuses {kwargs} on {DEVICE}: {exc}")


def make_both_optimizers(name, kwargs, backend, torch_params, optgen_params):
    """torch's and optgen's optimizers; where torch refuses the kwargs, optgen must raise the same error (then
    ``None, None``)."""
    try:
        torch_opt = make_torch_optimizer(name, torch_params, kwargs)
    except REFUSALS as exc:
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            make_optgen_optimizer(name, optgen_params, kwargs, backend)
        return None, None
    return torch_opt, make_optgen_optimizer(name, optgen_params, kwargs, backend)


def apply_gradients(params, row):
    for p, g in zip(params, row):
        p.grad = None if g is None else g.clone()


# -- the reference comparison ----------------------------------------------------------------------------------


def tolerance_for(dtype):
    """conftest's TOL by dtype (complex: by its real dtype); float64, which TOL has no row for: the float32 row
    scaled by the ratio of the machine epsilons (near-exact)."""
    real = dtype.to_real() if dtype.is_complex else dtype
    if real in TOL:
        return TOL[real]
    return TOL[torch.float32] * torch.finfo(real).eps / torch.finfo(torch.float32).eps


def assert_same_tensor(actual, expected, what):
    """Same dtype, shape and device, values within ``tolerance_for(dtype)`` (complex: real and imaginary parts)."""
    assert isinstance(actual, torch.Tensor), f"{what}: {type(actual).__name__} where torch has a tensor"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, torch has {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, torch has {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{what}: device {actual.device}, torch has {expected.device}"
    if expected.is_complex():
        actual, expected = torch.view_as_real(actual.detach()), torch.view_as_real(expected.detach())
    assert_close_rel(actual.detach(), expected.detach(), tol=tolerance_for(expected.dtype), what=what)


def assert_values_equal(actual, expected, what):
    """Plain values, tensors (a tensor lr) and tuples of them (betas), compared by value."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), f"{what}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_values_equal(a, e, f"{what}[{i}]")
    elif isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, torch has {expected.dtype}"
        assert torch.equal(actual, expected), f"{what}: {actual!r} != {expected!r}"
    elif isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):  # a tensor lr against a float
        a, e = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
        assert torch.equal(a.reshape(-1), e.reshape(-1)), f"{what}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


def assert_matches_torch(torch_opt, torch_params, optgen_opt, optgen_params, what, state_keys=None):
    """optgen's parameters and state equal torch's: every parameter, and every state entry torch keeps for it
    (optgen may keep more, e.g. a step count for SGD), or only ``state_keys`` of them."""
    for i, (expected, actual) in enumerate(zip(torch_params, optgen_params)):
        assert_same_tensor(actual, expected, f"{what}: parameter {i}")
    for i, (tp, op) in enumerate(zip(torch_params, optgen_params)):
        expected_state = torch_opt.state.get(tp, {})
        actual_state = optgen_opt.state.get(op, {})
        for key, expected in expected_state.items():
            if state_keys is not None and key not in state_keys:
                continue
            assert key in actual_state, f"{what}: parameter {i} lacks state {key!r} (has {sorted(actual_state)})"
            if isinstance(expected, torch.Tensor):
                assert_same_tensor(actual_state[key], expected, f"{what}: state {key!r} of parameter {i}")
            else:
                assert_values_equal(actual_state[key], expected, f"{what}: state {key!r} of parameter {i}")


def step_side_by_side(torch_opt, torch_params, optgen_opt, optgen_params, gradients, what, state_keys=None):
    """Both optimizers step on the same gradients; compared after every step."""
    for step, row in enumerate(gradients):
        apply_gradients(torch_params, row)
        torch_opt.step()
        apply_gradients(optgen_params, row)
        optgen_opt.step()
        assert_matches_torch(torch_opt, torch_params, optgen_opt, optgen_params, f"{what}, step {step + 1}", state_keys)


def state_keys_torch_writes(name, kwargs):
    """The state entries torch's class makes itself with ``kwargs``. Loaded from optgen's state dict, torch also
    carries the entries only optgen keeps (a step count for SGD) and never updates them: not compared."""
    param = Parameter(torch.ones(2))
    opt = make_torch_optimizer(name, [param], kwargs)
    param.grad = torch.ones(2)
    opt.step()
    return set(opt.state[param])


# -- test cases from torch's database --------------------------------------------------------------------------------


def slug(text):
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")


def database_inputs(skip=()):
    """(name, desc, kwargs) for every input torch's helper yields on this device, cliquey variants included; and
    foreach=True on each input, which the helper yields only where torch has foreach kernels, but which torch's
    classes take on CPU too (its test_foreach_matches_forloop runs there)."""
    for name, info in OPTIM_INFOS.items():
        inputs = _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, None, info, skip=skip)
        for optim_input in inputs:
            yield name, optim_input.desc, optim_input.kwargs
        if (
            "foreach" in info.supported_impls
            and "foreach" not in skip
            and not any("foreach" in i.kwargs for i in inputs)
        ):
            for optim_input in info.optim_inputs_func(DEVICE):
                yield name, f"{optim_input.desc} & foreach", {**optim_input.kwargs, "foreach": True}


DEFAULT_BACKEND = "default-backend"  # in test ids: no backend= passed


def backends_for(kwargs):
    """optgen backends to run kwargs on: with fused=True none is passed (optgen picks its fused backend)."""
    return [None] if kwargs.get("fused") else BACKENDS


def unsupported(backend, dtype):
    """Marks for a backend/dtype pair optgen does not run by design."""
    if backend == "triton" and dtype in (torch.float64, torch.complex128):
        return [pytest.mark.skip(reason=TRITON_FLOAT64)]
    return []


def case_id(*parts):
    return "-".join(slug(str(p).replace("torch.", "")) for p in parts if p is not None)


def equality_cases():
    for name, desc, kwargs in database_inputs():
        if kwargs.get("differentiable"):
            continue  # refused by optgen: test_differentiable_is_refused_clearly
        for dtype in DTYPES:
            for backend in backends_for(kwargs):
                marks = unsupported(backend, dtype)
                case = case_id(name, desc, dtype, backend or DEFAULT_BACKEND)
                yield pytest.param(name, kwargs, dtype, backend, marks=marks, id=case)


def complex_cases():
    for name, desc, kwargs in database_inputs(skip=("differentiable", "fused")):  # as torch's own test_complex
        if not OPTIM_INFOS[name].supports_complex:
            continue
        for dtype in COMPLEX_DTYPES:
            for backend in BACKENDS:
                marks = unsupported(backend, dtype)
                yield pytest.param(name, kwargs, dtype, backend, marks=marks, id=case_id(name, desc, dtype, backend))


def differentiable_cases():
    for name, desc, kwargs in database_inputs():
        if kwargs.get("differentiable"):
            yield pytest.param(name, kwargs, id=case_id(name, desc))


def state_dict_cases():
    for name, desc, kwargs in database_inputs(skip=("differentiable",)):
        for backend in backends_for(kwargs):
            yield pytest.param(name, kwargs, backend, id=case_id(name, desc, backend or DEFAULT_BACKEND))


def config_cases():
    for name, desc, kwargs in database_inputs(skip=("differentiable",)):
        yield pytest.param(name, kwargs, id=case_id(name, desc))


def error_cases():
    for name, info in OPTIM_INFOS.items():
        for index, error_input in enumerate(info.optim_error_inputs_func(DEVICE, torch.float32)):
            yield pytest.param(name, index, id=case_id(name, index, error_input.optimizer_error_input.desc))


# -- 1. step-by-step equality ------------------------------------------------------------------------------------


def compare_with_torch(name, kwargs, backend, torch_params):
    """torch's and optgen's optimizers, made with ``kwargs`` on equal parameters, step side by side."""
    optgen_params = copy_parameters(torch_params)
    torch_opt, optgen_opt = make_both_optimizers(name, kwargs, backend, torch_params, optgen_params)
    if torch_opt is None:
        return  # both refused the kwargs alike
    gradients = make_gradients(torch_params)
    step_side_by_side(torch_opt, torch_params, optgen_opt, optgen_params, gradients, f"{name}({kwargs})")


@pytest.mark.parametrize("name, kwargs, dtype, backend", list(equality_cases()))
def test_steps_match_torch(name, kwargs, dtype, backend):
    compare_with_torch(name, kwargs, backend, make_parameter_set(dtype))


@pytest.mark.parametrize("name, kwargs, dtype, backend", list(complex_cases()))
def test_complex_parameters_match_torch(name, kwargs, dtype, backend):
    """torch.optim steps complex parameters (as their view_as_real); real parameters alongside."""
    compare_with_torch(name, kwargs, backend, make_parameter_set(dtype.to_real(), complex_dtype=dtype))


@pytest.mark.parametrize("name, kwargs", list(differentiable_cases()))
def test_differentiable_is_refused_clearly(name, kwargs):
    """torch accepts differentiable=True (autograd through the step); optgen's kernels are not differentiable: it
    must refuse at construction, naming the option, rather than step without a graph."""
    make_torch_optimizer(name, make_parameter_set(torch.float32), kwargs)
    with pytest.raises((ValueError, TypeError, NotImplementedError, RuntimeError), match="differentiable"):
        make_optgen_optimizer(name, make_parameter_set(torch.float32), kwargs, backend=None)


# -- 2. state dicts ----------------------------------------------------------------------------------------------------


def assert_state_dicts_equal(actual, expected, what):
    assert actual.keys() == expected.keys(), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
    assert actual["state"].keys() == expected["state"].keys(), what
    for index, state in expected["state"].items():
        assert actual["state"][index].keys() == state.keys(), f"{what}: state of parameter {index}"
        for key, value in state.items():
            assert_values_equal(actual["state"][index][key], value, f"{what}: state {key!r} of parameter {index}")
    assert len(actual["param_groups"]) == len(expected["param_groups"]), what
    for i, (a, e) in enumerate(zip(actual["param_groups"], expected["param_groups"])):
        assert a.keys() == e.keys(), f"{what}: keys of param group {i}"
        for key in e:
            assert_values_equal(a[key], e[key], f"{what}: {key!r} of param group {i}")


@pytest.mark.parametrize("source", ["torch", "optgen"])
@pytest.mark.parametrize("name, kwargs, backend", list(state_dict_cases()))
def test_state_dict_round_trip(name, kwargs, backend, source):
    """One side steps PRIME_STEPS times; a fresh optimizer of the other side, on copies of its parameters, loads its
    state dict; both continue equal (as torch's test_state_dict_deterministic, across the two libraries)."""
    params = make_parameter_set(torch.float32)
    gradients = make_gradients(params, PRIME_STEPS + RESUMED_STEPS)
    make = {
        "torch": lambda ps: make_torch_optimizer_or_skip(name, ps, kwargs),
        "optgen": lambda ps: make_optgen_optimizer(name, ps, kwargs, backend),
    }
    first = make[source](params)
    for row in gradients[:PRIME_STEPS]:
        apply_gradients(params, row)
        first.step()
    resumed_params = copy_parameters(params)
    resumed = make["optgen" if source == "torch" else "torch"](resumed_params)
    saved = first.state_dict()
    given = copy.deepcopy(saved)
    resumed.load_state_dict(given)
    assert_state_dicts_equal(given, saved, "the state dict given to load_state_dict was modified")
    if source == "torch":
        torch_side, optgen_side = (first, params), (resumed, resumed_params)
    else:
        torch_side, optgen_side = (resumed, resumed_params), (first, params)
    keys = state_keys_torch_writes(name, kwargs)
    assert_matches_torch(*torch_side, *optgen_side, f"{name}({kwargs}) loaded from {source}", keys)
    what = f"{name}({kwargs}) resumed from {source}"
    step_side_by_side(*torch_side, *optgen_side, gradients[PRIME_STEPS:], what, keys)


@pytest.mark.parametrize("name, kwargs", list(config_cases()))
def test_state_dict_param_groups_keep_torch_keys(name, kwargs):
    """Every key torch keeps in a param group is in optgen's state dict: the algorithm switches and the
    hyperparameters with torch's values, the implementation switches (foreach, fused, ...) present."""
    torch_params = make_parameter_set(torch.float32)
    optgen_params = copy_parameters(torch_params)
    torch_opt = make_torch_optimizer_or_skip(name, torch_params, kwargs)
    optgen_opt = make_optgen_optimizer(name, optgen_params, kwargs, backend=None)
    row = make_gradients(torch_params, 1)[0]
    apply_gradients(torch_params, row)
    torch_opt.step()
    apply_gradients(optgen_params, row)
    optgen_opt.step()
    for i, (expected, actual) in enumerate(
        zip(torch_opt.state_dict()["param_groups"], optgen_opt.state_dict()["param_groups"], strict=True)
    ):
        missing = sorted(set(expected) - set(actual))
        assert not missing, f"param group {i} of optgen.{name}'s state dict lacks {missing} (torch keeps them)"
        for key in ALGORITHM_KEYS:
            if key in expected and actual[key] != expected[key]:
                pytest.fail(f"param group {i}: {key}={actual[key]!r}, torch has {expected[key]!r}: torch would resume it "
                            f"with another algorithm")  # fmt: skip
        for key, value in expected.items():
            if key in ("params", "param_names") or key in IMPLEMENTATION_KEYS:
                continue
            assert_values_equal(actual[key], value, f"{key!r} of param group {i}")


def step_one_optimizer(opt, params, gradients):
    for row in gradients:
        apply_gradients(params, row)
        opt.step()


def without_newer_group_flags(state_dict, name):
    """As torch's test_can_load_older_state_dict: the group flags added after the class was first released
    (OptimizerInfo.not_og_supported_flags) deleted where they are off -- a checkpoint from before a flag existed
    ran with it off (torch's __setstate__ fills them in as off, so a maximize=True deleted would switch the
    algorithm: a state dict no torch version wrote)."""
    for group in state_dict["param_groups"]:
        for flag in OPTIM_INFOS[name].not_og_supported_flags:
            if not group.get(flag):
                group.pop(flag, None)
    return state_dict


def with_python_number_steps(state_dict, name):
    """As torch's test_load_nontensor_step: torch < 1.12 saved step counts as Python numbers."""
    for state in state_dict["state"].values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].item()
    return state_dict


OLDER_STATE_DICTS = {
    "without-newer-group-flags": without_newer_group_flags,
    "python-number-steps": with_python_number_steps,
}


@pytest.mark.parametrize("make_older", OLDER_STATE_DICTS.values(), ids=OLDER_STATE_DICTS.keys())
@pytest.mark.parametrize("name, kwargs", list(config_cases()))
def test_older_torch_state_dicts_resume_like_torch(name, kwargs, make_older):
    """A state dict as older torch versions wrote it, loaded by a fresh torch optimizer and a fresh optgen one:
    both continue equal (torch's __setstate__ fills in the missing group flags with their defaults)."""
    params = make_parameter_set(torch.float32)
    gradients = make_gradients(params, PRIME_STEPS + RESUMED_STEPS)
    source = make_torch_optimizer_or_skip(name, params, kwargs)
    step_one_optimizer(source, params, gradients[:PRIME_STEPS])
    older = make_older(copy.deepcopy(source.state_dict()), name)
    torch_params, optgen_params = copy_parameters(params), copy_parameters(params)
    torch_opt = make_torch_optimizer(name, torch_params, kwargs)
    torch_opt.load_state_dict(copy.deepcopy(older))
    optgen_opt = make_optgen_optimizer(name, optgen_params, kwargs, backend=None)
    optgen_opt.load_state_dict(copy.deepcopy(older))
    what = f"{name}({kwargs}) resumed from an older state dict"
    step_side_by_side(torch_opt, torch_params, optgen_opt, optgen_params, gradients[PRIME_STEPS:], what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_loading_an_adamw_state_dict_steps_like_adamw(backend):
    """torch.optim.AdamW's state dict says decoupled_weight_decay=True in its groups; torch.optim.Adam loading it
    steps like AdamW. optgen.Adam must do the same, or refuse naming why: never L2-decay silently."""
    kwargs = {"lr": 0.01, "weight_decay": 0.1}
    params = make_parameter_set(torch.float32)
    gradients = make_gradients(params, PRIME_STEPS + RESUMED_STEPS)
    adamw = torch.optim.AdamW(params, **kwargs)
    step_one_optimizer(adamw, params, gradients[:PRIME_STEPS])
    resumed_params = copy_parameters(params)
    adam = optgen.Adam(resumed_params, **kwargs, backend=backend)
    try:
        adam.load_state_dict(copy.deepcopy(adamw.state_dict()))
    except REFUSALS as exc:
        assert re.search("decoupled|AdamW", str(exc)), f"optgen.Adam refused an AdamW state dict unclearly: {exc}"
        return
    step_side_by_side(adamw, params, adam, resumed_params, gradients[PRIME_STEPS:], "optgen.Adam resuming AdamW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_adam_loading_an_optgen_adamw_state_dict_steps_like_adamw(backend):
    """The other way: optgen.AdamW's state dict carries decoupled_weight_decay=True, so torch.optim.Adam resumes
    it as AdamW."""
    kwargs = {"lr": 0.01, "weight_decay": 0.1}
    params = make_parameter_set(torch.float32)
    gradients = make_gradients(params, PRIME_STEPS + RESUMED_STEPS)
    adamw = optgen.AdamW(params, **kwargs, backend=backend)
    step_one_optimizer(adamw, params, gradients[:PRIME_STEPS])
    resumed_params = copy_parameters(params)
    adam = torch.optim.Adam(resumed_params, **kwargs)
    adam.load_state_dict(copy.deepcopy(adamw.state_dict()))
    keys = state_keys_torch_writes("AdamW", kwargs)
    step_side_by_side(adam, resumed_params, adamw, params, gradients[PRIME_STEPS:], "torch.optim.Adam resuming", keys)


# -- 3. error inputs -------------------------------------------------------------------------------------------------


def check_error_input(cls, error_input):
    """As torch's TestOptimRenewed.test_errors: construction (or construction then step()) raises error_type
    matching error_regex, or warns it when error_type is a Warning. A missing params is a small Parameter."""
    optim_input = error_input.optimizer_error_input
    params = optim_input.params if optim_input.params is not None else [Parameter(torch.randn(1))]
    kwargs = copy.deepcopy(optim_input.kwargs)
    expect_warning = issubclass(error_input.error_type, Warning)

    def expect():
        if expect_warning:
            return pytest.warns(error_input.error_type, match=error_input.error_regex)
        return pytest.raises(error_input.error_type, match=error_input.error_regex)

    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with expect():
            cls(params, **kwargs)
    elif error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
        opt = cls(params, **kwargs)
        with expect():
            opt.step()
    else:
        raise NotImplementedError(f"unknown error_on {error_input.error_on}")


def uses_sparse_tensors(error_input):
    optim_input = error_input.optimizer_error_input
    params = optim_input.params if isinstance(optim_input.params, (list, tuple)) else [optim_input.params]
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return "sparse" in optim_input.desc.lower() or any(isinstance(t, torch.Tensor) and t.is_sparse for t in tensors)


@pytest.mark.parametrize("name, index", list(error_cases()))
def test_error_input(name, index):
    def fresh_entry():  # a new entry (and new tensors) for each class
        return OPTIM_INFOS[name].optim_error_inputs_func(DEVICE, torch.float32)[index]

    entry = fresh_entry()
    if uses_sparse_tensors(entry):
        pytest.skip(f"optgen refuses sparse gradients: {entry.optimizer_error_input.desc}")
    check_error_input(torch_class(name), entry)  # the harness reproduces torch's own contract
    check_error_input(optgen_class(name), fresh_entry())


# -- 4. direct checks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nesterov_sgd_state_dict_resumes_in_torch(backend):
    """torch.optim.SGD made with its defaults takes momentum and nesterov from the loaded param groups."""
    kwargs = {"lr": 0.01, "momentum": 0.9, "nesterov": True}
    params = make_parameter_set(torch.float32)
    gradients = make_gradients(params, PRIME_STEPS + RESUMED_STEPS)
    sgd = optgen.SGD(params, **kwargs, backend=backend)
    step_one_optimizer(sgd, params, gradients[:PRIME_STEPS])
    resumed_params = copy_parameters(params)
    resumed = torch.optim.SGD(resumed_params)
    resumed.load_state_dict(copy.deepcopy(sgd.state_dict()))
    assert resumed.param_groups[0]["nesterov"] is True and resumed.param_groups[0]["momentum"] == 0.9
    keys = state_keys_torch_writes("SGD", kwargs)
    step_side_by_side(resumed, resumed_params, sgd, params, gradients[PRIME_STEPS:], "torch.optim.SGD resuming", keys)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_meta_device_parameters_step(name):
    """torch.optim steps meta tensors (shape-only models, e.g. before to_empty); so must optgen."""
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    params = [Parameter(torch.empty(shape, device="meta")) for shape in [(5, 3), (7,), ()]]
    opt = optgen_class(name)(params, **kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
    for p in params:
        assert p.device.type == "meta"


def materialized_on_cpu(model, seed=0):
    """A model made on the meta device, given storage and deterministic values and gradients."""
    model.to_empty(device=DEVICE)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
            p.grad = torch.randn(p.shape, generator=gen)
    return model


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_fused_optimizer_made_for_meta_parameters_steps_once_materialized(name):
    """As torch's test_fused_error_on_params_on_meta: a model built on the meta device gets its fused optimizer
    before to_empty(); a step on meta tensors raises, and after to_empty() the same optimizer steps like torch's."""
    stepped = []
    for cls in (torch_class(name), optgen_class(name)):
        with torch.device("meta"):
            model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1))
        opt = cls(model.parameters(), fused=True)
        with torch.device("meta"):
            for p in model.parameters():
                p.grad = torch.rand_like(p)
        with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
            opt.step()
        opt.zero_grad(set_to_none=True)
        materialized_on_cpu(model)
        opt.step()
        stepped.append(list(model.parameters()))
    for i, (expected, actual) in enumerate(zip(*stepped)):
        assert_same_tensor(actual, expected, f"{name}(fused=True) after to_empty: parameter {i}")


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_string_lr_is_refused(name):
    with pytest.raises(TypeError):
        torch_class(name)([Parameter(torch.zeros(2))], lr="1e-3")
    with pytest.raises((TypeError, ValueError), match="lr"):
        optgen_class(name)([Parameter(torch.zeros(2))], lr="1e-3")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_integer_and_bool_parameters_are_refused_at_construction(name, dtype):
    """torch.optim accepts them and fails (or truncates) at the first step; optgen must refuse them when made."""
    param = torch.zeros(3, dtype=dtype)
    with pytest.raises((TypeError, ValueError), match=r"int32|int64|bool|floating|dtype"):
        optgen_class(name)([param])


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_bare_tensor_as_params_is_refused(name):
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        torch_class(name)(Parameter(torch.zeros(2)))
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        optgen_class(name)(Parameter(torch.zeros(2)))


MIXED_BETAS = {"float-tensor": (0.9, torch.tensor(0.99)), "tensor-float": (torch.tensor(0.9), 0.99)}


@pytest.mark.parametrize("betas", MIXED_BETAS.values(), ids=MIXED_BETAS.keys())
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_betas_mixing_floats_and_tensors_are_refused(name, betas):
    with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
        optgen_class(name)([Parameter(torch.zeros(2))], betas=betas)


PER_GROUP_FLAGS = {
    "SGD": [{"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "maximize": True}, {"momentum": 0.5}],
    "Adam": [{"amsgrad": True}, {"maximize": True}, {"weight_decay": 0.0}],
    "AdamW": [{"amsgrad": True}, {"maximize": True, "amsgrad": True}, {"weight_decay": 0.0}],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_per_group_flags_match_torch(name, backend):
    """torch.optim reads maximize, nesterov and amsgrad per param group: groups that differ in them step as
    torch's class with the same groups does."""
    kwargs = {"lr": 0.01, "weight_decay": 0.1}
    torch_params = make_parameter_set(torch.float32)
    optgen_params = copy_parameters(torch_params)
    groups = PER_GROUP_FLAGS[name]
    torch_opt = torch_class(name)(split_into_groups(torch_params, groups), **kwargs)
    optgen_opt = optgen_class(name)(split_into_groups(optgen_params, groups), **kwargs, backend=backend)
    gradients = make_gradients(torch_params)
    step_side_by_side(torch_opt, torch_params, optgen_opt, optgen_params, gradients, f"{name} with groups {groups}")


# -- 5. A torch.optim training script, the prefix replaced ----------------------------------------------------------


def _train(optim, steps=6):
    """A training loop as scripts write it: a model, a scheduler, zero_grad/backward/step, a checkpoint midway."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    data, target = torch.randn(16, 7), torch.randn(16, 3)
    losses = []
    for cls, kwargs in (
        (optim.AdamW, dict(lr=1e-2, fused=True, amsgrad=True)),
        (optim.Adam, dict(lr=1e-2, foreach=False, weight_decay=0.1, amsgrad=True)),
        (optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, foreach=False)),
    ):
        opt = cls(model.parameters(), **kwargs)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for step in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(data), target)
            loss.backward()
            opt.step()
            scheduler.step()
            losses.append(loss.item())
            if step == steps // 2:  # save and resume, as a preempted job does
                checkpoint = copy.deepcopy({"opt": opt.state_dict(), "sched": scheduler.state_dict()})
                opt = cls(model.parameters(), **kwargs)
                scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
                opt.load_state_dict(checkpoint["opt"])
                scheduler.load_state_dict(checkpoint["sched"])
    return torch.tensor(losses), [p.detach().clone() for p in model.parameters()]


def test_a_torch_training_script_runs_unchanged_with_the_optgen_prefix():
    """``torch.optim.X(..., fused=True / foreach=False / amsgrad=True)`` replaced by ``optgen.X(...)``: the same
    script runs and trains the same model (the fused C kernels on CPU)."""
    torch_losses, torch_params = _train(torch.optim)
    optgen_losses, optgen_params = _train(optgen)
    assert_close_rel(optgen_losses, torch_losses, tol=TOL[torch.float32], what="losses")
    assert_close_rel(optgen_params, torch_params, tol=TOL[torch.float32], what="params")
