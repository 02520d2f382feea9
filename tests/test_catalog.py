"""The catalog beyond Adam/LAMB: LARS in optax's form, NovoGrad, Lion, AdaBelief, and the layer-wise trust ratio
added to any element-wise optimizer (``optgen.layer_adaptive``; ``LayerAdaptiveLion`` is built in).

Each optimizer runs on both backends against an independent reference: the third-party implementation where
its flags really match (pytorch_optimizer's Lion, AdaBelief and NovoGrad, torch_optimizer's NovoGrad), and a
float64 transcription of the docstring formula (for LARSOptax, of optax's chain of transformations). Odd shapes
(a 0-d parameter, sizes around the 256-element chunk, a zero-initialised bias) and deterministic gradients, as
in test_references.py.
"""

import math

import pytest
import torch
from conftest import (
    ODD_SHAPES,
    TOL,
    TOL_F64_REFERENCE,
    ZERO_BIAS,
    assert_bitwise,
    assert_close_rel,
    clone_params,
    make_grads,
    make_params,
    rel_err,
    run_steps,
)

import optgen
from optgen import catalog, cli
from optgen.analysis import plan
from optgen.ir import lower
from optgen.layerwise import layer_adaptive
from optgen.specs import BUILTINS, adabelief, adamw, lamb, lion, novograd, sgd

STEPS = 12

# Third-party fp32 implementations against ours: both round every step in fp32, in different orders (lerp
# against beta*m + (1-beta)*g, fused against unfused decay); 1e-5 as for the third-party LAMBs.
TOL_THIRD_PARTY = 1e-5


def _f64(tensors):
    return [t.detach().to(torch.float64).clone() for t in tensors]


def _ratio(num, den):
    return num / den if (num > 0 and den > 0) else 1.0


# --------------------------------------------------------------------------------------------------
# float64 transcriptions (per layer = per parameter tensor)
# --------------------------------------------------------------------------------------------------


def lion_reference(params, grads, lr, betas, wd, layer_adaptive_=False, layer_adaptation=True):
    """c = b1 m + (1-b1) g;  u = sign(c) + wd w;  w <- w - lr r u;  m <- b2 m + (1-b2) g.
    r = 1 (Lion), or ||w|| / ||u|| (layer-adaptive; 1 where a norm is 0 or adaptation is off)."""
    beta1, beta2 = betas
    w = _f64(params)
    m = [torch.zeros_like(x) for x in w]
    for step_grads in grads:
        g = _f64(step_grads)
        for i in range(len(w)):
            u = torch.sign(beta1 * m[i] + (1 - beta1) * g[i]) + wd * w[i]
            r = _ratio(float(w[i].norm()), float(u.norm())) if (layer_adaptive_ and layer_adaptation) else 1.0
            w[i] = w[i] - lr * r * u
            m[i] = beta2 * m[i] + (1 - beta2) * g[i]
    return w, m


def adabelief_reference(params, grads, lr, betas, eps, wd, weight_decouple=True):
    """g' = g (+ wd w unless decoupled); m = b1 m + (1-b1) g'; s = b2 s + (1-b2)(g' - m)^2 + eps;
    w <- w (1 - lr wd if decoupled) - lr/(1-b1^t) m / (sqrt(s)/sqrt(1-b2^t) + eps)."""
    beta1, beta2 = betas
    w = _f64(params)
    m = [torch.zeros_like(x) for x in w]
    s = [torch.zeros_like(x) for x in w]
    for t, step_grads in enumerate(grads, start=1):
        g = _f64(step_grads)
        for i in range(len(w)):
            gi = g[i] if weight_decouple else g[i] + wd * w[i]
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            s[i] = beta2 * s[i] + (1 - beta2) * (gi - m[i]) ** 2 + eps
            step = lr / (1 - beta1**t) * m[i] / (torch.sqrt(s[i]) / math.sqrt(1 - beta2**t) + eps)
            w[i] = (w[i] * (1 - lr * wd) if weight_decouple else w[i]) - step
    return w, m, s


