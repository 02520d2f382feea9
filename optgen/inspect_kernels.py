"""Static kernel report: compile every Triton kernel of a plan for a GPU architecture, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs Triton's real compiler (MLIR, LLVM,
ptxas) on a CPU-only machine and yields PTX and a cubin. The report reads:

* ``registers``/``spills``: from the ``ptxas -v`` log of the very ptxas run that built the cubin (Triton's
  bundled ptxas, Triton's own flags), captured during the compile; ``spills`` is spill-store plus spill-load
  bytes. If the log cannot be captured, ptxas is re-run on the PTX with the same flags; if ptxas cannot run
  at all, both are ``None`` and ``notes`` says why.
* ``shared_bytes``/``num_warps``: the compiled kernel's metadata.
* ``global_loads``/``global_stores``: every ``ld.global``/``st.global`` instruction of the PTX, by form
  (``ld.global.v4.b32`` is a 16-byte vector load of four 32-bit words).
* ``element_loads``/``element_stores``: the same for element data only (see below); ``vectorized`` is true
  when any element-data load is a ``.v2``/``.v4`` vector load.
* ``int64_addressing``: whether the element offsets are computed in 64-bit integers, established by a
  data-flow walk over the PTX (see ``analyze_ptx``).

The plan supplies ``bytes_per_param`` and ``launches_per_step``. Each kernel is compiled in a fresh, temporary
Triton cache (nothing is read from or written to ``~/.triton/cache``, and ptxas always runs, so its log is
the cubin's: Triton 3.9 passes ``--regAllocOptLevel=2``, which can cap a kernel at 128 registers and spill
where a plain ``ptxas -v`` would not).

A process that imported triton with ``TRITON_INTERPRET=1`` cannot compile: Triton decides at import, and its
standard library (``tl.sum``, ``tl.max`` ...) is then interpreted. ``compile_kernel`` raises a RuntimeError
there; ``optgen inspect`` re-runs itself without the variable, and the tests compile in a worker process.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

from .analysis import Plan
from .codegen.abi import axes_args, pass_args, reduce_args
from .codegen.render import load_module
from .runtime.triton_backend import LaunchConfig, fit_config

# Launch defaults of the Triton backend (optgen.runtime.triton_backend.LaunchConfig).
CHUNK = 65536
BLOCK = 1024
REDUCE_BLOCK = 256
NUM_WARPS = 4
ARCHS = (80, 86, 89, 90)

_DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "uint8": "uint8",
                "fp16": "float16", "float16": "float16"}


def arch_number(arch) -> int:
    """``"sm_90"``, ``"sm90"``, ``"90"`` or ``90`` -> 90; other architectures are refused."""
    text = str(arch).strip().lower()
    digits = re.sub(r"^sm_?", "", text)
    if not digits.isdigit() or int(digits) not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}: use one of {', '.join(f'sm_{a}' for a in ARCHS)}")
    return int(digits)


def _tl_dtype(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return value
    name = _DTYPE_NAMES.get(str(value).replace("torch.", "").lower())
    if name is None:
        raise ValueError(f"unsupported element dtype {value!r}: use fp32, bf16 or fp16")
    return getattr(tl, name)


def signature_of(kernel, constexprs: dict, args) -> tuple[dict, dict]:
    """(signature, constexpr values) of a kernel: its runtime arguments typed by the kernel ABI ``args``
    (``optgen.codegen.abi``: the list the template printed the signature from and the launchers fill), every
    other argument a constexpr taken from ``constexprs``."""
    typed = {a.name: (f"*{a.dtype}" if a.pointer else a.dtype) for a in args}
    signature, values = {}, {}
    for name in kernel.arg_names:
        if name in typed:
            signature[name] = typed.pop(name)
        elif name.startswith("_"):
            raise ValueError(f"{_kernel_name(kernel)}: runtime argument {name!r} is not in its ABI")
        else:
            if name not in constexprs:
                raise ValueError(f"{_kernel_name(kernel)}: no value for constexpr {name!r}")
            signature[name] = "constexpr"
            values[name] = constexprs[name]
    if typed:
        raise ValueError(f"{_kernel_name(kernel)}: ABI argument(s) {', '.join(typed)} missing from the kernel")
    return signature, values


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))


def interpreter_active() -> bool:
    """Whether ``triton`` was imported with ``TRITON_INTERPRET=1``.

    Triton decides at import time: its standard library (``tl.sum``, ``tl.max``, ``tl.cdiv`` ...) is then made
    of interpreted functions, which the real compiler cannot inline, so no kernel can be compiled in this
    process. ``optgen inspect`` re-runs itself in a clean process in that case."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.sum, JITFunction)


