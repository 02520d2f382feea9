"""Global values (GlobalSum/GlobalMax slots: NVLAMB's global gradient norm, ``max_grad_norm`` clipping) are folded
once per step on the Triton backend: the producing pass's reduce launch has one more program that folds the
chunk partial table into a small fp64 vector, and the consuming passes read that vector with one load per
value. They used to re-sum the producer's whole ``[chunks, slots]`` table in every program (O(chunks^2) reads)."""

import pytest
import torch
from conftest import assert_close_rel, clone_params, make_grads, make_params, run_steps

import optgen

GLOBAL_MAX_SPEC = optgen.Spec("GlobalMaxFold")
_lr = GLOBAL_MAX_SPEC.hyper(lr=0.1)
GLOBAL_MAX_SPEC.update(
    GLOBAL_MAX_SPEC.param,
    GLOBAL_MAX_SPEC.param - _lr * GLOBAL_MAX_SPEC.grad / (1 + optgen.global_max(GLOBAL_MAX_SPEC.grad)),
)
GlobalMaxFold = optgen.build(GLOBAL_MAX_SPEC)

CASES = {
    "NVLAMB": lambda ps, **kw: optgen.NVLAMB(ps, lr=1e-2, **kw),
    "AdamW_max_grad_norm": lambda ps, **kw: optgen.AdamW(ps, lr=1e-2, max_grad_norm=0.5, **kw),
    "global_max": lambda ps, **kw: GlobalMaxFold(ps, lr=0.1, **kw),
}


class _Recorder:
    """Stands in for a generated kernel: records (grid, args) of every launch and forwards it."""

    def __init__(self, kernel, log, role, index):
        self.kernel, self.log, self.role, self.index = kernel, log, role, index
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.role, self.index, grid, args))
            return self.kernel[grid](*args, **kwargs)

        return launch


class _RecordingModule:
    def __init__(self, module, log):
        self.PASSES = tuple(_Recorder(k, log, "pass", i) for i, k in enumerate(module.PASSES))
        self.REDUCES = tuple(k and _Recorder(k, log, "reduce", i) for i, k in enumerate(module.REDUCES))
        self.AXES = module.AXES  # (none in these plans: no per-row/column reductions)


def _global_producers(plan):
    return [p.index for p in plan.passes if p.fold_after]


@pytest.mark.parametrize("name", list(CASES))
def test_consumers_take_the_folded_vector_not_the_partial_table(name):
    """The kernel signatures: a consumer of a global value takes ``_global_<k>`` (no ``_rows_<k>``, no partial
    table of a producer read only globally); the reduce kernel of a producing pass takes ``_global``."""
    params = make_params([(300,), (7,)], zero=())
    opt = CASES[name](params, backend="triton")
    run_steps(opt, params, make_grads([(300,), (7,)], 1))
    backend = opt._backends["triton"]
    module, plan = backend.module, opt.plan
    producers = _global_producers(plan)
    assert producers
    for p, kernel, reduce_kernel in zip(plan.passes, module.PASSES, module.REDUCES):
        args = kernel.arg_names
        assert not any(a.startswith("_rows_") for a in args), args
        global_from = sorted({plan.slots[k].stage for k in p.consumes if plan.slots[k].scope == "global"})
        layer_from = sorted({plan.slots[k].stage for k in p.consumes if plan.slots[k].scope == "layer"})
        assert [a for a in args if a.startswith("_global_")] == [f"_global_{k}" for k in global_from]
        assert [a for a in args if a.startswith("_table_")] == [f"_table_{k}" for k in layer_from]
        if p.fold_after:
            assert reduce_kernel.arg_names[-5:] == ["_n_segments", "_fold", "_fold_rows", "_global", "BLOCK"]
        elif reduce_kernel is not None:
            assert "_global" not in reduce_kernel.arg_names
    # the source of a consuming pass loads each global value once: no loop over rows of a table
    source = render_source(plan)
    for p in plan.passes:
        body = source.split(f"_pass_{p.index}(", 1)[1].split("@triton.jit", 1)[0]
        for k in p.consumes:
            if plan.slots[k].scope == "global":
                assert body.count(f"tl.load(_global_{plan.slots[k].stage} +") == 1
        assert "_rows" not in body


def render_source(plan):
    from optgen.codegen.render import render

    return render(plan, "triton")


