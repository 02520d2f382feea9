"""The torch.optim contract of the generated optimizers and the runtime properties of both backends:
state_dict round trips, skipped parameters, torch's state names, launches per step, no host sync, runtime
hyperparameter changes without regenerating code, determinism."""

import copy
import math
import re
from pathlib import Path

import pytest
import sympy
import torch
from conftest import (
    BACKENDS,
    ODD_SHAPES,
    TOL,
    RecordHostSyncs,
    assert_bitwise,
    assert_close_rel,
    clone_params,
    compiled_code,
    make_grads,
    make_params,
    run_steps,
)

import optgen
from optgen import settings
from optgen.codegen import render
from optgen.runtime import cbuild

BUILTIN_CASES = [
    (optgen.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01), 1),
    (optgen.Adam, dict(lr=1e-2, weight_decay=0.01), 1),
    (optgen.AdamW, dict(lr=1e-2), 1),
    (optgen.LARS, dict(lr=1.0, trust_coefficient=0.01), 3),
    (optgen.LAMB, dict(lr=1e-2), 3),
    (optgen.NVLAMB, dict(lr=1e-2), 5),  # 3 passes, the fold of ||g||^2 after pass 0, the segment-reduce after pass 1
]
IDS = [c.__name__ for c, _, _ in BUILTIN_CASES]
SHAPES = [(), (3, 1, 4), (7,), (257,), (7,)]


# --------------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# --------------------------------------------------------------------------------------------------


def _round_trip(cls, kwargs, backend, load_backend=None, dtype=torch.float32, before=3, after=3):
    """Run ``before`` steps, snapshot, continue ``after`` steps; a fresh optimizer loaded from the snapshot
    continues from cloned parameters with the same gradients. Returns both continuations."""
    grads = make_grads(SHAPES, before + after, dtype=dtype)
    params = make_params(SHAPES, dtype=dtype, zero=(4,))
    opt = cls(params, backend=backend, **kwargs)
    run_steps(opt, params, grads[:before])
    snapshot = copy.deepcopy(opt.state_dict())
    resumed_params = clone_params(params)
    run_steps(opt, params, grads[before:])

    resumed = cls(resumed_params, backend=load_backend or backend, **kwargs)
    resumed.load_state_dict(snapshot)
    run_steps(resumed, resumed_params, grads[before:])
    return (opt, params), (resumed, resumed_params)


@pytest.mark.parametrize("cls,kwargs,_", BUILTIN_CASES, ids=IDS)
def test_state_dict_round_trip_is_bitwise(cls, kwargs, _, backend):
    (opt, params), (resumed, resumed_params) = _round_trip(cls, kwargs, backend)
    assert_bitwise(resumed_params, params, "params")
    for p, q in zip(params, resumed_params):
        assert set(opt.state[p]) == set(resumed.state[q])
        for name in opt.state[p]:
            assert_bitwise(resumed.state[q][name], opt.state[p][name], name)
    assert float(resumed.state[resumed_params[0]]["step"]) == 6


def test_state_dict_moves_between_backends():
    """A snapshot of the torch backend continues on the Triton backend (same values within fp32 tolerance)."""
    (_, params), (resumed, resumed_params) = _round_trip(optgen.LAMB, dict(lr=1e-2), "torch", load_backend="triton")
    assert_close_rel(resumed_params, params, torch.float32, what="params")
    assert all(float(resumed.state[p]["step"]) == 6 for p in resumed_params)


def test_state_dict_round_trip_keeps_fp32_states_of_bf16_params():
    (opt, params), (resumed, resumed_params) = _round_trip(optgen.AdamW, dict(lr=1e-2), "torch", dtype=torch.bfloat16)
    for p, q in zip(params, resumed_params):
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert resumed.state[q]["exp_avg"].dtype == torch.float32, "state downcast to bf16 by load_state_dict"
    assert_bitwise(resumed_params, params, "params")


# --------------------------------------------------------------------------------------------------
# Parameters without gradients, state names
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs,_", BUILTIN_CASES, ids=IDS)
def test_parameters_without_grad_are_skipped(cls, kwargs, _, backend):
    params = make_params(SHAPES, zero=())
    untouched = params[1].detach().clone()
    opt = cls(params, backend=backend, **kwargs)
    grads = make_grads(SHAPES, 3)
    for step_grads in grads[:2]:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if i == 1 else g.clone()
        opt.step()
    assert params[1] not in opt.state or len(opt.state[params[1]]) == 0
    assert torch.equal(params[1].detach(), untouched)
    assert float(opt.state[params[0]]["step"]) == 2
    # once it has a gradient it starts at step 1 while the others go on
    run_steps(opt, params, grads[2:])
    assert float(opt.state[params[1]]["step"]) == 1
    assert float(opt.state[params[0]]["step"]) == 3
    assert not torch.equal(params[1].detach(), untouched)