def _jit_function(kernel):
    """A ``JITFunction`` for ``kernel``: itself, or the Python function of an interpreted kernel."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None or not callable(fn):
        raise TypeError(f"not a Triton kernel: {kernel!r}")
    return JITFunction(fn)


@contextlib.contextmanager
def _compile_environment(cache_dir: str):
    """Triton's real compiler, a private cache, the ptxas log printed (and captured), FP fusion explicit."""
    import triton

    knobs = triton.knobs
    with knobs.runtime.scope(), knobs.cache.scope(), knobs.nvidia.scope(), knobs.language.scope():
        knobs.runtime.interpret = False
        knobs.cache.dir = cache_dir
        knobs.nvidia.dump_ptxas_log = True
        if os.environ.get("TRITON_DEFAULT_FP_FUSION") is None:
            # Triton 3.9's default (fusion on), stated so it does not warn; the scope restores the environment.
            os.environ["TRITON_DEFAULT_FP_FUSION"] = "1"
        yield


@dataclass
class AOTKernel:
    """One kernel compiled ahead of time: the Triton result and what ptxas said about it."""

    name: str
    arch: int
    compiled: object  # triton.compiler.CompiledKernel
    runtime_args: list[str]  # the PTX parameters, in order (``<name>_param_<i>``)
    registers: int | None
    spill_store_bytes: int | None
    spill_load_bytes: int | None
    stack_frame_bytes: int | None
    ptxas_log: str
    notes: list[str] = field(default_factory=list)

    @property
    def ptx(self) -> str:
        return self.compiled.asm["ptx"]

    @property
    def spills(self) -> int | None:
        if self.spill_store_bytes is None or self.spill_load_bytes is None:
            return None
        return self.spill_store_bytes + self.spill_load_bytes


