"""Every generated kernel compiles with Triton's real compiler for sm_80 and sm_90 (no GPU needed): the
interpreter accepts code the compiler rejects. The static report agrees with the plan.

Triton decides at import whether it interprets (conftest sets TRITON_INTERPRET=1 for the runtime tests), and
an interpreting process cannot compile (its ``tl.sum``/``tl.max`` are interpreted functions). So this file is
also the compile worker: ``python tests/test_aot.py sm_90`` compiles everything for one architecture in a
clean process and prints JSON; a session fixture runs one worker per architecture, concurrently, and the
tests below (one per kernel and architecture) read their results."""

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import triton
import triton.language as tl

from optgen import transforms
from optgen.analysis import plan as make_plan
from optgen.catalog import default_plan, variants
from optgen.codegen.abi import KernelArg
from optgen.codegen.render import variant_stem
from optgen.inspect_kernels import (
    BLOCK,
    NUM_WARPS,
    compile_kernel,
    inspect_plan,
    interpreter_active,
    kernel_report,
    plan_kernels,
)
from optgen.ir import lower
from optgen.runtime import autotune
from optgen.specs import BUILTINS

ARCHS = ["sm_80", "sm_90"]
REPO = Path(__file__).resolve().parents[1]


def builtin_plans() -> dict:
    """Every flag variant of every built-in, and the variant whose flags are per-group switches (param groups
    that disagree on them) with maximize per group too."""
    plans = {variant_stem(p): p for f in BUILTINS.values() for p in (default_plan(f(), fl) for fl in variants(f()))}
    for f in BUILTINS.values():
        flags = tuple(flag.name for flag in f().flags)
        for value in (False, True) if f().shape_flags else (False,):
            shape = {flag.name: value for flag in f().shape_flags}
            ir = transforms.apply(lower(f(), shape, runtime=flags), maximize_="runtime")
            plans[f"{variant_stem(make_plan(ir))}__per_group"] = make_plan(ir)
    # 8-bit states in the row-tile loops (state_format="8bit" on CAME; not a built-in's default)
    came = BUILTINS["came"]()
    ir = transforms.apply(lower(came, {flag.name: True for flag in came.shape_flags}), quantized=None)
    plans[f"{variant_stem(make_plan(ir))}__8bit"] = make_plan(ir)
    return plans


PLANS = builtin_plans()
ADAM, ADAMW = "adam__amsgrad_0__decoupled_weight_decay_0", "adamw__amsgrad_0__decoupled_weight_decay_1"
# (variant, role, pass index, kernel name, launched every step), in launch order
KERNELS = [
    (stem, role, index, kernel.fn.__name__, launched)
    for stem, plan in PLANS.items()
    for role, index, kernel, launched, _ in plan_kernels(plan)
]
LAMB = [stem for stem, plan in PLANS.items() if plan.ir.name == "LAMB"]
LAMB_PASSES = [(stem, index, name) for stem, role, index, name, _ in KERNELS if stem in LAMB and role == "pass"]


# Controls for the detectors: the same kernel with the int64 chunk start kept 64-bit, and narrowed to int32.
CONTROL_ARGS = (
    KernelArg("_chunk_start", True, "i64", "[chunks]"),
    KernelArg("_numel", True, "i64", "[tensors]"),
    KernelArg("_x_addr", True, "i64", "[tensors]"),
)
@triton.jit
def wide_pass(_chunk_start, _numel, _x_addr, DT_x: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    start = tl.load(_chunk_start + tl.program_id(0))
    ptr = tl.load(_x_addr).to(tl.pointer_type(DT_x))
    offs = start + tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.load(ptr + offs) * 2)


@triton.jit
def narrow_pass(_chunk_start, _numel, _x_addr, DT_x: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    start = tl.load(_chunk_start + tl.program_id(0)).to(tl.int32)
    ptr = tl.load(_x_addr).to(tl.pointer_type(DT_x))
    offs = start + tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.load(ptr + offs) * 2)


