"""The training-grade runtime on both backends: param groups for layer-wise optimizers, ``trust_clip``,
``max_grad_norm``, ``maximize``, mixed precision (master weights, ``state_dtype``), torch.amp.GradScaler,
tensor learning rates, LR schedulers, checkpoints, the ``torch.optim`` step contract and input validation.

References are torch.optim (after ``torch.nn.utils.clip_grad_norm_`` where clipping is involved) or float64
transcriptions of the docstring formulas; gradients come from a ``torch.Generator`` or from a small MLP on
fixed random data, identical for both runs of a comparison.
"""

import io
import math
import types
import warnings

import pytest
import torch
from conftest import (
    BACKENDS,
    TOL,
    TOL_F64_REFERENCE,
    RecordHostSyncs,
    assert_bitwise,
    assert_close_rel,
    clone_params,
    compiled_code,
    make_grads,
    make_params,
    rel_err,
    run_steps,
)

import optgen
from optgen.codegen import render

SHAPES = [(), (3, 1, 4), (7,), (257,), (7,)]  # 257 straddles the 256-element test chunk; the last is a bias


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def make_mlp(seed=0, dtype=torch.float32, head=False):
    """Linear(8, 16) - LayerNorm(16) - Tanh - Linear(16, 4) [- an unused Linear(4, 2) head], with weights from a
    torch.Generator (the global RNG is never touched)."""
    gen = torch.Generator().manual_seed(seed)
    layers = [torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 4)]
    model = torch.nn.Sequential(*layers)
    if head:
        model.add_module("head", torch.nn.Linear(4, 2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name == "1.weight" else 0.0))
    return model.to(dtype)


_DATA = torch.Generator().manual_seed(1)
X = torch.randn(32, 8, generator=_DATA)
Y = torch.randn(32, 4, generator=_DATA)


def mlp_loss(model, scale=1.0):
    """Mean squared error of the first four layers on (X, Y), computed in the model's dtype, loss in fp32."""
    dtype = next(model.parameters()).dtype
    out = model[:4](X.to(dtype)).float()
    return ((out - Y) ** 2).mean() * scale


def loss_value(model) -> float:
    with torch.no_grad():
        return float(mlp_loss(model))


def backward(model, scale=1.0):
    for p in model.parameters():
        p.grad = None
    loss = mlp_loss(model, scale)
    loss.backward()
    return loss


def record_syncs_in_step(opt) -> RecordHostSyncs:
    """Wrap ``opt.step`` (only the optimizer's step, not what calls it) in a host-sync recorder."""
    recorder = RecordHostSyncs()
    inner = opt.step

    def step(self, *args, **kwargs):
        with recorder:
            return inner(*args, **kwargs)

    opt.step = types.MethodType(step, opt)  # a bound method, as LR schedulers expect to wrap
    return recorder


def snapshot(opt, params):
    """Deep copies of what a failed call must leave untouched: parameters, state, step counts, groups."""
    return (
        [p.detach().clone() for p in params],
        {id(p): {k: v.detach().clone() for k, v in opt.state[p].items()} for p in params if p in opt.state},
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        [len(g["params"]) for g in opt.param_groups],
    )


def assert_unchanged(opt, params, before):
    values, states, groups, sizes = before
    assert_bitwise([p.detach() for p in params], values, "params")
    now = {id(p): opt.state[p] for p in params if p in opt.state and len(opt.state[p])}
    assert set(now) == {k for k, v in states.items() if len(v)}, "state created or dropped"
    for key, state in now.items():
        assert set(state) == set(states[key])
        for name, value in state.items():
            assert_bitwise(value, states[key][name], name)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert [len(g["params"]) for g in opt.param_groups] == sizes


def global_norm(grads) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))


def scaled_grads(shapes, scales, seed=1):
    """One step of gradients per entry of ``scales``, each step multiplied by its scale (so a global-norm
    clip changes the relative weight of the steps, which even scale-invariant Adam sees)."""
    grads = make_grads(shapes, len(scales), seed=seed)
    return [[g * s for g in step] for step, s in zip(grads, scales)]