def compile_kernel(
    kernel,
    arch="sm_90",
    dtype_map: dict | None = None,
    *,
    args,
    n_hyper: int | None = None,
    aligned: bool = True,
    chunk: int = CHUNK,
    block: int | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = 3,
) -> AOTKernel:
    """Compile one generated kernel (a pass, a segment-reduce or a reduce step) for ``arch`` with Triton's real compiler;
    ``args``: its runtime arguments, from the kernel ABI (``plan_kernels`` gives them).

    ``dtype_map`` gives the element dtype of buffers, by buffer name (``"param"``) or constexpr name
    (``"DT_param"``), as ``"fp32"``/``"bf16"``/``"fp16"`` or a ``triton.language`` dtype; buffers not named
    are fp32. ``n_hyper`` (the plan's number of hyperparameters) is required by pass and reduce-step kernels.
    ``block`` defaults to the backend's: 1024 for passes and reduce steps, 256 for segment-reduces.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    number = arch_number(arch)
    if interpreter_active():
        raise RuntimeError(
            "ahead-of-time compilation needs a process in which triton was imported without TRITON_INTERPRET=1 "
            "(the interpreter replaces triton.language's standard library): run `optgen inspect` or "
            "`python -m optgen.inspect_kernels` with TRITON_INTERPRET unset"
        )
    jit = _jit_function(kernel)
    name = _kernel_name(jit)
    is_pass = "CHUNK" in jit.arg_names
    dtypes = {}
    for key, value in (dtype_map or {}).items():
        key = key if key.startswith("DT_") else f"DT_{key}"
        dtypes[key] = _tl_dtype(value)
    is_axes = "_rowtot" in jit.arg_names and not is_pass  # a factored plan's reduce step: a pass's block
    constexprs = {"BLOCK": block or (BLOCK if is_pass or is_axes else REDUCE_BLOCK), "CHUNK": chunk, "ALIGNED": bool(aligned)}
    if "N_HYPER" in jit.arg_names:
        if n_hyper is None:
            raise ValueError(f"{name}: n_hyper (len(plan.ir.hypers)) is required to compile a pass kernel")
        constexprs["N_HYPER"] = int(n_hyper)
    for arg in jit.arg_names:
        if arg.startswith("DT_"):
            constexprs[arg] = dtypes.pop(arg, _tl_dtype("fp32"))
    if dtypes:
        raise ValueError(f"{name} has no buffer(s) {', '.join(k[3:] for k in sorted(dtypes))}")
    signature, values = signature_of(jit, constexprs, args)
    source = ASTSource(fn=jit, signature=signature, constexprs=values)
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="optgen-aot-") as cache_dir, _compile_environment(cache_dir):
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", number, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    result = AOTKernel(
        name=name,
        arch=number,
        compiled=compiled,
        runtime_args=[a for a in jit.arg_names if signature[a] != "constexpr"],
        registers=None,
        spill_store_bytes=None,
        spill_load_bytes=None,
        stack_frame_bytes=None,
        ptxas_log=log.getvalue(),
    )
    resources = _parse_ptxas_log(result.ptxas_log, name)
    if resources is None:
        result.ptxas_log, note = _rerun_ptxas(result.ptx, number)
        resources = _parse_ptxas_log(result.ptxas_log, name)
        if note:
            result.notes.append(note)
    if resources is None:
        result.notes.append("registers/spills unknown: no ptxas -v report for this kernel")
    else:
        result.registers, result.stack_frame_bytes, result.spill_store_bytes, result.spill_load_bytes = resources
    return result


def _parse_ptxas_log(log: str, name: str):
    """(registers, stack frame, spill store, spill load bytes) of entry ``name`` in a ``ptxas -v`` log."""
    entry = re.search(rf"Compiling entry function '{re.escape(name)}'(.*?)(?=Compiling entry function|\Z)", log, re.S)
    if not entry:
        return None
    text = entry.group(1)
    regs = re.search(r"Used (\d+) registers", text)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not frame:
        return None
    return int(regs.group(1)), int(frame.group(1)), int(frame.group(2)), int(frame.group(3))


def _rerun_ptxas(ptx: str, arch: int) -> tuple[str, str | None]:
    """Run Triton's ptxas on ``ptx`` with the flags Triton uses for its cubin; (log, note on failure)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        ptxas = get_ptxas(arch).path
        gpu = sm_arch_from_capability(arch)
    except Exception as exc:  # pragma: no cover - depends on the Triton build
        return "", f"ptxas not found in this Triton install ({exc})"
    with tempfile.TemporaryDirectory(prefix="optgen-ptxas-") as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as handle:
            handle.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o", src + ".o"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            return "", f"ptxas could not run: {exc}"
    if out.returncode:
        return out.stdout + out.stderr, f"ptxas failed with exit code {out.returncode}"
    return out.stdout + out.stderr, "registers/spills from a re-run of ptxas (the compile's log was not captured)"


# ---------------------------------------------------------------------------------------------------------
# PTX data flow


@dataclass
class _Instr:
    opcode: str
    dests: tuple[str, ...]
    uses: tuple[str, ...]
    address: tuple[str, ...]  # registers inside [...] (loads and stores)
    param: str | None  # ld.param: the parameter's name


_REG = re.compile(r"%[a-z]+\d+")
_NARROWING = re.compile(r"^cvt(?:\.\w+)*\.[su](?:8|16|32)\.[su]64$")


