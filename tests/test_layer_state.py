"""Per-layer states (``spec.state(name, per="layer")``): one number per parameter tensor, on every backend.

The planner computes a per-layer state's new value in every pass that reads it (a few scalar operations per
program) and writes it in the last pass, like the step count; the kernels keep one fp64 copy per chunk (each
program reads and writes its own), the state dict a 0-d fp64 tensor. Checked here against float64
transcriptions of small specs that use the pieces in every position: a state no element reads (a tracker), a
state whose new value feeds a reduction of the next pass (three passes), a reduction of a per-layer state;
and the runtime around them: zero-size parameters, in-place edits of the state between steps, GradScaler's
skipped steps, state dicts, and bad specs.
"""

import math
import os

import pytest
import sympy
import torch
from conftest import (
    CHUNK,
    TOL_F64_REFERENCE,
    assert_close_rel,
    assert_spec_error,
    clone_params,
    make_grads,
    make_params,
    run_steps,
)

import optgen
from optgen import Spec, SpecError
from optgen.analysis import plan
from optgen.ir import lower
from optgen.spec import global_sum, layer_mean, layer_numel, maxabs, sqrt, sumsq, where
from optgen.specs import novograd

HERE = os.path.basename(__file__)
# odd shapes, a zero-size parameter and one spanning several chunks (its chunks each keep a copy of the state)
SHAPES = [(), (3, 1, 4), (0,), (7,), (257,), (3 * CHUNK + 5,), (2, 0, 3)]
STEPS = 12


def _f64(tensors):
    return [t.detach().to(torch.float64).clone() for t in tensors]


# -- specs and their float64 transcriptions ------------------------------------------------------------


def tracker_spec() -> Spec:
    """SGD that also tracks each layer's largest |g| seen so far: a per-layer state no element-wise value reads."""
    spec = Spec("GradMaxTracker")
    lr = spec.hyper(lr=0.1)
    peak = spec.state("grad_peak", per="layer", init=-1.0)
    spec.update(peak, sympy.Max(peak, maxabs(spec.grad)))
    spec.update(spec.param, spec.param - lr * spec.grad)
    return spec


def tracker_reference(params, grads, lr):
    w = _f64(params)
    peak = [-1.0 for _ in w]
    for step in grads:
        g = _f64(step)
        for i in range(len(w)):
            peak[i] = max(peak[i], float(g[i].abs().max()) if g[i].numel() else -math.inf)
            w[i] = w[i] - lr * g[i]
    return w, peak


def rms_scaled_spec() -> Spec:
    """A per-layer second moment of the gradient's mean square, then an RMS clip of the scaled update (a
    reduction of a value that reads the new per-layer state): three passes."""
    spec = Spec("LayerRMSClip")
    lr, beta, eps, d = spec.hyper(lr=0.01, beta=0.9, eps=1e-8, d=1.0)
    w, g, t = spec.param, spec.grad, spec.step
    v = spec.state("layer_sq", per="layer")
    v1 = spec.update(v, where(sympy.Eq(t, 1), layer_mean(g**2), beta * v + (1 - beta) * layer_mean(g**2)))
    u = g / (sqrt(v1) + eps)
    clipped = u / sympy.Max(1, sqrt(sumsq(u) / layer_numel()) / d)
    spec.update(w, w - lr * clipped)
    return spec


def rms_scaled_reference(params, grads, lr, beta, eps, d):
    w = _f64(params)
    v = [0.0 for _ in w]
    for t, step in enumerate(grads, start=1):
        g = _f64(step)
        for i in range(len(w)):
            n = g[i].numel()
            mean_sq = float((g[i] ** 2).sum()) / n if n else math.nan
            v[i] = mean_sq if t == 1 else beta * v[i] + (1 - beta) * mean_sq
            u = g[i] / (math.sqrt(v[i]) + eps) if n else g[i]
            rms = math.sqrt(float((u**2).sum()) / n) if n else math.nan
            w[i] = w[i] - lr * u / max(1.0, rms / d) if n else w[i]
    return w, v


def counter_spec() -> Spec:
    """A per-layer state summed over elements: sum_i c = c * numel, global too."""
    spec = Spec("LayerCounter")
    lr = spec.hyper(lr=0.1)
    c = spec.state("visits", per="layer", init=2.0)
    c1 = spec.update(c, c + 1)
    total = global_sum(c1)  # sum over all elements of all parameters of their layer's count
    spec.update(spec.param, spec.param - lr * spec.grad * c1 / total)
    return spec


