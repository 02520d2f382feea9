"""The C backend: generated multi-tensor C kernels against the eager torch oracle, storage conversions, the
build (flags, cache, concurrent builds, failures) and the static vectorisation check.

The runtime contract (state dicts, schedulers, GradScaler, master weights, capturable, sharding) runs on the
C backend through the ``backend`` fixture of the other test files (``conftest.BACKENDS``)."""

import multiprocessing
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CHUNK, ODD_SHAPES, TOL, assert_close_rel, make_grads, make_params, run_steps

import optgen
from optgen.analysis import plan as make_plan
from optgen.catalog import default_plan, variants
from optgen.codegen.render import source_path
from optgen.ir import lower
from optgen.runtime import c_backend, cbuild
from optgen.runtime.c_backend import STORAGE_CODES
from optgen.specs import BUILTINS

CLASSES = {
    "sgd": optgen.SGD, "adam": optgen.Adam, "adamw": optgen.AdamW, "lars": optgen.LARS, "lars_optax": optgen.LARSOptax,
    "lamb": optgen.LAMB, "nvlamb": optgen.NVLAMB, "novograd": optgen.NovoGrad, "lion": optgen.Lion,
    "layer_adaptive_lion": optgen.LayerAdaptiveLion, "adabelief": optgen.AdaBelief,
}  # fmt: skip
# hyperparameters that make every term of each update matter (momentum, decay, a trust clip)
EXTRA = {"sgd": dict(momentum=0.9, weight_decay=0.01), "lars": dict(momentum=0.9), "lamb": dict(trust_clip=(0.0, 10.0))}
STEPS = 20
EDGE_SHAPES = [*ODD_SHAPES, (0,), (2, 0, 3)]  # empty tensors beside the rest: no chunk, the step still counts


def _run(cls, backend, shapes, dtype, kwargs, steps=STEPS, seed=0):
    params = make_params(shapes, seed=seed, dtype=dtype, zero=(len(ODD_SHAPES) - 1,) if len(shapes) >= len(ODD_SHAPES) else ())
    opt = cls(params, backend=backend, **kwargs)
    run_steps(opt, params, make_grads(shapes, steps, seed=seed + 1, dtype=dtype))
    return params, opt


def _c_backend(opt):
    (backend,) = opt._backends.values()
    assert backend.name == "c" and backend.fallback is None
    return backend


@pytest.mark.parametrize("name", list(CLASSES))
def test_every_builtin_variant_equals_the_torch_oracle(name):
    """fp32, 20 steps, odd shapes (0-d, chunk-straddling, empty): within 1e-6 of the eager torch backend, the
    state too, for every flag variant; the step count advances on every tensor, empty ones included."""
    cls = CLASSES[name]
    for flags in variants(BUILTINS[name]()):
        kwargs = {**EXTRA.get(name, {}), **flags}
        if flags.get("nesterov") and name == "sgd":
            kwargs["dampening"] = 0.0
        got, opt = _run(cls, "c", EDGE_SHAPES, torch.float32, kwargs)
        want, ref = _run(cls, "torch", EDGE_SHAPES, torch.float32, kwargs)
        _c_backend(opt)
        assert_close_rel(got, want, torch.float32, what=f"{name} {flags} params")
        for p, q in zip(got, want):
            for key, value in ref.state[q].items():
                assert_close_rel(opt.state[p][key], value, torch.float32, what=f"{name} {flags} state {key}")


@pytest.mark.parametrize("name", ["adamw", "lamb", "lars"])
def test_per_step_values_follow_each_chunks_group_and_step(monkeypatch, name):
    """The kernels compute a group's per-step values (bias corrections) once per run of chunks of one group and
    step count: interleaved groups of other hyperparameters, and parameters of one group at other step counts
    (one skipped on some steps), must each get their own, as the oracle computes them per parameter."""
    monkeypatch.setenv("OPTGEN_C_CHUNK", "8")  # several chunks per tensor: runs of chunks, threads' shares
    shapes = [(5, 7), (13,), (3, 3), (20,)]
    outs = {}
    for backend in ("c", "torch"):
        params = make_params(shapes, seed=3)
        groups = [{"params": [params[0], params[2]], "lr": 0.01},
                  {"params": [params[1]], "lr": 0.003, "weight_decay": 0.1},
                  {"params": [params[3]], "lr": 0.02}]  # fmt: skip
        opt = CLASSES[name](groups, backend=backend, **EXTRA.get(name, {}))
        grads = make_grads(shapes, 8, seed=4)
        for k, step_grads in enumerate(grads):
            if k % 3 == 1:
                step_grads[2] = None  # params[2] skips: its step count falls behind params[0]'s, in the same group
            if k == 5:
                step_grads[0] = None
            run_steps(opt, params, [step_grads])
        outs[backend] = [p.detach().clone() for p in params]
        if backend == "c":
            _c_backend(opt)
    for got, want in zip(outs["c"], outs["torch"]):
        assert_close_rel(got, want, torch.float32, tol=TOL[torch.float32], what=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["adamw", "lamb", "nvlamb", "lion"])
def test_low_and_double_precision_parameters(name, dtype):
    """bf16/fp16 parameters: fp32 math, stores rounded to nearest even (the torch backend rounds the same
    fp32 values: one ulp apart at most); fp64 parameters computed in double (1e-12 of the torch backend)."""
    kwargs = EXTRA.get(name, {})
    got, opt = _run(CLASSES[name], "c", ODD_SHAPES, dtype, kwargs, steps=5)
    want, _ = _run(CLASSES[name], "torch", ODD_SHAPES, dtype, kwargs, steps=5)
    _c_backend(opt)
    assert all(p.dtype == dtype for p in got)
    assert_close_rel(got, want, dtype, tol=1e-12 if dtype == torch.float64 else TOL[dtype], what=f"{name} {dtype}")


def test_mixed_dtypes_master_weights_and_bf16_state():
    """fp32, bf16 and fp16 parameters in one optimizer (one call per pass per dtype partition), master
    weights and bf16 moments: equal to the torch backend within one ulp of each dtype."""
    shapes = [(5, 7), (300,), (), (CHUNK + 3,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]

    def run(backend):
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(d)) for s, d in zip(shapes, dtypes)]
        opt = optgen.LAMB(params, lr=1e-2, backend=backend, master_weights=True, state_dtype=torch.bfloat16)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        return params, opt

    got, opt = run("c")
    want, _ = run("torch")
    backend = _c_backend(opt)
    assert len(backend._tables.partitions) == 3
    for p, q, d in zip(got, want, dtypes):
        assert_close_rel(p, q, d, what=str(d))