@pytest.mark.parametrize("name", list(CASES))
def test_global_values_are_folded_once_per_step_independent_of_the_chunk_count(name, monkeypatch):
    """Every launch of a step, recorded: a consuming pass never receives a partial table, the fold is one
    program (grid n_tensors + 1 beside a segment-reduce, else 1), the same launches for 3 and for 300+ chunks,
    and the folded value is the fp64 sum (or max) over every element."""
    monkeypatch.setenv("OPTGEN_CHUNK", "64")
    monkeypatch.setenv("OPTGEN_BLOCK", "64")
    counts = []
    for sizes in ([(100,), (7,)], [(64 * 300 + 5,), (700,), (7,)]):
        params = make_params(sizes, zero=())
        grads = make_grads(sizes, 1)
        opt = CASES[name](params, backend="triton")
        run_steps(opt, params, [make_grads(sizes, 1, seed=9)[0]])  # builds the tables
        backend = opt._backends["triton"]
        log = []
        backend.module = _RecordingModule(backend.module, log)
        before = backend.launches
        run_steps(opt, params, grads)
        t, plan = backend._tables, opt.plan
        for role, index, _grid, args in log:
            if role == "pass":
                # its own partial table (written) only: none of an earlier pass's is read
                others = [id(x) for k, x in t.partials.items() if k != index]
                assert not any(id(a) in others for a in args if isinstance(a, torch.Tensor)), index
                p = plan.passes[index]
                for k in {plan.slots[k].stage for k in p.consumes if plan.slots[k].scope == "global"}:
                    assert any(a is t.globals[k] for a in args)
        folds = [(index, grid) for role, index, grid, args in log if role == "reduce" and plan.passes[index].fold_after]
        assert folds == [(k, ((t.n_tensors if plan.passes[k].reduce_after else 0) + 1,)) for k in _global_producers(plan)]
        assert len(log) == plan.launches_per_step == backend.launches - before
        counts.append(len(log))
        # the folded value: NVLAMB's and the clip's ||g||^2, or max(g), over all elements
        (k,) = _global_producers(plan)
        flat = torch.cat([g.double().flatten() for g in grads[0]])
        expected = flat.max() if name == "global_max" else (flat * flat).sum()
        column = [plan.slots[s].scope for s, _ in plan.passes[k].produces].index("global")
        assert t.n_chunks > 300 or sizes[0] == (100,)
        torch.testing.assert_close(t.globals[k][column], expected, rtol=1e-12, atol=0)
    assert counts[0] == counts[1]


def test_nvlamb_with_hundreds_of_chunks_matches_the_torch_backend(monkeypatch):
    """NVLAMB on the Triton interpreter with small chunks (several hundred, so the fold loops over more rows
    than its block, with a masked tail) against the torch backend."""
    monkeypatch.setenv("OPTGEN_CHUNK", "64")
    monkeypatch.setenv("OPTGEN_BLOCK", "64")
    shapes = [(64 * 300 + 37,), (40, 33), (7,), ()]
    grads = make_grads(shapes, 3)
    base = make_params(shapes, zero=(2,))
    results = {}
    for backend in ("torch", "triton"):
        params = clone_params(base)
        opt = optgen.NVLAMB(params, lr=1e-2, weight_decay=0.01, backend=backend)
        run_steps(opt, params, grads)
        results[backend] = (params, opt)
    tp, topt = results["triton"]
    assert topt._backends["triton"]._tables.n_chunks > 300
    assert topt._backends["triton"].config.chunk == 64
    assert_close_rel(tp, results["torch"][0], torch.float32, what="params")
    for p, q in zip(tp, results["torch"][0]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_rel(topt.state[p][key], results["torch"][1].state[q][key], torch.float32, what=key)


def test_a_nan_in_a_late_chunk_reaches_the_folded_global_max(monkeypatch):
    """A NaN beyond the fold's first block of rows makes the global max NaN (``_max_propagating_nan``)."""
    monkeypatch.setenv("OPTGEN_CHUNK", "64")
    monkeypatch.setenv("OPTGEN_BLOCK", "64")
    n = 64 * 300 + 5
    p, q = torch.nn.Parameter(torch.ones(n)), torch.nn.Parameter(torch.ones(7))
    p.grad, q.grad = -torch.ones(n), -torch.ones(7)
    p.grad[64 * 280 + 3] = float("nan")
    GlobalMaxFold([p, q], lr=0.1, backend="triton").step()
    assert torch.isnan(q).all() and torch.isnan(p).all()


def test_signature_of_types_the_new_arguments():
    """``optgen inspect`` types kernel signatures from the kernel ABI: the fold's arguments have types."""
    import triton.language as tl

    from optgen.inspect_kernels import plan_kernels, signature_of

    plan = optgen.NVLAMB([torch.nn.Parameter(torch.ones(3))]).plan
    base = {"BLOCK": 64, "CHUNK": 256, "ALIGNED": True, "N_HYPER": len(plan.ir.hypers)}
    types = {}
    for _, _, kernel, _, args in plan_kernels(plan):
        constexprs = {**base, **{a: tl.float32 for a in kernel.arg_names if a.startswith("DT_")}}
        types.update(signature_of(kernel, constexprs, args)[0])
    assert {k: types[k] for k in ("_global_0", "_n_segments", "_fold", "_fold_rows", "_global")} == {
        "_global_0": "*fp64", "_n_segments": "i64", "_fold": "*fp64", "_fold_rows": "i64", "_global": "*fp64"
    }
    assert "_table_1" in types and not any(k.startswith("_rows_") for k in types)