def novograd_reference(params, grads, lr, betas, eps, wd, grad_averaging=False):
    """v = ||g||^2 (t = 1) or b2 v + (1-b2) ||g||^2;  u = g / (sqrt(v) + eps) + wd w;
    m = u (t = 1) or b1 m + u ((1-b1) u with grad averaging);  w <- w - lr m.  v is one number per layer."""
    beta1, beta2 = betas
    w = _f64(params)
    m = [torch.zeros_like(x) for x in w]
    v = [0.0 for _ in w]
    for t, step_grads in enumerate(grads, start=1):
        g = _f64(step_grads)
        for i in range(len(w)):
            g2 = float((g[i] ** 2).sum())
            v[i] = g2 if t == 1 else beta2 * v[i] + (1 - beta2) * g2
            u = g[i] / (math.sqrt(v[i]) + eps) + wd * w[i]
            m[i] = u if t == 1 else beta1 * m[i] + ((1 - beta1) * u if grad_averaging else u)
            w[i] = w[i] - lr * m[i]
    return w, m, v


def optax_lars_reference(params, grads, lr, momentum, wd, coeff, eps, nesterov=False):
    """optax.lars as its chain of transformations, in float64:

    add_decayed_weights(wd):            u = g + wd w
    scale_by_trust_ratio(coeff, eps):   u = u * (coeff ||w|| / (||u|| + eps)), ratio 1 where ||w|| or ||u|| is 0
    scale_by_learning_rate(lr):         u = -lr u
    trace(momentum, nesterov):          tr = u + momentum tr;  u = u + momentum tr if nesterov else tr
    apply_updates:                      w = w + u

    optax's trace holds -momentum_buffer (it accumulates the negated step).
    """
    w = _f64(params)
    trace = [torch.zeros_like(x) for x in w]
    for step_grads in grads:
        g = _f64(step_grads)
        for i in range(len(w)):
            u = g[i] + wd * w[i]
            param_norm, update_norm = float(w[i].norm()), float(u.norm())
            ratio = 1.0 if (param_norm == 0 or update_norm == 0) else coeff * param_norm / (update_norm + eps)
            u = -lr * (u * ratio)
            trace[i] = u + momentum * trace[i]
            u = u + momentum * trace[i] if nesterov else trace[i]
            w[i] = w[i] + u
    return w, [-x for x in trace]


def _check_zero_bias_moved(params):
    assert params[ZERO_BIAS].detach().abs().max() > 0


# --------------------------------------------------------------------------------------------------
# Lion
# --------------------------------------------------------------------------------------------------

LION = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)


def test_lion_matches_float64_reference(backend):
    params = make_params()
    grads = make_grads(ODD_SHAPES, STEPS)
    expected_w, expected_m = lion_reference(params, grads, LION["lr"], LION["betas"], LION["weight_decay"])
    opt = optgen.Lion(params, backend=backend, **LION)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    assert_close_rel([opt.state[p]["exp_avg"] for p in params], expected_m, tol=TOL_F64_REFERENCE, what="m")
    _check_zero_bias_moved(params)
    assert all(float(opt.state[p]["step"]) == STEPS for p in params)


def test_lion_matches_pytorch_optimizer(backend):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    params = make_params()
    ref_params = clone_params(params)
    grads = make_grads(ODD_SHAPES, STEPS)
    opt = optgen.Lion(params, backend=backend, **LION)
    ref = pytorch_optimizer.Lion(ref_params, weight_decouple=True, fixed_decay=False, foreach=False, **LION)
    run_steps(opt, params, grads)
    run_steps(ref, ref_params, grads)
    assert_close_rel(params, list(ref_params), tol=TOL_THIRD_PARTY, what="w")
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert_close_rel(opt.state[p]["exp_avg"], ref.state[r]["exp_avg"], tol=TOL_THIRD_PARTY, what=f"m {i}")


# --------------------------------------------------------------------------------------------------
# AdaBelief
# --------------------------------------------------------------------------------------------------

ADABELIEF_CASES = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.1, weight_decouple=True),
    # eps large enough to matter in fp32: checks where it goes (inside s every step, and outside the root)
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.01, weight_decouple=False),
]
_ids = ["decoupled", "l2_big_eps"]


@pytest.mark.parametrize("kwargs", ADABELIEF_CASES, ids=_ids)
def test_adabelief_matches_float64_reference(kwargs, backend):
    params = make_params()
    grads = make_grads(ODD_SHAPES, STEPS)
    expected_w, expected_m, expected_s = adabelief_reference(
        params, grads, kwargs["lr"], kwargs["betas"], kwargs["eps"], kwargs["weight_decay"], kwargs["weight_decouple"]
    )
    opt = optgen.AdaBelief(params, backend=backend, **kwargs)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    assert_close_rel([opt.state[p]["exp_avg"] for p in params], expected_m, tol=TOL_F64_REFERENCE, what="m")
    assert_close_rel([opt.state[p]["exp_avg_var"] for p in params], expected_s, tol=TOL_F64_REFERENCE, what="s")
    _check_zero_bias_moved(params)


