"""The built-in optimizers against torch.optim, against float64 transcriptions of their docstring formulas,
against third-party LAMB implementations where the flags really match, and the Triton backend against the
torch backend (low precision, thousands of tensors, several param groups).

Every run uses odd shapes (a 0-d parameter, a (3,1,4) tensor, sizes 1, 7, 255, 256, 257, 3*256+5 around
the 256-element chunk, and a zero-initialised bias) and deterministic gradients from a torch.Generator,
identical for both optimizers of a comparison.
"""

import math

import pytest
import torch
from conftest import (
    BACKENDS,
    ODD_SHAPES,
    TOL_F64_REFERENCE,
    ZERO_BIAS,
    assert_close_rel,
    clone_params,
    make_grads,
    make_params,
    run_steps,
)

import optgen

STEPS = 20


# --------------------------------------------------------------------------------------------------
# torch.optim references
# --------------------------------------------------------------------------------------------------

SGD_CONFIGS = [
    dict(lr=0.05),
    dict(lr=0.05, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
]


def _compare_with_torch(ours_cls, theirs_cls, kwargs, backend, their_kwargs=None):
    params = make_params()
    ref_params = clone_params(params)
    grads = make_grads(ODD_SHAPES, STEPS)
    opt = ours_cls(params, backend=backend, **kwargs)
    ref = theirs_cls(ref_params, foreach=False, **(their_kwargs or kwargs))
    run_steps(opt, params, grads)
    run_steps(ref, ref_params, grads)
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert_close_rel(p, r, torch.float32, what=f"param {i} shape {tuple(p.shape)}")
    return opt, ref, params, ref_params


@pytest.mark.parametrize("kwargs", SGD_CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_sgd_matches_torch(kwargs, backend):
    opt, ref, params, ref_params = _compare_with_torch(optgen.SGD, torch.optim.SGD, kwargs, backend)
    if kwargs.get("momentum"):
        for i, (p, r) in enumerate(zip(params, ref_params)):
            assert_close_rel(opt.state[p]["momentum_buffer"], ref.state[r]["momentum_buffer"], what=f"buf {i}")


def test_adam_matches_torch(backend):
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05)
    opt, ref, params, ref_params = _compare_with_torch(optgen.Adam, torch.optim.Adam, kwargs, backend)
    for i, (p, r) in enumerate(zip(params, ref_params)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_rel(opt.state[p][key], ref.state[r][key], what=f"{key} {i}")
        assert float(opt.state[p]["step"]) == float(ref.state[r]["step"]) == STEPS


def test_adamw_matches_torch(backend):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt, ref, params, ref_params = _compare_with_torch(optgen.AdamW, torch.optim.AdamW, kwargs, backend)
    for i, (p, r) in enumerate(zip(params, ref_params)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_rel(opt.state[p][key], ref.state[r][key], what=f"{key} {i}")


# --------------------------------------------------------------------------------------------------
# float64 transcriptions of the docstring formulas (per layer = per parameter tensor)
# --------------------------------------------------------------------------------------------------


def _f64(tensors):
    return [t.detach().to(torch.float64).clone() for t in tensors]


def lamb_reference(params, grads, lr, betas, eps, wd, bias_correction=True, eps_inside_sqrt=False,
                   layer_adaptation=True, max_grad_norm=None):
    """LAMB (and NVLAMB with ``max_grad_norm``) in float64, straight from the docstrings.

    u = m_hat / (sqrt(v_hat) + eps) + wd * w   (eps_inside_sqrt: m_hat / sqrt(v_hat + eps) + wd * w)
    r = ||w|| / ||u||, 1 where either norm is 0 (or layer adaptation is off);  w <- w - lr * r * u.
    NVLAMB: g <- g / max(1, ||g||_global / max_grad_norm) first (norm over all parameters).
    """
    beta1, beta2 = betas
    w = _f64(params)
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t, step_grads in enumerate(grads, start=1):
        g = _f64(step_grads)
        if max_grad_norm is not None:
            global_norm = math.sqrt(sum(float((x * x).sum()) for x in g))
            g = [x / max(1.0, global_norm / max_grad_norm) for x in g]
        for i in range(len(w)):
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            m_hat = m[i] / (1 - beta1**t) if bias_correction else m[i]
            v_hat = v[i] / (1 - beta2**t) if bias_correction else v[i]
            if eps_inside_sqrt:
                u = m_hat / torch.sqrt(v_hat + eps) + wd * w[i]
            else:
                u = m_hat / (torch.sqrt(v_hat) + eps) + wd * w[i]
            w_norm, u_norm = float(w[i].norm()), float(u.norm())
            r = w_norm / u_norm if (w_norm > 0 and u_norm > 0 and layer_adaptation) else 1.0
            w[i] = w[i] - lr * r * u
    return w, m, v


def lars_reference(params, grads, lr, momentum, wd, coeff, eps, nesterov=False):
    """LARS in float64, from its docstring.

    r = c ||w|| / (||g|| + wd ||w|| + eps), 1 where ||w|| or ||g|| is 0;
    m <- mu m + lr r (g + wd w);  w <- w - m   (nesterov: w <- w - mu m - lr r (g + wd w)).
    """
    w = _f64(params)
    buf = [torch.zeros_like(x) for x in w]
    for step_grads in grads:
        g = _f64(step_grads)
        for i in range(len(w)):
            w_norm, g_norm = float(w[i].norm()), float(g[i].norm())
            r = coeff * w_norm / (g_norm + wd * w_norm + eps) if (w_norm > 0 and g_norm > 0) else 1.0
            scaled = lr * r * (g[i] + wd * w[i])
            buf[i] = momentum * buf[i] + scaled
            w[i] = w[i] - (momentum * buf[i] + scaled if nesterov else buf[i])
    return w, buf


LAMB_HYPERS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


@pytest.mark.parametrize("eps_inside_sqrt", [False, True], ids=["eps_outside", "eps_inside"])
@pytest.mark.parametrize("bias_correction", [True, False], ids=["bc", "no_bc"])
def test_lamb_matches_float64_reference(bias_correction, eps_inside_sqrt, backend):
    params = make_params()
    grads = make_grads(ODD_SHAPES, STEPS)
    expected_w, expected_m, expected_v = lamb_reference(
        params, grads, LAMB_HYPERS["lr"], LAMB_HYPERS["betas"], LAMB_HYPERS["eps"], LAMB_HYPERS["weight_decay"],
        bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt,
    )
    opt = optgen.LAMB(params, bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt,
                      backend=backend, **LAMB_HYPERS)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    assert_close_rel([opt.state[p]["exp_avg"] for p in params], expected_m, tol=TOL_F64_REFERENCE, what="m")
    assert_close_rel([opt.state[p]["exp_avg_sq"] for p in params], expected_v, tol=TOL_F64_REFERENCE, what="v")
    # the zero-initialised bias moved (trust ratio 1 where ||w|| = 0), and every step was counted
    assert params[ZERO_BIAS].detach().abs().max() > 0
    assert all(float(opt.state[p]["step"]) == STEPS for p in params)


@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
def test_lars_matches_float64_reference(nesterov, backend):
    hypers = dict(lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01, eps=1e-8)
    params = make_params()
    grads = make_grads(ODD_SHAPES, STEPS)
    expected_w, expected_buf = lars_reference(
        params, grads, hypers["lr"], hypers["momentum"], hypers["weight_decay"], hypers["trust_coefficient"],
        hypers["eps"], nesterov=nesterov,
    )
    opt = optgen.LARS(params, nesterov=nesterov, backend=backend, **hypers)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    assert_close_rel([opt.state[p]["momentum_buffer"] for p in params], expected_buf, tol=TOL_F64_REFERENCE,
                     what="momentum_buffer")
    assert params[ZERO_BIAS].detach().abs().max() > 0


@pytest.mark.parametrize("max_grad_norm", [1.0, 1e4], ids=["clipped", "unclipped"])
def test_nvlamb_matches_float64_reference(max_grad_norm, backend):
    params = make_params()
    grads = make_grads(ODD_SHAPES, STEPS)
    global_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads[0]))
    assert (global_norm > max_grad_norm) == (max_grad_norm == 1.0)  # the pre-normalisation is really exercised
    expected_w, expected_m, expected_v = lamb_reference(
        params, grads, LAMB_HYPERS["lr"], LAMB_HYPERS["betas"], LAMB_HYPERS["eps"], LAMB_HYPERS["weight_decay"],
        max_grad_norm=max_grad_norm,
    )
    opt = optgen.NVLAMB(params, max_grad_norm=max_grad_norm, backend=backend, **LAMB_HYPERS)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    assert_close_rel([opt.state[p]["exp_avg"] for p in params], expected_m, tol=TOL_F64_REFERENCE, what="m")
    assert_close_rel([opt.state[p]["exp_avg_sq"] for p in params], expected_v, tol=TOL_F64_REFERENCE, what="v")


def test_float64_parameters_match_the_references_to_rounding():
    """With fp64 parameters the torch backend computes in fp64: the transcriptions agree to ~1e-15, which
    checks the formulas themselves, free of fp32 rounding."""
    grads = make_grads(ODD_SHAPES, STEPS, dtype=torch.float64)
    h = LAMB_HYPERS
    cases = [
        (optgen.LAMB, dict(bias_correction=True, eps_inside_sqrt=False),
         lambda p: lamb_reference(p, grads, h["lr"], h["betas"], h["eps"], h["weight_decay"])[0]),
        (optgen.LAMB, dict(bias_correction=False, eps_inside_sqrt=True),
         lambda p: lamb_reference(p, grads, h["lr"], h["betas"], h["eps"], h["weight_decay"], bias_correction=False,
                                  eps_inside_sqrt=True)[0]),
        (optgen.NVLAMB, dict(max_grad_norm=1.0),
         lambda p: lamb_reference(p, grads, h["lr"], h["betas"], h["eps"], h["weight_decay"], max_grad_norm=1.0)[0]),
    ]
    for cls, flags, reference in cases:
        params = make_params(dtype=torch.float64)
        expected = reference(params)
        run_steps(cls(params, backend="torch", **flags, **h), params, grads)
        assert_close_rel(params, expected, tol=1e-12, what=f"{cls.__name__} {flags}")
    params = make_params(dtype=torch.float64)
    expected, _ = lars_reference(params, grads, 1.0, 0.9, 1e-3, 0.01, 1e-8, nesterov=True)
    run_steps(optgen.LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01, eps=1e-8,
                          nesterov=True, backend="torch"), params, grads)
    assert_close_rel(params, expected, tol=1e-12, what="LARS")