def counter_reference(params, grads, lr):
    w = _f64(params)
    c = [2.0 for _ in w]
    for step in grads:
        g = _f64(step)
        c = [x + 1 for x in c]
        total = sum(x * p.numel() for x, p in zip(c, w))
        for i in range(len(w)):
            w[i] = w[i] - lr * g[i] * c[i] / total
    return w, c


# -- plans ------------------------------------------------------------------------------------------


def test_plans_write_layer_states_in_the_last_pass():
    tracker = plan(lower(tracker_spec()))
    # the update needs no reduction, the state does: a second pass that only writes it (reading no element)
    assert len(tracker.passes) == 2
    assert tracker.passes[-1].layer_stores and not tracker.passes[0].layer_stores
    assert tracker.state_bytes_per_param == 0  # one number per layer is no memory per parameter
    assert "grad_peak per layer" in tracker.describe()

    rms = plan(lower(rms_scaled_spec()))
    assert len(rms.passes) == 3
    assert [bool(p.layer_stores) for p in rms.passes] == [False, False, True]
    # the new value is computed where it is read (pass 1's reduction and pass 2's update) from the old one
    assert rms.passes[1].layer_state_reads == ("layer_sq",) and rms.passes[2].layer_state_reads == ("layer_sq",)
    # element-wise traffic: pass 0 reads g, pass 1 reads g, pass 2 reads w, g and writes w
    assert rms.bytes_per_param == 4 * (1 + 1 + 3)

    novograd_plan = plan(lower(novograd()))
    assert (novograd_plan.bytes_per_param, novograd_plan.state_bytes_per_param) == (24, 4)


# -- every backend against the transcriptions --------------------------------------------------------


def _check_layer_state(opt, params, name, expected):
    for i, (p, value) in enumerate(zip(params, expected)):
        state = opt.state[p][name]
        assert state.shape == () and state.dtype == torch.float64, (i, state.shape, state.dtype)
        if math.isnan(value):
            assert torch.isnan(state), (i, float(state))
        else:
            assert float(state) == pytest.approx(value, rel=1e-6, abs=1e-12), (i, float(state), value)


def test_tracker(backend):
    params = make_params(SHAPES, zero=())
    grads = make_grads(SHAPES, STEPS)
    expected_w, expected_peak = tracker_reference(params, grads, 0.1)
    opt = optgen.build(tracker_spec())(params, lr=0.1, backend=backend)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    _check_layer_state(opt, params, "grad_peak", expected_peak)
    assert [float(opt.state[p]["step"]) for p in params] == [STEPS] * len(params)


def test_three_passes(backend):
    params = make_params(SHAPES, zero=())
    grads = make_grads(SHAPES, STEPS, scale=3.0)
    h = dict(lr=0.01, beta=0.9, eps=1e-8, d=0.5)
    expected_w, expected_v = rms_scaled_reference(params, grads, **h)
    opt = optgen.build(rms_scaled_spec())(params, backend=backend, **h)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    _check_layer_state(opt, params, "layer_sq", expected_v)  # a zero-size layer's mean is 0/0: NaN, as torch


def test_reduction_of_a_layer_state(backend):
    params = make_params(SHAPES, zero=())
    grads = make_grads(SHAPES, 4)
    expected_w, expected_c = counter_reference(params, grads, 0.1)
    opt = optgen.build(counter_spec())(params, lr=0.1, backend=backend)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    _check_layer_state(opt, params, "visits", expected_c)


def test_many_tensors_one_launch_per_pass():
    """1000 tensors: the kernels' launches per step are the plan's, whatever the count."""
    shapes = [(1 + i % 7,) for i in range(1000)]
    params = make_params(shapes, zero=())
    grads = make_grads(shapes, 3)
    reference = clone_params(params)
    opt = optgen.NovoGrad(params, lr=0.01, backend="c")
    ref = optgen.NovoGrad(reference, lr=0.01, backend="torch")
    run_steps(opt, params, grads)
    run_steps(ref, reference, grads)
    assert_close_rel(params, list(reference), what="w")
    for p, r in zip(params, reference):
        assert float(opt.state[p]["exp_avg_sq"]) == pytest.approx(float(ref.state[r]["exp_avg_sq"]), rel=1e-12)
    c = opt._backends["c"]
    before = c.launches
    run_steps(opt, params, grads[:1])
    assert c.launches - before == plan(lower(novograd())).launches_per_step


