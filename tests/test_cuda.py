"""GPU-only checks (skipped on CPU machines): the Triton kernels on CUDA tensors against the eager torch backend
(the oracle) on the same device -- every built-in and flag variant in fp32 and bf16 on odd sizes, groups that
disagree on their flags (the per-group variants), master weights, 1000 tensors, the factored optimizers on 2-D,
3-D and odd shapes with rows wider than a block --, a LAMB step captured in a CUDA graph and replayed while a
scheduler changes its lr tensor, and GradScaler's skipped step. ``bench/gpu_suite.sh`` runs this file on a lent
GPU (``TRITON_INTERPRET=0``; conftest's small chunks, 256 elements, so that small tensors span several).

``OPTGEN_TEST_CUDA_ON_CPU=1`` runs the checks that need no CUDA graph or GradScaler on CPU tensors in the Triton
interpreter (slow): to try a change of this file on a machine without a GPU."""

import os

import pytest
import torch
from conftest import TOL, assert_bitwise, assert_close_rel

import optgen
from optgen import quantization
from optgen.catalog import variants
from optgen.specs import BUILTINS

ON_CPU = os.environ.get("OPTGEN_TEST_CUDA_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
if not ON_CPU:
    pytestmark = [
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter cannot run CUDA tensors"),
    ]
needs_cuda = pytest.mark.skipif(ON_CPU, reason="CUDA only (OPTGEN_TEST_CUDA_ON_CPU)")

SHAPES = [(1,), (7,), (65535,), (65536,), (65537,), (3 * 65536 + 5,), (), (0,), (129, 257)]
if ON_CPU:  # the interpreter: sizes around conftest's 256-element chunk
    SHAPES = [(1,), (7,), (255,), (257,), (3 * 256 + 5,), (), (0,), (13, 29), (4100,)]  # 4100: 8-bit states
# factored updates: matrices, a batch of matrices, a vector and a 0-d parameter (the unfactored variant), single
# rows and columns, rows wider than conftest's 64-element block, a 4-D tensor
FACTORED_SHAPES = [(7, 13), (3, 4, 6), (5,), (), (1, 9), (9, 1), (33, 17), (3, 700), (2, 3, 1, 5)]
# rows wider than the default 1024-element block, run with the default chunk and block
WIDE_SHAPES = [(5, 3000), (2, 3, 2500), (1, 4097), (1100, 3), (17,)]
FACTORED = {"Adafactor", "CAME", "LayerAdaptiveAdafactor"}
NAMES = [BUILTINS[key]().name for key in BUILTINS]
# (class name, flags): every built-in with every combination of its flags (shape flags follow the shapes)
VARIANTS = [
    (name, {k: v for k, v in flags.items() if k not in {f.name for f in BUILTINS[key]().shape_flags}})
    for key, name in zip(BUILTINS, NAMES)
    for flags in variants(BUILTINS[key]())
]
VARIANTS = [v for i, v in enumerate(VARIANTS) if v not in VARIANTS[:i]]  # a shape flag alone adds none
STEPS = 3 if ON_CPU else 20


def _id(variant) -> str:
    name, flags = variant
    return "-".join([name, *(f"{k}{int(v)}" for k, v in flags.items())])


def options(name: str) -> dict:
    """Hyperparameters that exercise every term: weight decay everywhere, SGD with momentum."""
    return dict(lr=1e-2, weight_decay=0.01, **({"momentum": 0.9} if name == "SGD" else {}))


def tolerance(name: str, dtype: torch.dtype, steps: int = STEPS) -> float:
    """fp32: a few ulps of the largest element after 20 steps (factored: the row and column sums' order too);
    bf16: one ulp of the stored parameter (the fp32 results round to the other side of a bf16 value); the
    interpreter truncates bf16 stores, an ulp per step."""
    if dtype != torch.float32:
        return TOL[dtype] * (steps if ON_CPU else 1)
    return 2e-6 if name in FACTORED else 1e-6


def make(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device=DEVICE, generator=gen).to(dtype)) for s in shapes]


def grads_for(shapes, steps, dtype=torch.float32, seed=1):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return [[torch.randn(s, device=DEVICE, generator=gen).to(dtype) for s in shapes] for _ in range(steps)]


def twin_runs(make_opt, shapes, dtype=torch.float32, steps=STEPS):
    """The same steps with the Triton kernels and with the eager oracle: ``(params, opt)`` of each."""
    grads = grads_for(shapes, steps, dtype)
    runs = []
    for backend in ("triton", "torch"):
        params = make(shapes, dtype)
        opt = make_opt(params, backend)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt))
    (params, opt), (_, oracle) = runs
    assert all(b.name == "triton" and getattr(b, "fallback", None) is None for b in opt._backends.values()), opt._backends
    assert all(b.name == "torch" for b in oracle._backends.values())
    return runs