def test_a_thousand_tensors_in_one_call_per_pass():
    """1000 tensors (0-d, empty, odd sizes, a few chunk-straddling ones): one call per pass, one reduce call
    where the plan has one, equal to the torch backend."""
    gen = torch.Generator().manual_seed(5)
    sizes = torch.randint(0, 40, (1000,), generator=gen).tolist()
    shapes = [() if s == 1 else (s,) for s in sizes]
    shapes[::97] = [(2 * CHUNK + 17,)] * len(shapes[::97])
    for cls in (optgen.AdamW, optgen.NVLAMB):
        got, opt = _run(cls, "c", shapes, torch.float32, {}, steps=3)
        want, _ = _run(cls, "torch", shapes, torch.float32, {}, steps=3)
        backend = _c_backend(opt)
        assert backend.launches == 3 * opt.plan.launches_per_step
        assert_close_rel(got, want, torch.float32, what=cls.__name__)


@pytest.mark.parametrize("name", list(CLASSES))
def test_calls_per_step_follow_the_plan(name):
    params = make_params([(3, 5), (CHUNK + 1,)])
    opt = CLASSES[name](params, backend="c", **EXTRA.get(name, {}))
    run_steps(opt, params, make_grads([(3, 5), (CHUNK + 1,)], 2))
    assert _c_backend(opt).launches == 2 * opt.plan.launches_per_step


@pytest.mark.parametrize("name", ["lamb", "lars", "layer_adaptive_lion", "nvlamb", "adamw"])
def test_blocked_schedule_is_bitwise_the_plain_one(name, monkeypatch):
    """Plans whose reductions are all per layer run every pass block by block (cache reuse between passes):
    the per-layer values fold the same partials in the same order, so parameters and states are bitwise the
    plain schedule's, through full and fast steps; a global norm (NVLAMB) or a single pass (AdamW) keeps the
    plain schedule."""
    shapes = [*EDGE_SHAPES, (40, 33), (5,), (2 * CHUNK,)] * 2
    grads = make_grads(shapes, 4)
    runs = {}
    for block_bytes in ("1e15", "3000"):  # one block (the plain schedule); a few tensors a block
        monkeypatch.setenv("OPTGEN_C_BLOCK_BYTES", block_bytes)
        params = make_params(shapes)
        opt = CLASSES[name](params, backend="c", **EXTRA.get(name, {}))
        run_steps(opt, params, grads)
        backend = _c_backend(opt)
        blocks = backend._blocks(backend._tables)
        runs[block_bytes] = (params, opt, backend.launches, blocks)
    (plain, plain_opt, plain_launches, none), (blocked, opt, launches, blocks) = runs.values()
    assert none is None
    for p, q in zip(blocked, plain):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, plain_opt.state[q][key]), key
    if name in ("nvlamb", "adamw"):
        assert blocks is None and launches == plain_launches
    else:
        assert len(blocks) > 3 and _c_backend(opt).fast_steps == 3
        calls_per_block = len(opt.plan.passes) + sum(bool(p.produces) for p in opt.plan.passes)
        assert launches == len(grads) * len(blocks) * calls_per_block


@pytest.mark.parametrize("name", ["lamb", "adafactor", "nvlamb"])
def test_threads_are_bitwise_one_thread(name, monkeypatch):
    """Threads take contiguous shares of the chunks and odd passes walk theirs backwards; partials are stored by
    chunk and folded in chunk order, so a step on every thread is bitwise a step on one."""
    shapes = [*ODD_SHAPES, (0,), (40, 33), (5,), (7 * CHUNK + 3,), (3, CHUNK + 5), (2, 9, 2 * CHUNK)]
    grads = make_grads(shapes, 3)
    cls = {**CLASSES, "adafactor": optgen.Adafactor}[name]
    runs = []
    for parallel_min in ("1e15", "1"):
        monkeypatch.setenv("OPTGEN_C_PARALLEL_MIN", parallel_min)
        params = make_params(shapes)
        opt = cls(params, backend="c", **EXTRA.get(name, {}))
        run_steps(opt, params, grads)
        runs.append((params, opt))
    (serial, serial_opt), (threaded, opt) = runs
    for p, q in zip(threaded, serial):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, serial_opt.state[q][key]), key


# -- storage conversions -------------------------------------------------------------------------------------