def test_skipped_parameter_matches_a_run_without_it(backend):
    """The update of the others does not depend on a parameter without a gradient (NVLAMB: global norm)."""
    grads = make_grads(SHAPES, 3)
    with_extra = make_params(SHAPES, zero=())
    opt = optgen.NVLAMB(with_extra, backend=backend)
    run_steps(opt, with_extra, [[None if i == 2 else g for i, g in enumerate(s)] for s in grads])
    without = [p for i, p in enumerate(make_params(SHAPES, zero=())) if i != 2]
    opt2 = optgen.NVLAMB(without, backend=backend)
    run_steps(opt2, without, [[g for i, g in enumerate(s) if i != 2] for s in grads])
    assert_bitwise([p for i, p in enumerate(with_extra) if i != 2], without, "params")


@pytest.mark.parametrize(
    "ours,theirs",
    [(optgen.Adam, torch.optim.Adam), (optgen.AdamW, torch.optim.AdamW), (optgen.SGD, torch.optim.SGD)],
    ids=["Adam", "AdamW", "SGD"],
)
def test_state_names_are_torch_names(ours, theirs, backend):
    params = make_params(SHAPES, zero=())
    ref_params = clone_params(params)
    kwargs = dict(lr=1e-2, momentum=0.9) if ours is optgen.SGD else dict(lr=1e-2)
    opt = ours(params, backend=backend, **kwargs)
    ref = theirs(ref_params, **kwargs)
    grads = make_grads(SHAPES, 2)
    run_steps(opt, params, grads)
    run_steps(ref, ref_params, grads)
    ours_sd, theirs_sd = opt.state_dict(), ref.state_dict()
    assert set(ours_sd["state"]) == set(theirs_sd["state"]) == set(range(len(SHAPES)))
    for i in range(len(SHAPES)):
        names = set(ours_sd["state"][i])
        if ours is optgen.SGD:
            assert set(theirs_sd["state"][i]) == {"momentum_buffer"} and names == {"momentum_buffer", "step"}
        else:
            assert names == set(theirs_sd["state"][i]) == {"exp_avg", "exp_avg_sq", "step"}
            assert ours_sd["state"][i]["step"].dtype == theirs_sd["state"][i]["step"].dtype == torch.float32
            assert float(ours_sd["state"][i]["step"]) == float(theirs_sd["state"][i]["step"]) == 2
        for name in names - {"step"}:
            assert ours_sd["state"][i][name].shape == params[i].shape
    assert ours_sd["param_groups"][0]["params"] == list(range(len(SHAPES)))
    for key in theirs_sd["param_groups"][0]:
        if key in opt.defaults:
            assert key in ours_sd["param_groups"][0]


# --------------------------------------------------------------------------------------------------
# Launches per step
# --------------------------------------------------------------------------------------------------


def _launches_per_step(opt, params, steps=2):
    backend = None
    counts = []
    for step_grads in make_grads([tuple(p.shape) for p in params], steps):
        before = backend.launches if backend else 0
        run_steps(opt, params, [step_grads])
        backend = opt._backends["triton"]
        counts.append(backend.launches - before)
    return counts


@pytest.mark.parametrize("cls,kwargs,expected", BUILTIN_CASES, ids=IDS)
def test_launches_per_step_on_ten_tensors(cls, kwargs, expected):
    params = make_params([(n,) for n in (1, 7, 40, 255, 256, 257, 3, 600, 2, 9)], zero=(4,))
    opt = cls(params, backend="triton", **kwargs)
    assert opt.plan.launches_per_step == expected
    assert _launches_per_step(opt, params) == [expected, expected]


def test_launches_per_step_independent_of_tensor_count():
    """1 launch per step for 10 tensors and for 1000 (LAMB with 1000 tensors: test_references)."""
    few = make_params([(5,)] * 10, zero=())
    many = make_params([(n % 40 + 1,) for n in range(1000)], zero=())
    counts = [
        _launches_per_step(optgen.SGD(ps, lr=0.1, momentum=0.9, backend="triton"), ps, steps=1) for ps in (few, many)
    ]
    assert counts == [[1], [1]]


# --------------------------------------------------------------------------------------------------
# No host synchronisation inside step
# --------------------------------------------------------------------------------------------------