# --------------------------------------------------------------------------------------------------
# Third-party LAMB implementations, only where the flags really match
# --------------------------------------------------------------------------------------------------
#
# * torch_optimizer.Lamb(debias=False): u = m/(sqrt(v)+eps) + wd*w, r = min(||w||, 10)/||u|| (1 where a norm is
#   0), w -= lr*r*u: optgen.LAMB(bias_correction=False, eps_inside_sqrt=False) while ||w|| < 10. Its debias=True
#   multiplies lr by sqrt(1-beta2^t)/(1-beta1^t) outside u (eps and wd*w not rescaled): no optgen variant.
# * pytorch_optimizer.Lamb(weight_decouple=False, adam_debias=True): the same u, but r = min(||w||, 10)/(||u|| + eps):
#   equal to optgen.LAMB(bias_correction=False) with eps=0 (||w|| < 10), or with adam=True (r = 1) to
#   LAMB(bias_correction=False, layer_adaptation=False) for any eps. Its default adam_debias=False divides the
#   whole step, wd*w included, by 1-beta1^t: no optgen variant; nor has it a bias correction of v.


def _small_params():
    # ||w|| < 10 for every tensor (torch_optimizer/pytorch_optimizer clamp the weight norm at 10)
    return make_params(scale=0.1)