def _specials(dtype):
    finfo = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 2,
              finfo.tiny / 3, finfo.eps, 1.0 + finfo.eps / 2, 1.0 + 1.5 * finfo.eps, 1.0 + finfo.eps / 4, 3.0e38,
              65504.0, 65519.0, 65520.0, 6.0e-8, 3.0e-8, 2.9e-8, 1e-45, 1e-30, float(finfo.max) * (1 + 2.0**-9)]  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(20000, generator=gen) * torch.exp2(torch.randint(-140, 130, (20000,), generator=gen).float())
    return torch.cat([torch.tensor(values, dtype=torch.float32), wide])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stores_round_to_nearest_even_like_torch(dtype):
    """SGD's first step stores the gradient into the momentum buffer: in a bf16/fp16 buffer the kernel's
    rounding of each fp32 value equals torch's ``.to(dtype)``, bitwise: ties to even, subnormals, overflow to
    inf, NaN stays NaN."""
    grad = _specials(dtype)
    grad = torch.cat([grad, torch.tensor([float("nan")])])
    param = torch.nn.Parameter(torch.zeros_like(grad))
    opt = optgen.SGD([param], lr=0.0, momentum=0.9, backend="c", state_dtype=dtype)
    param.grad = grad.clone()
    opt.step()
    _c_backend(opt)
    buffer = opt.state[param]["momentum_buffer"]
    expected = (grad + 0.0).to(dtype)  # the buffer is g + weight_decay * w: -0.0 + 0.0 is +0.0
    assert torch.equal(torch.isnan(buffer), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert torch.equal(buffer[finite].view(torch.int16), expected[finite].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_are_exact_for_every_bit_pattern(dtype):
    """Every one of the 65536 bf16/fp16 values, loaded by the kernel and stored into an fp32 buffer, is the
    same fp32 number torch makes of it."""
    grad = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    param = torch.nn.Parameter(torch.zeros(grad.shape, dtype=dtype))
    opt = optgen.SGD([param], lr=0.0, momentum=0.9, backend="c", master_weights=True)
    param.grad = grad.clone()
    opt.step()
    _c_backend(opt)
    buffer = opt.state[param]["momentum_buffer"]
    assert buffer.dtype == torch.float32
    expected = grad.float()
    assert torch.equal(torch.isnan(buffer), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert torch.equal(buffer[finite], expected[finite])


# -- the build ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CLASSES))
def test_every_element_loop_is_vectorised(name):
    """A static check (gcc's vectorisation report of the backend's own flags): every element loop of every
    variant, for fp32, bf16 storage and fp64 math. Without -fno-math-errno the sqrt loops would not be."""
    for flags in variants(BUILTINS[name]()):
        plan = default_plan(BUILTINS[name](), flags)
        source = source_path(plan, "c")
        eight_bit = {f"OG_DT_{b}": STORAGE_CODES[torch.uint8] for b, _ in plan.quantized}  # codes and quantize loops
        for defines in ({}, {"OG_DT_param": STORAGE_CODES[torch.bfloat16]}, {"OG_DT_param": 1, "OG_REAL_F64": 1}, *([eight_bit] if eight_bit else [])):
            try:
                loops = cbuild.vectorization(source, defines)
            except cbuild.BuildError:
                pytest.skip(f"no vectorisation report (it is gcc's) from {cbuild.toolchain().identity}")
            assert loops and all(loops.values()), f"{name} {flags} {defines}: not vectorised: {loops}"


OPTIONS = {"maximize_": "runtime", "max_grad_norm": True, "master": True, "amp_mode": "unscale"}


@pytest.mark.parametrize("options", [*([o] for o in OPTIONS), list(OPTIONS)], ids=[*OPTIONS, "all"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_element_loops_with_the_options_are_vectorised(name, options):
    """The same check on each variant's plan with optimizer-level options on (a per-group maximize switch,
    gradient clipping, master weights, GradScaler's unscale and skip), one at a time and all together: their
    per-step booleans (``found_inf == 0``, the maximize switch) must stay selects gcc vectorises (carried
    across chunks as ints, they did not: the review of 3b28b70)."""
    from optgen import transforms

    for flags in variants(BUILTINS[name]()):
        ir = lower(BUILTINS[name](), flags)
        chosen = {o: OPTIONS[o] for o in options if o != "max_grad_norm" or "max_grad_norm" not in {h.name for h in ir.hypers}}
        plan = make_plan(transforms.apply(ir, **chosen))
        for defines in ({}, {"OG_DT_param": 1, "OG_REAL_F64": 1}):
            try:
                loops = cbuild.vectorization(source_path(plan, "c"), defines)
            except cbuild.BuildError:
                pytest.skip(f"no vectorisation report (it is gcc's) from {cbuild.toolchain().identity}")
            if loops and not all(loops.values()) and flags.get("amsgrad") and {"master", "amp_mode"} <= set(options):
                # known, older than the memo: master weights and GradScaler together leave amsgrad's
                # where(ok, sqrt(max), sqrt(old max)) two calls under a select, which gcc does not if-convert
                continue
            assert loops and all(loops.values()), f"{name} {flags} {chosen} {defines}: not vectorised: {loops}"


def test_factored_8bit_element_loops_are_vectorised():
    """CAME with 8-bit states (state_format="8bit", not a built-in's default): the row-tile loops' block loops and
    their quantize loops, with the 8-bit buffers as codes and in full precision (a small tensor's)."""
    from optgen import transforms
    from optgen.analysis import plan as make_plan

    came = BUILTINS["came"]()
    plan = make_plan(transforms.apply(lower(came, {"factored": True}), quantized=None))
    assert plan.quantized and plan.ir.factored
    source = source_path(plan, "c")
    eight_bit = {f"OG_DT_{b}": STORAGE_CODES[torch.uint8] for b, _ in plan.quantized}
    for defines in ({}, eight_bit, {**eight_bit, "OG_DT_param": STORAGE_CODES[torch.bfloat16]}):
        try:
            loops = cbuild.vectorization(source, defines)
        except cbuild.BuildError:
            pytest.skip(f"no vectorisation report (it is gcc's) from {cbuild.toolchain().identity}")
        assert loops and all(loops.values()), f"{defines}: not vectorised: {loops}"


def test_the_vectorisation_check_sees_an_unswitched_loop(tmp_path):
    """The control: with a short-circuit NaN test in the max (``||``, as the template had it), gcc unswitches
    Adafactor's element loops on max(eps^2, v)'s loop-invariant operand and leaves the ordinary case scalar,
    though it reports them vectorised; the check must say they are not."""
    source = source_path(make_plan(lower(BUILTINS["adafactor"](), {"factored": True})), "c")
    text = source.read_text()
    short_circuit = text.replace("((a != a) | (a > b))", "(a != a || a > b)")
    assert short_circuit != text
    control = tmp_path / "short_circuit.c"
    control.write_text(short_circuit)
    try:
        loops, control_loops = cbuild.vectorization(source), cbuild.vectorization(control)
    except cbuild.BuildError:
        pytest.skip(f"no vectorisation report (it is gcc's) from {cbuild.toolchain().identity}")
    assert all(loops.values()) and not all(control_loops.values()), (loops, control_loops)


def test_no_compiler_warns_once_and_runs_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cbuild.toolchain.cache_clear()
    try:
        params = make_params([(4, 3), (9,)])
        ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = optgen.LAMB(params, backend="auto")
        grads = make_grads([(4, 3), (9,)], 3)
        with pytest.warns(cbuild.CKernelsUnavailable, match="no C compiler"):
            run_steps(opt, params, grads[:1])
        run_steps(opt, params, grads[1:])  # no second warning (the filter makes one an error)
        (backend,) = opt._backends.values()
        assert backend.fallback is not None
        run_steps(optgen.LAMB(ref, backend="torch"), ref, grads)
        assert all(torch.equal(p, q) for p, q in zip(params, ref))
    finally:
        cbuild.toolchain.cache_clear()


def test_a_failing_build_names_the_command_and_changes_nothing_first(monkeypatch, tmp_path):
    """A compiler that builds the probe but fails on the kernels: the warning shows the command and the
    compiler's message; the step then runs on the torch path from unmodified parameters and state."""
    fake = tmp_path / "fake-cc"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in *-DOG_*) echo "fake-cc: kernels refused" >&2; exit 1;; esac
        exec {cbuild.toolchain().compiler} "$@"
    """))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path / "cache"))
    cbuild.toolchain.cache_clear()
    try:
        params = make_params([(4, 3), (9,)])
        ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = optgen.AdamW(params, backend="c")
        grads = make_grads([(4, 3), (9,)], 2)
        with pytest.warns(cbuild.CKernelsUnavailable, match="(?s)fake-cc.*-DOG_DT_param=0.*kernels refused"):
            run_steps(opt, params, grads)
        run_steps(optgen.AdamW(ref, backend="torch"), ref, grads)
        assert all(torch.equal(p, q) for p, q in zip(params, ref))
    finally:
        cbuild.toolchain.cache_clear()


_WORKER = """
import os, sys, torch, optgen
params = [torch.nn.Parameter(torch.linspace(-1, 1, n)) for n in (1000, 3, 70000)]
opt = optgen.LAMB(params, lr=1e-2, backend="c")
for step in range(3):
    for p in params:
        p.grad = torch.sin(p.detach() * (step + 1))
    opt.step()
(backend,) = opt._backends.values()
assert backend.fallback is None
torch.save([p.detach() for p in params], sys.argv[1])
"""


def _compiler_log_env(tmp_path, cache):
    """An environment whose CC logs every compile of a kernel object to ``log`` (probes are not logged)."""
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "logging-cc"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in *-DOG_*) echo "$$" >> {log};; esac
        exec {cbuild.toolchain().compiler} "$@"
    """))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "CC": str(wrapper), "OPTGEN_CACHE_DIR": str(cache), "OPTGEN_C_CHUNK": "65536"}
    return env, log


def test_cold_build_then_warm_cache_without_compiling(tmp_path):
    """A fresh cache compiles each object once; a second process loads them without running the compiler."""
    env, log = _compiler_log_env(tmp_path, tmp_path / "cache")
    for k in range(2):
        subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path / f"out{k}.pt")], env=env, check=True, timeout=300)
        compiles = len(log.read_text().splitlines()) if log.exists() else 0
        assert compiles == 1, f"run {k}: {compiles} compiles (one dtype signature: one object, once)"
    assert all(torch.equal(a, b) for a, b in zip(torch.load(tmp_path / "out0.pt"), torch.load(tmp_path / "out1.pt")))


