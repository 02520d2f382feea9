"""The pass planner: passes, bytes per parameter, launches, pass boundaries, and scratch buffers."""

import pytest
import torch
from conftest import BACKENDS, TOL_F64_REFERENCE, assert_close_rel, make_grads, make_params, run_steps

import optgen
from optgen.analysis import plan
from optgen.catalog import variants
from optgen.ir import lower
from optgen.specs import BUILTINS


def _plans(name):
    spec = BUILTINS[name]()
    return [(flags, plan(lower(spec, flags))) for flags in variants(spec)]


def _stores(p):
    return [[buffer for buffer, _ in ps.stores] for ps in p.passes]


def _loads(p):
    return [[ld.buffer + ("(new)" if ld.symbol.endswith("_new") else "") for ld in ps.loads] for ps in p.passes]


def _slot(p, index):
    s = p.slots[index]
    return s.scope, s.op, str(s.arg), s.stage


# (passes, bytes/param/step, launches/step) of every variant
EXPECTED_COSTS = {
    "sgd": (1, 20, 1),
    "adam": (1, 28, 1),
    "adamw": (1, 28, 1),
    "lars": (2, 28, 3),
    "lamb": (2, 40, 3),
    "nvlamb": (3, 44, 5),  # the global pre-pass is followed by a one-program launch that folds ||g||^2
}


@pytest.mark.parametrize("name", list(EXPECTED_COSTS))
def test_builtin_costs(name):
    n_passes, n_bytes, launches = EXPECTED_COSTS[name]
    plans = _plans(name)
    assert len(plans) == {"sgd": 2, "lars": 2, "lamb": 4, "adam": 4, "adamw": 4}.get(name, 1)
    for flags, p in plans:
        amsgrad = 8 if flags.get("amsgrad") else 0  # the running maximum of v: read and written
        assert len(p.passes) == n_passes, (flags, p.describe())
        assert p.bytes_per_param == n_bytes + amsgrad, (flags, p.describe())
        assert p.launches_per_step == launches, (flags, p.describe())
        assert p.scratch == (), "the built-ins recompute (ties go to recomputation: no extra memory)"
        assert p.passes[-1].writes_step and not any(ps.writes_step for ps in p.passes[:-1])
        assert sum(ps.bytes_per_param for ps in p.passes) == p.bytes_per_param


def test_adam_adamw_sgd_single_pass():
    for name in ("adam", "adamw"):
        for flags, p in _plans(name):
            (ps,) = p.passes
            states = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if flags["amsgrad"] else [])
            assert [ld.buffer for ld in ps.loads] == ["param", "grad", *states]
            assert _stores(p) == [[*states, "param"]]
            assert p.slots == () and not ps.reduce_after
    for _, p in _plans("sgd"):
        assert _loads(p) == [["param", "grad", "momentum_buffer"]]
        assert _stores(p) == [["momentum_buffer", "param"]]


def test_lamb_boundaries():
    for flags, p in _plans("lamb"):
        assert len(p.slots) == 2, flags
        # pass 0 computes both norms (||w|| and ||u||) and writes the moments; pass 1 only the parameter
        assert _slot(p, 0)[:2] == ("layer", "sum") and _slot(p, 0)[2] == "w**2" and _slot(p, 0)[3] == 0
        assert _slot(p, 1)[:2] == ("layer", "sum") and _slot(p, 1)[3] == 0
        assert "exp_avg_new" in _slot(p, 1)[2] and "exp_avg_sq_new" in _slot(p, 1)[2]
        assert [k for k, _ in p.passes[0].produces] == [0, 1]
        assert p.passes[0].reduce_after and not p.passes[1].reduce_after
        assert p.passes[0].consumes == () and p.passes[1].consumes == (0, 1)
        assert _loads(p) == [["param", "grad", "exp_avg", "exp_avg_sq"], ["param", "exp_avg(new)", "exp_avg_sq(new)"]]
        assert _stores(p) == [["exp_avg", "exp_avg_sq"], ["param"]]
        assert [ps.bytes_per_param for ps in p.passes] == [24, 16]
        assert "layer_adaptation" in p.passes[1].hypers
        assert "layer_adaptation" in [h.name for h in p.ir.hypers]