def _run_third_party(ours, theirs, params, ref_params, grads):
    run_steps(ours, params, grads)
    run_steps(theirs, ref_params, grads)
    assert max(float(p.detach().norm()) for p in ref_params) < 10.0, "precondition: weight norms < 10"
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert_close_rel(p, r, torch.float32, tol=1e-5, what=f"param {i} shape {tuple(p.shape)}")


def test_lamb_matches_torch_optimizer_lamb(backend):
    torch_optimizer = pytest.importorskip("torch_optimizer")
    params = _small_params()
    ref_params = clone_params(params)
    grads = make_grads(ODD_SHAPES, STEPS)
    hypers = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    ours = optgen.LAMB(params, bias_correction=False, eps_inside_sqrt=False, backend=backend, **hypers)
    theirs = torch_optimizer.Lamb(ref_params, clamp_value=10, adam=False, debias=False, **hypers)
    _run_third_party(ours, theirs, params, ref_params, grads)


# eps=0: u = m/sqrt(v) is 0/0 in the masked tail lanes of a Triton block (never stored nor reduced)
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("adam", [False, True], ids=["trust_ratio", "adam"])
def test_lamb_matches_pytorch_optimizer_lamb(adam, backend):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    params = _small_params()
    ref_params = clone_params(params)
    grads = make_grads(ODD_SHAPES, STEPS)
    eps = 1e-6 if adam else 0.0  # with the trust ratio, pytorch_optimizer adds eps to ||u||: match it with eps=0
    hypers = dict(lr=1e-2, betas=(0.9, 0.999), eps=eps, weight_decay=0.01)
    ours = optgen.LAMB(params, bias_correction=False, eps_inside_sqrt=False, layer_adaptation=not adam,
                       backend=backend, **hypers)
    theirs = pytorch_optimizer.Lamb(ref_params, weight_decouple=False, fixed_decay=False, rectify=False,
                                    grad_averaging=True, adam=adam, pre_norm=False, adam_debias=True,
                                    foreach=False, **hypers)
    _run_third_party(ours, theirs, params, ref_params, grads)