def test_concurrent_processes_share_the_cache(tmp_path):
    """Four processes step at once on one empty cache: all succeed with equal results, and the cache holds
    whole objects only (no temporary files left, every object loads)."""
    env, _ = _compiler_log_env(tmp_path, tmp_path / "cache")
    context = multiprocessing.get_context("spawn")
    del context  # processes are started with subprocess.Popen: each is a fresh interpreter
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / f"out{k}.pt")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        for k in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    results = [torch.load(tmp_path / f"out{k}.pt") for k in range(4)]
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r))
    objects = list((tmp_path / "cache" / "c").glob("*.so"))
    assert objects and not list((tmp_path / "cache" / "c").glob("*.tmp"))
    for path in objects:
        cbuild.load(path)


def test_a_name_reserved_in_c_is_a_spec_error_at_build():
    spec = optgen.Spec("Reserved")
    lr = spec.hyper(lr=0.1)
    double = spec.state("double")
    spec.update(double, 0.5 * double + spec.grad)
    spec.update(spec.param, spec.param - lr * double)
    with pytest.raises(optgen.SpecError, match="'double' is reserved in C"):
        optgen.build(spec)


# -- the fast path (a step with the layout of the last one) ---------------------------------------------------


def _fast_path_run(cls, fast: bool, monkeypatch):
    """A training loop that changes, between steps, everything a fast step must notice: new gradient tensors,
    in-place gradients, an lr schedule, a param group added, a parameter without a gradient, a parameter's
    storage replaced, a state tensor replaced, a state dict loaded. Returns the parameters and the fast steps of
    each backend (a factored spec runs one for its matrices and one for its vectors)."""
    monkeypatch.setattr(cls, "_fast_path", fast)
    shapes = [(6, 5), (300,), (3, 70), (), (0,), (CHUNK + 9,)]
    params = make_params(shapes)
    extra = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 17))
    opt = cls([{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.0}], lr=1e-2, backend="c")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    grads = make_grads(shapes + [(17,)], 16, seed=4)

    def step(k, with_extra=False, skip=None):
        for i, p in enumerate(params + ([extra] if with_extra else [])):
            p.grad = None if i == skip else grads[k][i].clone()
        opt.step()
        scheduler.step()

    for k in range(4):
        step(k)  # new gradient tensors every step, lr halved every second step
    for p in params:  # gradients updated in place (zero_grad(set_to_none=False) and accumulation)
        p.grad.mul_(0.5)
    opt.step()
    step(5, skip=1)  # a parameter without a gradient: skipped
    step(6)
    params[0].data = params[0].data.clone()  # storage replaced
    step(7)
    state = opt.state[params[1]]
    name = next(k for k in state if k != "step" and state[k].shape == params[1].shape)
    state[name] = state[name].clone() * 0.5  # a state replaced
    step(8)
    opt.add_param_group({"params": [extra], "lr": 3e-3})
    step(9, with_extra=True)
    step(10, with_extra=True)
    opt.load_state_dict(opt.state_dict())
    step(11, with_extra=True)
    step(12, with_extra=True)
    backends = list(opt._backends.values())
    assert all(b.name == "c" and b.fallback is None for b in backends)
    return [p.detach().clone() for p in params + [extra]], [b.fast_steps for b in backends]


@pytest.fixture(params=["C", "Python"])
def host_reads(request, monkeypatch):
    """The fast step's checks and reads in C (``host_ptrs``), or from Python where that is not built."""
    from optgen.runtime import host_ptrs

    if request.param == "C":
        assert host_ptrs.helper() is not None  # a C++ compiler and torch's headers: the C reads must load
    else:
        monkeypatch.setenv("OPTGEN_HOST_READS_IN_C", "0")
    return request.param