def test_sync_recorder_sees_item():
    x = torch.ones(2)
    with RecordHostSyncs() as rec:
        x.sum().item()
        float(x[0])
        bool(x[1] > 0)
    assert len(rec.syncs) == 3


@pytest.mark.parametrize("cls,kwargs,_", BUILTIN_CASES, ids=IDS)
def test_no_host_sync_in_step(cls, kwargs, _, backend):
    params = make_params(SHAPES, zero=(4,))
    opt = cls(params, backend=backend, **kwargs)
    grads = make_grads(SHAPES, 2)
    run_steps(opt, params, grads[:1])  # warm-up: states, tables, generated modules
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    with RecordHostSyncs() as rec:
        opt.step()
    assert rec.syncs == []


def test_no_host_sync_with_tensor_lr(backend):
    params = make_params(SHAPES, zero=())
    opt = optgen.AdamW(params, lr=torch.tensor(1e-2), backend=backend)
    grads = make_grads(SHAPES, 2)
    run_steps(opt, params, grads[:1])
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    with RecordHostSyncs() as rec:
        opt.step()
    assert rec.syncs == []


# --------------------------------------------------------------------------------------------------
# Hyperparameters change at run time without new code
# --------------------------------------------------------------------------------------------------


def test_lr_schedule_takes_effect_without_regenerating(backend):
    steps = 6
    grads = make_grads(SHAPES, steps)
    params = make_params(SHAPES)
    ref_params = clone_params(params)
    constant_params = clone_params(params)
    opt = optgen.AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    run_steps(opt, params, grads[:1])
    run_steps(ref, ref_params, grads[:1])
    misses = render._import.cache_info().misses
    builds = cbuild.load.cache_info().misses
    code = compiled_code(opt._backends[backend])
    for k in range(1, steps):
        for group in opt.param_groups + ref.param_groups:
            group["lr"] = 1e-2 / (k + 1)
            group["weight_decay"] = 0.1 if k % 2 else 0.0
        run_steps(opt, params, grads[k : k + 1])
        run_steps(ref, ref_params, grads[k : k + 1])
    assert render._import.cache_info().misses == misses
    assert cbuild.load.cache_info().misses == builds
    assert compiled_code(opt._backends[backend]) == code
    assert_close_rel(params, ref_params, torch.float32, what="scheduled params")
    constant = optgen.AdamW(constant_params, lr=1e-2, weight_decay=0.1, backend=backend)
    run_steps(constant, constant_params, grads)
    assert all(not torch.equal(a, b) for a, b in zip(params, constant_params))


def test_layer_adaptation_switch_at_run_time(backend):
    params = make_params(SHAPES)
    adamw_params = clone_params(params)
    grads = make_grads(SHAPES, 4)
    opt = optgen.LAMB(params, lr=1e-2, weight_decay=0.1, backend=backend)
    adamw = torch.optim.AdamW(adamw_params, lr=1e-2, weight_decay=0.1, eps=1e-6, foreach=False)
    run_steps(opt, params, grads[:2])
    run_steps(adamw, adamw_params, grads[:2])
    assert max(float((p - a).detach().abs().max()) for p, a in zip(params, adamw_params)) > 1e-4
    for p, a in zip(params, adamw_params):  # continue from the same point with the trust ratio off
        a.data.copy_(p.data)
        adamw.state[a]["exp_avg"].copy_(opt.state[p]["exp_avg"])
        adamw.state[a]["exp_avg_sq"].copy_(opt.state[p]["exp_avg_sq"])
    opt.param_groups[0]["layer_adaptation"] = False
    run_steps(opt, params, grads[2:])
    run_steps(adamw, adamw_params, grads[2:])
    assert_close_rel(params, adamw_params, torch.float32, what="params")


# --------------------------------------------------------------------------------------------------
# Determinism, zero-size parameters
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,kwargs",
    [(optgen.LAMB, dict(lr=1e-2)), (optgen.NVLAMB, dict(lr=1e-2)), (optgen.LARS, dict(lr=1.0, trust_coefficient=0.01))],
    ids=["LAMB", "NVLAMB", "LARS"],
)
def test_two_runs_are_bitwise_equal(cls, kwargs, backend):
    grads = make_grads(ODD_SHAPES, 3)
    runs = []
    for _ in range(2):
        params = make_params()
        opt = cls(params, backend=backend, **kwargs)
        run_steps(opt, params, grads)
        runs.append((params, [opt.state[p] for p in params]))
    assert_bitwise(runs[0][0], runs[1][0], "params")
    for s0, s1 in zip(runs[0][1], runs[1][1]):
        for name in s0:
            assert_bitwise(s0[name], s1[name], name)