def test_lars_boundaries():
    for flags, p in _plans("lars"):
        # pass 0 only reduces ||g|| and ||w|| (stores nothing); pass 1 updates the buffer and the parameter
        assert sorted(str(s.arg) for s in p.slots) == ["g**2", "w**2"], flags
        assert all(s.scope == "layer" and s.op == "sum" and s.stage == 0 for s in p.slots)
        assert _loads(p) == [["param", "grad"], ["param", "grad", "momentum_buffer"]]
        assert _stores(p) == [[], ["momentum_buffer", "param"]]
        assert [ps.bytes_per_param for ps in p.passes] == [8, 20]
        assert p.passes[0].reduce_after and p.passes[1].consumes == (0, 1)


def test_nvlamb_boundaries():
    ((_, p),) = _plans("nvlamb")
    # pass 0 is a pre-pass: the global gradient norm, read by pass 1; no segment-reduce (global values are
    # summed by the consumer from the producer's partial table)
    assert _slot(p, 0) == ("global", "sum", "g**2", 0)
    assert _slot(p, 1) == ("layer", "sum", "w**2", 1)
    assert _slot(p, 2)[:2] == ("layer", "sum") and _slot(p, 2)[3] == 1
    assert _loads(p) == [["grad"], ["param", "grad", "exp_avg", "exp_avg_sq"], ["param", "exp_avg(new)", "exp_avg_sq(new)"]]
    assert _stores(p) == [[], ["exp_avg", "exp_avg_sq"], ["param"]]
    assert [ps.bytes_per_param for ps in p.passes] == [4, 24, 16]
    assert [ps.reduce_after for ps in p.passes] == [False, True, False]
    assert [ps.consumes for ps in p.passes] == [(), (0,), (1, 2)]


def test_plan_is_pure():
    spec = BUILTINS["nvlamb"]()
    assert plan(lower(spec)).describe() == plan(lower(spec)).describe()
    assert lower(spec).hash == lower(BUILTINS["nvlamb"]()).hash


# --------------------------------------------------------------------------------------------------
# A spec where storing a scratch value beats recomputing it
# --------------------------------------------------------------------------------------------------

HYPERS = dict(lr=0.05, rho=0.9, mu=0.5, nu=0.25)


def three_state_spec():
    """Three states updated in pass 0; pass 1 needs only their combination u (after the norm of u).

    Recomputing u in pass 1 loads a_new, b_new, c_new (12 B); storing u in pass 0 and loading it in pass 1
    costs 8 B: the planner stores it (52 -> 48 B/param/step).
    """
    spec = optgen.Spec("ThreeStates")
    lr, rho, mu, nu = spec.hyper(**HYPERS)
    w, g = spec.param, spec.grad
    a, b, c = spec.state("a"), spec.state("b"), spec.state("c")
    a1 = spec.update(a, rho * a + g)
    b1 = spec.update(b, mu * b + g * g)
    c1 = spec.update(c, nu * c - g)
    u = a1 * b1 + c1
    spec.update(w, w - lr * optgen.trust_ratio(optgen.norm(w), optgen.norm(u)) * u)
    return spec


def three_state_reference(params, grads):
    """float64 transcription: u = a*b + c per element, r = ||w||/||u|| (1 where a norm is 0), w -= lr*r*u."""
    lr, rho, mu, nu = HYPERS["lr"], HYPERS["rho"], HYPERS["mu"], HYPERS["nu"]
    w = [p.detach().double().clone() for p in params]
    a, b, c = ([torch.zeros_like(x) for x in w] for _ in range(3))
    for step_grads in grads:
        for i, gi in enumerate(step_grads):
            g = gi.double()
            a[i], b[i], c[i] = rho * a[i] + g, mu * b[i] + g * g, nu * c[i] - g
            u = a[i] * b[i] + c[i]
            wn, un = float(w[i].norm()), float(u.norm())
            w[i] = w[i] - lr * (wn / un if wn > 0 and un > 0 else 1.0) * u
    return w, a, b, c


def test_scratch_buffer_beats_recomputation():
    p = plan(lower(three_state_spec()))
    assert p.scratch == ("scratch_0",)
    assert len(p.passes) == 2 and p.launches_per_step == 3
    stores = _stores(p)
    assert stores[0] == ["a", "b", "c", "scratch_0"] and stores[1] == ["param"]
    assert _loads(p) == [["param", "grad", "a", "b", "c"], ["param", "scratch_0"]]
    # without the scratch buffer pass 1 would load w, a_new, b_new, c_new: 20 + 12 + (4*4 + 4) = 52 B
    assert p.bytes_per_param == 48 < 52
    # the stored value is the combination u, and pass 1 reads nothing else of the states
    (note,) = [n for n in p.notes if n.startswith("scratch_0 = ")]
    assert note.startswith("scratch_0 = a_new*b_new + c_new is stored by pass 0 for pass 1"), note
    assert p.passes[1].consumes == (0, 1)