@pytest.mark.parametrize("name", ["LAMB", "Adafactor", "CAME"])
def test_fast_steps_equal_full_steps_bitwise(monkeypatch, name, host_reads):
    cls = getattr(optgen, name)
    fast, fast_steps = _fast_path_run(cls, True, monkeypatch)
    full, full_steps = _fast_path_run(cls, False, monkeypatch)
    assert len(fast_steps) == (1 if name == "LAMB" else 2)  # the factored specs: matrices' and vectors' variants
    assert set(full_steps) == {0} and min(fast_steps) >= 6  # steps right after a change take the full path
    for a, b in zip(fast, full):
        assert torch.equal(a, b)


def test_auto_runs_the_c_kernels_on_cpu_and_c_refuses_other_devices():
    from optgen.runtime import backends

    assert backends.resolve("auto", torch.device("cpu")).name == "c"
    assert backends.resolve("auto", torch.device("meta")).name == "torch"  # no kernel target there
    with pytest.raises(RuntimeError, match="backend='c' runs on CPU tensors"):
        optgen.AdamW([torch.nn.Parameter(torch.ones(3, device="meta"))], backend="c")
    params = make_params([(3,)])
    opt = optgen.AdamW(params)
    run_steps(opt, params, make_grads([(3,)], 1))
    _c_backend(opt)


# -- found by the adversarial review (each failed before its fix) -------------------------------------------------


def _twin_runs(monkeypatch, cls, change, steps_after=2, **kwargs):
    """The same run with the fast path on and off: ``change(opt, params)`` between steps 3 and 4."""
    out = []
    for fast in (True, False):
        monkeypatch.setattr(cls, "_fast_path", fast)
        params = make_params([(4, 4), (300,), ()])
        opt = cls(params, backend="c", **kwargs)
        grads = make_grads([(4, 4), (300,), ()], 3 + steps_after, seed=9)
        run_steps(opt, params, grads[:3])
        change(opt, params)
        for k in range(3, 3 + steps_after):
            for p, g in zip(params, grads[k]):
                if p.grad is None or p.grad.shape == g.shape:
                    p.grad = g.clone()
            opt.step()
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("change", ["grad transposed in place", "grad storage swapped", "state storage swapped",
                                    "parameter moved to another group", "group appended to param_groups"])  # fmt: skip
def test_fast_path_notices_in_place_changes(monkeypatch, change, host_reads):
    def transposed(opt, params):  # the same gradient object, non-contiguous now
        params[0].grad = params[0].grad.clone()
        opt.step()  # a full step, then a fast one over the object to be changed
        params[0].grad.data = params[0].grad.data.t()

    def grad_swapped(opt, params):
        params[1].grad = params[1].grad.clone()
        opt.step()
        params[1].grad.set_(torch.linspace(-1, 1, 300))

    def state_swapped(opt, params):
        opt.state[params[1]]["exp_avg"].data = torch.full((300,), 0.25)

    def moved(opt, params):
        first = opt.param_groups[0]["params"]
        del first[next(i for i, p in enumerate(first) if p is params[2])]
        opt.param_groups[1]["params"].append(params[2])

    def appended(opt, params):
        opt.param_groups.append({**opt.param_groups[1], "params": []})

    groups = lambda params: [{"params": params[:1] + params[2:], "lr": 0.1}, {"params": params[1:2], "lr": 0.0}]  # noqa: E731
    if change in ("parameter moved to another group", "group appended to param_groups"):
        cls = optgen.AdamW
        out = []
        for fast in (True, False):
            monkeypatch.setattr(cls, "_fast_path", fast)
            params = make_params([(4, 4), (300,), ()])
            opt = cls(groups(params), backend="c")
            grads = make_grads([(4, 4), (300,), ()], 6, seed=9)
            run_steps(opt, params, grads[:3])
            (moved if change.startswith("parameter") else appended)(opt, params)
            run_steps(opt, params, grads[3:])
            out.append([p.detach().clone() for p in params])
    else:
        out = _twin_runs(monkeypatch, optgen.LAMB, {"grad transposed in place": transposed,
                                                    "grad storage swapped": grad_swapped,
                                                    "state storage swapped": state_swapped}[change])  # fmt: skip
    for a, b in zip(*out):
        assert torch.equal(a, b)


def _set_data_float64(t):
    t.data = torch.zeros(t.shape, dtype=torch.float64)


@pytest.mark.parametrize("change", [
    lambda t: t.set_(torch.zeros(t.shape)),  # storage swapped
    lambda t: t.resize_(t.numel() - 1),  # smaller, in the same storage
    lambda t: t.as_strided_(t.shape[::-1], (1, t.shape[1])),  # another view of the same storage
    lambda t: t.requires_grad_(True),
    _set_data_float64,
    lambda t: t.unsqueeze_(0),
], ids=["set_", "resize_", "as_strided_", "requires_grad_", ".data = float64", "unsqueeze_"])  # fmt: skip
def test_host_reads_see_each_tensor_as_python_does(change):
    from optgen.runtime.host_ptrs import Objects, PointerTable, helper

    class Subclass(torch.Tensor):
        pass

    host = helper()
    base = torch.zeros(40)
    tensors = [torch.zeros(3, 4), base[5:].view(5, 7), base.view(8, 5).t(), torch.zeros(0), torch.zeros(())]
    impls = PointerTable([t._cdata for t in tensors])
    records, ptrs = host.seen(impls)
    assert ptrs.values == [t.data_ptr() for t in tensors] and host.same(impls, records, ptrs)
    ids = Objects(tensors)
    assert host.same_objects(tensors, ids, impls) and not host.same_objects(tensors[:-1], ids, impls)
    assert not host.same_objects([*tensors[:-1], torch.zeros(())], ids, impls)  # another object, the same metadata
    tensors[0].__class__ = Subclass  # the same object and TensorImpl, another type (its .grad may be Python's)
    assert not host.same_objects(tensors, ids, impls)
    tensors[0].__class__ = torch.Tensor
    assert host.same_objects(tensors, ids, impls)
    swapped = torch.zeros(())
    torch.utils.swap_tensors(tensors[-1], swapped)  # the same object holding another TensorImpl
    assert not host.same_objects(tensors, ids, impls)
    for k in range(3):  # the same object changed in place: its record or data pointer differs
        twins = [t.clone() if i != 2 else t for i, t in enumerate(tensors)]
        twin_impls = PointerTable([t._cdata for t in twins])
        records, ptrs = host.seen(twin_impls)
        change(twins[k])
        assert not host.same(twin_impls, records, ptrs), k
    sparse = torch.ones(3).to_sparse()  # no storage: torch's accessor throws
    sparse_impls = PointerTable([sparse._cdata])
    assert host.seen(sparse_impls) is None and not host.same(sparse_impls, records, ptrs)