# -- the runtime around them --------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_backend", ["c", "triton"])
def test_in_place_edit_reaches_every_chunk(kernel_backend):
    """``state[name]`` is a view of the tensor's first chunk copy: an edit between steps (a fast step on the C
    backend) is spread to every chunk, as for the step count."""
    shapes = [(3 * CHUNK + 5,), (9,)]
    params = make_params(shapes, zero=())
    reference = clone_params(params)
    grads = make_grads(shapes, 4)
    opt = optgen.NovoGrad(params, lr=0.01, backend=kernel_backend)
    ref = optgen.NovoGrad(reference, lr=0.01, backend="torch")
    for k, step in enumerate(grads):
        run_steps(opt, params, [step])
        run_steps(ref, reference, [step])
        if k == 1:
            for o, ps in ((opt, params), (ref, reference)):
                o.state[ps[0]]["exp_avg_sq"].mul_(100.0)
                o.state[ps[1]]["exp_avg_sq"].fill_(7.0)
    assert_close_rel(params, list(reference), what="w")
    for p, r in zip(params, reference):
        assert float(opt.state[p]["exp_avg_sq"]) == pytest.approx(float(ref.state[r]["exp_avg_sq"]), rel=1e-12)


def test_grad_scaler_skip_keeps_layer_states(backend):
    params = make_params(SHAPES[:2], zero=())
    grads = make_grads(SHAPES[:2], 3)
    opt = optgen.NovoGrad(params, lr=0.01, backend=backend)
    run_steps(opt, params, grads[:1])
    before = [opt.state[p]["exp_avg_sq"].clone() for p in params]
    weights = [p.detach().clone() for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    run_steps(opt, params, grads[1:2])
    for p, v, w in zip(params, before, weights):
        assert torch.equal(opt.state[p]["exp_avg_sq"], v) and torch.equal(p.detach(), w)
        assert float(opt.state[p]["step"]) == 1.0
    opt.found_inf = torch.tensor(0.0)
    run_steps(opt, params, grads[2:])
    assert all(float(opt.state[p]["step"]) == 2.0 for p in params)
    assert not any(torch.equal(opt.state[p]["exp_avg_sq"], v) for p, v in zip(params, before))


def test_state_dict_round_trip_across_backends():
    shapes = SHAPES[:2] + [(3 * CHUNK + 5,)]
    params = make_params(shapes, zero=())
    grads = make_grads(shapes, 6)
    opt = optgen.NovoGrad(params, lr=0.01, backend="c")
    run_steps(opt, params, grads[:3])
    saved = opt.state_dict()
    assert all(saved["state"][i]["exp_avg_sq"].shape == () for i in range(len(shapes)))
    resumed_params = clone_params(params)
    resumed = optgen.NovoGrad(resumed_params, lr=0.01, backend="torch")
    resumed.load_state_dict(saved)
    run_steps(opt, params, grads[3:])
    run_steps(resumed, resumed_params, grads[3:])
    assert_close_rel(list(resumed_params), params, what="w")


def test_resumes_a_torch_optimizer_checkpoint(backend):
    """torch_optimizer.NovoGrad keeps exp_avg_sq as a 0-d fp32 tensor: loaded as optgen's fp64 number."""
    torch_optimizer = pytest.importorskip("torch_optimizer")
    shapes = SHAPES[:2] + [(7,), (257,)]
    params = make_params(shapes, zero=())
    ref_params = clone_params(params)
    grads = make_grads(shapes, 6)
    ref = torch_optimizer.NovoGrad(ref_params, lr=0.01, betas=(0.95, 0.98), grad_averaging=False)
    run_steps(ref, ref_params, grads[:3])
    for p, r in zip(params, ref_params):
        p.data.copy_(r.detach())
    opt = optgen.NovoGrad(params, lr=0.01, betas=(0.95, 0.98), backend=backend)
    opt.load_state_dict(ref.state_dict())
    assert opt.state[params[0]]["exp_avg_sq"].dtype == torch.float64
    run_steps(ref, ref_params, grads[3:])
    run_steps(opt, params, grads[3:])
    assert_close_rel(params, list(ref_params), tol=1e-5, what="w")


def test_state_of_a_wrong_shape_is_refused_before_anything_changes(backend):
    params = make_params([(5,), (4,)], zero=())
    opt = optgen.NovoGrad(params, lr=0.01, backend=backend)
    run_steps(opt, params, make_grads([(5,), (4,)], 1))
    opt.state[params[1]]["exp_avg_sq"] = torch.zeros(4, dtype=torch.float64)
    weights = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    with pytest.raises(RuntimeError, match=r"'exp_avg_sq' has shape \(4,\).*one number per layer"):
        run_steps(opt, params, make_grads([(5,), (4,)], 1, seed=3))
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, weights))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(params, moments))