# ... and a reduce step's loop over a tensor's rows, counted in int64 and in int32.
AXES_CONTROL_ARGS = (
    KernelArg("_rows", True, "i64", "[tensors]"),
    KernelArg("_rowtot", True, "fp64", "[rows]"),
    KernelArg("_x_addr", True, "i64", "[tensors]"),
)


@triton.jit
def wide_axes(_rows, _rowtot, _x_addr, DT_x: tl.constexpr, BLOCK: tl.constexpr):
    ptr = tl.load(_x_addr + tl.program_id(0)).to(tl.pointer_type(DT_x))
    n = tl.load(_rows + tl.program_id(0))
    for x0 in range(0, n, BLOCK):
        x = x0 + tl.arange(0, BLOCK)
        tl.store(ptr + x, tl.load(_rowtot + x, mask=x < n).to(DT_x), mask=x < n)


@triton.jit
def narrow_axes(_rows, _rowtot, _x_addr, DT_x: tl.constexpr, BLOCK: tl.constexpr):
    ptr = tl.load(_x_addr + tl.program_id(0)).to(tl.pointer_type(DT_x))
    n = tl.load(_rows + tl.program_id(0)).to(tl.int32)
    for x0 in range(0, n, BLOCK):
        x = x0 + tl.arange(0, BLOCK)
        tl.store(ptr + x, tl.load(_rowtot + x, mask=x < n).to(DT_x), mask=x < n)


TUNE_CORNERS = [
    (max(autotune.CHUNKS), max(autotune.BLOCKS), max(autotune.WARPS), min(autotune.STAGES)),
    (min(autotune.CHUNKS), min(autotune.BLOCKS), min(autotune.WARPS), max(autotune.STAGES)),
]


def _guard(fn):
    try:
        return fn()
    except Exception:
        return {"error": traceback.format_exc()[-4000:]}


def worker(arch: str) -> dict:
    """Compile for ``arch``: every kernel of every built-in variant (fp32, aligned), LAMB's pass kernels with
    bf16 parameters and gradients, and the detector controls."""
    out = {"reports": {}, "bf16": {}, "controls": {}}
    for stem, plan in PLANS.items():
        out["reports"][stem] = _guard(lambda plan=plan: inspect_plan(plan, arch, keep_going=True))
    for stem in LAMB:
        n_hyper = len(PLANS[stem].ir.hypers)
        for role, index, kernel, _, args in plan_kernels(PLANS[stem]):
            if role == "pass":
                low = {b: "bf16" for b in ("param", "grad") if f"DT_{b}" in kernel.arg_names}
                out["bf16"][kernel.fn.__name__] = _guard(
                    lambda k=kernel, i=index, n=n_hyper, low=low, a=args: kernel_report(
                        compile_kernel(k, arch, low, args=a, n_hyper=n), "pass", i, True
                    )
                )
    # the corners of the autotuner's search space, for LAMB's default variant (the autotuner times whatever
    # compiles; a config that fails to compile on the GPU is skipped there, so here they must all compile)
    out["tuned"] = {}
    lamb = next(stem for stem in LAMB if stem.startswith("lamb__bias_correction_1__eps_inside_sqrt_0"))
    for role, index, kernel, _, args in plan_kernels(PLANS[lamb]):
        if role != "pass":
            continue
        for chunk, block, warps, stages in TUNE_CORNERS:
            out["tuned"][f"{kernel.fn.__name__}/{block}/{warps}/{stages}"] = _guard(
                lambda k=kernel, i=index, c=chunk, b=block, w=warps, s=stages, a=args: kernel_report(
                    compile_kernel(k, arch, args=a, n_hyper=len(PLANS[lamb].ir.hypers), chunk=c, block=b, num_warps=w, num_stages=s),
                    "pass",
                    i,
                    True,
                )
            )
    _, _, adamw, _, adamw_args = plan_kernels(PLANS[ADAMW])[0]
    controls = {
        "adamw_unaligned": lambda: compile_kernel(adamw, arch, args=adamw_args, n_hyper=len(PLANS[ADAMW].ir.hypers), aligned=False),
        "wide": lambda: compile_kernel(wide_pass, arch, args=CONTROL_ARGS),
        "narrow": lambda: compile_kernel(narrow_pass, arch, args=CONTROL_ARGS),
        "wide_axes": lambda: compile_kernel(wide_axes, arch, args=AXES_CONTROL_ARGS),
        "narrow_axes": lambda: compile_kernel(narrow_axes, arch, args=AXES_CONTROL_ARGS),
    }
    for name, build in controls.items():
        out["controls"][name] = _guard(lambda build=build: kernel_report(build(), "pass", 0, True))
    return out


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


