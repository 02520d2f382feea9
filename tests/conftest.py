"""Shared test setup: the Triton backend runs in the interpreter with small chunks, the C backend too.

The environment must be set before torch, triton or optgen are imported, so it is done at the top of this
file (pytest imports conftest.py before any test module).
"""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["OPTGEN_CHUNK"] = "256"  # CHUNK: tensors of 255/256/257/773 elements straddle chunk boundaries
os.environ["OPTGEN_BLOCK"] = "64"
os.environ["OPTGEN_C_CHUNK"] = "256"  # the C backend's chunks straddle the same boundaries
# One generated-code cache per test session: nothing from ~/.cache/optgen or an earlier run is reused.
_CACHE = tempfile.TemporaryDirectory(prefix="optgen-test-cache-")
os.environ["OPTGEN_CACHE_DIR"] = _CACHE.name

import pytest  # noqa: E402
import torch  # noqa: E402

CHUNK = int(os.environ["OPTGEN_CHUNK"])

BACKENDS = ["torch", "triton", "c"]

# Normwise relative tolerance, max|actual - expected| / max|expected| per tensor, by parameter dtype.
#
# * float32: 1e-6 -- the generated fp32 code against torch.optim's fp32 code (a few ulps of the largest
#   element after 20 steps), and the Triton backend against the torch backend.
# * float16: ~1e-3 -- one fp16 ulp relative to the largest element is 2**-10 ~ 9.8e-4; the two backends
#   round the same fp32 value to fp16 and may differ by one ulp.
# * bfloat16: one bf16 ulp, 2**-7 -- the Triton interpreter truncates fp32 -> bf16 stores instead of rounding
#   to nearest (the torch backend rounds), so the stored parameters may differ by one ulp.
TOL = {
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 2.0**-7,
}

# fp32 optimizers against hand-written float64 references of their formulas after 20 steps. The fp32
# rounding of every step (and of the norms in the trust ratio) accumulates; 1e-5 is ~100 fp32 ulps of the
# largest element, far below any formula mistake (a wrong eps placement or a missing bias correction moves
# parameters by 1e-3 or more relative).
TOL_F64_REFERENCE = 1e-5


def assert_spec_error(make, *fragments, written_in: str) -> str:
    """``optgen.build(make())`` raises a SpecError naming ``fragments`` and the file the spec was written in."""
    import optgen

    with pytest.raises(optgen.SpecError) as info:
        optgen.build(make())
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert written_in in message, f"the message does not say where the spec was written: {message!r}"
    return message


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error max|actual - expected| / max|expected| (absolute if expected is all zero)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff = (a - e).abs().max().item() if a.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close_rel(actual, expected, dtype=torch.float32, tol=None, what=""):
    """Assert normwise closeness within ``TOL[dtype]`` (or ``tol``); lists/tuples compare element by element."""
    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close_rel(a, e, dtype, tol, f"{what}[{i}]")
        return
    limit = TOL[dtype] if tol is None else tol
    assert not torch.isnan(torch.as_tensor(actual, dtype=torch.float64)).any(), f"{what}: NaN in result"
    err = rel_err(torch.as_tensor(actual), torch.as_tensor(expected))
    assert err <= limit, f"{what}: normwise relative error {err:.3e} > {limit:.1e}"


def assert_bitwise(actual, expected, what=""):
    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bitwise(a, e, f"{what}[{i}]")
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(actual, expected), f"{what}: not bitwise equal (max diff {(actual - expected).abs().max()})"


# Odd shapes: a 0-d parameter, a (3,1,4) tensor, sizes around the chunk size and a zero-initialised bias.
ODD_SHAPES = [(), (3, 1, 4), (1,), (7,), (255,), (256,), (257,), (3 * CHUNK + 5,), (7,)]
ZERO_BIAS = len(ODD_SHAPES) - 1  # index of the zero-initialised bias


def make_params(shapes=ODD_SHAPES, seed=0, dtype=torch.float32, zero=(ZERO_BIAS,), scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        value = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
        if i in zero:
            value.zero_()
        params.append(torch.nn.Parameter(value.to(dtype)))
    return params


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def make_grads(shapes, steps, seed=1, dtype=torch.float32, scale=1.0):
    """Deterministic gradients: grads[step][i], from one torch.Generator."""
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes] for _ in range(steps)]


def run_steps(opt, params, grads):
    """Apply ``grads`` (a list of per-step lists) with ``opt``; gradients are fresh copies every step."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params


def compiled_code(backend) -> list:
    """What a backend runs, by identity: its generated module, or (C) its loaded libraries."""
    if backend.name == "c":
        return [id(k) for k in backend._kernels.values()]
    return [id(backend.module)]


def pytest_configure(config):
    # A C build failure falls back to the torch path with this warning: in the tests it is a failure. (Set
    # here, not in pyproject.toml: resolving the class imports optgen, and so triton, which must come after
    # TRITON_INTERPRET is set above.)
    config.addinivalue_line("filterwarnings", "error::optgen.runtime.cbuild.CKernelsUnavailable")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class RecordHostSyncs(TorchDispatchMode):
    """Records every aten._local_scalar_dense call (what .item(), float(t), bool(t) dispatch to)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append(func)
        return func(*args, **(kwargs or {}))


def assert_spec_file_compiles(tmp_path, source: str, variable: str = "spec", arch: str = "sm_90") -> None:
    """``source`` (a spec file's text) compiles with Triton's real compiler, through ``optgen inspect`` in a
    process without the interpreter (this one interprets; the interpreter accepts code the compiler rejects)."""
    import json
    import subprocess
    import sys

    path = tmp_path / f"spec_{abs(hash(source)) % 10**8}.py"
    path.write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "optgen.cli", "inspect", f"{path}:{variable}", "--arch", arch, "--json"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert all("error" not in kernel for kernel in json.loads(done.stdout)["kernels"])
