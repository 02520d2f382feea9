"""Static kernel report: compile every Triton kernel of a plan for a GPU architecture, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` builds PTX and cubin on a CPU machine. The
report reads them: registers and spills (from ``ptxas -v``, Triton's bundled ptxas), shared memory, and the
global loads/stores of the PTX by form (``ld.global.v4.b32`` is a vectorised 16-byte load). The plan supplies
``bytes_per_param`` and ``launches_per_step``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

from .analysis import Plan
from .codegen.render import load_module

_POINTERS = {
    "_chunk_tensor": "*i32",
    "_chunk_start": "*i64",
    "_numel": "*i64",
    "_group": "*i32",
    "_step": "*fp32",
    "_hyper": "*fp64",
    "_partials": "*fp64",
    "_first_chunk": "*i64",
    "_n_chunks": "*i64",
    "_out": "*fp64",
}
DEFAULTS = {"CHUNK": 65536, "BLOCK": 1024, "REDUCE_BLOCK": 256, "num_warps": 4}


def _arch_number(arch: str) -> int:
    digits = re.sub(r"^sm_?", "", str(arch))
    if digits not in ("80", "86", "89", "90"):
        raise ValueError(f"unsupported arch {arch!r}: use sm_80 or sm_90")
    return int(digits)


def _signature(kernel, constexprs: dict) -> tuple[dict, dict]:
    """Argument types by the templates' naming convention (the same for every optimizer)."""
    signature, values = {}, {}
    for name in kernel.arg_names:
        if name in _POINTERS:
            signature[name] = _POINTERS[name]
        elif name.endswith("_addr"):
            signature[name] = "*i64"
        elif name.startswith("_table_"):
            signature[name] = "*fp64"
        elif name.startswith("_dev_"):
            signature[name] = "*fp32"
        elif name.startswith("_rows_") or name == "_chunk_offset":
            signature[name] = "i64"
        else:
            signature[name] = "constexpr"
            values[name] = constexprs[name]
    return signature, values


def _ptxas_resources(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spilled bytes) from Triton's bundled ptxas; (None, None) if it cannot run here."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as handle:
            handle.write(ptx)
        suffix = "a" if arch == 90 else ""
        try:
            out = subprocess.run(
                [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "kernel.cubin")],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except (OSError, subprocess.SubprocessError):
            return None, None
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    return (int(regs.group(1)) if regs else None), (sum(int(s) for s in spills) if regs else None)


def compile_kernel(kernel, arch: str, constexprs: dict, num_warps: int = 4):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated explicitly
    if not hasattr(kernel, "cache_key"):
        # The interpreter patches triton.language in this process; the real compiler must run in another.
        raise RuntimeError(
            "ahead-of-time compilation needs a process without TRITON_INTERPRET=1 "
            "(run `optgen inspect` or `python -m optgen.inspect_kernels --all` in a clean environment)"
        )
    signature, values = _signature(kernel, constexprs)
    source = ASTSource(fn=kernel, signature=signature, constexprs=values)
    return triton.compile(source, target=GPUTarget("cuda", _arch_number(arch), 32), options={"num_warps": num_warps})


def _memory_ops(ptx: str, kind: str) -> dict[str, int]:
    return dict(sorted(Counter(re.findall(rf"\b{kind}\.global(?:\.[\w]+)+", ptx)).items()))


def inspect_plan(plan: Plan, arch: str = "sm_90", dtype: str = "fp32") -> dict:
    """Compile each kernel of ``plan`` for ``arch`` (parameters and gradients of ``dtype``) and report."""
    import triton.language as tl

    element = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[dtype]
    module = load_module(plan, "triton")
    arch_number = _arch_number(arch)
    kernels = []
    for p, kernel, reduce_kernel in zip(plan.passes, module.PASSES, module.REDUCES):
        constexprs = {
            "N_HYPER": len(plan.ir.hypers),
            "CHUNK": DEFAULTS["CHUNK"],
            "BLOCK": DEFAULTS["BLOCK"],
            "ALIGNED": True,
        }
        for name in kernel.arg_names:
            if name.startswith("DT_"):
                constexprs[name] = element if name in ("DT_param", "DT_grad") else tl.float32
        entries = [("pass", kernel, constexprs)]
        if p.reduce_after:
            entries.append(("segment_reduce", reduce_kernel, {"BLOCK": DEFAULTS["REDUCE_BLOCK"]}))
        for role, fn, values in entries:
            compiled = compile_kernel(fn, arch, values, DEFAULTS["num_warps"])
            ptx = compiled.asm["ptx"]
            registers, spills = _ptxas_resources(ptx, arch_number)
            loads, stores = _memory_ops(ptx, "ld"), _memory_ops(ptx, "st")
            kernels.append(
                {
                    "name": fn.fn.__name__,
                    "role": role,
                    "pass_index": p.index,
                    "registers": registers,
                    "spills": spills,
                    "shared_bytes": compiled.metadata.shared,
                    "num_warps": compiled.metadata.num_warps,
                    "global_loads": loads,
                    "global_stores": stores,
                    "vectorized": any(".v2." in k or ".v4." in k for k in loads),
                    # element offsets are int64: 64-bit integer arithmetic on them (mul.wide/add.s64/shl.b64)
                    "int64_addressing": bool(re.search(r"\b(?:mul\.wide\.s32|add\.s64|shl\.b64|mad\.wide)", ptx)),
                    "ptx_bytes": len(ptx),
                }
            )
    return {
        "optimizer": plan.ir.name,
        "flags": dict(plan.ir.flags),
        "arch": f"sm_{arch_number}",
        "dtype": dtype,
        "bytes_per_param": plan.bytes_per_param,
        "launches_per_step": plan.launches_per_step,
        "kernels": kernels,
    }


def main(argv=None) -> int:
    """``python -m optgen.inspect_kernels --all --arch sm_90``: the JSON reports of every built-in variant."""
    import argparse
    import json

    from .analysis import plan as make_plan
    from .cli import variants
    from .ir import lower
    from .specs import BUILTINS

    parser = argparse.ArgumentParser(prog="python -m optgen.inspect_kernels")
    parser.add_argument("--all", action="store_true", required=True)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args(argv)
    reports = []
    for factory in BUILTINS.values():
        for flags in variants(factory()):
            plan = make_plan(lower(factory(), flags))
            report = inspect_plan(plan, args.arch, args.dtype)
            module = load_module(plan, "triton")
            # the segment-reduce kernels only launched under sharding compile too
            report["sharded_reduces_compiled"] = sum(
                1 for r in module.REDUCES if r is not None and compile_kernel(r, args.arch, {"BLOCK": DEFAULTS["REDUCE_BLOCK"]})
            )
            report["passes_with_partials"] = sum(1 for p in plan.passes if p.produces)
            reports.append(report)
    print(json.dumps(reports, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