# -- bad specs ---------------------------------------------------------------------------------------


def _raises(make, *fragments):
    assert_spec_error(make, *fragments, written_in=HERE)


def test_element_wise_value_for_a_layer_state():
    def make():
        spec = Spec("Bad")
        lr = spec.hyper(lr=0.1)
        v = spec.state("v", per="layer")
        spec.update(v, v + spec.grad**2)
        spec.update(spec.param, spec.param - lr * spec.grad)
        return spec

    _raises(make, "per-layer state", "one number per layer", "g")


def test_layer_state_initial_value_from_w():
    def make():
        spec = Spec("Bad")
        lr = spec.hyper(lr=0.1)
        v = spec.state("v", per="layer", init=spec.param)
        spec.update(v, v + sumsq(spec.grad))
        spec.update(spec.param, spec.param - lr * spec.grad)
        return spec

    _raises(make, "initial value", "hyperparameters")


def test_unknown_granularity():
    with pytest.raises(SpecError, match=r"per='matrix'.*expected one of") as info:
        Spec("Bad").state("v", per="matrix")
    assert HERE in str(info.value)


# -- found by review: each failed before its fix -------------------------------------------------------------


def test_a_layer_state_read_element_wise_stays_fp64(backend):
    """The new value is also read by element-wise code (cast to fp32 there): the state keeps the fp64 value."""
    spec = Spec("Accumulate")
    lr = spec.hyper(lr=0.1)
    v = spec.state("v", per="layer", init=1.0)
    v1 = spec.update(v, v + 1e-9)
    spec.update(spec.param, spec.param - lr * spec.grad * v1)
    params = make_params([(5,), (3 * CHUNK + 5,)], zero=())
    opt = optgen.build(spec)(params, backend=backend)
    run_steps(opt, params, make_grads([(5,), (3 * CHUNK + 5,)], 100))
    assert all(float(opt.state[p]["v"]) == pytest.approx(1 + 100e-9, rel=0, abs=1e-12) for p in params)


def test_a_layer_state_that_keeps_another_ones_old_value(backend):
    """prev <- cur, cur <- ||g||^2: the torch passes read cur's old value, not the one just written."""
    spec = Spec("PreviousNorm")
    lr = spec.hyper(lr=0.1)
    cur, prev = spec.state("cur", per="layer"), spec.state("prev", per="layer")
    spec.update(cur, sumsq(spec.grad))
    spec.update(prev, cur)
    spec.update(spec.param, spec.param - lr * spec.grad)
    param = torch.nn.Parameter(torch.zeros(3))
    opt = optgen.build(spec)([param], backend=backend)
    seen = []
    for k in (1.0, 2.0, 3.0):
        param.grad = torch.full((3,), k)
        opt.step()
        seen.append((float(opt.state[param]["cur"]), float(opt.state[param]["prev"])))
    assert seen == [(3.0, 0.0), (12.0, 3.0), (27.0, 12.0)]


def test_a_state_named_like_a_layer_states_argument():
    def make():
        spec = Spec("Clash")
        lr = spec.hyper(lr=0.1)
        v, layer_v = spec.state("v", per="layer"), spec.state("layer_v")
        spec.update(v, sumsq(spec.grad))
        spec.update(layer_v, layer_v + spec.grad)
        spec.update(spec.param, spec.param - lr * layer_v * v)
        return spec

    with pytest.raises(SpecError, match="a state named 'layer_v' beside the per-layer state 'v'"):
        optgen.build(make())


@pytest.mark.parametrize(
    "saved", [torch.tensor(3, dtype=torch.int64), 3, torch.full((5,), 3.0)], ids=["int-tensor", "number", "per-element"]
)
def test_checkpoint_forms_of_a_layer_state(saved):
    """A number, an integer tensor, or the per-element tensor optgen kept before per-layer states: one fp64 number."""
    param = torch.nn.Parameter(torch.ones(5))
    opt = optgen.NovoGrad([param], backend="torch")
    param.grad = torch.ones(5)
    opt.step()
    state = opt.state_dict()
    state["state"][0]["exp_avg_sq"] = saved
    opt.load_state_dict(state)
    assert opt.state[param]["exp_avg_sq"].dtype == torch.float64 and float(opt.state[param]["exp_avg_sq"]) == 3.0
    state["state"][0]["exp_avg_sq"] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    before = opt.state[param]["exp_avg_sq"].clone()
    with pytest.raises(ValueError, match="has 5 different values"):
        opt.load_state_dict(state)
    assert torch.equal(opt.state[param]["exp_avg_sq"], before)