def _split_operands(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_ptx(ptx: str) -> list[_Instr]:
    """The instructions of a PTX function body (directives, labels and declarations dropped)."""
    out = []
    for line in ptx.splitlines():
        line = line.split("//", 1)[0].strip()
        if not line or line.startswith("."):
            continue
        for stmt in line.split(";"):
            stmt = stmt.strip().lstrip("{").rstrip("}").strip()
            if not stmt or stmt.startswith(".") or stmt.endswith(":") or stmt.startswith(")"):
                continue
            if stmt.startswith("@"):
                stmt = stmt.split(None, 1)[1] if " " in stmt else ""
            head = stmt.split(None, 1)
            if not head:
                continue
            opcode = head[0]
            operands = _split_operands(head[1]) if len(head) > 1 else []
            address = tuple(_REG.findall(" ".join(o for o in operands if o.startswith("["))))
            param = None
            if opcode.startswith("ld.param") and len(operands) > 1:
                param = operands[1].strip("[] ")
            if opcode.startswith(("st.", "bra", "ret", "bar", "red.", "prefetch", "fence", "membar", "exit", "trap")):
                dests, uses = (), tuple(_REG.findall(" ".join(operands)))
            elif operands:
                dests = tuple(_REG.findall(operands[0]))
                uses = tuple(_REG.findall(" ".join(operands[1:])))
            else:
                dests, uses = (), ()
            out.append(_Instr(opcode, dests, uses, address, param))
    return out


class _DataFlow:
    def __init__(self, instrs: list[_Instr]):
        self.instrs = instrs
        self.defs: dict[str, list[int]] = {}
        for i, ins in enumerate(instrs):
            for reg in ins.dests:
                self.defs.setdefault(reg, []).append(i)
        self._params: dict[int, frozenset] = {}

    def slice(self, regs) -> set[int]:
        """Instructions whose results flow into ``regs`` (predicates excluded: they select, not compute)."""
        seen: set[int] = set()
        todo = [r for r in regs if not r.startswith("%p")]
        visited = set(todo)
        while todo:
            reg = todo.pop()
            for i in self.defs.get(reg, ()):
                if i in seen:
                    continue
                seen.add(i)
                for use in self.instrs[i].uses:
                    if use not in visited and not use.startswith("%p"):
                        visited.add(use)
                        todo.append(use)
        return seen

    def params_of_load(self, i: int) -> frozenset:
        """Parameters from which the address of load ``i`` is computed."""
        if i not in self._params:
            self._params[i] = frozenset(
                self.instrs[j].param for j in self.slice(self.instrs[i].address) if self.instrs[j].param
            )
        return self._params[i]

    def forward(self, start: set[int], within: set[int]) -> set[int]:
        """Instructions of ``within`` reachable from ``start`` through register uses."""
        reached = set(start)
        regs = {r for i in start for r in self.instrs[i].dests}
        changed = True
        while changed:
            changed = False
            for i in sorted(within - reached):
                if any(u in regs for u in self.instrs[i].uses):
                    reached.add(i)
                    regs.update(self.instrs[i].dests)
                    changed = True
        return reached


def analyze_ptx(ptx: str, name: str, runtime_args: list[str]) -> dict:
    """Global memory operations of a generated kernel, from a data-flow walk over its PTX.

    PTX parameters are ``<name>_param_<i>``, the kernel's runtime arguments in order. For every ``ld.global``
    and ``st.global`` the backward slice of its address registers (the instructions whose results flow into
    the address) is computed.

    * Element data (pass kernels): accesses whose address is computed from a pointer that was itself loaded
      from a ``_<buffer>_addr`` table (the per-tensor ``data_ptr``). Index tables, hyperparameters, reduction
      tables, partials and the step table are not element data.
    * ``vectorized``: any element-data load is ``.v2``/``.v4``.
    * ``int64_addressing``: the index table with the int64 element/row origin -- ``_chunk_start`` (pass
      kernels: the element data; a factored plan's tiles: the geometry tables ``FACTORED_ORIGINS``) or
      ``_first_chunk`` (segment-reduce kernels: the ``_partials`` rows) -- is
      loaded with a 64-bit load that reaches the address of *every* such access, and no instruction on the
      way from that load to the address narrows an integer (``cvt`` to a 8/16/32-bit integer type, or the
      unpacking of a 64-bit register into 32-bit halves). Then the offsets are formed in 64-bit arithmetic and
      cannot wrap at 2**31 elements. Merely finding ``mul.wide``/``add.s64`` in the PTX would prove nothing:
      every pointer addition is 64-bit, including those of a 32-bit index widened by ``mul.wide.s32``.
      ``None`` when the kernel has no such access. A factored plan's reduce step indexes its states by a
      loop counter: ``_wide_index`` says whether that is 64-bit.
    """
    instrs = parse_ptx(ptx)
    flow = _DataFlow(instrs)
    param_name = {f"{name}_param_{i}": arg for i, arg in enumerate(runtime_args)}
    for ins in instrs:
        if ins.param is not None:
            ins.param = param_name.get(ins.param, ins.param)
    accesses = [i for i, ins in enumerate(instrs) if ins.opcode.startswith(("ld.global", "st.global"))]
    is_pass = "_chunk_start" in runtime_args

    def forms(indices, kind):
        return dict(sorted(Counter(instrs[i].opcode for i in indices if instrs[i].opcode.startswith(kind)).items()))

    def element(i: int) -> bool:
        for j in flow.slice(instrs[i].address):
            if instrs[j].opcode.startswith("ld.global") and any(
                p.endswith("_addr") for p in flow.params_of_load(j)
            ):
                return True
        return False

    if is_pass:
        data = [i for i in accesses if element(i)]
        # a factored plan's tiles: elements at row * C + column, from the int64 geometry tables
        origins = FACTORED_ORIGINS if "_chunk_row" in runtime_args else {"_chunk_start"}
        wide = lambda i: _rooted_wide(flow, instrs, i, origins)  # noqa: E731
    elif "_rowtot" in runtime_args:  # a factored plan's reduce step: per-row/column states, by a loop index
        data = [i for i in accesses if element(i)]
        wide = lambda i: _wide_index(flow, instrs, i)  # noqa: E731
    else:
        data = [i for i in accesses if instrs[i].opcode.startswith("ld.global") and "_partials" in flow.params_of_load(i)]
        wide = lambda i: _rooted_wide(flow, instrs, i, {"_first_chunk"})  # noqa: E731
    int64 = all(wide(i) for i in data) if data else None

    element_loads = forms(data, "ld.global") if is_pass else {}
    return {
        "global_loads": forms(accesses, "ld.global"),
        "global_stores": forms(accesses, "st.global"),
        "element_loads": element_loads,
        "element_stores": forms(data, "st.global") if is_pass else {},
        "vectorized": any(".v2." in k or ".v4." in k for k in element_loads),
        "int64_addressing": int64,
    }


FACTORED_ORIGINS = {"_chunk_row", "_chunk_col", "_chunk_mat", "_cols"}


def _rooted_wide(flow, instrs, i: int, origins: set) -> bool:
    """Access ``i``'s address is rooted in a 64-bit load of the ``origins`` index tables and nothing on the way
    from that load to the address narrows an integer."""
    backward = flow.slice(instrs[i].address)
    roots = {
        j
        for j in backward
        if instrs[j].opcode.startswith("ld.global")
        and instrs[j].opcode.endswith(("b64", "u64", "s64"))
        and origins & set(flow.params_of_load(j))
        and set(flow.params_of_load(j)) <= origins
    }
    return bool(roots) and not any(_narrows(instrs[j]) for j in flow.forward(roots, backward))


def _wide_index(flow, instrs, i: int) -> bool:
    """A reduce step's state access: its index is a loop counter, not a table entry, so no origin load roots it.
    64-bit when nothing on the address's backward slice narrows an integer, loads a 32-bit value or carries a
    32-bit register round a loop (a 32-bit counter adds to itself); the thread and program ids, 32-bit
    themselves, only widen."""
    for j in flow.slice(instrs[i].address):
        ins = instrs[j]
        narrow = [d for d in ins.dests if d.startswith("%r") and not d.startswith("%rd")]
        if _narrows(ins) or (narrow and (ins.opcode.startswith("ld.global") or set(narrow) & set(ins.uses))):
            return False
    return True


def _narrows(ins: _Instr) -> bool:
    if _NARROWING.match(ins.opcode):
        return True
    # mov.b64 {lo, hi}, %rdN: a 64-bit value split into 32-bit halves
    return ins.opcode == "mov.b64" and bool(ins.dests) and all(not d.startswith("%rd") for d in ins.dests)


# ---------------------------------------------------------------------------------------------------------
# Plans


def kernel_report(aot: AOTKernel, role: str, pass_index: int, launched_per_step: bool) -> dict:
    meta = aot.compiled.metadata
    report = {
        "name": aot.name,
        "role": role,
        "pass_index": pass_index,
        "launched_per_step": launched_per_step,
        "registers": aot.registers,
        "spills": aot.spills,
        "spill_store_bytes": aot.spill_store_bytes,
        "spill_load_bytes": aot.spill_load_bytes,
        "stack_frame_bytes": aot.stack_frame_bytes,
        "shared_bytes": meta.shared,
        "num_warps": meta.num_warps,
        "ptx_bytes": len(aot.ptx.encode()),
        "cubin_bytes": len(aot.compiled.asm.get("cubin", b"")),
    }
    report.update(analyze_ptx(aot.ptx, aot.name, aot.runtime_args))
    if aot.notes:
        report["notes"] = list(aot.notes)
    return report


def plan_kernels(plan: Plan):
    """(role, pass index, kernel, launched every step, ABI arguments) for every kernel of the plan's Triton
    module, in launch order.

    Every pass kernel; every reduce kernel (one per pass that produces partials, role ``segment_reduce``),
    launched every step after passes with per-layer reductions (``reduce_after``) or global ones
    (``fold_after``: its extra program folds the global values), so after every producing pass; and the
    per-row/column reduce step of a factored plan (role ``axes``) after the passes that have one."""
    module = load_module(plan, "triton")
    kernels = (module.PASSES, module.REDUCES, module.AXES)
    if any(len(k) != len(plan.passes) for k in kernels):
        raise RuntimeError(f"{module.__name__}: {len(module.PASSES)} pass kernels for {len(plan.passes)} passes")
    out = []
    for p, kernel, reduce_kernel, axes_kernel in zip(plan.passes, *kernels):
        out.append(("pass", p.index, kernel, True, pass_args(plan, p)))
        if reduce_kernel is not None:
            out.append(("segment_reduce", p.index, reduce_kernel, bool(p.reduce_after or p.fold_after), reduce_args(plan, p)))
        elif p.reduce_after or p.fold_after:
            raise RuntimeError(f"{module.__name__}: pass {p.index} needs a segment-reduce kernel and has none")
        if (axes_kernel is not None) != p.axes_after:
            raise RuntimeError(f"{module.__name__}: pass {p.index}'s reduce step and its kernel disagree")
        if axes_kernel is not None:
            out.append(("axes", p.index, axes_kernel, True, axes_args(plan, p)))
    return out


def inspect_plan(plan: Plan, arch: str = "sm_90", dtype="fp32", *, keep_going: bool = False) -> dict:
    """Compile every kernel of ``plan`` for ``arch`` (parameters and gradients of ``dtype``, states fp32) and
    report: the plan's figures and, per kernel, resources and global memory operations (JSON-serialisable).

    ``kernels`` lists every pass kernel and every segment-reduce kernel in launch order, each with
    ``launched_per_step``; ``launches_per_step`` (the plan's) counts those launched every step unsharded.
    With ``keep_going`` a kernel that fails to compile is reported with ``error`` instead of raising."""
    number = arch_number(arch)
    element = _tl_dtype(dtype)
    kernels = []
    for role, index, kernel, launched, args in plan_kernels(plan):
        dtype_map = {}
        if role == "pass":
            dtype_map = {a: element for a in ("DT_param", "DT_grad") if a in kernel.arg_names}
            # 8-bit buffers as the kernels run for tensors of 4096+ elements: their uint8 codes
            dtype_map.update({f"DT_{b}": "uint8" for b, _ in plan.quantized if f"DT_{b}" in kernel.arg_names})
        try:
            block = fit_config(plan, LaunchConfig(chunk=CHUNK, block=BLOCK)).block if role == "pass" else None
            aot = compile_kernel(kernel, number, dtype_map, args=args, n_hyper=len(plan.ir.hypers), block=block)
        except Exception as exc:
            if not keep_going or (isinstance(exc, RuntimeError) and interpreter_active()):
                raise
            kernels.append({"name": _kernel_name(kernel), "role": role, "pass_index": index,
                            "launched_per_step": launched, "error": f"{type(exc).__name__}: {exc}"[-4000:]})
            continue
        kernels.append(kernel_report(aot, role, index, launched))
    return {
        "optimizer": plan.ir.name,
        "flags": dict(plan.ir.flags),
        "arch": f"sm_{number}",
        "dtype": str(dtype),
        "bytes_per_param": plan.bytes_per_param,
        "state_bytes_per_param": plan.state_bytes_per_param,
        "launches_per_step": plan.launches_per_step,
        "kernels": kernels,
    }


def main(argv=None) -> int:
    """``python -m optgen.inspect_kernels [NAME ...] --arch sm_90 --dtype fp32``: a JSON list with the report of
    every variant of the named built-ins (all built-ins by default); kernels that fail carry ``error``."""
    import argparse
    import json

    from .catalog import default_plan, variants
    from .codegen.render import variant_stem
    from .specs import BUILTINS

    parser = argparse.ArgumentParser(prog="python -m optgen.inspect_kernels", description=main.__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"built-ins: {', '.join(BUILTINS)}")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BUILTINS]
    if unknown:
        parser.error(f"unknown optimizer(s) {', '.join(unknown)}; built-ins: {', '.join(BUILTINS)}")
    reports = []
    for key in args.names or list(BUILTINS):
        spec = BUILTINS[key]()
        for flags in variants(spec):
            plan = default_plan(spec, flags)
            report = inspect_plan(plan, args.arch, args.dtype, keep_going=True)
            report["variant"] = variant_stem(plan)
            reports.append(report)
    print(json.dumps(reports, indent=1, sort_keys=True))
    return 1 if any("error" in k for r in reports for k in r["kernels"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