def test_scratch_spec_backends_agree_and_match_float64():
    cls = optgen.build(three_state_spec())
    shapes = [(), (3, 1, 4), (7,), (257,), (7,)]
    steps = 6
    grads = make_grads(shapes, steps, scale=0.5)
    results = {}
    for backend in BACKENDS:
        params = make_params(shapes, zero=(4,))
        opt = cls(params, backend=backend, **HYPERS)
        run_steps(opt, params, grads)
        results[backend] = (params, opt)
        assert set(opt.state[params[0]]) == {"a", "b", "c", "step"}  # scratch is not optimizer state
    expected_w, expected_a, expected_b, expected_c = three_state_reference(make_params(shapes, zero=(4,)), grads)
    for backend, (params, opt) in results.items():
        assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what=f"{backend} w")
        for name, expected in zip("abc", (expected_a, expected_b, expected_c)):
            assert_close_rel([opt.state[p][name] for p in params], expected, tol=TOL_F64_REFERENCE,
                             what=f"{backend} {name}")
    assert_close_rel(results["triton"][0], results["torch"][0], torch.float32, what="triton vs torch")


# --------------------------------------------------------------------------------------------------
# Reductions that read reductions, and max reductions
# --------------------------------------------------------------------------------------------------

SMALL_SHAPES = [(3,), (300,), (), (257,), (7,)]


def _run_both(cls, grads, **kwargs):
    out = {}
    for backend in BACKENDS:
        params = make_params(SMALL_SHAPES, zero=(4,))
        run_steps(cls(params, backend=backend, **kwargs), params, grads)
        out[backend] = params
    return out


def test_reduction_over_a_value_that_reads_a_reduction():
    """norm(g*||g|| + w): element-wise in its argument, so accepted; it needs a pass after ||g||."""
    spec = optgen.Spec("Nested")
    lr = spec.hyper(lr=0.1)
    w, g = spec.param, spec.grad
    u = g * optgen.norm(g) + w
    spec.update(w, w - lr * g / (1 + optgen.norm(u)))
    p = plan(lower(spec))
    assert (len(p.passes), p.launches_per_step, p.bytes_per_param) == (3, 5, 24)
    assert [s.stage for s in p.slots] == [0, 1] and str(p.slots[0].arg) == "g**2"
    assert [ps.consumes for ps in p.passes] == [(), (0,), (1,)]

    grads = make_grads(SMALL_SHAPES, 3)
    results = _run_both(optgen.build(spec), grads, lr=0.1)
    expected = [x.detach().double() for x in make_params(SMALL_SHAPES, zero=(4,))]
    for step_grads in grads:
        for i, gi in enumerate(step_grads):
            gd = gi.double()
            expected[i] = expected[i] - 0.1 * gd / (1 + (gd * gd.norm() + expected[i]).norm())
    for backend, params in results.items():
        assert_close_rel(params, expected, tol=TOL_F64_REFERENCE, what=backend)


def test_max_reductions_with_negative_values():
    """layer_max, global_max and maxabs; all gradients negative, so a 0 (not -inf) in masked lanes, in the
    segment-reduce or in an empty tail would show."""
    spec = optgen.Spec("Maxes")
    lr = spec.hyper(lr=0.1)
    w, g = spec.param, spec.grad
    spec.update(w, w - lr * (g - optgen.layer_max(g)) / (1 + optgen.global_max(g) - optgen.maxabs(w)))
    p = plan(lower(spec))
    assert sorted((s.scope, s.op) for s in p.slots) == [("global", "max"), ("layer", "max"), ("layer", "max")]
    assert (len(p.passes), p.launches_per_step) == (2, 3)

    grads = [[-g.abs() - 0.5 for g in step] for step in make_grads(SMALL_SHAPES, 3)]
    results = _run_both(optgen.build(spec), grads, lr=0.1)
    expected = [x.detach().double() for x in make_params(SMALL_SHAPES, zero=(4,))]
    for step_grads in grads:
        global_max = max(float(x.max()) for x in step_grads)
        for i, gi in enumerate(step_grads):
            gd = gi.double()
            expected[i] = expected[i] - 0.1 * (gd - gd.max()) / (1 + global_max - expected[i].abs().max())
    for backend, params in results.items():
        assert_close_rel(params, expected, tol=TOL_F64_REFERENCE, what=backend)