def save_load(state_dict):
    """A checkpoint round trip through torch.save / torch.load (weights_only, as torch loads by default)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------------------------------
# float64 references of the docstring formulas, with phi(||w||) = clip(||w||, lo, hi)
# --------------------------------------------------------------------------------------------------


def _f64(tensors):
    return [t.detach().to(torch.float64).clone() for t in tensors]


def _per_param(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def lamb_reference(params, grads, lr, betas, eps, wd, trust_clip=(0.0, math.inf), adaptation=True,
                   max_grad_norm=None, clipped=None):
    """LAMB (docstring): u = m_hat / (sqrt(v_hat) + eps) + wd w; r = phi(||w||) / ||u||, 1 where ||w|| or ||u||
    is 0 or adaptation is off; w <- w - lr r u; phi(z) = min(max(z, lo), hi). ``wd`` and ``adaptation`` may be
    per-parameter lists. ``clipped`` (a list) collects, per step, which layers phi clipped."""
    beta1, beta2 = betas
    lo, hi = trust_clip
    w = _f64(params)
    wd, adaptation = _per_param(wd, len(w)), _per_param(adaptation, len(w))
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t, step_grads in enumerate(grads, start=1):
        g = _f64(step_grads)
        if max_grad_norm is not None:
            total = math.sqrt(sum(float((x * x).sum()) for x in g))
            g = [x / max(1.0, total / max_grad_norm) for x in g]
        flags = []
        for i in range(len(w)):
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            u = (m[i] / (1 - beta1**t)) / (torch.sqrt(v[i] / (1 - beta2**t)) + eps) + wd[i] * w[i]
            w_norm, u_norm = float(w[i].norm()), float(u.norm())
            phi = min(max(w_norm, lo), hi)
            flags.append(phi != w_norm and w_norm > 0)
            r = phi / u_norm if (w_norm > 0 and u_norm > 0 and adaptation[i]) else 1.0
            w[i] = w[i] - lr * r * u
        if clipped is not None:
            clipped.append(flags)
    return w, m, v


def lars_reference(params, grads, lr, momentum, wd, coeff, eps, trust_clip=(0.0, math.inf), clipped=None):
    """LARS (docstring): r = c phi(||w||) / (||g|| + wd ||w|| + eps), 1 where ||w|| or ||g|| is 0;
    m <- mu m + lr r (g + wd w); w <- w - m; phi(z) = min(max(z, lo), hi)."""
    lo, hi = trust_clip
    w = _f64(params)
    buf = [torch.zeros_like(x) for x in w]
    for step_grads in grads:
        g = _f64(step_grads)
        flags = []
        for i in range(len(w)):
            w_norm, g_norm = float(w[i].norm()), float(g[i].norm())
            phi = min(max(w_norm, lo), hi)
            flags.append(phi != w_norm and w_norm > 0)
            r = coeff * phi / (g_norm + wd * w_norm + eps) if (w_norm > 0 and g_norm > 0) else 1.0
            buf[i] = momentum * buf[i] + lr * r * (g[i] + wd * w[i])
            w[i] = w[i] - buf[i]
        if clipped is not None:
            clipped.append(flags)
    return w, buf


# --------------------------------------------------------------------------------------------------
# optgen.param_groups
# --------------------------------------------------------------------------------------------------


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_param_groups_default_excludes_vectors():
    model = make_mlp()
    groups = optgen.param_groups(model, weight_decay=0.05, lr=1e-2)
    assert len(groups) == 2
    matrices, vectors = groups
    assert _names(model, matrices) == ["0.weight", "3.weight"]
    assert _names(model, vectors) == ["0.bias", "1.bias", "1.weight", "3.bias"]  # biases and the LayerNorm
    assert matrices["weight_decay"] == 0.05 and "layer_adaptation" not in matrices
    assert vectors["weight_decay"] == 0.0 and vectors["layer_adaptation"] is False
    assert matrices["lr"] == vectors["lr"] == 1e-2  # options are copied into every group
    # every trainable parameter exactly once, frozen ones left out, empty groups dropped
    model[3].bias.requires_grad_(False)
    groups = optgen.param_groups(model)
    assert sorted(n for g in groups for n in _names(model, g)) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad)
    assert "3.bias" not in [n for g in groups for n in _names(model, g)]
    only_matrices = torch.nn.Linear(3, 3, bias=False)
    assert len(optgen.param_groups(only_matrices)) == 1


def test_param_groups_rules_are_callables_or_name_substrings():
    model = make_mlp()
    groups = optgen.param_groups(model, weight_decay=0.1, no_decay=lambda name, p: name.endswith("bias"),
                                 no_adaptation=["1."])
    by_key = {(g["weight_decay"], g.get("layer_adaptation", True)): _names(model, g) for g in groups}
    assert by_key == {
        (0.1, True): ["0.weight", "3.weight"],
        (0.1, False): ["1.weight"],  # LayerNorm weight: decayed, not adapted
        (0.0, True): ["0.bias", "3.bias"],
        (0.0, False): ["1.bias"],
    }
    nothing = optgen.param_groups(model, no_decay=[], no_adaptation=lambda name, p: False)
    assert len(nothing) == 1 and nothing[0]["weight_decay"] == 0.01 and len(nothing[0]["params"]) == 6


def test_param_groups_train_with_lamb(backend):
    """The default groups in LAMB: matrices get the trust ratio and weight decay, vectors plain Adam steps
    without decay -- the float64 reference with per-parameter settings."""
    model = make_mlp()
    named = list(model.named_parameters())
    opt = optgen.LAMB(optgen.param_groups(model, weight_decay=0.1), lr=1e-2, backend=backend)
    vector = [p.ndim <= 1 for _, p in named]
    params = [p for _, p in named]
    grads = make_grads([tuple(p.shape) for p in params], 5)
    expected, _, _ = lamb_reference(params, grads, 1e-2, (0.9, 0.999), 1e-6,
                                    [0.0 if v else 0.1 for v in vector], adaptation=[not v for v in vector])
    run_steps(opt, params, grads)
    assert_close_rel(params, expected, tol=TOL_F64_REFERENCE, what="params")
    # one group without the exclusions would have moved the LayerNorm weight (norm ~4) by the trust ratio
    single, _, _ = lamb_reference(params, grads, 1e-2, (0.9, 0.999), 1e-6, 0.1)
    assert rel_err(params[2], single[2]) > 1e-3
    # and a real training loop with these groups lowers the loss
    first = loss_value(model)
    for _ in range(5):
        backward(model)
        opt.step()
    assert loss_value(model) < first


# --------------------------------------------------------------------------------------------------
# trust_clip
# --------------------------------------------------------------------------------------------------

CLIP_SHAPES = [(4, 5), (7,), (257,), (3, 1, 4), (7,)]
CLIP_SCALES = [10.0, 0.01, 0.1, 1.0, 0.0]  # ||w|| ~ 45 (> hi), ~ 0.03 (< lo), ~ 1.6, ~ 3.5, 0 (a bias)
BIG, SMALL, MIDDLE = 0, 1, 2


def _clip_params():
    params = make_params(CLIP_SHAPES, zero=())
    with torch.no_grad():
        for p, s in zip(params, CLIP_SCALES):
            p.mul_(s)
    return params


@pytest.mark.parametrize("cls", ["LAMB", "LARS"])
def test_trust_clip_matches_float64_reference(cls, backend):
    lo, hi = 0.5, 5.0
    steps = 12
    grads = make_grads(CLIP_SHAPES, steps)
    params = _clip_params()
    unclipped_params = clone_params(params)
    flags = []
    if cls == "LAMB":
        hypers = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
        expected, expected_m, _ = lamb_reference(params, grads, *hypers.values(), trust_clip=(lo, hi), clipped=flags)
        plain, _, _ = lamb_reference(params, grads, *hypers.values())
        opt = optgen.LAMB(params, trust_clip=(lo, hi), backend=backend, **hypers)
        default = optgen.LAMB(unclipped_params, backend=backend, **hypers)
        state = "exp_avg"
    else:
        hypers = dict(lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01, eps=1e-8)
        expected, expected_m = lars_reference(params, grads, *hypers.values(), trust_clip=(lo, hi), clipped=flags)
        plain, _ = lars_reference(params, grads, *hypers.values())
        opt = optgen.LARS(params, trust_clip=(lo, hi), backend=backend, **hypers)
        default = optgen.LARS(unclipped_params, backend=backend, **hypers)
        state = "momentum_buffer"
    # the clip really acts: above hi and below lo on every step, never on the middle layer
    assert all(f[BIG] and f[SMALL] and not f[MIDDLE] for f in flags)
    run_steps(opt, params, grads)
    run_steps(default, unclipped_params, grads)
    assert_close_rel(params, expected, tol=TOL_F64_REFERENCE, what="clipped params")
    assert_close_rel([opt.state[p][state] for p in params], expected_m, tol=TOL_F64_REFERENCE, what=state)
    # the default (no clip) is the plain formula; the clip changes exactly the layers it clips
    assert_close_rel(unclipped_params, plain, tol=TOL_F64_REFERENCE, what="default params")
    assert rel_err(params[BIG], unclipped_params[BIG]) > 1e-3
    assert rel_err(params[SMALL], unclipped_params[SMALL]) > 1e-3
    assert_bitwise(params[MIDDLE], unclipped_params[MIDDLE], "unclipped layer")
    assert opt.param_groups[0]["trust_clip"] == (lo, hi)
    assert default.param_groups[0]["trust_clip"] == (0.0, math.inf)


def test_trust_clip_explicit_no_clip_is_the_default(backend):
    grads = make_grads(CLIP_SHAPES, 3)
    a, b = _clip_params(), _clip_params()
    run_steps(optgen.LAMB(a, lr=1e-2, backend=backend), a, grads)
    run_steps(optgen.LAMB(b, lr=1e-2, trust_clip=(0.0, math.inf), backend=backend), b, grads)
    assert_bitwise(a, b, "params")


# --------------------------------------------------------------------------------------------------
# max_grad_norm
# --------------------------------------------------------------------------------------------------

NORM_SCALES = [10.0, 1.0, 30.0, 3.0, 20.0, 5.0]  # global norms ~ 40 * scale: clipped by 1, never by 1e4


@pytest.mark.parametrize("max_norm", [1.0, 1e4], ids=["clipped", "unclipped"])
def test_lamb_max_grad_norm_is_nvlamb(max_norm, backend):
    grads = scaled_grads(SHAPES, NORM_SCALES)
    assert all((global_norm(g) > max_norm) == (max_norm == 1.0) for g in grads)
    params = make_params(SHAPES)
    nv_params = clone_params(params)
    opt = optgen.LAMB(params, lr=1e-2, max_grad_norm=max_norm, backend=backend)
    nv = optgen.NVLAMB(nv_params, lr=1e-2, max_grad_norm=max_norm, backend=backend)
    run_steps(opt, params, grads)
    run_steps(nv, nv_params, grads)
    assert_close_rel(params, nv_params, tol=TOL[torch.float32], what="params")
    for p, q in zip(params, nv_params):
        for name in ("exp_avg", "exp_avg_sq"):
            assert_close_rel(opt.state[p][name], nv.state[q][name], tol=TOL[torch.float32], what=name)
    assert opt.param_groups[0]["max_grad_norm"] == max_norm


@pytest.mark.parametrize("max_norm", [1.0, 1e4], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("ours,theirs,kwargs", [
    (optgen.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (optgen.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.01)),
], ids=["AdamW", "SGD"])
def test_max_grad_norm_matches_clip_grad_norm_then_torch(ours, theirs, kwargs, max_norm, backend):
    grads = scaled_grads(SHAPES, NORM_SCALES)
    clipped = max_norm == 1.0
    assert all((global_norm(g) > max_norm) == clipped for g in grads)
    params = make_params(SHAPES)
    ref_params, plain_params = clone_params(params), clone_params(params)
    opt = ours(params, max_grad_norm=max_norm, backend=backend, **kwargs)
    ref = theirs(ref_params, foreach=False, **kwargs)
    for step_grads in grads:
        for p, r, g in zip(params, ref_params, step_grads):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(ref_params, max_norm, foreach=False)
        ref.step()
        for p, g in zip(params, step_grads):
            assert torch.equal(p.grad, g), "the clip must happen inside the step, not on .grad"
    assert_close_rel(params, ref_params, tol=TOL[torch.float32], what="params")
    run_steps(ours(plain_params, backend=backend, **kwargs), plain_params, grads)
    if clipped:
        assert rel_err(params[3], plain_params[3]) > 1e-3  # the clip is visible
    else:
        assert_close_rel(params, plain_params, tol=TOL[torch.float32], what="unclipped params")


# --------------------------------------------------------------------------------------------------
# maximize
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ours,theirs,kwargs", [
    (optgen.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (optgen.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.01, nesterov=True)),
], ids=["AdamW", "SGD"])
def test_maximize_matches_torch(ours, theirs, kwargs, backend):
    grads = make_grads(SHAPES, 6)
    params = make_params(SHAPES)
    ref_params = clone_params(params)
    opt = ours(params, maximize=True, backend=backend, **kwargs)
    ref = theirs(ref_params, maximize=True, foreach=False, **kwargs)
    run_steps(opt, params, grads)
    run_steps(ref, ref_params, grads)
    assert_close_rel(params, ref_params, tol=TOL[torch.float32], what="params")


def test_maximize_lamb_is_lamb_on_negated_gradients(backend):
    grads = make_grads(SHAPES, 4)
    params, neg_params = make_params(SHAPES), make_params(SHAPES)
    run_steps(optgen.LAMB(params, lr=1e-2, maximize=True, backend=backend), params, grads)
    run_steps(optgen.LAMB(neg_params, lr=1e-2, backend=backend), neg_params, [[-g for g in s] for s in grads])
    assert_close_rel(params, neg_params, tol=TOL[torch.float32], what="params")
    # ascending the MLP's loss raises it
    model = make_mlp()
    opt = optgen.AdamW(model.parameters(), lr=1e-2, maximize=True, backend=backend)
    first = loss_value(model)
    for _ in range(3):
        backward(model)
        opt.step()
    assert loss_value(model) > first


# --------------------------------------------------------------------------------------------------
# Mixed precision: master weights and state_dtype
# --------------------------------------------------------------------------------------------------


def _train(cls, kwargs, dtype, backend, steps=30, **options):
    """``steps`` of the MLP in ``dtype`` (initial weights are the bf16 ones for every dtype)."""
    model = make_mlp(dtype=torch.bfloat16).to(dtype)
    opt = cls(model.parameters(), backend=backend, **kwargs, **options)
    for _ in range(steps):
        backward(model)
        opt.step()
    return model, opt


def test_master_weights_keep_an_fp32_copy(backend):
    params = make_params(SHAPES, dtype=torch.bfloat16)
    opt = optgen.AdamW(params, lr=1e-2, master_weights=True, backend=backend)
    grads = make_grads(SHAPES, 3, dtype=torch.bfloat16)
    run_steps(opt, params, grads[:1])
    for p in params:
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "master_param"}
        assert state["master_param"].dtype == torch.float32 and state["master_param"].shape == p.shape
        assert state["exp_avg"].dtype == torch.float32
    run_steps(opt, params, grads[1:])
    for p in params:
        master = opt.state[p]["master_param"]
        # the model's weights are written from the master copy (one bf16 ulp: the interpreter truncates)
        assert_close_rel(p, master.to(torch.bfloat16), torch.bfloat16, what="param from master")
    # the master copy holds what bf16 cannot: the fp32 run's values
    ref_params = [torch.nn.Parameter(p.detach().float()) for p in make_params(SHAPES, dtype=torch.bfloat16)]
    run_steps(optgen.AdamW(ref_params, lr=1e-2, backend=backend), ref_params, [[g.float() for g in s] for s in grads])
    assert_close_rel([opt.state[p]["master_param"] for p in params], ref_params, tol=TOL[torch.float32],
                     what="master vs fp32 run")


@pytest.mark.parametrize("cls,kwargs", [(optgen.AdamW, dict(lr=3e-3)), (optgen.LAMB, dict(lr=3e-3))],
                         ids=["AdamW", "LAMB"])
def test_bf16_training_with_master_weights_tracks_fp32(cls, kwargs, backend):
    fp32, _ = _train(cls, kwargs, torch.float32, backend)
    master, opt = _train(cls, kwargs, torch.bfloat16, backend, master_weights=True)
    plain, _ = _train(cls, kwargs, torch.bfloat16, backend)
    initial = make_mlp(dtype=torch.bfloat16)
    ref = list(fp32.parameters())
    moved = max(rel_err(p, q) for p, q in zip(initial.parameters(), ref))
    err_master = max(rel_err(p, q) for p, q in zip(master.parameters(), ref))
    err_plain = max(rel_err(p, q) for p, q in zip(plain.parameters(), ref))
    assert moved > 0.05  # the runs really trained
    assert err_master < 2e-2, f"bf16 + master weights: {err_master:.3e} from the fp32 run"
    assert err_master < err_plain / 2, f"master {err_master:.3e} not closer than plain bf16 {err_plain:.3e}"
    assert all(p.dtype == torch.bfloat16 for p in master.parameters())
    assert all(opt.state[p]["master_param"].dtype == torch.float32 for p in master.parameters())


def test_master_weights_on_fp32_params_warn_and_do_nothing(backend):
    grads = make_grads(SHAPES, 3)
    params, plain_params = make_params(SHAPES), make_params(SHAPES)
    with pytest.warns(UserWarning, match="master_weights=True has no effect"):
        opt = optgen.LAMB(params, lr=1e-2, master_weights=True, backend=backend)
    run_steps(opt, params, grads)
    run_steps(optgen.LAMB(plain_params, lr=1e-2, backend=backend), plain_params, grads)
    assert all("master_param" not in opt.state[p] for p in params)
    assert_bitwise(params, plain_params, "params")


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_state_dtype_sets_the_dtype_of_the_moments(state_dtype, backend):
    params = make_params(SHAPES, dtype=torch.bfloat16)
    opt = optgen.LAMB(params, lr=1e-2, state_dtype=state_dtype, master_weights=True, backend=backend)
    run_steps(opt, params, make_grads(SHAPES, 2, dtype=torch.bfloat16))
    for p in params:
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == state_dtype
        assert state["master_param"].dtype == torch.float32  # master weights stay fp32
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 2
    fp32 = optgen.AdamW(make_params(SHAPES), lr=1e-2, backend=backend)
    run_steps(fp32, fp32.param_groups[0]["params"], make_grads(SHAPES, 1))
    assert all(fp32.state[p]["exp_avg"].dtype == torch.float32 for p in fp32.param_groups[0]["params"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dtype_bf16_moments_are_the_fp32_ones_rounded(param_dtype, backend):
    grads = make_grads(SHAPES, 3, dtype=param_dtype)
    params, ref_params = make_params(SHAPES, dtype=param_dtype), make_params(SHAPES, dtype=param_dtype)
    master = param_dtype == torch.bfloat16
    opt = optgen.AdamW(params, lr=1e-2, state_dtype=torch.bfloat16, master_weights=master, backend=backend)
    ref = optgen.AdamW(ref_params, lr=1e-2, master_weights=master, backend=backend)
    run_steps(opt, params, grads)
    run_steps(ref, ref_params, grads)
    for p, r in zip(params, ref_params):
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
        if master:
            assert opt.state[p]["master_param"].dtype == torch.float32  # master weights stay fp32
        for name in ("exp_avg", "exp_avg_sq"):  # the moments are the fp32 ones, rounded to bf16
            assert_close_rel(opt.state[p][name], ref.state[r][name], torch.bfloat16, tol=2 * TOL[torch.bfloat16],
                             what=name)
    assert_close_rel(params, ref_params, torch.bfloat16, tol=4 * TOL[torch.bfloat16], what="params")


# --------------------------------------------------------------------------------------------------
# AMP: torch.amp.GradScaler
# --------------------------------------------------------------------------------------------------

AMP_CASES = [
    (optgen.AdamW, dict(lr=1e-2), torch.float32),
    (optgen.LAMB, dict(lr=1e-2), torch.float32),
    (optgen.NVLAMB, dict(lr=1e-2), torch.float32),
    (optgen.AdamW, dict(lr=1e-2, max_grad_norm=0.5), torch.float32),
    (optgen.LAMB, dict(lr=1e-2, master_weights=True), torch.bfloat16),
]
AMP_IDS = ["AdamW", "LAMB", "NVLAMB", "AdamW-clip", "LAMB-bf16-master"]
# "as_shipped": the class as it is; "fused": the instance opts into GradScaler's fused-optimizer contract
# (``_step_supports_amp_scaling``): the scaler then sets ``grad_scale``/``found_inf`` and the generated step
# unscales and skips on the device (the AMP variant of the plan).
AMP_MODES = ["as_shipped", "fused"]


def _amp_optimizer(cls, kwargs, model, backend, mode):
    opt = cls(model.parameters(), backend=backend, **kwargs)
    if mode == "fused":
        opt._step_supports_amp_scaling = True
    return opt


@pytest.mark.parametrize("mode", AMP_MODES)
@pytest.mark.parametrize("cls,kwargs,dtype", AMP_CASES, ids=AMP_IDS)
def test_grad_scaler_run_equals_unscaled_run(cls, kwargs, dtype, mode, backend):
    """Loss scaled by a power of two, gradients unscaled exactly: the run is the unscaled one."""
    model, ref_model = make_mlp(dtype=dtype), make_mlp(dtype=dtype)
    opt = _amp_optimizer(cls, kwargs, model, backend, mode)
    ref = cls(ref_model.parameters(), backend=backend, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    recorder = record_syncs_in_step(opt)
    for _ in range(4):
        for p in model.parameters():
            p.grad = None
        scaler.scale(mlp_loss(model)).backward()
        scaler.step(opt)
        scaler.update()
        backward(ref_model)
        ref.step()
    assert recorder.syncs == []
    assert scaler.get_scale() == 2.0**10
    assert_close_rel(list(model.parameters()), list(ref_model.parameters()), dtype, what="params")
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert float(opt.state[p]["step"]) == 4
        for name in opt.state[p]:
            assert_close_rel(opt.state[p][name], ref.state[q][name], tol=TOL[torch.float32], what=name)
    if mode == "fused":
        assert any(amp == "unscale" for _, amp, _ in opt._runner._plans)  # the AMP variant ran, grad_scale on the device


@pytest.mark.parametrize("mode", AMP_MODES)
@pytest.mark.parametrize("cls,kwargs,dtype", AMP_CASES, ids=AMP_IDS)
def test_grad_scaler_skips_the_step_on_inf(cls, kwargs, dtype, mode, backend):
    """An inf (and a NaN) gradient: the step is skipped -- on the fused contract inside the generated step, which
    runs and must write back every old value -- and the scaler halves its scale."""
    model, ref_model = make_mlp(dtype=dtype), make_mlp(dtype=dtype)
    opt = _amp_optimizer(cls, kwargs, model, backend, mode)
    ref = cls(ref_model.parameters(), backend=backend, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    params = list(model.parameters())
    recorder = record_syncs_in_step(opt)
    for k in range(4):
        for p in params:
            p.grad = None
        scaler.scale(mlp_loss(model)).backward()
        if k == 2:
            model[0].weight.grad[0, 0] = float("inf")
            model[3].bias.grad[1] = float("nan")
            before = snapshot(opt, params)
        scaler.step(opt)
        scaler.update()
        if k == 2:
            assert_unchanged(opt, params, before)  # parameters, states and step counts
            assert all(float(opt.state[p]["step"]) == 2 for p in params)
            assert scaler.get_scale() == 2.0**9  # the scaler backs off
        else:
            backward(ref_model)
            ref.step()
    assert recorder.syncs == []
    # the skipped step left no trace: the run equals one without that step
    assert_close_rel(params, list(ref_model.parameters()), dtype, what="params")
    assert all(float(opt.state[p]["step"]) == 3 for p in params)


@pytest.mark.parametrize("mode", AMP_MODES)
def test_grad_scaler_with_unscale_and_clip(mode, backend):
    """``scaler.unscale_(opt)`` then ``clip_grad_norm_`` then ``scaler.step``: the usual AMP clipping recipe
    (on the fused contract the step gets ``found_inf`` without ``grad_scale``)."""
    model, ref_model = make_mlp(), make_mlp()
    opt = _amp_optimizer(optgen.LAMB, dict(lr=1e-2), model, backend, mode)
    ref = optgen.LAMB(ref_model.parameters(), lr=1e-2, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(3):
        for p in model.parameters():
            p.grad = None
        scaler.scale(mlp_loss(model)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()
        backward(ref_model)
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)
        ref.step()
    assert_close_rel(list(model.parameters()), list(ref_model.parameters()), tol=TOL[torch.float32], what="params")
    if mode == "fused":
        assert any(amp == "gate" for _, amp, _ in opt._runner._plans)  # already unscaled: the step only skips on found_inf


def test_grad_scaler_uses_the_fused_contract(backend):
    model = make_mlp()
    opt = optgen.AdamW(model.parameters(), lr=1e-2, backend=backend)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append((getattr(o, "grad_scale", None),
                                                                     getattr(o, "found_inf", None))))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(mlp_loss(model)).backward()
    with RecordHostSyncs() as recorder:
        scaler.step(opt)
    assert len(seen) == 1
    grad_scale, found_inf = seen[0]
    assert isinstance(found_inf, torch.Tensor) and float(found_inf) == 0
    assert isinstance(grad_scale, torch.Tensor) and float(grad_scale) == 2.0**10
    assert recorder.syncs == []  # nothing in scaler.step waits for the device


# --------------------------------------------------------------------------------------------------
# Tensor learning rates (capturable style)
# --------------------------------------------------------------------------------------------------

LR_VALUES = [2.0**-6, 2.0**-6, 2.0**-7, 2.0**-9, 0.0, 2.0**-5]  # exact in fp32: no rounding between runs


@pytest.mark.parametrize("cls", [optgen.AdamW, optgen.LAMB], ids=["AdamW", "LAMB"])
def test_tensor_lr_changed_in_place_takes_effect(cls, backend):
    grads = make_grads(SHAPES, len(LR_VALUES))
    params = make_params(SHAPES)
    float_params = clone_params(params)
    lr = torch.tensor(LR_VALUES[0])  # one tensor shared by two groups with different weight decay

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.0}, {"params": ps[2:]}]

    opt = cls(groups(params), lr=lr, weight_decay=0.1, backend=backend)
    by_hand = cls(groups(float_params), lr=LR_VALUES[0], weight_decay=0.1, backend=backend)
    assert all(group["lr"] is lr for group in opt.param_groups)
    recorder = record_syncs_in_step(opt)
    for k, value in enumerate(LR_VALUES):
        lr.fill_(value)
        for group in by_hand.param_groups:
            group["lr"] = value
        before = [p.detach().clone() for p in params]
        run_steps(opt, params, grads[k : k + 1])
        run_steps(by_hand, float_params, grads[k : k + 1])
        if value == 0.0:  # lr 0: AdamW's decoupled decay and step are both zero; LAMB's too
            assert_bitwise([p.detach() for p in params], before, "params at lr=0")
    assert recorder.syncs == []
    assert_bitwise(params, float_params, "params")


def test_tensor_lr_matches_torch_adamw_with_tensor_lr(backend):
    grads = make_grads(SHAPES, 4)
    params = make_params(SHAPES)
    ref_params = clone_params(params)
    lr, ref_lr = torch.tensor(1e-2), torch.tensor(1e-2)
    opt = optgen.AdamW(params, lr=lr, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=ref_lr, foreach=False)
    for k in range(4):
        run_steps(opt, params, grads[k : k + 1])
        run_steps(ref, ref_params, grads[k : k + 1])
        lr.mul_(0.5)
        ref_lr.mul_(0.5)
    assert_close_rel(params, ref_params, tol=TOL[torch.float32], what="params")


# --------------------------------------------------------------------------------------------------
# LR schedulers
# --------------------------------------------------------------------------------------------------

SCHED_STEPS = 8


def _make_scheduler(name, opt):
    if name == "StepLR":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    if name == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=SCHED_STEPS, eta_min=1e-4)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=SCHED_STEPS, cycle_momentum=True,
                                               base_momentum=0.8, max_momentum=0.95)


def _schedule(name, kwargs):
    """(lr, betas) per step from a torch.optim optimizer driven by the same scheduler: independent of optgen."""
    dummy = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    scheduler = _make_scheduler(name, dummy)
    values = []
    for _ in range(SCHED_STEPS):
        values.append((dummy.param_groups[0]["lr"], dummy.param_groups[0]["betas"]))
        dummy.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("name", ["StepLR", "CosineAnnealingLR", "OneCycleLR"])
def test_lr_scheduler_equals_lr_set_by_hand(name, backend):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.999))
    model, manual_model = make_mlp(), make_mlp()
    opt = optgen.LAMB(optgen.param_groups(model), backend=backend, **kwargs)
    manual = optgen.LAMB(optgen.param_groups(manual_model), backend=backend, **kwargs)
    scheduler = _make_scheduler(name, opt)
    schedule = _schedule(name, kwargs)
    lrs = [lr for lr, _ in schedule]
    assert len(set(lrs)) > 2
    if name == "OneCycleLR":  # cycle_momentum drives beta1 of our betas tuple
        assert len({b[0] for _, b in schedule}) > 2 and all(b[1] == 0.999 for _, b in schedule)
    misses = module = None
    for k, (lr, betas) in enumerate(schedule):
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(lr, rel=1e-12) and tuple(group["betas"]) == pytest.approx(betas)
        for group in manual.param_groups:
            group["lr"], group["betas"] = lr, betas
        backward(model)
        opt.step()
        backward(manual_model)
        manual.step()
        scheduler.step()
        if k == 0:  # generated code is loaded by the first step; no schedule value loads more
            misses = render._import.cache_info().misses
            module = compiled_code(opt._backends[backend])
            backend_object = opt._backends[backend]
    assert render._import.cache_info().misses == misses
    assert len(opt._backends) == 1 and opt._backends[backend] is backend_object
    assert compiled_code(backend_object) == module
    assert_bitwise(list(model.parameters()), list(manual_model.parameters()), "params")
    if name == "OneCycleLR":  # the betas really were read: without momentum cycling the result differs
        still = make_mlp()
        fixed = optgen.LAMB(optgen.param_groups(still), backend=backend, **kwargs)
        for lr, _ in schedule:
            for group in fixed.param_groups:
                group["lr"] = lr
            backward(still)
            fixed.step()
        assert max(rel_err(p, q) for p, q in zip(model.parameters(), still.parameters())) > 1e-4


def test_lr_scheduler_on_a_tensor_lr_needs_no_sync(backend):
    """torch's schedulers fill_() a tensor lr in place; the step reads it on the device."""
    model, manual_model = make_mlp(), make_mlp()
    lr = torch.tensor(1e-2)
    opt = optgen.AdamW(model.parameters(), lr=lr, backend=backend)
    manual = optgen.AdamW(manual_model.parameters(), lr=1e-2, backend=backend)
    recorder = record_syncs_in_step(opt)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for k in range(6):
        manual.param_groups[0]["lr"] = 1e-2 * 0.5 ** (k // 2)
        backward(model)
        opt.step()
        backward(manual_model)
        manual.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(1e-2 / 8)
    assert recorder.syncs == []
    assert_close_rel(list(model.parameters()), list(manual_model.parameters()), tol=TOL[torch.float32],
                     what="params")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def test_loads_torch_adamw_checkpoint_and_continues_like_torch(backend):
    grads = make_grads(SHAPES, 10)
    ref_params = make_params(SHAPES)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    run_steps(ref, ref_params, grads[:5])
    checkpoint = save_load(ref.state_dict())
    params = clone_params(ref_params)
    opt = optgen.AdamW(params, lr=1e-3, weight_decay=0.0, backend=backend)  # the checkpoint's groups win
    opt.load_state_dict(checkpoint)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["weight_decay"] == 0.1
    run_steps(opt, params, grads[5:])
    run_steps(ref, ref_params, grads[5:])
    assert_close_rel(params, ref_params, tol=TOL[torch.float32], what="params")
    for p, r in zip(params, ref_params):
        assert float(opt.state[p]["step"]) == float(ref.state[r]["step"]) == 10
        for name in ("exp_avg", "exp_avg_sq"):
            assert_close_rel(opt.state[p][name], ref.state[r][name], tol=TOL[torch.float32], what=name)


def test_torch_adamw_loads_our_checkpoint_and_continues_like_us(backend):
    grads = make_grads(SHAPES, 10)
    params = make_params(SHAPES)
    opt = optgen.AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    run_steps(opt, params, grads[:5])
    checkpoint = save_load(opt.state_dict())
    ref_params = clone_params(params)
    ref = torch.optim.AdamW(ref_params, lr=1e-3, foreach=False)
    ref.load_state_dict(checkpoint)
    assert ref.param_groups[0]["lr"] == 1e-2 and ref.param_groups[0]["weight_decay"] == 0.1
    run_steps(opt, params, grads[5:])
    run_steps(ref, ref_params, grads[5:])
    assert_close_rel(ref_params, params, tol=TOL[torch.float32], what="params")
    for p, r in zip(params, ref_params):
        assert float(ref.state[r]["step"]) == 10
        assert_close_rel(ref.state[r]["exp_avg_sq"], opt.state[p]["exp_avg_sq"], tol=TOL[torch.float32],
                         what="exp_avg_sq")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_moments_of_a_torch_checkpoint_keep_updating(backend):
    """torch.optim keeps the moments of bf16 parameters in bf16; loaded, they become the fp32 moments optgen
    keeps for bf16 parameters (exactly: bf16 -> fp32 is exact) and go on following m <- beta1 m + (1 - beta1) g."""
    grads = make_grads(SHAPES, 3, dtype=torch.bfloat16)
    ref_params = make_params(SHAPES, dtype=torch.bfloat16)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    run_steps(ref, ref_params, grads[:2])
    params = clone_params(ref_params)
    opt = optgen.AdamW(params, lr=1e-2, backend=backend)
    opt.load_state_dict(save_load(ref.state_dict()))
    loaded = [opt.state[p]["exp_avg"].clone() for p in params]
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    assert all(torch.equal(m, ref.state[q]["exp_avg"].float()) for m, q in zip(loaded, ref_params))
    run_steps(opt, params, grads[2:])
    expected = [0.9 * m + 0.1 * g.float() for m, g in zip(loaded, grads[2])]
    assert_close_rel([opt.state[p]["exp_avg"] for p in params], expected, tol=TOL[torch.float32], what="exp_avg")


def _trained_optimizer(backend, cls=optgen.AdamW, **kwargs):
    params = make_params(SHAPES)
    opt = cls(params, lr=1e-2, backend=backend, **kwargs)
    run_steps(opt, params, make_grads(SHAPES, 2))
    return opt, params


@pytest.mark.parametrize("kwargs,match", [
    (dict(betas=(0.9, 1.0)), r"beta parameter at index 1.*\[0.0, 1.0\)"),
    (dict(betas=(-0.1, 0.999)), r"beta parameter at index 0"),
    (dict(betas=(0.9,)), r"betas.*tuple of 2"),
    (dict(lr=-1e-3), r"Invalid learning rate: -0.001"),
    (dict(lr=float("nan")), r"Invalid learning rate"),
    (dict(eps=-1.0), r"Invalid epsilon value"),
    (dict(maximize=2), r"Invalid maximize value: 2 \(expected True or False\)"),
    (dict(maximize="yes"), r"Invalid maximize"),
    (dict(master_weights=None), r"Invalid master_weights"),
    (dict(state_dtype=torch.int32), r"Invalid state_dtype"),
    (dict(state_dtype="bf16"), r"Invalid state_dtype"),
    (dict(max_grad_norm=0.0), r"Invalid max_grad_norm"),
    (dict(backend="cuda"), r"Invalid backend"),
], ids=["beta2=1", "beta1<0", "one-beta", "lr<0", "lr-nan", "eps<0", "maximize=2", "maximize-str",
        "master-None", "state_dtype-int", "state_dtype-str", "max_grad_norm=0", "backend"])
def test_invalid_options_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optgen.AdamW(make_params([(3,)]), **kwargs)


@pytest.mark.parametrize("group,match", [
    (dict(betas=(0.9, 1.5)), r"beta parameter at index 1"),
    (dict(lr=-1.0), r"Invalid learning rate"),
    (dict(weight_decay=float("inf")), r"Invalid weight_decay"),
], ids=["betas", "lr", "weight_decay"])
def test_invalid_param_group_is_rejected_before_it_is_added(group, match, backend):
    opt, params = _trained_optimizer(backend)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": make_params([(4,)], seed=3), **group})
    assert_unchanged(opt, params, before)


def test_complex_parameters_step_as_their_real_views(backend):
    """As torch.optim: a complex parameter is optimized as ``view_as_real`` (its states stay complex). AdamW
    against torch's; LAMB (a per-layer norm over the real and imaginary parts) against itself on the real view."""
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    w = torch.nn.Parameter(torch.randn(5))
    zr, wr = torch.nn.Parameter(z.detach().clone()), torch.nn.Parameter(w.detach().clone())
    opt = optgen.AdamW([z, w], lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW([zr, wr], lr=1e-2, weight_decay=0.1, foreach=False)
    for grads in make_grads([(4, 3), (5,)], 4):
        z.grad, zr.grad = (torch.complex(g, g.flip(0)) for g in (grads[0], grads[0].clone()))
        w.grad, wr.grad = grads[1].clone(), grads[1].clone()
        opt.step()
        ref.step()
    assert_close_rel([torch.view_as_real(z), w], [torch.view_as_real(zr), wr], tol=TOL[torch.float32], what="params")
    assert opt.state[z]["exp_avg"].dtype == torch.complex64
    assert_close_rel(torch.view_as_real(opt.state[z]["exp_avg_sq"]), torch.view_as_real(ref.state[zr]["exp_avg_sq"]),
                     tol=TOL[torch.float32], what="exp_avg_sq")
    z = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64))
    real = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    lamb, twin = optgen.LAMB([z], lr=1e-2, backend=backend), optgen.LAMB([real], lr=1e-2, backend=backend)
    for (g,) in make_grads([(6, 2)], 3):
        z.grad, real.grad = torch.view_as_complex(g.clone()), g.clone()
        lamb.step()
        twin.step()
    assert_close_rel(torch.view_as_real(z), real, tol=TOL[torch.float32], what="LAMB on a complex parameter")