@pytest.fixture(scope="session")
def compiled():
    """{arch: worker output}; the workers run concurrently, one per architecture."""
    procs = {
        arch: subprocess.Popen(
            [sys.executable, __file__, arch], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=REPO
        )
        for arch in ARCHS
    }
    out = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{arch} worker failed:\n{stderr[-5000:]}"
        out[arch] = json.loads(stdout)
    return out


def kernel_entry(compiled, arch, stem, name):
    report = compiled[arch]["reports"][stem]
    assert "error" not in report, report["error"]
    found = {k["name"]: k for k in report["kernels"]}
    assert name in found, f"{name} missing from the {arch} report of {stem}"
    kernel = found[name]
    assert "error" not in kernel, f"{name} does not compile for {arch}:\n{kernel['error']}"
    return kernel


def vector_loads_per_buffer(dtype_bytes: int) -> int:
    """16-byte loads per thread per buffer in the unmasked loop: BLOCK elements over 32 * NUM_WARPS threads."""
    return BLOCK // (32 * NUM_WARPS) * dtype_bytes // 16


# The seed's optimizers (and SGD/Adam/AdamW) must not spill; catalog kernels may spill a little under
# Triton's --regAllocOptLevel=2 register cap (measured: layer-adaptive Lion pass 0, 8 B on sm_90) -- reported,
# bounded here, and a tuning item (num_warps 8 halves the per-thread work).
CORE = ("sgd", "adam", "adamw", "lars", "lamb", "nvlamb")
CATALOG_SPILL_BYTES = 64


def assert_resources(kernel):
    assert isinstance(kernel["registers"], int) and 0 < kernel["registers"] <= 255, kernel
    # (the 8-bit built-ins are catalog kernels: measured up to 24 B on sm_80 at 48-56 registers, the ptxas cap)
    core = kernel["name"].startswith(CORE) and not kernel["name"].startswith("larsoptax") and "8bit" not in kernel["name"]
    limit = 0 if core else CATALOG_SPILL_BYTES
    assert kernel["spills"] <= limit, f"{kernel['name']} spills {kernel['spills']} bytes"
    assert kernel["num_warps"] == NUM_WARPS
    assert kernel["ptx_bytes"] > 0 and kernel["shared_bytes"] >= 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("stem", "role", "index", "name", "launched"), KERNELS, ids=[k[3] for k in KERNELS])