def test_runtime_flags_are_per_group_switches():
    """``lower(runtime=)``: a flag groups disagree on becomes a boolean hyperparameter; the plan keeps every state
    either value needs, and the passes of the fixed variants."""
    spec = BUILTINS["adam"]()
    ir = lower(spec, runtime=("amsgrad",))
    assert dict(ir.flags) == {"decoupled_weight_decay": False}
    (decl,) = [h for h in ir.hypers if h.name == "amsgrad"]
    assert decl.is_bool and decl.key == "amsgrad" and decl.default is False
    assert "max_exp_avg_sq" in ir.state_names
    assert plan(ir).bytes_per_param == 36 and len(plan(ir).passes) == 1
    lamb = BUILTINS["lamb"]()
    fixed, mixed = plan(lower(lamb)), plan(lower(lamb, runtime=("bias_correction", "eps_inside_sqrt")))
    assert len(mixed.passes) == len(fixed.passes) and mixed.bytes_per_param == fixed.bytes_per_param
    with pytest.raises(optgen.SpecError, match="has no flag 'amsgrad'"):
        lower(lamb, runtime=("amsgrad",))


def test_states_a_variant_neither_changes_nor_reads_are_dropped():
    """AMSGrad's maximum without amsgrad: no memory and no traffic (torch.optim keeps no such state). A state
    left unchanged but read stays (its initial value is used)."""
    assert "max_exp_avg_sq" not in lower(BUILTINS["adamw"]()).state_names
    assert "max_exp_avg_sq" in lower(BUILTINS["adamw"](), {"amsgrad": True}).state_names
    spec = optgen.Spec("Frozen")
    lr = spec.hyper(lr=0.1)
    on = spec.flag(on=False)
    scale, unused = spec.state("scale", init=2.0), spec.state("unused")
    spec.update(scale, optgen.where(on, scale * 0.5, scale))
    spec.update(unused, optgen.where(on, unused + spec.grad, unused))
    spec.update(spec.param, spec.param - lr * scale * spec.grad)
    assert lower(spec).state_names == ("scale",)
    assert lower(spec, {"on": True}).state_names == ("scale", "unused")


@pytest.mark.parametrize(
    "name,flags,state_bytes",
    [("sgd", {}, 4), ("adam", {}, 8), ("adamw", {"amsgrad": True}, 12), ("lamb", {}, 8), ("lion", {}, 4),
     ("novograd", {}, 4)],  # its second moment is one number per layer
)  # fmt: skip
def test_state_bytes_per_param(name, flags, state_bytes):
    """Optimizer memory per fp32 parameter (what the 8-bit and factored states will shrink), in the plan and
    in its description."""
    p = plan(lower(BUILTINS[name](), flags))
    assert p.state_bytes_per_param == state_bytes
    assert f"-> {state_bytes} B/param (fp32)" in p.describe().splitlines()[1]
    master = plan(optgen.transforms.master_weights(lower(BUILTINS[name](), flags)))
    assert master.state_bytes_per_param == state_bytes + 4


def test_state_bytes_count_scratch_buffers():
    """A value stored by one pass for a later one lives per parameter between steps too: it is memory."""
    spec = optgen.Spec("Scratchy")
    lr = spec.hyper(lr=0.1)
    a, b, c = spec.state("a"), spec.state("b"), spec.state("c")
    g = spec.grad
    a1, b1, c1 = (spec.update(s, 0.9 * s + g * k) for s, k in ((a, 1), (b, g), (c, 2)))
    u = a1 / (optgen.sqrt(b1) + 1e-8) + c1
    v = u / optgen.norm(u)
    spec.update(spec.param, spec.param - lr * v / optgen.norm(v))
    p = plan(lower(spec))
    assert p.scratch, p.describe()
    assert p.state_bytes_per_param == 4 * (3 + len(p.scratch))
    assert f"{p.scratch[0]}" in p.describe().splitlines()[1]