def test_gradient_shape_mismatch_raises_before_any_update(backend):
    opt, params = _trained_optimizer(backend, optgen.NVLAMB)
    for p, g in zip(params, make_grads(SHAPES, 1, seed=5)[0]):
        p.grad = g
    params[-1].grad.data = torch.ones(8)  # smuggled past autograd's shape check; the last parameter
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"gradient of shape \(8,\) for a parameter of shape \(7,\)"):
        opt.step()
    assert_unchanged(opt, params, before)  # the first parameters were not updated either


@pytest.mark.parametrize("param_dtype,grad_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["fp32-param-bf16-grad", "bf16-param-fp32-grad"])
def test_gradient_dtype_differing_from_the_parameter_works(param_dtype, grad_dtype, backend):
    """torch allows it (``param.grad_dtype``); both backends read the gradient in its own dtype: the result is
    that of the same gradient values given in the parameter's dtype."""
    grads = make_grads(SHAPES, 3, dtype=torch.bfloat16)  # bf16 values: exact in both dtypes
    params, ref_params = make_params(SHAPES, dtype=param_dtype), make_params(SHAPES, dtype=param_dtype)
    for p in params:
        p.grad_dtype = grad_dtype
    opt = optgen.LAMB(params, lr=1e-2, backend=backend)
    ref = optgen.LAMB(ref_params, lr=1e-2, backend=backend)
    run_steps(opt, params, [[g.to(grad_dtype) for g in s] for s in grads])
    run_steps(ref, ref_params, [[g.to(param_dtype) for g in s] for s in grads])
    assert params[1].grad.dtype == grad_dtype
    assert_bitwise(params, ref_params, "params")


def test_triton_fp64_parameter_raises_before_state_changes():
    opt, params = _trained_optimizer("triton")
    extra = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    for p, g in zip(params, make_grads(SHAPES, 1, seed=5)[0]):
        p.grad = g
    extra.grad = torch.randn(5, dtype=torch.float64)
    before = snapshot(opt, params + [extra])
    with pytest.raises(TypeError, match="Triton backend supports fp32, fp16 and bf16"):
        opt.step()
    assert_unchanged(opt, params + [extra], before)


def test_warnings_are_not_raised_for_valid_options(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt, params = _trained_optimizer(backend, optgen.LAMB, trust_clip=(0.1, 10.0), max_grad_norm=1.0,
                                         maximize=False, state_dtype=torch.float32)
    assert float(opt.state[params[0]]["step"]) == 2


# --------------------------------------------------------------------------------------------------
# The torch.optim contract, found wanting by an adversarial review (each test failed before its fix)
# --------------------------------------------------------------------------------------------------


def _copy_by(how, opt):
    import copy
    import pickle

    return {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o))}[how](opt)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("make", ["AdamW", "LAMB", "built"])