def test_zero_size_parameters(backend):
    shapes = [(0,), (5,), (0, 3), (300,)]
    grads = make_grads(shapes, 3)
    params = make_params(shapes, zero=())
    ref_params = clone_params(params)
    opt = optgen.NVLAMB(params, backend=backend)
    run_steps(opt, params, grads)
    assert [float(opt.state[p]["step"]) for p in params] == [3.0] * 4
    ref = optgen.NVLAMB(ref_params[1::2], backend="torch")
    run_steps(ref, ref_params[1::2], [s[1::2] for s in grads])
    assert_close_rel(params[1::2], ref_params[1::2], torch.float32, what="non-empty params")


# --------------------------------------------------------------------------------------------------
# Custom specs run on both backends
# --------------------------------------------------------------------------------------------------


def test_spec_with_constant_sqrt_runs_on_torch_backend():
    spec = optgen.Spec("ScaledSGD")
    lr = spec.hyper(lr=0.1)
    spec.update(spec.param, spec.param - lr * spec.grad / sympy.sqrt(2))
    cls = optgen.build(spec)
    (p,) = make_params([(5,)], zero=(0,))
    p.grad = torch.ones(5)
    cls([p], backend="torch").step()
    assert_close_rel(p, torch.full((5,), -0.1 / 2**0.5), torch.float32, tol=TOL[torch.float32])


# --------------------------------------------------------------------------------------------------
# torch.optim interoperability and odd storage
# --------------------------------------------------------------------------------------------------


def test_loads_a_torch_optim_state_dict(backend):
    """torch.optim.AdamW's state_dict (same state names) continues in optgen.AdamW."""
    grads = make_grads(ODD_SHAPES, 6)
    ref_params = make_params()
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    run_steps(ref, ref_params, grads[:3])
    params = clone_params(ref_params)
    opt = optgen.AdamW(params, lr=1e-2, backend=backend)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    run_steps(opt, params, grads[3:])
    run_steps(ref, ref_params, grads[3:])
    assert_close_rel(params, ref_params, torch.float32, what="params")
    assert all(float(opt.state[p]["step"]) == 6 for p in params)


def test_unaligned_views_into_one_buffer():
    """Parameters that are views at 4-byte (not 16-byte) offsets of one flat buffer: the unaligned kernels."""
    offsets = [(1, 8), (9, 300), (301, 302), (303, 700)]
    results = {}
    for backend in BACKENDS:
        flat = torch.randn(1000, generator=torch.Generator().manual_seed(0))
        original = flat.clone()
        params = [torch.nn.Parameter(flat[a:b]) for a, b in offsets]
        assert any(p.data_ptr() % 16 for p in params)
        opt = optgen.LAMB(params, lr=1e-2, backend=backend)
        grads = make_grads([(b - a,) for a, b in offsets], 3)
        run_steps(opt, params, grads)
        results[backend] = params
        gaps = [0, 8, 300, 302] + list(range(700, 1000))
        assert torch.equal(flat[gaps], original[gaps])  # elements between the parameters are untouched
    assert_close_rel(results["triton"], results["torch"], torch.float32, what="params")


def test_step_with_closure_returns_the_loss(backend):
    (p,) = make_params([(5,)], zero=())
    opt = optgen.LAMB([p], lr=1e-2, backend=backend)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    assert torch.equal(loss, (before**2).sum())
    assert not torch.equal(p.detach(), before)