def test_host_reads_check_and_gather_gradients():
    from optgen.runtime.host_ptrs import NO_DATA, PointerTable, helper

    host = helper()
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(0))]
    for p in params:
        p.grad = torch.ones_like(p)
    impls = PointerTable([p._cdata for p in params])
    records, ptrs = host.seen(impls, grads=True)
    assert ptrs.values == [p.grad.data_ptr() for p in params]
    table, scratch = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    assert host.grads(impls, records, table, scratch) == 1 and table.tolist() == ptrs.values
    assert host.grads(impls, records, table, scratch) == 0  # nothing moved since
    for p in params:  # new gradients (zero_grad(set_to_none=True), backward): written
        p.grad = torch.full_like(p, 2.0)
    assert host.grads(impls, records, table, scratch) == 1 and table.tolist() == [p.grad.data_ptr() for p in params]
    written = table.tolist()
    params[1].grad = torch.ones(2, 2).t()  # the same shape, other strides: refused, nothing written
    assert host.grads(impls, records, table, scratch) == -1 and table.tolist() == written
    params[1].grad = None
    assert host.grads(impls, records, table, scratch) == -1 and host.seen(impls, grads=True) is None
    params[1].grad = torch.ones(2, 2)
    params[0].grad.untyped_storage().resize_(0)  # storage freed in place: torch reads its data pointer as 0
    assert host.grads(impls, records, table, scratch) == NO_DATA and table.tolist() == written
    flat = torch.ones(7)
    params[0].grad = flat[4:]
    assert host.grads(impls, records, table, scratch) == 1
    flat.untyped_storage().resize_(0)  # a view of a freed flat buffer: torch reads its data pointer as 16, not 0
    assert params[0].grad.data_ptr() == 16 and host.grads(impls, records, table, scratch) == NO_DATA
    with pytest.raises(ValueError, match="int64 tables of 2 and 3 for 3 parameters"):
        host.grads(impls, records, table[:2], scratch)


def test_without_a_cxx_compiler_fast_steps_read_from_python(monkeypatch, tmp_path):
    from optgen.runtime import host_ptrs

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached: it would have to build
    for cached in (host_ptrs.helper, cbuild.cxx_toolchain, cbuild.toolchain):
        cached.cache_clear()
    try:
        assert host_ptrs.helper() is None
        params = make_params([(4, 4), (300,)])
        opt = optgen.AdamW(params, backend="c")
        run_steps(opt, params, make_grads([(4, 4), (300,)], 4))
        assert _c_backend(opt).fast_steps == 3 and opt._runner.fast.compiled is None
    finally:
        for cached in (host_ptrs.helper, cbuild.cxx_toolchain, cbuild.toolchain):
            cached.cache_clear()


def test_threads_building_one_object_at_once_all_get_it(monkeypatch, tmp_path):
    """Threads of one process building the same object (first steps of optimizers in several threads) each
    compile to their own temporary name: all get the object (one temporary per process made them collide)."""
    import threading

    from optgen.runtime import host_ptrs

    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path / "cache"))
    results, errors = [], []

    def build():
        try:
            results.append(cbuild.build(host_ptrs.SOURCE, {}, "host_ptrs", extra=host_ptrs.torch_flags()))
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1 and results[0].is_file()
    assert not list((tmp_path / "cache" / "c").glob("*.tmp"))


def test_a_helper_that_cannot_be_had_leaves_the_reads_in_python(monkeypatch, tmp_path):
    from optgen.runtime import host_ptrs

    monkeypatch.setattr(host_ptrs, "SOURCE", tmp_path / "missing.cpp")  # e.g. a package installed without it
    host_ptrs.helper.cache_clear()
    try:
        assert host_ptrs.helper() is None
    finally:
        host_ptrs.helper.cache_clear()


def _beside_torch_adamw(steps, change, shapes=((6, 5), (300,)), options=dict):
    """optgen's AdamW (C backend) and torch.optim's (for-loop) over the same parameters and gradients, each
    given ``change(k, opt, params)`` before its step k and ``options()`` at construction; asserts they end
    equal, returns optgen's optimizer."""
    params = make_params(list(shapes))
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = optgen.AdamW(params, backend="c", **options()), torch.optim.AdamW(twins, foreach=False, **options())
    for k, grads in enumerate(make_grads(list(shapes), steps)):
        for o, ps in ((opt, params), (ref, twins)):
            change(k, o, ps)
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    for a, b in zip(params, twins):
        assert_close_rel(a.detach(), b.detach())
    return opt


def test_a_tensor_lr_whose_storage_is_swapped_is_read_again():
    """``lr.set_(...)`` keeps the tensor object: the step must read the new storage, as torch.optim does."""

    def swap(k, opt, params):
        if k == 3:
            opt.param_groups[0]["lr"].set_(torch.tensor(0.5))

    _beside_torch_adamw(6, swap, shapes=[(300,)], options=lambda: dict(lr=torch.tensor(0.01)))


def test_a_state_dict_assigned_by_the_user_takes_the_full_path(monkeypatch):
    """``opt.state = defaultdict(dict)`` (a reset some training scripts do) does not count its edits: the fast
    path cannot notice an entry deleted or set there, so such an optimizer steps the full way."""
    import collections

    def reset(k, opt, params):
        if k == 3:
            opt.state = collections.defaultdict(dict, {q: dict(v) for q, v in opt.state.items()})
        if k == 5:
            del opt.state[params[1]]  # a restart of that parameter's moments

    assert _beside_torch_adamw(8, reset)._runner.fast is None