def test_a_copied_or_pickled_optimizer_steps_like_the_original(make, how, backend):
    """torch's __getstate__ keeps only defaults, state and param_groups; optgen's copies also carry the
    constructor's choices, so the copy steps (and classes made by optgen.build pickle with their spec)."""
    from optgen.specs.lamb import lamb

    cls = optgen.build(lamb()) if make == "built" else getattr(optgen, make)
    params = make_params(SHAPES)
    opt = cls(params, lr=1e-2, weight_decay=0.1, backend=backend)
    grads = make_grads(SHAPES, 4)
    run_steps(opt, params, grads[:2])
    twin = _copy_by(how, opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert type(twin).__name__ == cls.__name__ and (how == "pickle" and make == "built" or type(twin) is cls)
    run_steps(opt, params, grads[2:])
    run_steps(twin, twin_params, grads[2:])
    for p, q in zip(params, twin_params):
        assert_bitwise(q, p)
        for key, value in opt.state[p].items():
            assert_bitwise(twin.state[q][key], value, key)


@pytest.mark.parametrize("name", ["AdamW", "LAMB"])
def test_step_inside_a_users_torch_compile(name):
    """dynamo resolves the generated module by name (it is in sys.modules) and traces the eager path."""
    params, ref_params = make_params(SHAPES), make_params(SHAPES)
    opt = getattr(optgen, name)(params, lr=1e-2, backend="torch")
    ref = getattr(optgen, name)(ref_params, lr=1e-2, backend="torch")

    @torch.compile
    def compiled_step():
        opt.step()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step_grads in make_grads(SHAPES, 3):
            for p, q, g in zip(params, ref_params, step_grads):
                p.grad, q.grad = g.clone(), g.clone()
            compiled_step()
            ref.step()
    # the optimizer's own Python (state dicts that count their edits) traces without graph-break warnings
    assert not [w for w in caught if "Dynamo does not know how to trace" in str(w.message)]
    assert_close_rel(params, ref_params, tol=1e-6)
    assert float(opt.state[params[1]]["step"]) == 3.0


@pytest.mark.parametrize(
    "cls,torch_cls,first,second",
    [(optgen.SGD, torch.optim.SGD, dict(momentum=0.9, nesterov=True), dict(momentum=0.5, maximize=True, dampening=0.1)),
     (optgen.Adam, torch.optim.Adam, dict(amsgrad=True), dict(maximize=True, decoupled_weight_decay=True, weight_decay=0.1)),
     (optgen.AdamW, torch.optim.AdamW, dict(amsgrad=True, maximize=True), dict(weight_decay=0.3))],
    ids=["SGD", "Adam", "AdamW"],
)  # fmt: skip
def test_per_group_flags_step_like_torch(backend, cls, torch_cls, first, second):
    """torch keeps nesterov, maximize, amsgrad, decoupled_weight_decay per param group: groups that disagree
    run one variant whose flags are per-group switches; a flag edited between steps takes effect."""
    params = make_params(SHAPES)
    reference = clone_params(params)
    opt = cls([dict(params=params[:2], **first), dict(params=params[2:], **second)], lr=0.05, backend=backend)
    ref = torch_cls([dict(params=reference[:2], **first), dict(params=reference[2:], **second)], lr=0.05, foreach=False)
    grads = make_grads(SHAPES, 6)
    run_steps(opt, params, grads[:3])
    run_steps(ref, reference, grads[:3])
    assert_close_rel(params, reference, tol=TOL[torch.float32], what="params")
    for group in (*opt.param_groups, *ref.param_groups):  # what torch would honour between steps
        group["maximize"] = not group["maximize"]
    run_steps(opt, params, grads[3:])
    run_steps(ref, reference, grads[3:])
    assert_close_rel(params, reference, tol=TOL[torch.float32], what="params after maximize flipped")
    for p, q in zip(params, reference):
        assert set(ref.state[q]) <= set(opt.state[p])
        for name, value in ref.state[q].items():
            assert_close_rel(opt.state[p][name], value, tol=TOL[torch.float32], what=name)


def test_per_group_flags_share_a_global_norm(backend):
    """LAMB groups that disagree on bias_correction, clipped by one global gradient norm: the norm spans both
    groups (one variant, per-group switches), equal to the same groups run by the eager oracle."""
    runs = []
    for backend_ in (backend, "torch"):
        params = make_params(SHAPES)
        groups = [dict(params=params[:2], bias_correction=False), dict(params=params[2:], maximize=True)]
        opt = optgen.LAMB(groups, lr=1e-2, max_grad_norm=0.5, backend=backend_)
        run_steps(opt, params, make_grads(SHAPES, 3, scale=10.0))
        assert {"bias_correction", "maximize"} <= {h.name for h in opt.plan.ir.hypers}  # per-group switches
        runs.append(params)
    assert_close_rel(runs[0], runs[1], tol=TOL[torch.float32], what="params")
    # the clipping factor saw all parameters: scaling one group's gradients changes the other group's update
    params = make_params(SHAPES)
    groups = [dict(params=params[:2], bias_correction=False), dict(params=params[2:], maximize=True)]
    # eps of the size of sqrt(v): the update depends on the gradients' scale, hence on the clipping factor
    opt = optgen.LAMB(groups, lr=1e-2, max_grad_norm=0.5, eps=0.05, backend=backend)
    grads = make_grads(SHAPES, 1, scale=10.0)[0]
    bigger = [g * (1.0 if i < 2 else 100.0) for i, g in enumerate(grads)]
    alone = clone_params(params)
    other = optgen.LAMB([dict(params=alone[:2], bias_correction=False), dict(params=alone[2:], maximize=True)],
                        lr=1e-2, max_grad_norm=0.5, eps=0.05, backend=backend)
    run_steps(opt, params, [grads])
    run_steps(other, alone, [bigger])
    assert any(not torch.allclose(a, b) for a, b in zip(params[:2], alone[:2]))


def test_adamw_loads_an_adam_checkpoint_as_adamw_like_torch(backend):
    """torch.optim.AdamW forces decoupled_weight_decay=True on every load (an Adam state dict too): so does
    optgen.AdamW, else the same script would step Adam's L2 decay with optgen and AdamW's with torch."""
    params = make_params(SHAPES)
    source = torch.optim.Adam(clone_params(params), lr=0.1, weight_decay=0.1, foreach=False)
    grads = make_grads(SHAPES, 4)
    run_steps(source, [p for g in source.param_groups for p in g["params"]], grads[:2])
    checkpoint = save_load(source.state_dict())
    reference, ours_params = clone_params(params), clone_params(params)
    ref = torch.optim.AdamW(reference, lr=0.1, foreach=False)
    ours = optgen.AdamW(ours_params, lr=0.1, backend=backend)
    ref.load_state_dict(save_load(checkpoint))
    ours.load_state_dict(save_load(checkpoint))
    assert ours.param_groups[0]["decoupled_weight_decay"] is True
    run_steps(ref, reference, grads[2:])
    run_steps(ours, ours_params, grads[2:])
    assert_close_rel(ours_params, reference, tol=TOL[torch.float32], what="params")


def test_a_torch_checkpoint_keeps_its_algorithm(backend):
    """A torch.optim state dict asking for maximize or AMSGrad is honoured (per group), not refused or ignored."""
    params = make_params(SHAPES)
    for kwargs in (dict(maximize=True), dict(amsgrad=True)):
        reference = clone_params(params)
        torch_opt = torch.optim.AdamW(reference, lr=0.1, foreach=False, **kwargs)
        grads = make_grads(SHAPES, 3)
        run_steps(torch_opt, reference, grads[:1])
        ours_params = clone_params(reference)
        ours = optgen.AdamW(ours_params, lr=0.1, backend=backend)
        ours.load_state_dict(save_load(torch_opt.state_dict()))
        run_steps(ours, ours_params, grads[1:])
        run_steps(torch_opt, reference, grads[1:])
        assert_close_rel(ours_params, reference, tol=TOL[torch.float32], what=str(kwargs))
    # an option this optimizer does not have is refused before anything is loaded, never ignored
    torch_opt = torch.optim.Adam(clone_params(params), lr=0.1, amsgrad=True)
    lamb = optgen.LAMB(clone_params(params), lr=0.2, backend=backend)
    with pytest.raises(ValueError, match="amsgrad=True in param group 0 of the state dict, but LAMB has no amsgrad"):
        lamb.load_state_dict(torch_opt.state_dict())
    assert lamb.param_groups[0]["lr"] == 0.2 and len(lamb.state) == 0


def test_a_torch_sgd_state_dict_keeps_its_momentum(backend):
    """torch's SGD saves no step count: its momentum buffer must not be taken for a first step's."""
    params = make_params(SHAPES)
    reference = clone_params(params)
    torch_opt = torch.optim.SGD(reference, lr=0.1, momentum=0.9, dampening=0.1)
    run_steps(torch_opt, reference, make_grads(SHAPES, 3))
    ours_params = clone_params(reference)
    ours = optgen.SGD(ours_params, lr=0.1, momentum=0.9, dampening=0.1, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SGD only tests for the first step: nothing to warn about
        ours.load_state_dict(torch_opt.state_dict())
    grads = make_grads(SHAPES, 2, seed=7)
    run_steps(torch_opt, reference, grads)
    run_steps(ours, ours_params, grads)
    assert_close_rel(ours_params, reference, tol=TOL[torch.float32])
    # a spec that counts steps cannot know how many were taken: it says so
    adam_state = {"state": {0: {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                  "param_groups": [dict(optgen.AdamW([torch.nn.Parameter(torch.zeros(3))]).param_groups[0], params=[0])]}  # fmt: skip
    adam = optgen.AdamW([torch.nn.Parameter(torch.zeros(3))], backend=backend)
    with pytest.warns(UserWarning, match="has no 'step'; counting from step 1"):
        adam.load_state_dict(adam_state)


def test_an_integer_step_from_an_old_torch_state_dict(backend):
    """torch < 1.12 saved the step as a Python number; torch.optim still loads such dicts."""
    params = make_params(SHAPES)
    reference = clone_params(params)
    torch_opt = torch.optim.AdamW(reference, lr=0.1)
    run_steps(torch_opt, reference, make_grads(SHAPES, 3))
    import copy

    saved = copy.deepcopy(torch_opt.state_dict())  # its state dicts are the optimizer's own
    for state in saved["state"].values():
        state["step"] = int(state["step"])
    ours_params = clone_params(reference)
    ours = optgen.AdamW(ours_params, lr=0.1, backend=backend)
    ours.load_state_dict(saved)
    grads = make_grads(SHAPES, 2, seed=7)
    run_steps(torch_opt, reference, grads)
    run_steps(ours, ours_params, grads)
    assert_close_rel(ours_params, reference, tol=TOL[torch.float32])


def test_a_step_count_written_in_place_reaches_every_chunk(backend):
    """state["step"].zero_() restarts the bias correction for the whole tensor (the Triton backend keeps a
    copy of the step per chunk; state["step"] is the first chunk's)."""
    shapes = [(3 * 256 + 5,), (7,)]  # four chunks of the 256-element test chunk
    params, reference = make_params(shapes), make_params(shapes)
    opt = optgen.AdamW(params, lr=1e-2, backend=backend)
    ref = optgen.AdamW(reference, lr=1e-2, backend="torch")
    grads = make_grads(shapes, 5)
    for i, step_grads in enumerate(grads):
        if i == 3:
            opt.state[params[0]]["step"].zero_()
            ref.state[reference[0]]["step"].zero_()
        run_steps(opt, params, [step_grads])
        run_steps(ref, reference, [step_grads])
    assert_close_rel(params, reference, tol=TOL[torch.float32])
    assert float(opt.state[params[0]]["step"]) == 2.0 and float(opt.state[params[1]]["step"]) == 5.0


def test_a_state_dtype_the_triton_backend_cannot_take_fails_before_any_state():
    params = make_params(SHAPES)
    opt = optgen.AdamW(params, lr=0.1, state_dtype=torch.float64, backend="triton")
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="fp32, fp16 and bf16 state_dtype, not torch.float64"):
        opt.step()
    assert len(opt.state) == 0
    optgen.AdamW(params, lr=0.1, state_dtype=torch.float64, backend="torch").step()  # the torch backend takes it


def test_master_weights_dropped_at_construction_refuse_a_later_low_precision_group():
    """master_weights=True with only fp32 parameters is ignored (with a warning); a bf16 group added later would
    silently get no master weights: refused, with the reason."""
    with pytest.warns(UserWarning, match="no effect on fp32"):
        opt = optgen.AdamW(make_params([(3,)]), master_weights=True)
    opt.add_param_group(dict(params=make_params([(2,)])))  # fp32: fine
    with pytest.raises(ValueError, match="master_weights=True was ignored when the optimizer was made"):
        opt.add_param_group(dict(params=make_params([(2,)], dtype=torch.bfloat16)))
    optgen.AdamW(make_params([(2,)], dtype=torch.bfloat16), master_weights=True).add_param_group(
        dict(params=make_params([(2,)], dtype=torch.bfloat16))
    )


def test_loaded_entries_that_are_not_optgen_states_keep_their_dtype(backend):
    """Only the states optgen keeps are cast to its state dtype on load; another entry a checkpoint carries (a
    complex tensor of some tool's) stays as saved (a cast to the real state dtype would drop its imaginary part)."""
    params = make_params(SHAPES)
    opt = optgen.AdamW(params, lr=1e-2, backend=backend)
    run_steps(opt, params, make_grads(SHAPES, 1))
    saved = save_load(opt.state_dict())
    extra = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    saved["state"][0]["tool_entry"] = extra.clone()
    twin = optgen.AdamW(clone_params(params), lr=1e-2, backend=backend)
    twin.load_state_dict(saved)
    loaded = twin.state[twin.param_groups[0]["params"][0]]
    assert loaded["tool_entry"].dtype == torch.complex64 and torch.equal(loaded["tool_entry"], extra)
    assert loaded["exp_avg"].dtype == torch.float32