def test_generated_signature_and_defaults():
    import inspect

    parameters = inspect.signature(optgen.LAMB).parameters
    assert list(parameters) == [
        "params",
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "trust_clip",
        "layer_adaptation",
        "bias_correction",
        "eps_inside_sqrt",
        "max_grad_norm",
        "maximize",
        "foreach",
        "capturable",
        "differentiable",
        "fused",
        "master_weights",
        "state_dtype",
        "state_format",
        "bf16_stochastic_round",
        "backend",
        "autotune",
    ]
    assert parameters["betas"].default == (0.9, 0.999)
    for option in ("max_grad_norm", "maximize", "foreach", "capturable", "differentiable", "fused", "master_weights",
                   "state_dtype", "backend", "autotune"):  # fmt: skip
        assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY
    opt = optgen.LAMB(make_params([(3,)]))
    # torch.optim keeps its flags and implementation options in the defaults (and so in every group)
    assert opt.defaults == dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, trust_clip=(0.0, math.inf), layer_adaptation=True,
        bias_correction=True, eps_inside_sqrt=False, maximize=False,
        foreach=None, capturable=False, differentiable=False, fused=None,
    )  # fmt: skip
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize("mode", ["in_place", "zero_grad_accumulate", "double_buffer"])
def test_gradient_storage_does_not_matter(mode, backend):
    """Gradients written in place, accumulated after zero_grad(set_to_none=False), or alternating between two
    buffers (new addresses every step) give bitwise the results of fresh gradient tensors."""
    steps = 4
    grads = make_grads(SHAPES, steps)
    fresh = make_params(SHAPES)
    run_steps(optgen.LAMB(fresh, lr=1e-2, backend=backend), fresh, grads)

    params = make_params(SHAPES)
    opt = optgen.LAMB(params, lr=1e-2, backend=backend)
    buffers = [[torch.zeros(s) for s in SHAPES] for _ in range(2)]
    for k, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            if mode == "double_buffer":
                p.grad = buffers[k % 2][i]
                p.grad.copy_(g)
            elif p.grad is None:
                p.grad = g.clone()
            elif mode == "in_place":
                p.grad.copy_(g)
            else:
                p.grad.add_(g)
        opt.step()
        if mode == "zero_grad_accumulate":
            opt.zero_grad(set_to_none=False)
    assert_bitwise(params, fresh, "params")


# --------------------------------------------------------------------------------------------------
# OPTGEN_* environment switches: one table, typed readers (optgen/settings.py)
# --------------------------------------------------------------------------------------------------

PACKAGE = Path(optgen.__file__).parent


def test_every_optgen_switch_is_in_the_settings_table_and_read_through_it():
    """No module reads an OPTGEN_* variable itself, every name the package mentions is in the table, and the
    architecture notes list the table."""
    ad_hoc = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["']OPTGEN_""")
    mentioned = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        mentioned |= set(re.findall(r"\bOPTGEN_[A-Z0-9_]*[A-Z0-9]", text))
        if path.name != "settings.py":
            assert not ad_hoc.search(text), f"{path}: read OPTGEN_* through optgen.settings"
    assert mentioned <= set(settings.SETTINGS), mentioned - set(settings.SETTINGS)
    notes = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert all(f"`{name}" in notes for name in settings.SETTINGS)
    assert all(s.doc and s.kind in ("flag", "count", "choice", "path") for s in settings.SETTINGS.values())


def test_settings_are_read_at_call_time_and_bad_values_name_the_variable(monkeypatch, tmp_path):
    from optgen.runtime import autotune, c_backend, triton_backend

    monkeypatch.setenv("OPTGEN_C_PARALLEL_MIN", "1e3")
    assert c_backend.parallel_min() == 1000
    monkeypatch.setenv("OPTGEN_C_PARALLEL_MIN", "")  # empty: the default
    assert c_backend.parallel_min() == settings.default("OPTGEN_C_PARALLEL_MIN") == 2**15
    for bad, why in (("abc", "a number"), ("1.5", "a whole number"), ("0", "a positive number"), ("inf", "a number")):
        monkeypatch.setenv("OPTGEN_CHUNK", bad)
        with pytest.raises(ValueError, match=f"OPTGEN_CHUNK='{bad}': expected {why} of elements"):
            triton_backend.default_config()
    monkeypatch.setenv("OPTGEN_CHUNK", "512")
    monkeypatch.setenv("OPTGEN_BLOCK", "128")
    assert (triton_backend.default_config().chunk, triton_backend.default_config().block) == (512, 128)
    monkeypatch.setenv("OPTGEN_AUTOTUNE_SEARCH", " Grid ")
    assert autotune.search_mode() == "grid"
    for text, value in (("1", True), ("on", True), ("TRUE", True), ("0", False), ("no", False), ("", False)):
        monkeypatch.setenv("OPTGEN_AUTOTUNE", text)
        assert settings.flag("OPTGEN_AUTOTUNE") is value
    monkeypatch.setenv("OPTGEN_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="OPTGEN_AUTOTUNE='maybe': expected 1 or 0"):
        settings.flag("OPTGEN_AUTOTUNE")
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    assert render.cache_dir() == tmp_path
    monkeypatch.delenv("OPTGEN_CACHE_DIR")
    assert render.cache_dir() == Path.home() / ".cache" / "optgen"
    with pytest.raises(KeyError):
        settings.count("OPTGEN_NO_SUCH_SWITCH")  # a misspelt name fails instead of reading nothing
    with pytest.raises(TypeError, match="OPTGEN_CHUNK is a count setting"):
        settings.flag("OPTGEN_CHUNK")