def test_the_tables_do_not_keep_gradients_alive(host_reads):
    """After ``zero_grad(set_to_none=True)`` the last gradients are freed (torch.optim's behaviour): the tables
    hold their addresses, not them, so they do not add a set of gradients to the next backward's peak."""
    import gc
    import weakref

    params = make_params([(6, 5), (300,)])
    opt = optgen.AdamW(params, backend="c")
    refs = []
    for g in make_grads([(6, 5), (300,)], 4):
        for p, gi in zip(params, g):
            p.grad = gi.clone()
            refs.append(weakref.ref(p.grad))
        opt.step()
        opt.zero_grad(set_to_none=True)
    gc.collect()
    assert _c_backend(opt).fast_steps == 3 and all(r() is None for r in refs)


@pytest.mark.parametrize("freed", ["parameter", "gradient", "gradient view", "state"])
def test_a_tensor_whose_storage_was_freed_is_refused_by_name(freed, host_reads):
    """A tensor emptied in place (``untyped_storage().resize_(0)``, as FSDP1 does between uses) reads as a null
    pointer, a view of one (a gradient in a freed flat buffer) as its offset: the kernels would write through
    it. The step refuses it, before anything is modified."""
    params = make_params([(300,), (4, 4)])
    opt = optgen.AdamW(params, backend="c")
    grads = make_grads([(300,), (4, 4)], 4)
    flat = torch.zeros(316)
    for k in range(3):
        if freed == "gradient view":  # DDP's gradient_as_bucket_view: gradients are views of one buffer
            flat[16:].copy_(grads[k][0])
            grads[k][0] = flat[16:]
        run_steps(opt, params, grads[k : k + 1])
    for p, g in zip(params, grads[3]):
        p.grad = g.clone()
    if freed == "gradient view":
        flat[16:].copy_(grads[3][0])
        params[0].grad = flat[16:]
    {"parameter": params[0], "gradient": params[0].grad, "gradient view": flat,
     "state": opt.state[params[0]]["exp_avg"]}[freed].untyped_storage().resize_(0)  # fmt: skip
    before = params[1].detach().clone(), opt.state[params[1]]["exp_avg"].clone()
    what = {"parameter": "a parameter", "gradient": "the gradient of a parameter", "gradient view": "the gradient of a parameter",
            "state": "the state 'exp_avg' of a parameter"}  # fmt: skip
    with pytest.raises(RuntimeError, match=f"AdamW: {what[freed]} of shape \\(300,\\) has no data"):
        opt.step()
    assert torch.equal(params[1], before[0]) and torch.equal(opt.state[params[1]]["exp_avg"], before[1])


@pytest.mark.parametrize("swapped", ["parameter", "parameter, the other dropped", "state", "step", "step set_"])
def test_tensors_swapped_under_their_objects_are_seen(monkeypatch, swapped, host_reads):
    """``torch.utils.swap_tensors`` (and module conversions with ``swap_module_params_on_conversion``) give an
    object another TensorImpl: the fast step must see it, and never read through the old one, which may be
    freed (found by the review of the compiled checks: a use-after-free, and stale updates)."""
    kept = []

    def change(opt, params):
        if swapped.startswith("step"):  # the step count a user sets (the kernels read it from their table)
            step = opt.state[params[1]]["step"]
            if swapped == "step":
                kept.append(torch.tensor(100.0))
                torch.utils.swap_tensors(step, kept[-1])
            else:
                step.set_(torch.tensor(100.0))
            return
        target = opt.state[params[1]]["exp_avg"] if swapped == "state" else params[1]
        other = torch.full_like(target, 0.25)
        torch.utils.swap_tensors(target, torch.nn.Parameter(other) if swapped != "state" else other)
        if not swapped.endswith("dropped"):
            kept.append(other)

    out = _twin_runs(monkeypatch, optgen.AdamW, change)
    for a, b in zip(*out):
        assert torch.equal(a, b)
    if swapped.startswith("step"):  # as torch.optim.AdamW counts: from 100, two steps since
        params = make_params([(4, 4), (300,), ()])
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt, ref = optgen.AdamW(params, backend="c"), torch.optim.AdamW(twins, foreach=False)
        grads = make_grads([(4, 4), (300,), ()], 5, seed=9)
        run_steps(opt, params, grads[:3])
        run_steps(ref, twins, grads[:3])
        change(opt, params)
        ref.state[twins[1]]["step"] = torch.tensor(100.0)
        run_steps(opt, params, grads[3:])
        run_steps(ref, twins, grads[3:])
        assert float(opt.state[params[1]]["step"]) == 102.0
        for a, b in zip(params, twins):
            assert_close_rel(a.detach(), b.detach(), torch.float32, tol=TOL[torch.float32], what=swapped)


def test_parameters_of_a_tensor_subclass_are_checked_from_python():
    """A subclass may override ``.grad`` (``__torch_function__``); the compiled checks read it from C++."""

    class Subclass(torch.nn.Parameter):
        pass

    params = [Subclass(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(300))]
    opt = optgen.AdamW(params, backend="c")
    run_steps(opt, params, make_grads([(4, 4), (300,)], 4))
    assert _c_backend(opt).fast_steps == 3 and opt._runner.fast.compiled is None


@pytest.mark.parametrize("in_c", ["1", "0"])
def test_the_switch_chooses_where_fast_steps_check_and_read(monkeypatch, in_c):
    monkeypatch.setenv("OPTGEN_HOST_READS_IN_C", in_c)
    params = make_params([(4, 4), (300,)])
    opt = optgen.AdamW(params, backend="c")
    run_steps(opt, params, make_grads([(4, 4), (300,)], 4))
    assert _c_backend(opt).fast_steps == 3 and (opt._runner.fast.compiled is not None) == (in_c == "1")


def test_betas_mutated_in_place_are_read_and_checked(monkeypatch):
    """A hyperparameter list edited in place keeps its identity: the step must still see (and check) the new
    values, as torch.optim, which reads the group every step, does."""

    def edit(k, opt, params):
        if k == 2:  # a list where the constructor keeps a tuple
            opt.param_groups[0]["betas"] = [0.8, 0.999]
        if k == 4:
            opt.param_groups[0]["betas"][0] = 0.5

    opt = _beside_torch_adamw(7, edit)
    params = [p for group in opt.param_groups for p in group["params"]]
    opt.param_groups[0]["betas"][1] = 1.5
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="beta"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("change", ["dtype", "shape", "strides", "device", "requires_grad", "layout"])
def test_the_metadata_guard_fails_on_every_change_a_fast_step_cannot_take(change):
    """The fast path's one C++ metadata check (dynamo's private TensorGuards) holds each change the kernels
    would misread: a torch where it stops doing so fails here, not in a training run."""
    from optgen.runtime.steps import _metadata_guard

    tensors = [torch.randn(4, 6), torch.randn(300), torch.randn(())]
    guard = _metadata_guard(tensors)
    assert guard is not None and guard.check(*tensors) and guard.check(*[t.clone() for t in tensors])
    changed = {
        "dtype": lambda t: t.double(),
        "shape": lambda t: t.reshape(6, 4),
        "strides": lambda t: t.t().contiguous().t(),
        "device": lambda t: t.to("meta"),
        "requires_grad": lambda t: t.clone().requires_grad_(),
        "layout": lambda t: t.to_sparse(),
    }[change](tensors[0])
    assert changed.shape == tensors[0].shape or change == "shape"
    assert not guard.check(changed, *tensors[1:])
    assert not guard.check(None, *tensors[1:])  # a parameter without a gradient


