"""Every generated kernel compiles with Triton's real compiler for sm_80 and sm_90 (no GPU needed): the
interpreter accepts code the compiler rejects. The static report agrees with the plan.

The compiler runs in a subprocess without TRITON_INTERPRET (the interpreter patches triton.language in the
test process)."""

import json
import os
import subprocess
import sys

import pytest

from optgen.analysis import plan as make_plan
from optgen.cli import variants
from optgen.ir import lower
from optgen.specs import BUILTINS


def clean_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def inspect_all(arch, dtype="fp32"):
    proc = subprocess.run(
        [sys.executable, "-m", "optgen.inspect_kernels", "--all", "--arch", arch, "--dtype", dtype],
        capture_output=True, text=True, env=clean_env(), timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def reports(request):
    return request.param, inspect_all(request.param)


def test_every_builtin_variant_compiles_and_matches_its_plan(reports):
    arch, found = reports
    plans = [make_plan(lower(f(), flags)) for f in BUILTINS.values() for flags in variants(f())]
    assert len(found) == len(plans)
    for plan, report in zip(plans, found):
        assert report["arch"] == arch
        assert (report["optimizer"], report["flags"]) == (plan.ir.name, dict(plan.ir.flags))
        assert report["bytes_per_param"] == plan.bytes_per_param
        # one kernel per launch: each pass, plus a segment-reduce after passes with per-layer reductions
        assert len(report["kernels"]) == plan.launches_per_step == report["launches_per_step"]
        assert report["sharded_reduces_compiled"] == report["passes_with_partials"]
        for kernel in report["kernels"]:
            assert kernel["spills"] in (0, None), kernel
            if kernel["role"] == "pass":
                # aligned fp32 buffers: 16-byte vector loads; element offsets in 64-bit arithmetic
                assert kernel["vectorized"], kernel["global_loads"]
                assert kernel["int64_addressing"], kernel["name"]


def test_inspect_cli_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "optgen.cli", "inspect", "lamb", "--arch", "sm_90", "--json"],
        capture_output=True, text=True, env=clean_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["bytes_per_param"] == 40 and report["launches_per_step"] == 3
    assert [k["role"] for k in report["kernels"]] == ["pass", "segment_reduce", "pass"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_parameters_compile(dtype):
    for report in inspect_all("sm_90", dtype):
        assert all(k["spills"] in (0, None) for k in report["kernels"])
