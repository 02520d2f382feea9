"""Per-row and per-column reductions and states (factored moments): Adafactor, and the language around it.

``row_sum``/``col_sum`` reduce over the last/second-to-last dimension of a parameter of 2+ dimensions (a (B, R, C)
tensor gives B x R and B x C values); ``spec.state(per="row" | "column")`` keeps one number per row/column in
torch.optim.Adafactor's shapes; a shape flag (``spec.shape_flag``) picks a variant per parameter, so vectors keep
a full second moment. Checked against torch.optim.Adafactor and float64 transcriptions on every backend (the
torch passes, the C kernels and the Triton kernels, the latter in the interpreter), with the bad uses as
SpecErrors and bad input refused before anything changes.
"""

import math
import os

import pytest
import sympy
import torch
from conftest import (
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
from optgen.spec import col_mean, col_sum, layer_sum, row_mean, row_sum, sqrt, sumsq, where
from optgen.specs import BUILTINS

HERE = os.path.basename(__file__)
# matrices, a batch of matrices, a vector, a 0-d parameter, single rows and columns, a matrix of several chunks of
# whole rows, rows longer than a chunk (the C kernels split them), a 4-D tensor
SHAPES = [(7, 13), (3, 4, 6), (5,), (), (1, 9), (9, 1), (33, 17), (3, 700), (2, 3, 1, 5)]
STEPS = 20
ADAFACTOR_TOL = 2e-6  # fp32 against fp32 torch.optim.Adafactor after 20 steps (it computes its row means in fp32)


def _relative(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "maximize"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd"])
def test_adafactor_matches_torch(backend, maximize, weight_decay):
    params = make_params(SHAPES, zero=())
    reference = clone_params(params)
    grads = make_grads(SHAPES, STEPS)
    opt = optgen.Adafactor(params, lr=1e-2, weight_decay=weight_decay, maximize=maximize, backend=backend)
    ref = torch.optim.Adafactor(reference, lr=1e-2, weight_decay=weight_decay, maximize=maximize)
    run_steps(opt, params, grads)
    run_steps(ref, reference, grads)
    for i, (p, r) in enumerate(zip(params, reference)):
        assert _relative(p, r) <= ADAFACTOR_TOL, (SHAPES[i], _relative(p, r))
        mine, theirs = opt.state[p], ref.state[r]
        assert set(mine) == set(theirs), (SHAPES[i], set(mine), set(theirs))
        for key, value in theirs.items():
            assert mine[key].shape == value.shape, (SHAPES[i], key)
            assert _relative(mine[key], value) <= ADAFACTOR_TOL, (SHAPES[i], key, _relative(mine[key], value))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd"])
def test_came_matches_the_reference(backend, weight_decay):
    """came-pytorch's CAME (its state names and shapes: row/column states without the reduced dimension)."""
    came_pytorch = pytest.importorskip("came_pytorch")
    params = make_params(SHAPES, zero=())
    reference = clone_params(params)
    grads = make_grads(SHAPES, STEPS)
    opt = optgen.CAME(params, lr=1e-2, weight_decay=weight_decay, backend=backend)
    run_steps(opt, params, grads)
    ref = came_pytorch.CAME(reference, lr=1e-2, weight_decay=weight_decay)
    run_steps(ref, reference, grads)
    for i, (p, r) in enumerate(zip(params, reference)):
        assert _relative(p, r) <= ADAFACTOR_TOL, (SHAPES[i], _relative(p, r))
        mine, theirs = opt.state[p], ref.state[r]
        assert set(mine) == set(theirs) - {"RMS"}, (SHAPES[i], set(mine), set(theirs))  # (its RMS is never read)
        for key in set(theirs) - {"step", "RMS"}:
            assert mine[key].shape == theirs[key].shape, (SHAPES[i], key)
            assert _relative(mine[key], theirs[key]) <= ADAFACTOR_TOL, (SHAPES[i], key)


def test_came_plan_and_state_bytes():
    """Its first moment per element, its second moments and confidence factored: 4 B/param of state for a matrix
    (plus 4 (R + C) / (R C) for the factors), 32 B/param of traffic in four passes."""
    factored = plan(lower(BUILTINS["came"](), {"factored": True}))
    assert (factored.state_bytes_per_param, len(factored.passes), factored.bytes_per_param) == (4, 4, 32)
    assert [bool(p.reduce_items) for p in factored.passes] == [True, False, True, False]


def test_adafactor_constructor_and_checkpoints_cross_with_torch():
    opt = optgen.Adafactor([torch.nn.Parameter(torch.zeros(3, 2))])
    ref = torch.optim.Adafactor([torch.nn.Parameter(torch.zeros(3, 2))])
    mine = {k: v for k, v in opt.defaults.items() if k in ref.defaults}
    assert mine == {k: ref.defaults[k] for k in mine}
    assert opt.defaults["eps"] == (None, 1e-3) and opt.defaults["beta2_decay"] == -0.8
    with pytest.raises(ValueError):
        optgen.Adafactor([torch.nn.Parameter(torch.zeros(3))], beta2_decay=0.5)  # torch: beta2_decay <= 0
    # torch's state dict resumes in optgen and back
    shapes = [(6, 5), (4,)]
    params, grads = make_params(shapes, zero=()), make_grads(shapes, 6)
    reference = clone_params(params)
    ref = torch.optim.Adafactor(reference, lr=0.05)
    run_steps(ref, reference, grads[:3])
    resumed = clone_params(reference)
    opt = optgen.Adafactor(resumed, lr=0.05, backend="torch")
    opt.load_state_dict(ref.state_dict())
    run_steps(ref, reference, grads[3:])
    run_steps(opt, resumed, grads[3:])
    assert all(_relative(p, r) <= ADAFACTOR_TOL for p, r in zip(resumed, reference))
    back = torch.optim.Adafactor(clone_params(resumed), lr=0.05)
    back.load_state_dict(opt.state_dict())
    assert set(back.state[back.param_groups[0]["params"][0]]) == {"step", "row_var", "col_var"}


def test_adafactor_plans_and_state_bytes():
    spec = BUILTINS["adafactor"]()
    factored = plan(lower(spec, {"factored": True}))
    vector = plan(lower(spec, {"factored": False}))
    assert factored.ir.state_names == ("row_var", "col_var") and vector.ir.state_names == ("variance",)
    assert factored.state_bytes_per_param == 0  # 4 (R + C) / (R C): nothing per element
    assert vector.state_bytes_per_param == 4
    text = factored.describe()
    assert "row_var per row; col_var per column" in text and "reduce step after pass 0: row_var = " in text
    # pass 0: ||w||, row and column sums of g^2; then the moments and their mean; pass 1: ||U||; pass 2: the update
    assert (len(factored.passes), factored.bytes_per_param, factored.launches_per_step) == (3, 24, 6)
    assert factored.passes[0].reduce_items and not factored.passes[1].reduce_items


def test_layer_adaptive_adafactor_is_adafactor_with_a_trust_ratio():
    """Against a transcription on torch.optim.Adafactor: each step its update delta (from a shadow copy), scaled
    by ||w|| / ||delta / lr||; layer_adaptation=False is Adafactor itself."""
    shapes = [(6, 5), (2, 3, 4), (7,)]
    params, grads = make_params(shapes, zero=()), make_grads(shapes, 8)
    plain = clone_params(params)
    shadow = clone_params(params)
    expected = [p.detach().clone() for p in params]
    lr = 0.02
    torch_adafactor = torch.optim.Adafactor(shadow, lr=lr)
    for step in grads:
        for s, w, g in zip(shadow, expected, step):
            s.data.copy_(w)
            s.grad = g.clone()
        torch_adafactor.step()
        for s, w in zip(shadow, expected):
            delta = w - s.detach()
            num, den = float(w.norm()), float((delta / lr).norm())
            ratio = num / den if num > 0 and den > 0 else 1.0
            w.sub_(ratio * delta)
    opt = optgen.LayerAdaptiveAdafactor(params, lr=lr, backend="torch")
    run_steps(opt, params, grads)
    assert all(_relative(p, e) <= 1e-5 for p, e in zip(params, expected))
    off = optgen.LayerAdaptiveAdafactor(plain, lr=lr, layer_adaptation=False, backend="torch")
    reference = clone_params(plain)
    run_steps(off, plain, grads)
    run_steps(torch.optim.Adafactor(reference, lr=lr), reference, grads)
    assert all(_relative(p, r) <= ADAFACTOR_TOL for p, r in zip(plain, reference))


# -- the language, against float64 transcriptions -------------------------------------------------------------


def row_col_spec() -> Spec:
    """Every kind of per-row/column value: row and column means of g^2 kept as states, a column sum of a row
    state (one value per matrix), a row sum of a column state, and element-wise code reading all of them."""
    spec = Spec("RowColSGD")
    lr, beta = spec.hyper(lr=0.1, beta=0.5)
    w, g = spec.param, spec.grad
    r = spec.state("r", per="row", init=1.0)
    c = spec.state("c", per="column", init=2.0)
    r1 = spec.update(r, beta * r + (1 - beta) * row_mean(g**2))
    c1 = spec.update(c, beta * c + (1 - beta) * col_mean(g**2))
    estimate = r1 * c1 / col_mean(r1) + row_sum(c1) / row_sum(1)  # per matrix: the mean of the rows, of the columns
    step = g / sqrt(estimate) + row_sum(g * w) / col_sum(w**2 + 1)
    spec.update(w, w - lr * step / sqrt(layer_sum(step**2) / layer_sum(1) + 1))
    return spec


def row_col_reference(params, grads, lr, beta):
    w = [p.detach().double().clone() for p in params]
    r = [torch.ones(p.shape[:-1] + (1,), dtype=torch.float64) for p in params]
    c = [torch.full(p.shape[:-2] + (1, p.shape[-1]), 2.0, dtype=torch.float64) for p in params]
    for step in grads:
        for i, g in enumerate(step):
            g = g.double()
            r[i] = beta * r[i] + (1 - beta) * (g**2).mean(-1, keepdim=True)
            c[i] = beta * c[i] + (1 - beta) * (g**2).mean(-2, keepdim=True)
            estimate = r[i] * c[i] / r[i].mean(-2, keepdim=True) + c[i].mean(-1, keepdim=True)
            u = g / estimate.sqrt() + (g * w[i]).sum(-1, keepdim=True) / (w[i] ** 2 + 1).sum(-2, keepdim=True)
            w[i] = w[i] - lr * u / math.sqrt(float((u**2).mean()) + 1)
    return w, r, c


def test_row_and_column_values(backend):
    shapes = [(7, 13), (3, 4, 6), (1, 9), (9, 1), (33, 17)]
    params, grads = make_params(shapes, zero=()), make_grads(shapes, 10)
    expected_w, expected_r, expected_c = row_col_reference(params, grads, 0.1, 0.5)
    opt = optgen.build(row_col_spec())(params, lr=0.1, beta=0.5, backend=backend)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected_w, tol=TOL_F64_REFERENCE, what="w")
    assert_close_rel([opt.state[p]["r"] for p in params], expected_r, tol=TOL_F64_REFERENCE, what="r")
    assert_close_rel([opt.state[p]["c"] for p in params], expected_c, tol=TOL_F64_REFERENCE, what="c")


@pytest.mark.parametrize("kernels", ["c", "triton"])
def test_kernels_launch_the_plan_whatever_the_tensor_count(kernels):
    """One launch per pass for all matrices, one segment-reduce and one row/column step where the plan has them
    (Triton's tiles are a block wide at most: the 40-matrix set has rows split over several tiles)."""
    expected = plan(lower(BUILTINS["adafactor"](), {"factored": True})).launches_per_step
    assert expected == 3 + 2 + 1
    for count in (1, 40):
        shapes = [(3 + i % 5, 2 + i % 7 + 60 * (i % 3)) for i in range(count)]
        params = make_params(shapes, zero=())
        opt = optgen.Adafactor(params, backend=kernels)
        run_steps(opt, params, make_grads(shapes, 2))
        (backend,) = [b for key, b in opt._runner.backends.items() if key[0] == kernels]
        before = backend.launches
        run_steps(opt, params, make_grads(shapes, 1, seed=5))
        assert backend.launches - before == expected, (count, backend.launches - before)


@pytest.mark.parametrize("name", ["adafactor", "came"])
def test_c_element_loops_are_vectorised(name):
    """gcc's vectorisation report: every element loop, fp32, bf16 storage and fp64 math (the row loops of the
    factored passes included)."""
    from optgen.codegen.render import source_path
    from optgen.runtime import cbuild
    from optgen.runtime.c_backend import STORAGE_CODES

    spec = BUILTINS[name]()
    for flags in ({"factored": True}, {"factored": False}):
        source = source_path(plan(lower(spec, flags)), "c")
        for defines in ({}, {"OG_DT_param": STORAGE_CODES[torch.bfloat16]}, {"OG_DT_param": 1, "OG_REAL_F64": 1}):
            try:
                loops = cbuild.vectorization(source, defines)
            except cbuild.BuildError:
                pytest.skip("no vectorisation report from this compiler")
            assert loops and all(loops.values()), (flags, defines, loops)


# -- bad specs and bad input ------------------------------------------------------------------------------------


def _raises(make, *fragments):
    assert_spec_error(make, *fragments, written_in=HERE)


def _base():
    spec = Spec("Bad")
    return spec, spec.hyper(lr=0.1)


def test_row_state_from_an_element_wise_value():
    def make():
        spec, lr = _base()
        r = spec.state("r", per="row")
        spec.update(r, r + spec.grad**2)
        spec.update(spec.param, spec.param - lr * spec.grad * r)
        return spec

    _raises(make, "per-row state", "one number per row", "g")


def test_row_state_from_a_column_value():
    def make():
        spec, lr = _base()
        r = spec.state("r", per="row")
        spec.update(r, col_mean(spec.grad**2))
        spec.update(spec.param, spec.param - lr * spec.grad * r)
        return spec

    _raises(make, "per-row state", "per-col values")


def test_row_sum_of_a_row_value_and_layer_sum_of_one():
    def row_of_row():
        spec, lr = _base()
        spec.update(spec.param, spec.param - lr * spec.grad * row_sum(row_sum(spec.grad)))
        return spec

    def layer_of_row():
        spec, lr = _base()
        spec.update(spec.param, spec.param - lr * spec.grad * sumsq(row_sum(spec.grad)))
        return spec

    _raises(row_of_row, "RowSum", "reduces a per-row value")
    _raises(layer_of_row, "reduces a per-row value over a whole parameter")


def test_a_state_absent_from_a_variant_is_not_read():
    def make():
        spec, lr = _base()
        factored = spec.shape_flag("factored", min_ndim=2)
        r = spec.state("r", per="row", when=factored)
        r1 = spec.update(r, row_mean(spec.grad**2))
        spec.update(spec.param, spec.param - lr * spec.grad / sqrt(r1 + 1))  # not under where(factored, ...)
        return spec

    _raises(make, "exists only where its shape flag holds", "factored=False")


def test_old_value_read_after_its_reduce_step():
    def make():
        spec, lr = _base()
        r = spec.state("r", per="row")
        spec.update(r, row_mean(spec.grad**2))
        # the old r, in the pass after ||g|| (pass 1): the reduce step after pass 0 has replaced it
        spec.update(spec.param, spec.param - lr * spec.grad * r / sqrt(sumsq(spec.grad)))
        return spec

    with pytest.raises(SpecError, match="reads the old value of r"):
        plan(lower(make()))


def test_bad_state_granularity_and_when():
    spec = Spec("Bad")
    with pytest.raises(SpecError, match=r"per='matrix'.*expected one of"):
        spec.state("v", per="matrix")
    with pytest.raises(SpecError, match="must be a shape flag"):
        spec.state("v", when=spec.flag(on=True))
    with pytest.raises(SpecError, match="min_ndim must be a positive integer"):
        spec.shape_flag("big", min_ndim=0)


def test_factored_update_on_a_vector_is_refused_before_anything_changes(backend):
    params = make_params([(4, 3), (5,)], zero=())
    before = [p.detach().clone() for p in params]
    opt = optgen.build(row_col_spec())(params, backend="torch")
    for p, g in zip(params, make_grads([(4, 3), (5,)], 1)[0]):
        p.grad = g
    with pytest.raises(RuntimeError, match=r"shape \(5,\) has fewer than 2 dimensions"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before)) and not opt.state