def test_steps_without_the_metadata_guard_take_the_full_path(monkeypatch):
    from optgen.runtime import steps

    monkeypatch.setattr(steps, "_metadata_guard", lambda tensors: None)  # a torch without TensorGuards
    monkeypatch.setenv("OPTGEN_HOST_READS_IN_C", "0")  # (the compiled checks do not use them)
    params = make_params([(4, 4), (300,)])
    opt = optgen.AdamW(params, backend="c")
    run_steps(opt, params, make_grads([(4, 4), (300,)], 4))
    assert _c_backend(opt).fast_steps == 0 and opt._runner.fast is None


def test_a_gradient_shrunk_in_place_is_refused_not_read_past(monkeypatch):
    params = make_params([(1000,)])
    opt = optgen.AdamW(params, backend="c")
    run_steps(opt, params, make_grads([(1000,)], 3))
    before = params[0].detach().clone()
    params[0].grad.set_(torch.randn(3))  # the same gradient object
    with pytest.raises(RuntimeError, match=r"gradient of shape \(3,\) for a parameter of shape \(1000,\)"):
        opt.step()
    assert torch.equal(params[0].detach(), before)


@pytest.mark.parametrize("backend", ["c", "torch"])
def test_a_state_of_another_shape_is_refused_before_anything_changes(backend):
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(1000))
    opt = optgen.AdamW([a, b], backend=backend)
    a.grad, b.grad = torch.randn(3), torch.randn(1000)
    opt.step()
    reordered = optgen.AdamW([b, a], lr=0.5, backend=backend)
    with pytest.raises(ValueError, match=r"state 'exp_avg' of parameter 0 has shape \(3,\), and the parameter has shape \(1000,\)"):
        reordered.load_state_dict(opt.state_dict())  # the saved states belong to the other order
    assert not reordered.state and reordered.param_groups[0]["lr"] == 0.5
    # the same found at the step, for a state dict edited after the load
    reordered.load_state_dict({**opt.state_dict(), "param_groups": [{**opt.state_dict()["param_groups"][0], "params": [1, 0]}]})
    reordered.state[b]["exp_avg"] = reordered.state[a]["exp_avg"].clone()
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' has shape \(3,\) for a parameter of shape \(1000,\)"):
        reordered.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    # no state is created for the parameters before the bad one either
    c = torch.nn.Parameter(torch.randn(5))
    fresh = optgen.AdamW([c, b], backend=backend)
    fresh.state[b]["exp_avg"] = torch.zeros(7)
    c.grad = torch.randn(5)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' has shape \(7,\)"):
        fresh.step()
    assert c not in fresh.state


def test_a_truncated_cached_object_is_built_again(tmp_path):
    """An object cut short on disk (a crash while another process wrote it, a full disk) is compiled again
    by the next process that needs it, instead of failing every step. (Processes: an object already mapped by
    this one must not be truncated under it.)"""
    env, log = _compiler_log_env(tmp_path, tmp_path / "cache")
    subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path / "out0.pt")], env=env, check=True, timeout=300)
    (obj,) = (o for o in (tmp_path / "cache" / "c").glob("*.so") if not o.name.startswith("host_ptrs_"))  # the kernels
    obj.write_bytes(obj.read_bytes()[:100])
    subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path / "out1.pt")], env=env, check=True, timeout=300)
    assert len(log.read_text().splitlines()) == 2  # built, then built again
    assert all(torch.equal(a, b) for a, b in zip(torch.load(tmp_path / "out0.pt"), torch.load(tmp_path / "out1.pt")))


def test_an_unwritable_cache_falls_back_with_a_warning(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(blocker / "cache"))  # a directory under a file: cannot exist
    cbuild.toolchain.cache_clear()
    try:
        params = make_params([(4,)])
        ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = optgen.SGD(params, lr=0.1, backend="c")  # its C source is a golden file: only the object needs the cache
        grads = make_grads([(4,)], 2)
        with pytest.warns(cbuild.CKernelsUnavailable, match="cannot build"):
            run_steps(opt, params, grads)
        run_steps(optgen.SGD(ref, lr=0.1, backend="torch"), ref, grads)
        assert torch.equal(params[0], ref[0])
    finally:
        cbuild.toolchain.cache_clear()


def test_cc_with_arguments_and_bad_settings_name_themselves(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", f"{cbuild.toolchain().compiler} -m64")
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    cbuild.toolchain.cache_clear()
    try:
        params = make_params([(7,)])
        opt = optgen.AdamW(params, backend="c")
        run_steps(opt, params, make_grads([(7,)], 1))
        _c_backend(opt)
        assert cbuild.toolchain().prefix[1:] == ("-m64",)
    finally:
        cbuild.toolchain.cache_clear()
    monkeypatch.setenv("OPTGEN_C_CHUNK", "abc")
    with pytest.raises(ValueError, match="OPTGEN_C_CHUNK='abc'"):
        c_backend.chunk_size()


@pytest.mark.parametrize("name", ["d_lr", "HUGE_VAL", "intptr_t", "OG_F32", "og_bits", "double", "sqrt"])
def test_names_the_c_kernels_cannot_declare_are_refused_at_build(name):
    spec = optgen.Spec("Names")
    lr = spec.hyper(lr=0.1)
    other = spec.hyper(**{name: 0.5})
    spec.update(spec.param, spec.param - lr * other * spec.grad)
    with pytest.raises(optgen.SpecError, match=repr(name)):
        optgen.build(spec)