def test_kernel_compiles(compiled, arch, stem, role, index, name, launched):
    kernel = kernel_entry(compiled, arch, stem, name)
    assert (kernel["role"], kernel["pass_index"], kernel["launched_per_step"]) == (role, index, launched)
    assert_resources(kernel)
    # element offsets in 64-bit arithmetic from the int64 chunk start (rows from the int64 first chunk)
    assert kernel["int64_addressing"] is True, kernel
    if role == "pass" and PLANS[stem].ir.factored:
        # a tile's rows are masked to its columns (any C): element accesses are scalar (a GPU to measure first)
        assert kernel["element_loads"] and not kernel["vectorized"]
    elif role == "pass" and PLANS[stem].quantized:
        # 8-bit plans run blocks of 256 elements (2 a thread): in the unmasked loop each fp32 buffer is one 8-byte
        # vector access a thread, each 8-bit buffer's codes one 16-bit access (the map lookups are gathers)
        p = PLANS[stem].passes[index]
        eight = {b for b, _ in PLANS[stem].quantized}
        stored = [b for b, _ in p.stores]
        assert kernel["vectorized"]
        assert kernel["element_loads"].get("ld.global.v2.b32", 0) == sum(ld.buffer not in eight for ld in p.loads)
        assert kernel["element_loads"].get("ld.global.b16", 0) == sum(ld.buffer in eight for ld in p.loads)
        assert kernel["element_stores"].get("st.global.v2.b32", 0) == sum(b not in eight for b in stored)
        assert kernel["element_stores"].get("st.global.b16", 0) == sum(b in eight for b in stored)
    elif role == "pass":
        # aligned fp32 buffers: every load and store of the unmasked loop is a 16-byte vector access
        p = PLANS[stem].passes[index]
        v4 = vector_loads_per_buffer(4)
        assert kernel["vectorized"]
        assert kernel["element_loads"].get("ld.global.v4.b32") == v4 * len(p.loads), kernel["element_loads"]
        assert kernel["element_stores"].get("st.global.v4.b32", 0) == v4 * len(p.stores), kernel["element_stores"]
    else:
        assert not kernel["element_loads"] and not kernel["vectorized"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stem", list(PLANS))
def test_report_matches_plan(compiled, arch, stem):
    plan, report = PLANS[stem], compiled[arch]["reports"][stem]
    assert "error" not in report, report["error"]
    assert report["arch"] == arch and report["dtype"] == "fp32"
    assert (report["optimizer"], report["flags"]) == (plan.ir.name, dict(plan.ir.flags))
    assert report["bytes_per_param"] == plan.bytes_per_param
    assert report["launches_per_step"] == plan.launches_per_step
    expected = [(name, role, index) for s, role, index, name, _ in KERNELS if s == stem]
    assert [(k["name"], k["role"], k["pass_index"]) for k in report["kernels"]] == expected
    # one launch per pass kernel and per reduce kernel: every pass with per-layer or global reductions is followed
    # by its reduce launch (segment-reduce of per-layer values and/or the fold of global values), every pass with
    # per-row/column ones by its reduce step
    launched = [k for k in report["kernels"] if k["launched_per_step"]]
    reduces = sum(bool(p.reduce_after or p.fold_after) for p in plan.passes)
    steps = sum(p.axes_after for p in plan.passes)
    assert len(launched) == plan.launches_per_step == len(plan.passes) + reduces + steps
    assert sum(k["role"] == "pass" for k in report["kernels"]) == len(plan.passes)
    assert sum(k["role"] == "segment_reduce" for k in report["kernels"]) == sum(bool(p.produces) for p in plan.passes)
    assert sum(k["role"] == "axes" for k in report["kernels"]) == steps
    json.dumps(report)  # JSON-serialisable as it is


@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_elementwise_loads_are_vectorized_when_aligned(compiled, arch):
    plan = PLANS[ADAMW]
    (kernel,) = compiled[arch]["reports"][ADAMW]["kernels"]
    loads = len(plan.passes[0].loads)  # param, grad, exp_avg, exp_avg_sq
    assert loads == 4
    assert kernel["element_loads"]["ld.global.v4.b32"] == loads * vector_loads_per_buffer(4)
    assert kernel["spills"] == 0
    # the control: unaligned buffers (ALIGNED=False) give scalar loads only, so the detector is not vacuous
    unaligned = compiled[arch]["controls"]["adamw_unaligned"]
    assert "error" not in unaligned, unaligned["error"]
    assert not unaligned["vectorized"]
    assert all(".v" not in form for form in unaligned["element_loads"]), unaligned["element_loads"]
    assert unaligned["int64_addressing"] is True


@pytest.mark.parametrize("arch", ARCHS)
def test_int64_detector_controls(compiled, arch):
    wide, narrow = compiled[arch]["controls"]["wide"], compiled[arch]["controls"]["narrow"]
    assert "error" not in wide and "error" not in narrow, (wide, narrow)
    assert wide["int64_addressing"] is True
    assert narrow["int64_addressing"] is False
    wide, narrow = compiled[arch]["controls"]["wide_axes"], compiled[arch]["controls"]["narrow_axes"]
    assert "error" not in wide and "error" not in narrow, (wide, narrow)
    assert wide["int64_addressing"] is True
    assert narrow["int64_addressing"] is False


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("stem", "index", "name"), LAMB_PASSES, ids=[n for _, _, n in LAMB_PASSES])
def test_lamb_pass_kernels_compile_with_bf16_parameters(compiled, arch, stem, index, name):
    kernel = compiled[arch]["bf16"][name]
    assert "error" not in kernel, f"{name} with bf16 param/grad does not compile for {arch}:\n{kernel['error']}"
    assert_resources(kernel)
    assert kernel["int64_addressing"] is True
    # bf16 param/grad: one 16-byte load per thread; fp32 states: two
    p = PLANS[stem].passes[index]
    expected = sum(vector_loads_per_buffer(2 if ld.buffer in ("param", "grad") else 4) for ld in p.loads)
    assert kernel["vectorized"]
    assert kernel["element_loads"].get("ld.global.v4.b32") == expected, kernel["element_loads"]