def test_state_of_a_changed_shape_is_refused_before_anything_changes():
    param = torch.nn.Parameter(torch.randn(6, 5))
    opt = optgen.Adafactor([param], backend="torch")
    param.grad = torch.randn(6, 5)
    opt.step()
    col_var = opt.state[param]["col_var"].clone()
    opt.state[param]["row_var"] = torch.zeros(5, 1)  # another parameter's
    param.grad = torch.randn(6, 5)
    weights = param.detach().clone()
    with pytest.raises(RuntimeError, match=r"'row_var' has shape \(5, 1\).*one number per row, shape \(6, 1\)"):
        opt.step()
    assert torch.equal(param.detach(), weights) and torch.equal(opt.state[param]["col_var"], col_var)


def test_a_global_norm_across_variants_is_refused():
    """Shape flags split the parameters into variants, each its own launches: a global norm would see part of them."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = optgen.Adafactor(params, max_grad_norm=1.0, backend="torch")
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="run 2 variants of the update \\(its shape flags: factored\\)"):
        opt.step()


def test_where_on_a_shape_flag_picks_per_parameter():
    spec = Spec("ShapeSwitch")
    lr = spec.hyper(lr=1.0)
    big = spec.shape_flag("big", min_ndim=2)
    spec.update(spec.param, spec.param - lr * where(big, 2 * spec.grad, spec.grad))
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))]
    opt = optgen.build(spec)(params, backend="torch")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(params[0].detach(), torch.full((2, 2), -2.0)) and torch.equal(params[1].detach(), torch.full((3,), -1.0))
    assert "big" not in opt.defaults  # decided by each parameter's shape, not a constructor keyword
    assert sympy.Symbol  # (sympy imported for specs above)


# -- found by review: each failed before its fix -------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-12])
def test_came_stays_finite_on_zero_and_tiny_gradients(backend, scale):
    """sympy had squared g/(sqrt(r/m) sqrt(c)) into g^2 m/(r c), whose r c underflows in fp32: 0/0."""
    came_pytorch = pytest.importorskip("came_pytorch")
    params = make_params([(4, 3), (5,)], zero=())
    reference = clone_params(params)
    grads = [[g * scale for g in step] for step in make_grads([(4, 3), (5,)], 2)]
    opt = optgen.CAME(params, lr=1e-2, backend=backend)
    run_steps(opt, params, grads)
    run_steps(came_pytorch.CAME(reference, lr=1e-2), reference, grads)
    assert all(bool(torch.isfinite(p).all()) and _relative(p, r) <= ADAFACTOR_TOL for p, r in zip(params, reference))


def test_per_row_values_read_per_layer_states_and_matrix_means(backend):
    """A column state reading a per-layer state, a row state normalised by its own mean over the rows (a per-matrix
    value, not per-column: it used to be refused), a matrix sum of a row value times a per-layer state."""
    spec = Spec("Mixed")
    lr = spec.hyper(lr=0.1)
    g, w = spec.grad, spec.param
    n = spec.state("n", per="layer", init=1.0)
    n1 = spec.update(n, 0.5 * n + sumsq(g) / layer_sum(1))
    r, c = spec.state("r", per="row", init=1.0), spec.state("c", per="column", init=1.0)
    r1 = spec.update(r, 0.5 * r + row_mean(g**2))
    c1 = spec.update(c, 0.5 * c + col_mean(g**2) + n)
    q = spec.state("q", per="row")
    spec.update(q, r1 / col_mean(r1))
    spec.update(w, w - lr * g * c1 * r1 / col_mean(r1 * n1))
    shapes = [(5, 4), (2, 3, 7), (3, 700)]
    params, grads = make_params(shapes, zero=()), make_grads(shapes, 4)
    expected = [p.detach().double().clone() for p in params]
    state = [dict(n=1.0, r=torch.ones(p.shape[:-1] + (1,), dtype=torch.float64),
                  c=torch.ones(p.shape[:-2] + (1, p.shape[-1]), dtype=torch.float64)) for p in params]  # fmt: skip
    for step in grads:
        for i, grad in enumerate(step):
            grad, s = grad.double(), state[i]
            n_new = 0.5 * s["n"] + float((grad**2).mean())
            s["r"] = 0.5 * s["r"] + (grad**2).mean(-1, keepdim=True)
            s["c"] = 0.5 * s["c"] + (grad**2).mean(-2, keepdim=True) + s["n"]
            s["q"] = s["r"] / s["r"].mean(-2, keepdim=True)
            s["n"] = n_new
            expected[i] = expected[i] - 0.1 * grad * s["c"] * s["r"] / (s["r"] * n_new).mean(-2, keepdim=True)
    opt = optgen.build(spec)(params, backend=backend)
    run_steps(opt, params, grads)
    assert_close_rel(params, expected, tol=TOL_F64_REFERENCE, what="w")
    assert_close_rel([opt.state[p]["q"] for p in params], [s["q"] for s in state], tol=TOL_F64_REFERENCE, what="q")


def test_planner_errors_name_the_line():
    def make():
        spec, lr = _base()
        r, q = spec.state("r", per="row"), spec.state("q", per="row")
        spec.update(r, 0.5 * q + row_mean(spec.grad**2))  # each reads the other's old value: written in place
        spec.update(q, 0.5 * r + row_mean(spec.grad**2))
        spec.update(spec.param, spec.param - lr * spec.grad)
        return spec

    _raises(make, "read each other's old values")


def test_complex_matrices_and_a_changed_variant_are_refused_before_anything_changes():
    param = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    param.grad = torch.randn_like(param)
    opt = optgen.Adafactor([param], backend="torch")
    with pytest.raises(RuntimeError, match="complex parameters of 2\\+ dimensions"):
        opt.step()
    assert not opt.state
    real = torch.nn.Parameter(torch.randn(6, 5))
    opt = optgen.Adafactor([real], backend="torch")
    real.grad = torch.randn(6, 5)
    opt.step()
    real.data = torch.randn(30)
    real.grad = torch.randn(30)
    with pytest.raises(RuntimeError, match="runs the variant factored=False, but its state holds 'row_var'"):
        opt.step()
    with pytest.raises(ValueError, match="d"):
        optgen.Adafactor([real], d=0.5)  # torch: d >= 1


@pytest.mark.parametrize("name", ["adafactor", "came"])
def test_c_blocked_schedule_is_bitwise_the_plain_one(name, monkeypatch):
    """Per-row/column sums are within a tensor: the passes and reduce steps run block by block of tensors (cache
    reuse between passes), folding the same partials in the same order as one block: bitwise equal."""
    shapes = [(7, 13), (3, 700), (33, 17), (2, 3, 6)] * 3
    grads = make_grads(shapes, 4)
    runs = []
    for block_bytes in ("1e15", "3000"):
        monkeypatch.setenv("OPTGEN_C_BLOCK_BYTES", block_bytes)
        params = make_params(shapes, zero=())
        opt = getattr(optgen, BUILTINS[name]().name)(params, lr=1e-2, backend="c")
        run_steps(opt, params, grads)
        (c,) = [b for key, b in opt._runner.backends.items() if key[0] == "c"]
        runs.append((params, opt, c._blocks(c._tables), c.fast_steps))
    (plain, plain_opt, none, _), (blocked, opt, blocks, fast) = runs
    assert none is None and len(blocks) > 3 and fast == 3
    for p, q in zip(blocked, plain):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, plain_opt.state[q][key]), key


def test_sums_over_split_rows_must_not_feed_their_own_reduce_step():
    """Under FSDP2 a 2-D weight's rows are split over the ranks: a sum over its rows is partial until an
    all-reduce. Made by an early item (one that reads nothing partial), it rides the pass boundary's all-reduce
    and later items may read it; made by a late item, it is all-reduced after the step's items, and no later
    item of that step may read it (refused)."""
    from optgen.runtime.steps import late_matrix_reads

    for name in ("adafactor", "came", "layer_adaptive_adafactor"):
        assert late_matrix_reads(plan(lower(BUILTINS[name](), {"factored": True}))) is None, name
    # a row state over its mean over the rows, in the same step: the mean is made early (it rides the pass
    # boundary's all-reduce), the state reading it is late
    spec = Spec("RowOfMean")
    w, g = spec.param, spec.grad
    r = spec.state("r", per="row", init=1.0)
    s = spec.state("s", per="row", init=1.0)
    r1 = spec.update(r, 0.5 * r + 0.5 * row_mean(g**2))
    s1 = spec.update(s, r1 / col_mean(r1))
    spec.update(w, w - 0.1 * g / sqrt(s1 + 1))
    factored = plan(lower(spec, {}))
    assert late_matrix_reads(factored) is None
    (step,) = [p for p in factored.passes if p.reduce_items]
    assert [key for _, key, _ in step.reduce_items][: step.early_items][0] == "r" and step.early_items == 2
    # ... but a row state that reads a per-layer value of the same pass is late, and so its mean over the rows
    spec = Spec("RowOfLayer")
    w, g = spec.param, spec.grad
    r = spec.state("r", per="row", init=1.0)
    s = spec.state("s", per="row", init=1.0)
    r1 = spec.update(r, 0.5 * r + 0.5 * row_mean(g**2) / layer_sum(g**2))
    s1 = spec.update(s, r1 / col_mean(r1))
    spec.update(w, w - 0.1 * g / sqrt(s1 + 1))
    assert late_matrix_reads(plan(lower(spec, {}))) is not None
    assert late_matrix_reads(plan(lower(row_col_spec(), {}))) is None


@pytest.mark.parametrize(("kernels", "other", "state_dtype"),
                         [("c", torch.bfloat16, None), ("triton", torch.bfloat16, None), ("c", torch.float64, None),
                          ("c", torch.float64, torch.float64)])  # fmt: skip
def test_matrices_of_several_storage_dtypes(kernels, other, state_dtype):
    """A factored plan's reduce step compiles its per-row/column states' dtypes in and runs over every tensor:
    fp32 and bf16 matrices (their states both fp32) share it, each partition's passes compiled for its own
    buffers; fp32 and fp64 matrices (fp64 states, or fp64 math beside fp32 with fp64 states for both; C: Triton
    takes no fp64) go to the eager torch passes (no kernel runs). Both as backend='torch' computes them (the bf16 matrix within two bf16 steps after three steps:
    Triton's interpreter rounds an element one step off now and then, this matrix alone as much)."""
    shapes = [(6, 5), (4, 3)]
    runs = {}
    for backend in (kernels, "torch"):
        params = make_params(shapes, zero=())
        params[1].data = params[1].data.to(other)
        grads = make_grads(shapes, 3)
        for step in grads:
            step[1] = step[1].to(other)
        opt = optgen.Adafactor(params, lr=1e-2, backend=backend, state_dtype=state_dtype)
        run_steps(opt, params, grads)
        runs[backend] = (params, opt)
    (params, opt), (expected, _) = runs[kernels], runs["torch"]
    (backend,) = [b for key, b in opt._runner.backends.items() if key[0] == kernels]
    if other == torch.float64:
        assert backend.launches == 0
        for p, e in zip(params, expected):
            assert torch.equal(p, e)
    else:
        assert backend.launches > 0 and getattr(backend, "_eager_backend", None) is None
        assert_close_rel(params[0], expected[0])
        assert_close_rel(params[1], expected[1], tol=2**-6)