@pytest.mark.parametrize("kwargs", ADABELIEF_CASES, ids=_ids)
def test_adabelief_matches_pytorch_optimizer(kwargs, backend):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    params = make_params()
    ref_params = clone_params(params)
    grads = make_grads(ODD_SHAPES, STEPS)
    opt = optgen.AdaBelief(params, backend=backend, **kwargs)
    ref = pytorch_optimizer.AdaBelief(
        ref_params, fixed_decay=False, rectify=False, ams_bound=False, foreach=False, **kwargs
    )
    run_steps(opt, params, grads)
    run_steps(ref, ref_params, grads)
    assert_close_rel(params, list(ref_params), tol=TOL_THIRD_PARTY, what="w")
    for i, (p, r) in enumerate(zip(params, ref_params)):
        for key in ("exp_avg", "exp_avg_var"):
            assert_close_rel(opt.state[p][key], ref.state[r][key], tol=TOL_THIRD_PARTY, what=f"{key} {i}")


# --------------------------------------------------------------------------------------------------
# NovoGrad: a per-layer second moment
# --------------------------------------------------------------------------------------------------

NOVOGRAD = dict(lr=1e-2, betas=(0.95, 0.98), eps=1e-8, weight_decay=0.01)


@pytest.mark.parametrize("grad_averaging", [False, True], ids=["plain", "grad_averaging"])
def test_novograd_matches_float64_reference(grad_averaging, backend):
    params = make_params()
    grads = make_grads(ODD_SHAPES, STEPS)
    h = NOVOGRAD
    expected_w, expected_m, expected_v = novograd_reference(
        params, grads, h["lr"], h["betas"], h["eps"], h["weight_decay"], grad_averaging
    )
    opt = optgen.NovoGrad(params, grad_averaging=grad_averaging, backend=backend, **h)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    assert_close_rel([opt.state[p]["exp_avg"] for p in params], expected_m, tol=TOL_F64_REFERENCE, what="m")
    for i, (p, v) in enumerate(zip(params, expected_v)):
        # the layer's second moment: one fp64 number per layer (a 0-d tensor, as torch_optimizer keeps it)
        state = opt.state[p]["exp_avg_sq"]
        assert state.shape == () and state.dtype == torch.float64
        assert_close_rel(state, torch.tensor(v, dtype=torch.float64), tol=TOL_F64_REFERENCE, what=f"v {i}")
    _check_zero_bias_moved(params)


@pytest.mark.parametrize("grad_averaging", [False, True], ids=["plain", "grad_averaging"])
def test_novograd_matches_pytorch_optimizer(grad_averaging, backend):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    params = make_params()
    ref_params = clone_params(params)
    grads = make_grads(ODD_SHAPES, STEPS)
    opt = optgen.NovoGrad(params, grad_averaging=grad_averaging, backend=backend, **NOVOGRAD)
    ref = pytorch_optimizer.NovoGrad(
        ref_params, grad_averaging=grad_averaging, weight_decouple=False, fixed_decay=False, foreach=False, **NOVOGRAD
    )
    run_steps(opt, params, grads)
    run_steps(ref, ref_params, grads)
    assert_close_rel(params, list(ref_params), tol=TOL_THIRD_PARTY, what="w")
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert_close_rel(opt.state[p]["exp_avg"], ref.state[r]["moments"], tol=TOL_THIRD_PARTY, what=f"m {i}")
        assert_close_rel(opt.state[p]["exp_avg_sq"], ref.state[r]["grads_ema"], tol=TOL_THIRD_PARTY, what=f"v {i}")