# --------------------------------------------------------------------------------------------------
# Triton backend == torch backend
# --------------------------------------------------------------------------------------------------

LOW_PRECISION_CASES = [
    (optgen.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    (optgen.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (optgen.LAMB, dict(lr=1e-2, weight_decay=0.01)),
    (optgen.LARS, dict(lr=1.0, trust_coefficient=0.01, weight_decay=1e-3)),
    (optgen.NVLAMB, dict(lr=1e-2, max_grad_norm=1.0)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cls,kwargs", LOW_PRECISION_CASES, ids=[c.__name__ for c, _ in LOW_PRECISION_CASES])
def test_low_precision_triton_matches_torch_backend(cls, kwargs, dtype):
    """5 steps in lockstep: before every step the Triton run is reset to the torch run's parameters and states,
    so each step is compared from identical inputs (the one-ulp difference of a bf16 store -- the interpreter
    truncates, torch rounds -- would otherwise compound over the steps)."""
    steps = 5
    shapes = [(), (3, 1, 4), (7,), (257,), (7,)]
    grads = make_grads(shapes, steps, dtype=dtype)
    ref_params = make_params(shapes, dtype=dtype, zero=(len(shapes) - 1,))
    params = clone_params(ref_params)
    ref = cls(ref_params, backend="torch", **kwargs)
    opt = cls(params, backend="triton", **kwargs)
    for step, step_grads in enumerate(grads, start=1):
        if step > 1:
            for p, r in zip(params, ref_params):
                p.data.copy_(r.data)
                for name, value in ref.state[r].items():
                    if name != "step":
                        opt.state[p][name].copy_(value)  # in place: the Triton tables keep their addresses
        run_steps(ref, ref_params, [step_grads])
        run_steps(opt, params, [step_grads])
        for i, (a, e) in enumerate(zip(params, ref_params)):
            assert a.dtype == dtype
            assert_close_rel(a, e, dtype, what=f"step {step} param {i}")
            for name in ref.state[e]:
                if name != "step":
                    assert opt.state[a][name].dtype == torch.float32  # states are kept in fp32
                    assert_close_rel(opt.state[a][name], ref.state[e][name], dtype, what=f"step {step} {name} {i}")
    assert all(float(opt.state[p]["step"]) == steps for p in params)


MIXED = [((257,), torch.float32), ((7,), torch.bfloat16), ((), torch.float32), ((3, 1, 4), torch.float16),
         ((300,), torch.bfloat16), ((7,), torch.float32)]


@pytest.mark.parametrize("cls,kwargs", [(optgen.LAMB, dict(lr=1e-2)), (optgen.NVLAMB, dict(lr=1e-2)),
                                        (optgen.SGD, dict(lr=0.05, momentum=0.9))], ids=["LAMB", "NVLAMB", "SGD"])
def test_mixed_dtypes_triton_matches_torch(cls, kwargs):
    """fp32, bf16 and fp16 parameters in one optimizer: one launch per pass per dtype partition, per-layer and
    global reductions across partitions (NVLAMB's global norm spans all three), in lockstep as above."""
    steps = 3
    shapes = [s for s, _ in MIXED]
    grads = [[g.to(dt) for g, (_, dt) in zip(step, MIXED)] for step in make_grads(shapes, steps)]
    base = make_params(shapes, zero=(5,))
    ref_params = [torch.nn.Parameter(p.detach().to(dt)) for p, (_, dt) in zip(base, MIXED)]
    params = clone_params(ref_params)
    ref = cls(ref_params, backend="torch", **kwargs)
    opt = cls(params, backend="triton", **kwargs)
    for step, step_grads in enumerate(grads, start=1):
        for p, r in zip(params, ref_params):
            p.data.copy_(r.data)
            for name, value in ref.state[r].items():
                if name != "step":
                    opt.state[p][name].copy_(value)
        launches = opt._backends["triton"].launches if step > 1 else 0
        run_steps(ref, ref_params, [step_grads])
        run_steps(opt, params, [step_grads])
        for i, (a, e) in enumerate(zip(params, ref_params)):
            assert a.dtype == e.dtype == MIXED[i][1]
            assert_close_rel(a, e, a.dtype, what=f"step {step} param {i} ({a.dtype})")
        partitions = 3
        reduces = sum(p.reduce_after or p.fold_after for p in opt.plan.passes)  # one reduce launch each
        assert opt._backends["triton"].launches - launches == len(opt.plan.passes) * partitions + reduces
    assert all(float(opt.state[p]["step"]) == steps for p in params)


@pytest.mark.parametrize("cls,kwargs", [(optgen.AdamW, dict(lr=1e-2)), (optgen.LAMB, dict(lr=1e-2))],
                         ids=["AdamW", "LAMB"])
def test_thousand_small_tensors_triton_matches_torch(cls, kwargs):
    gen = torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 41, (1000,), generator=gen).tolist()
    shapes = [(n,) for n in sizes]
    steps = 2
    grads = make_grads(shapes, steps, seed=6)
    results = {}
    for backend in BACKENDS:
        params = make_params(shapes, seed=7, zero=(3, 500))
        opt = cls(params, backend=backend, **kwargs)
        run_steps(opt, params, grads)
        results[backend] = (params, opt)
    (tp, topt), (rp, _) = results["triton"], results["torch"]
    assert_close_rel(tp, rp, torch.float32, what="params")
    assert all(float(topt.state[p]["step"]) == steps for p in tp)
    # one launch per pass (+ segment-reduce) for all 1000 tensors
    assert topt._backends["triton"].launches == steps * topt.plan.launches_per_step


GROUP_CASES = [
    (optgen.LAMB, dict(lr=1e-2, weight_decay=0.01, layer_adaptation=True),
     dict(lr=3e-3, weight_decay=0.0, layer_adaptation=False)),
    (optgen.LARS, dict(lr=1.0, weight_decay=1e-3, trust_coefficient=0.01, layer_adaptation=True),
     dict(lr=0.05, weight_decay=0.0, layer_adaptation=False)),
    (optgen.NVLAMB, dict(lr=1e-2, weight_decay=0.01), dict(lr=3e-3, weight_decay=0.0, layer_adaptation=False)),
    (optgen.AdamW, dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0, betas=(0.8, 0.9))),
]


@pytest.mark.parametrize("cls,first,second", GROUP_CASES, ids=[c.__name__ for c, _, _ in GROUP_CASES])
def test_param_groups_triton_matches_torch(cls, first, second):
    steps = 6
    grads = make_grads(ODD_SHAPES, steps)
    results = {}
    for backend in BACKENDS:
        params = make_params()
        groups = [dict(params=params[:5], **first), dict(params=params[5:], **second)]
        opt = cls(groups, backend=backend)
        run_steps(opt, params, grads)
        results[backend] = params
    assert_close_rel(results["triton"], results["torch"], torch.float32, what="params")


def test_param_groups_differ_from_single_group():
    """The second group's options are really used: the same run with one group gives different values."""
    steps = 3
    grads = make_grads(ODD_SHAPES, steps)
    grouped = make_params()
    opt = optgen.LAMB([dict(params=grouped[:5]), dict(params=grouped[5:], lr=3e-3, layer_adaptation=False)],
                      lr=1e-2, backend="torch")
    run_steps(opt, grouped, grads)
    single = make_params()
    run_steps(optgen.LAMB(single, lr=1e-2, backend="torch"), single, grads)
    assert all(torch.equal(a, b) for a, b in zip(grouped[:5], single[:5]))
    assert not any(torch.equal(a, b) for a, b in zip(grouped[5:], single[5:]))


# --------------------------------------------------------------------------------------------------
# Layer means and RMS: reductions of per-step scalars count elements (layer_numel = layer_sum(1))
# --------------------------------------------------------------------------------------------------


def _rms_clipped_sgd():
    """Adafactor's two uses of a layer mean: g normalised by its RMS, the step clipped to RMS <= d."""
    spec = optgen.Spec("RMSClippedSGD")
    lr, d, eps = spec.hyper(lr=0.05, d=1.0, eps=1e-3)
    w, g = spec.param, spec.grad
    u = g / optgen.sqrt(optgen.layer_mean(g**2) + eps)
    spec.update(w, w - lr * u / optgen.Max(1, optgen.rms(u) / d) + 1e-3 * optgen.layer_numel())
    return spec


def _rms_clipped_sgd_float64(params, grads, lr=0.05, d=1.0, eps=1e-3):
    out = [p.detach().double().clone() for p in params]
    for step_grads in grads:
        for w, g in zip(out, step_grads):
            g = g.double()
            n = g.numel()
            u = g / math.sqrt((g**2).sum().item() / n + eps) if n else g
            rms = math.sqrt((u**2).sum().item() / n) if n else 0.0
            w -= lr * u / max(1.0, rms / d)
            w += 1e-3 * n
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_mean_rms_and_element_count_match_float64(backend):
    shapes = [*ODD_SHAPES, (0,), (4, 0)]
    params = make_params(shapes)
    grads = make_grads(shapes, STEPS)
    expected = _rms_clipped_sgd_float64(params, grads)
    opt = optgen.build(_rms_clipped_sgd())(params, backend=backend)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected, tol=TOL_F64_REFERENCE, what="params")
    # the count is one per-layer reduction in the pass that reduces g^2: no extra pass
    assert len(opt.plan.passes) == 3 and opt.plan.slots[0].arg == 1


def _counting(kind):
    spec = optgen.Spec(f"Counting{kind.title()}")
    lr = spec.hyper(lr=0.1)
    w, g = spec.param, spec.grad
    update = {
        "numel": g / optgen.layer_numel(),
        "where": optgen.where(optgen.layer_numel() > 5, g, 2 * g),
        "global": g * optgen.global_sum(1),
        "max": g * optgen.layer_max(lr),
    }[kind]
    spec.update(w, w - lr * update)
    return spec


@pytest.mark.parametrize("kind", ["numel", "where", "global", "max"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_that_only_counts_elements(backend, kind):
    """Reductions of per-step scalars alone in their pass (no buffer touched): the kernels run over the
    elements by the chunk tables, the torch pass over the parameter's shape; nothing is moved for them."""
    shapes = [(3, 5), (7,), (), (0,), (2, 3, 4), (3 * 256 + 5,)]
    params = make_params(shapes)
    grads = make_grads(shapes, 2)
    total = sum(p.numel() for p in params)
    expected = [p.detach().double().clone() for p in params]
    for step_grads in grads:
        for w, g in zip(expected, step_grads):
            n, g = w.numel(), g.double()
            w -= 0.1 * {"numel": g / max(n, 1), "where": g if n > 5 else 2 * g, "global": g * total, "max": g * 0.1}[kind]
    opt = optgen.build(_counting(kind))(params, backend=backend)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected, tol=TOL_F64_REFERENCE, what=kind)
    assert opt.plan.bytes_per_param == 12 and len(opt.plan.passes) == 2