@pytest.mark.parametrize("arch", ARCHS)
def test_autotune_search_space_corners_compile(compiled, arch):
    tuned = compiled[arch]["tuned"]
    assert len(tuned) == 2 * len(TUNE_CORNERS)
    for name, kernel in tuned.items():
        assert "error" not in kernel, f"{name} does not compile for {arch}:\n{kernel['error']}"
        assert 0 < kernel["registers"] <= 255 and kernel["int64_addressing"] is True, (name, kernel)
        assert kernel["num_warps"] == int(name.split("/")[2])


def test_compile_refuses_an_interpreting_process():
    _, _, kernel, _, args = plan_kernels(PLANS[ADAM])[0]
    if interpreter_active():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            compile_kernel(kernel, "sm_90", args=args, n_hyper=len(PLANS[ADAM].ir.hypers))
    else:  # the suite run with TRITON_INTERPRET=0: compiling in-process works
        assert compile_kernel(kernel, "sm_90", args=args, n_hyper=len(PLANS[ADAM].ir.hypers)).registers


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "optgen.cli", "inspect", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )


def test_inspect_cli_json():
    # run from an interpreting environment (as the test process is): inspect re-runs itself without it
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = run_cli("lamb", "--arch", "sm_90", "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    plan = PLANS[variant_stem(make_plan(lower(BUILTINS["lamb"](), {})))]
    assert report["arch"] == "sm_90"
    assert report["bytes_per_param"] == plan.bytes_per_param == 40
    assert report["state_bytes_per_param"] == plan.state_bytes_per_param == 8
    assert report["launches_per_step"] == plan.launches_per_step == 3
    assert [k["role"] for k in report["kernels"]] == ["pass", "segment_reduce", "pass"]
    assert all(k["spills"] == 0 and k["registers"] for k in report["kernels"])


def test_inspect_cli_text_and_errors():
    proc = run_cli("adamw", "--arch", "80", env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on sm_80" in proc.stdout and f"{ADAMW}_pass_0 [pass 0]" in proc.stdout and "vectorized True" in proc.stdout
    bad = run_cli("adamw", "--arch", "sm_70", env=clean_env())
    assert bad.returncode == 2 and "unsupported arch" in bad.stderr


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1]), sort_keys=True))