def assert_same_run(runs, dtype, tol, states=True):
    (params, opt), (expected, oracle) = runs
    assert_close_rel(params, expected, dtype, tol=tol, what="params")
    if states:
        for i, (p, q) in enumerate(zip(params, expected)):
            assert set(opt.state[p]) == set(oracle.state[q])
            for key, value in oracle.state[q].items():
                kind = opt._runner.eight_bit_kinds.get(key)
                if value.dtype == torch.uint8 and kind is not None:
                    # 8-bit codes: a value on a rounding boundary may take the neighbouring code where the GPU's
                    # fp32 (FMA) differs in the last bit: compare what they hold, to one code step of the block
                    scales = (opt.state[p][key + "_absmax"], oracle.state[q][key + "_absmax"])
                    held = [quantization.dequantize(c, s, kind) for c, s in ((opt.state[p][key], scales[0]), (value, scales[1]))]
                    assert_close_rel(held[0], held[1], tol=max(tol, 0.02), what=f"[{i}] {key} (8-bit)")
                    continue
                assert_close_rel(opt.state[p][key], value, tol=tol, what=f"[{i}] {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
def test_every_variant_equals_the_torch_oracle(variant, dtype):
    name, flags = variant
    cls = getattr(optgen, name)
    shapes = FACTORED_SHAPES if name in FACTORED else SHAPES
    runs = twin_runs(lambda ps, backend: cls(ps, backend=backend, **options(name), **flags), shapes, dtype)
    assert_same_run(runs, dtype, tolerance(name, dtype), states=dtype == torch.float32)


@pytest.mark.parametrize("name", NAMES)
def test_groups_that_disagree_on_flags_equal_the_torch_oracle(name):
    """The per-group variant (flags and maximize as per-group switches), with a global gradient clip where the
    update has a single variant (a global norm across a factored update's two variants is refused)."""
    cls = getattr(optgen, name)
    key = NAMES.index(name)
    spec = BUILTINS[list(BUILTINS)[key]]()
    flipped = {f.name: not f.default for f in spec.flags}
    shapes = FACTORED_SHAPES if name in FACTORED else SHAPES
    half = len(shapes) // 2
    clip = {} if name in FACTORED or name == "NVLAMB" else {"max_grad_norm": 0.5}

    def build(ps, backend):
        groups = [dict(params=ps[:half], maximize=True, **flipped), dict(params=ps[half:])]
        return cls(groups, backend=backend, **options(name), **clip)

    runs = twin_runs(build, shapes, steps=6)
    assert any(h.name == "maximize" for h in runs[0][1].plan.ir.hypers)  # really the per-group variant
    assert_same_run(runs, torch.float32, tolerance(name, torch.float32))


@pytest.mark.parametrize("name", ["AdamW", "LAMB", "NVLAMB", "LARS", "Adafactor", "CAME"])
def test_master_weights_equal_the_torch_oracle(name):
    cls = getattr(optgen, name)
    shapes = FACTORED_SHAPES if name in FACTORED else SHAPES
    runs = twin_runs(lambda ps, backend: cls(ps, backend=backend, master_weights=True, **options(name)), shapes, torch.bfloat16, steps=10)
    (params, opt), (expected, oracle) = runs
    assert_close_rel(params, expected, torch.bfloat16, what="bf16 params")
    for i, (p, q) in enumerate(zip(params, expected)):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert_close_rel(master, oracle.state[q]["master_param"], tol=tolerance(name, torch.float32), what=f"[{i}] master")
        assert_close_rel(p, master.to(torch.bfloat16), torch.bfloat16, what=f"[{i}] param from master")


@pytest.mark.parametrize("name", ["AdamW", "LAMB", "NVLAMB", "CAME"])
def test_a_thousand_tensors_equal_the_torch_oracle(name):
    """1000 tensors of odd sizes in one step (chunk tables, per-layer and global reductions over all of them)."""
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 3000, (1000,), generator=gen).tolist()
    # a third matrices, the rest vectors; a factored update's all matrices (one variant: a global norm across two is refused)
    shapes = [(1 + s % 37, 1 + s % 101) if name in FACTORED or i % 3 == 0 else (s,) for i, s in enumerate(sizes)]
    cls = getattr(optgen, name)
    runs = twin_runs(lambda ps, backend: cls(ps, backend=backend, **options(name)), shapes, steps=3)
    assert_same_run(runs, torch.float32, tolerance(name, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(FACTORED))
def test_factored_rows_wider_than_the_default_block(name, dtype, monkeypatch):
    """With the default chunk and block (conftest sets small ones): rows of several blocks, split into tiles."""
    from optgen import settings

    monkeypatch.setenv("OPTGEN_CHUNK", str(settings.default("OPTGEN_CHUNK")))
    monkeypatch.setenv("OPTGEN_BLOCK", str(settings.default("OPTGEN_BLOCK")))
    cls = getattr(optgen, name)
    runs = twin_runs(lambda ps, backend: cls(ps, backend=backend, **options(name)), WIDE_SHAPES, dtype, steps=10)
    assert_same_run(runs, dtype, tolerance(name, dtype, steps=10), states=dtype == torch.float32)


@needs_cuda
def test_lamb_in_a_cuda_graph_follows_a_scheduler_on_its_lr_tensor():
    """A LAMB step captured once, replayed with new gradients while StepLR halves the lr tensor in place: the
    same parameters and states as the same steps run eagerly (Triton) and by the oracle."""
    shapes = [(7,), (300,), (129, 257), (), (65537,)]
    runs = {}
    for mode in ("graph", "triton", "torch"):
        params = make(shapes)
        lr = torch.tensor(1e-2, device="cuda")
        opt = optgen.LAMB(params, lr=lr, backend="torch" if mode == "torch" else "triton")
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        grads = grads_for(shapes, 9)
        for p in params:
            p.grad = torch.zeros_like(p)

        def take(step, params=params):
            for p, g in zip(params, step):
                p.grad.copy_(g)

        if mode == "graph":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream: states, tables, compiled kernels
                for step in grads[:3]:
                    take(step)
                    opt.step()
                    scheduler.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            for step in grads[3:]:
                take(step)
                graph.replay()
                scheduler.step()
        else:
            for step in grads:
                take(step)
                opt.step()
                scheduler.step()
        torch.cuda.synchronize()
        assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(1e-2 * 0.5**4)
        runs[mode] = (params, opt)
    graph_params, graph_opt = runs["graph"]
    for other in ("triton", "torch"):
        params, opt = runs[other]
        assert_close_rel(graph_params, params, tol=1e-6, what=f"graph vs {other}")
        for p, q in zip(graph_params, params):
            assert float(graph_opt.state[p]["step"]) == float(opt.state[q]["step"]) == 9
    assert_bitwise([p.detach() for p in graph_params], [p.detach() for p in runs["triton"][0]], "graph vs eager Triton")


def _mlp(dtype):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.to(device="cuda", dtype=dtype)


def _loss(model):
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
    dtype = next(model.parameters()).dtype
    return ((model(x.to("cuda", dtype)).float() - y.cuda()) ** 2).mean()


@needs_cuda
@pytest.mark.parametrize("fused", [False, True], ids=["as_shipped", "fused_contract"])
@pytest.mark.parametrize("name,dtype,kwargs", [("AdamW", torch.float32, {}), ("LAMB", torch.float32, {}),
                                               ("NVLAMB", torch.float32, {}),
                                               ("LAMB", torch.bfloat16, {"master_weights": True})],
                         ids=["AdamW", "LAMB", "NVLAMB", "LAMB-bf16-master"])  # fmt: skip
def test_grad_scaler_skips_the_step_on_inf(name, dtype, kwargs, fused):
    """An inf and a NaN gradient at the third step: nothing changes (on the fused contract inside the kernels,
    which run and must write every old value back), the scale halves, and the run equals one without that step."""
    cls = getattr(optgen, name)
    model, ref_model = _mlp(dtype), _mlp(dtype)
    opt = cls(model.parameters(), lr=1e-2, backend="triton", **kwargs)
    if fused:
        opt._step_supports_amp_scaling = True
    ref = cls(ref_model.parameters(), lr=1e-2, backend="triton", **kwargs)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    params = list(model.parameters())
    for k in range(4):
        for p in params:
            p.grad = None
        scaler.scale(_loss(model)).backward()
        if k == 2:
            model[0].weight.grad[0, 0] = float("inf")
            model[3].bias.grad[1] = float("nan")
            before = [p.detach().clone() for p in params], {id(p): {n: v.clone() for n, v in opt.state[p].items()} for p in params}
        scaler.step(opt)
        scaler.update()
        if k == 2:
            assert_bitwise([p.detach() for p in params], before[0], "params after the skipped step")
            for p in params:
                for n, v in opt.state[p].items():
                    assert_bitwise(v, before[1][id(p)][n], f"state {n} after the skipped step")
            assert scaler.get_scale() == 2.0**9
        else:
            for p in ref_model.parameters():
                p.grad = None
            _loss(ref_model).backward()
            ref.step()
    torch.cuda.synchronize()
    assert_close_rel(params, list(ref_model.parameters()), dtype, tol=max(TOL[dtype], 1e-6), what="params")
    assert all(float(opt.state[p]["step"]) == 3 for p in params)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_parameters_on_a_gpu_that_is_not_the_current_one():
    """Triton launches on the current device: the backend of cuda:1 must make cuda:1 current."""
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda:1").requires_grad_() for s in SHAPES]
    twins = [p.detach().clone().to("cuda:0").requires_grad_() for p in params]
    opts = [optgen.LAMB(ps, lr=1e-2, backend="triton") for ps in (params, twins)]
    with torch.cuda.device(0):
        for _ in range(3):
            for p, q in zip(params, twins):
                p.grad = torch.ones_like(p)
                q.grad = torch.ones_like(q)
            for opt in opts:
                opt.step()
    for p, q in zip(params, twins):
        assert torch.equal(p.detach().cpu(), q.detach().cpu())