def test_novograd_matches_torch_optimizer(backend):
    """torch_optimizer.NovoGrad (NVIDIA's Jasper code): no grad averaging (with it, its first step scales u by
    1-beta1, where the paper and pytorch_optimizer take m_1 = u_1); its v starts where v == 0, not at t == 1,
    the same unless a layer's first gradients are all zero."""
    torch_optimizer = pytest.importorskip("torch_optimizer")
    params = make_params()
    ref_params = clone_params(params)
    grads = make_grads(ODD_SHAPES, STEPS)
    opt = optgen.NovoGrad(params, grad_averaging=False, backend=backend, **NOVOGRAD)
    ref = torch_optimizer.NovoGrad(ref_params, grad_averaging=False, amsgrad=False, **NOVOGRAD)
    run_steps(opt, params, grads)
    run_steps(ref, ref_params, grads)
    assert_close_rel(params, list(ref_params), tol=TOL_THIRD_PARTY, what="w")
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert_close_rel(opt.state[p]["exp_avg"], ref.state[r]["exp_avg"], tol=TOL_THIRD_PARTY, what=f"m {i}")
        v = ref.state[r]["exp_avg_sq"]
        assert v.ndim == 0 and opt.state[p]["exp_avg_sq"].ndim == 0
        assert_close_rel(opt.state[p]["exp_avg_sq"], v, tol=TOL_THIRD_PARTY, what=f"v {i}")


# --------------------------------------------------------------------------------------------------
# LARS in optax's form
# --------------------------------------------------------------------------------------------------

LARS_HYPERS = dict(lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01, eps=1e-8)


@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
def test_lars_optax_matches_float64_optax_chain(nesterov, backend):
    h = LARS_HYPERS
    params = make_params()
    grads = make_grads(ODD_SHAPES, STEPS)
    expected_w, expected_buf = optax_lars_reference(
        params, grads, h["lr"], h["momentum"], h["weight_decay"], h["trust_coefficient"], h["eps"], nesterov
    )
    opt = optgen.LARSOptax(params, nesterov=nesterov, backend=backend, **h)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    assert_close_rel(
        [opt.state[p]["momentum_buffer"] for p in params], expected_buf, tol=TOL_F64_REFERENCE, what="momentum_buffer"
    )
    _check_zero_bias_moved(params)


def test_lars_optax_differs_from_seed_lars_only_through_weight_decay(backend):
    """||g + wd w|| against ||g|| + wd ||w||: equal without weight decay, apart with it."""
    grads = make_grads(ODD_SHAPES, STEPS)
    results = {}
    for wd in (0.0, 0.05):
        h = dict(LARS_HYPERS, weight_decay=wd)
        for cls in (optgen.LARS, optgen.LARSOptax):
            params = make_params()
            run_steps(cls(params, backend=backend, **h), params, grads)
            results[cls.__name__, wd] = params
    assert_close_rel(results["LARSOptax", 0.0], results["LARS", 0.0], tol=TOL[torch.float32], what="wd=0")
    far = max(rel_err(a, b) for a, b in zip(results["LARSOptax", 0.05], results["LARS", 0.05]))
    assert far > 1e-4, f"the two forms should differ with weight decay (max rel diff {far:.1e})"


# --------------------------------------------------------------------------------------------------
# layer_adaptive: a layer-wise trust ratio on any element-wise optimizer
# --------------------------------------------------------------------------------------------------


def test_layer_adaptive_lion_matches_float64_reference(backend):
    params = make_params()
    grads = make_grads(ODD_SHAPES, STEPS)
    expected_w, expected_m = lion_reference(
        params, grads, LION["lr"], LION["betas"], LION["weight_decay"], layer_adaptive_=True
    )
    opt = optgen.LayerAdaptiveLion(params, backend=backend, **LION)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    assert_close_rel([opt.state[p]["exp_avg"] for p in params], expected_m, tol=TOL_F64_REFERENCE, what="m")
    _check_zero_bias_moved(params)
    # really adapted: every layer with ||w|| > 0 moved by lr * ||w|| on the first step (LAMB's shape; the
    # difference of two fp32 parameters of norm ||w|| carries ~1e-7 ||w|| of rounding, 1e-4 of lr ||w||)
    first = make_params()
    before = [p.detach().clone() for p in first]
    run_steps(optgen.LayerAdaptiveLion(first, backend=backend, **LION), first, grads[:1])
    for i, (a, b) in enumerate(zip(first, before)):
        if float(b.norm()) > 0:
            assert math.isclose(float((a.detach() - b).norm()), LION["lr"] * float(b.norm()), rel_tol=1e-3), i


_IDENTITY_CASES = [
    ("lion", lion, dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)),
    ("adamw", adamw, dict(lr=1e-2, weight_decay=0.1)),
    ("adabelief", adabelief, dict(lr=1e-2, weight_decay=0.01, weight_decouple=False)),
    ("novograd", novograd, dict(lr=1e-2, weight_decay=0.01, grad_averaging=True)),
    ("sgd_nesterov", sgd, dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)),
]
_ADAPTIVE = {}


def _adaptive(name, factory):
    if name not in _ADAPTIVE:
        _ADAPTIVE[name] = optgen.build(layer_adaptive(factory, name=f"LayerAdaptive_{name}"))
    return _ADAPTIVE[name]


@pytest.mark.parametrize("name,factory,kwargs", _IDENTITY_CASES, ids=[c[0] for c in _IDENTITY_CASES])
def test_layer_adaptive_without_adaptation_is_the_original(name, factory, kwargs, backend):
    """With layer_adaptation=False the parameter gets the original update expression (a where on the option).
    It is computed bitwise as in the original where the compiler's common-subexpression elimination leaves it
    alone -- LayerAdaptiveLion (golden generated files), AdamW, AdaBelief, NovoGrad; with SGD-Nesterov it
    reassociates g + wd w + mu b, shared with the adapted branch: equal to rounding there."""
    grads = make_grads(ODD_SHAPES, STEPS)
    original = make_params()
    opt = optgen.build(factory())(original, backend=backend, **kwargs)
    run_steps(opt, original, grads)
    adaptive = make_params()
    opt_a = _adaptive(name, factory)(adaptive, layer_adaptation=False, backend=backend, **kwargs)
    run_steps(opt_a, adaptive, grads)
    check = (
        assert_bitwise
        if name != "sgd_nesterov"
        else (lambda a, e, what: assert_close_rel(a, e, tol=TOL[torch.float32], what=what))
    )
    check(list(adaptive), list(original), what="w")
    for p, q in zip(adaptive, original):
        for key, value in opt.state[q].items():
            check(opt_a.state[p][key], value, what=key)
    # and with adaptation the step really changes
    again = make_params()
    run_steps(_adaptive(name, factory)(again, backend=backend, **kwargs), again, grads)
    assert not all(torch.equal(a, b) for a, b in zip(again, original))


def test_layer_adaptive_lion_builtin_without_adaptation_is_lion_bitwise(backend):
    grads = make_grads(ODD_SHAPES, STEPS)
    plain = make_params()
    run_steps(optgen.Lion(plain, backend=backend, **LION), plain, grads)
    params = make_params()
    run_steps(optgen.LayerAdaptiveLion(params, layer_adaptation=False, backend=backend, **LION), params, grads)
    assert_bitwise(list(params), list(plain), what="w")


def test_layer_adaptation_is_per_group(backend):
    """First group adapted, second not: the second group's parameters are plain Lion's, bitwise."""
    grads = make_grads(ODD_SHAPES, STEPS)
    params = make_params()
    opt = optgen.LayerAdaptiveLion(
        [dict(params=params[:5]), dict(params=params[5:], layer_adaptation=False)], backend=backend, **LION
    )
    run_steps(opt, params, grads)
    plain = make_params()
    run_steps(optgen.Lion(plain, backend=backend, **LION), plain, grads)
    assert_bitwise(list(params[5:]), list(plain[5:]), what="second group")
    expected, _ = lion_reference(
        make_params(), grads, LION["lr"], LION["betas"], LION["weight_decay"], layer_adaptive_=True
    )
    assert_close_rel(list(params[:5]), expected[:5], tol=TOL_F64_REFERENCE, what="first group")


def test_layer_adaptive_adamw_is_lamb(backend):
    """LAMB is AdamW's step with LAMB's trust ratio: layer_adaptive(AdamW) == LAMB(bias_correction=True,
    eps_inside_sqrt=False), the same math in two specs (fp32 roundings in different orders)."""
    hypers = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    grads = make_grads(ODD_SHAPES, STEPS)
    ours = make_params()
    run_steps(_adaptive("adamw", adamw)(ours, backend=backend, **hypers), ours, grads)
    ref = make_params()
    run_steps(optgen.LAMB(ref, backend=backend, **hypers), ref, grads)
    assert_close_rel(list(ours), list(ref), tol=TOL_F64_REFERENCE, what="w")


def test_layer_adaptive_refuses_what_it_cannot_transform():
    with pytest.raises(optgen.SpecError, match="already has a trust ratio"):
        layer_adaptive(lamb)
    spec = optgen.Spec("NoLR")
    step_size = spec.hyper(step_size=0.1)
    spec.update(spec.param, spec.param - step_size * spec.grad)
    with pytest.raises(optgen.SpecError, match="no hyperparameter 'lr'"):
        layer_adaptive(spec)
    with pytest.raises(TypeError):
        layer_adaptive(42)


def test_layer_adaptive_step_has_no_cancellation():
    """Delta/lr is formed symbolically: w - w(1 - lr wd) never appears, lr leaves the ratio's norm."""
    from optgen.layerwise import update_step

    delta, per_lr = update_step(lion())
    spec = lion()
    lr, wd = spec._symbols["lr"], spec._symbols["weight_decay"]
    assert not per_lr.has(lr)
    assert delta.coeff(spec.param) == lr * wd
    _, per_lr = update_step(adamw())
    assert not per_lr.has(adamw()._symbols["lr"])


# --------------------------------------------------------------------------------------------------
# The plans, and the CLI
# --------------------------------------------------------------------------------------------------

# (passes, bytes/param/step, launches/step) of every variant
EXPECTED_COSTS = {
    "lars_optax": (2, 28, 3),  # = seed LARS: pass 0 reads w, g for both norms
    "novograd": (2, 24, 3),  # pass 0 reads g for ||g||; v is one number per layer (a per-layer state)
    "lion": (1, 20, 1),
    "layer_adaptive_lion": (2, 32, 3),  # the ratio needs ||sign(c) + wd w||: a reduction, so two passes
    "adabelief": (1, 28, 1),
}


@pytest.mark.parametrize("name", list(EXPECTED_COSTS))
def test_catalog_plans(name):
    n_passes, n_bytes, launches = EXPECTED_COSTS[name]
    spec = BUILTINS[name]()
    for flags in catalog.variants(spec):
        p = plan(lower(spec, flags))
        assert (len(p.passes), p.bytes_per_param, p.launches_per_step) == (n_passes, n_bytes, launches), (
            flags,
            p.describe(),
        )
        assert all(s.scope == "layer" for s in p.slots)


def test_layer_adaptive_plans():
    lion_plan = plan(lower(BUILTINS["layer_adaptive_lion"]()))
    assert [(s.scope, s.op) for s in lion_plan.slots] == [("layer", "sum"), ("layer", "sum")]
    assert str(lion_plan.slots[0].arg) == "w**2" and "sign" in str(lion_plan.slots[1].arg)
    assert lion_plan.passes[0].reduce_after and lion_plan.passes[1].consumes == (0, 1)
    # layer_adaptive(AdamW) has LAMB's plan
    adamw_plan = plan(lower(layer_adaptive(adamw)))
    lamb_plan = plan(lower(lamb()))
    assert (
        (len(adamw_plan.passes), adamw_plan.bytes_per_param, adamw_plan.launches_per_step)
        == (len(lamb_plan.passes), lamb_plan.bytes_per_param, lamb_plan.launches_per_step)
        == (2, 40, 3)
    )


def test_optgen_list_shows_the_catalog(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for key, factory in BUILTINS.items():
        line = next(line for line in out.splitlines() if line.split()[0] == key)
        assert factory().name in line
    for key in ("lars_optax", "novograd", "lion", "layer_adaptive_lion", "adabelief"):
        assert key in BUILTINS
        assert isinstance(getattr(optgen, BUILTINS[key]().name), type)


def test_optgen_list_prints_plain_text_summaries_whole(capsys, monkeypatch):
    """Each docstring's first paragraph, whole, without RST markup, wrapped at words to the terminal's width."""
    monkeypatch.setenv("COLUMNS", "100")
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert ":math:" not in out and "``" not in out and "`" not in out
    assert all(len(line) <= 100 for line in out.splitlines()), out
    words = out.split()
    for key, factory in BUILTINS.items():
        expected = catalog.summary(factory().doc).split()
        start = words.index(key) + 2  # key, class name, then the summary's words in order, none cut
        assert words[start : start + len(expected)] == expected, key
    assert "pre-normalisation, with bias correction and the trust ratio on every layer." in " ".join(words)


def test_summary_unwraps_rst():
    doc = r"""A :math:`\|g + \lambda w\|` per layer :math:`l`, ``FusedLAMB(use_nvlamb=True)`` and :class:`optgen.Spec`,
    in `two` lines:

    .. math::
       x"""
    assert catalog.summary(doc) == "A ‖g + λ w‖ per layer l, FusedLAMB(use_nvlamb=True) and optgen.Spec, in two lines."
