"""The torch backend: runs the generated pure-torch passes one parameter at a time.

It works on any device and dtype, and is the oracle the Triton kernels are tested against. Math runs in
fp32 (fp64 for fp64 parameters). Per-layer reductions are the values the pass returns; global ones are
summed over all parameters in a fixed order. No ``.item()``: nothing here waits for the device.

The fast CPU path (``compiled``): op by op, a pass makes a temporary per operation and reads and writes each
one from memory. Instead each pass is traced once (``torch.fx``) and split in two:

* a *prologue*: everything that depends only on 0-d inputs (hyperparameters, the step count, finished
  reductions, GradScaler's scalars): bias corrections, the trust ratio. It runs eagerly, ONCE per pass for
  all parameters, on [n_params] tensors (its operations are element-wise; hyperparameters of several groups
  and the per-layer norms are stacked), not once per element as it would inside a compiled loop;
* a *body*: the element-wise work and the per-layer reductions over 1-D views of the buffers, traced with
  symbolic sizes (``make_fx``) and compiled by ``torch._inductor.standalone_compile`` (Inductor's C++
  backend: one vectorised loop per pass; OpenMP for parameters of 2**15 elements and more, a serial twin for
  smaller ones). No dynamo at run time: a call costs ~10 us. Older torch without that API:
  ``torch.compile(dynamic=True)`` of the body.

Compiled once per (pass, dtypes) and process: the sizes are symbolic (every parameter is passed flat, so 1-D,
2-D and 4-D parameters share one kernel) and hyperparameters are 0-d tensors, so neither the number or shapes
of the parameters nor a new lr recompiles. ``compile_stats()`` counts the kernels compiled. Two adjustments
to Inductor apply to these compiles only (``_our_inductor_config``): a post-grad pass that puts the state
stores before the reductions (LAMB's first pass is then one loop, not two) and single-instruction fp32 ->
fp64 vector conversions for the fp64 norm accumulators.

When it is used (``OPTGEN_COMPILE``): ``auto`` (default) on CPU tensors when the step updates at least
``OPTGEN_COMPILE_MIN_NUMEL`` elements (default 2**20: below that the one-time compile, seconds, does not pay
for itself, and small test models stay on the eager path); ``1`` always (any device: on CUDA Inductor emits
Triton); ``0`` never. Parameters with fewer than 2 elements or non-contiguous buffers take the eager path
inside a compiled step. If tracing or compiling fails (no C++ compiler, an unsupported operation), the
backend warns once and stays eager.
"""

from __future__ import annotations

import contextlib
import operator
import os
import warnings

import torch

from ..codegen.render import load_module

COMPILE_ENV = "OPTGEN_COMPILE"
MIN_NUMEL_ENV = "OPTGEN_COMPILE_MIN_NUMEL"
DEFAULT_MIN_NUMEL = 1 << 20

_STATS = {"compiles": 0, "failures": 0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def compile_mode() -> str:
    """``OPTGEN_COMPILE``: 'auto' (default), 'on' (1/true/on) or 'off' (0/false/off)."""
    value = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if value in ("0", "false", "off", "no"):
        return "off"
    if value in ("1", "true", "on", "yes"):
        return "on"
    return "auto"


def _env_int(name: str, default: int) -> int:
    try:
        return int(float(os.environ.get(name, default)))
    except ValueError:
        return default


def compile_min_numel() -> int:
    return _env_int(MIN_NUMEL_ENV, DEFAULT_MIN_NUMEL)


def compile_stats() -> dict:
    """Graphs compiled by the fast path in this process (``compiles``) and compile failures."""
    return dict(_STATS)


class TorchBackend:
    name = "torch"

    def __init__(self, plan):
        self.plan = plan
        self.module = load_module(plan, "torch")
        self._hyper_cache: dict = {}
        self.compile_mode = compile_mode()
        self.compile_min_numel = compile_min_numel()
        self.last_step_compiled = False

    def _hyper_tensors(self, values: tuple, device, dtype) -> dict[str, torch.Tensor]:
        names = [h.name for h in self.plan.ir.hypers]
        if any(isinstance(v, torch.Tensor) for v in values):  # device tensors: copied on the device, no sync
            return {n: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype, device=device)) for n, v in zip(names, values)}
        key = (values, device, dtype)
        cached = self._hyper_cache.get(key)
        if cached is None:
            stacked = torch.tensor(values, dtype=dtype, device=device)
            cached = dict(zip(names, stacked.unbind()))
            if len(self._hyper_cache) > 64:
                self._hyper_cache.clear()
            self._hyper_cache[key] = cached
        return cached

    def _use_compiled(self, items) -> bool:
        mode = self.compile_mode
        if mode == "off" or not items or not hasattr(torch, "compile"):
            return False
        if torch.compiler.is_compiling():  # inside the user's torch.compile: let dynamo trace the eager path
            return False
        if mode == "on":
            return True
        device = items[0][0].device
        if device.type != "cpu":
            return False
        return sum(item[0].numel() for item in items) >= self.compile_min_numel

    def step(self, items, scratch_of, device_scalars=None, reducer=None) -> None:
        """``items``: one per parameter with a gradient: (param, grad, state dict, hyper values tuple)."""
        self.last_step_compiled = self._use_compiled(items)
        if self.last_step_compiled:
            self._step_compiled(items, scratch_of, device_scalars or {}, reducer)
        else:
            self._step_eager(items, scratch_of, device_scalars or {}, reducer)
        self._advance(items, device_scalars or {})

    # -- eager: every operation of a pass, one parameter at a time -------------------------------------

    def _step_eager(self, items, scratch_of, device_scalars, reducer) -> None:
        plan = self.plan
        contexts = []
        for param, grad, state, values in items:
            dtype = compute_dtype(param.dtype)
            t = state["step"].to(device=param.device, dtype=torch.float64) + 1
            buffers = {"param": param, "grad": grad}
            for name in plan.ir.state_names:
                buffers[name] = state[name]
            for name in plan.scratch:
                buffers[name] = scratch_of(param, name)
            hypers = self._hyper_tensors(values, param.device, torch.float64)
            contexts.append((buffers, dtype, t, hypers, param.numel() == 0))
        finished: list[dict[str, torch.Tensor]] = [dict() for _ in items]
        for p, fn in zip(plan.passes, self.module.PASSES):
            results = []
            for (buffers, dtype, t, hypers, empty), reds in zip(contexts, finished):
                results.append(self._eager_pass(p, fn, buffers, dtype, t, hypers, device_scalars, reds, empty))
            if not p.produces:
                continue
            # The [tensors, slots] table of partials; sharded, one all-reduce makes every value exact.
            table = torch.stack([torch.stack([v.to(torch.float64) for v in r]) for r in results])
            if reducer is not None:
                reducer(table, [plan.slots[k].op for k, _ in p.produces])
            for col, (k, _) in enumerate(p.produces):
                slot = plan.slots[k]
                column = table[:, col]
                if slot.scope == "layer":
                    values = column.unbind()
                else:
                    total = column.sum() if slot.op == "sum" else column.amax()
                    values = [total] * len(items)
                for reds, value in zip(finished, values):
                    reds[slot.name] = value  # fp64, like the per-step scalars it feeds

    def _eager_pass(self, p, fn, buffers, dtype, t, hypers, device_scalars, reds, empty):
        plan = self.plan
        if empty:  # nothing to update; contributes the identity to every reduction
            return tuple(torch.full((), plan.slots[k].identity, device=t.device, dtype=torch.float64) for k, _ in p.produces)
        kwargs = {f"_{b}": buffers[b] for b in _buffers_of(p)}
        kwargs["dtype"] = dtype
        kwargs["t"] = t
        kwargs.update({h: hypers[h] for h in p.hypers})
        kwargs.update({d: device_scalars[d].reshape(()) for d in p.device_scalars})
        kwargs.update({plan.slots[k].name: reds[plan.slots[k].name] for k in p.consumes})
        return fn(**kwargs)

    def _advance(self, items, device_scalars) -> None:
        steps = [state["step"] for _, _, state, _ in items]
        last = self.plan.passes[-1]
        advance = self.module.step_advance(**{d: device_scalars[d].reshape(()) for d in last.device_scalars})
        if isinstance(advance, torch.Tensor):
            for step in steps:
                step.add_(advance.to(device=step.device, dtype=step.dtype))
        else:
            torch._foreach_add_(steps, advance)

    # -- compiled: prologue once per pass for all parameters, one compiled loop per parameter ---------------

    def _step_compiled(self, items, scratch_of, device_scalars, reducer) -> None:
        plan = self.plan
        n = len(items)
        device = items[0][0].device
        device_scalars = {k: v.reshape(()) for k, v in device_scalars.items()}
        steps = [state["step"] for _, _, state, _ in items]
        try:
            t_all = torch.stack(steps).to(device=device, dtype=torch.float64) + 1
        except RuntimeError:  # steps on several devices (never made by the optimizer): one at a time
            t_all = torch.stack([s.to(device=device, dtype=torch.float64) for s in steps]) + 1
        t_each = t_all.unbind()
        contexts = []
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (param, grad, state, values) in enumerate(items):
            dtype = compute_dtype(param.dtype)
            buffers = {"param": param, "grad": grad}
            for name in plan.ir.state_names:
                buffers[name] = state[name]
            for name in plan.scratch:
                buffers[name] = scratch_of(param, name)
            hypers = self._hyper_tensors(values, device, torch.float64)
            numel = param.numel()
            flat = numel >= 2 and all(
                b.is_contiguous() and b.device == device and b.numel() == numel for b in buffers.values()
            )
            contexts.append((buffers, dtype, hypers, param.numel() == 0, flat))
            by_dtype.setdefault(dtype, []).append(i)
        # finished reductions: slot name -> ("layer", [n] fp64 column) or ("global", 0-d total)
        finished: dict[str, tuple[str, torch.Tensor]] = {}
        per_item_reds: list[dict] | None = None
        for p, fn in zip(plan.passes, self.module.PASSES):
            results: list = [None] * n
            for dtype, idx in by_dtype.items():
                compiled = _compiled_pass(fn, dtype, tuple(f"_{b}" for b in _buffers_of(p)))
                eager_idx = idx
                if compiled is not None:
                    flat_idx = [i for i in idx if contexts[i][4]]
                    eager_idx = [i for i in idx if not contexts[i][4]]
                    if flat_idx:
                        eager_idx += self._run_compiled(compiled, flat_idx, contexts, t_all, device_scalars, finished, results)
                if eager_idx:
                    if per_item_reds is None:
                        per_item_reds = _per_item(finished, n)
                    for i in eager_idx:
                        buffers, cdtype, hypers, empty, _ = contexts[i]
                        reds = {name: values[i] for name, values in per_item_reds.items()}
                        results[i] = self._eager_pass(p, fn, buffers, cdtype, t_each[i], hypers, device_scalars, reds, empty)
            if not p.produces:
                continue
            flat_results = [v for r in results for v in r]
            if all(v.dtype == torch.float64 and v.dim() == 0 for v in flat_results):
                table = torch.stack(flat_results).view(n, len(p.produces))
            else:
                table = torch.stack([torch.stack([v.to(torch.float64).reshape(()) for v in r]) for r in results])
            if reducer is not None:
                reducer(table, [plan.slots[k].op for k, _ in p.produces])
            for col, (k, _) in enumerate(p.produces):
                slot = plan.slots[k]
                column = table[:, col]
                if slot.scope == "layer":
                    finished[slot.name] = ("layer", column)
                else:
                    finished[slot.name] = ("global", column.sum() if slot.op == "sum" else column.amax())
            per_item_reds = None

    def _run_compiled(self, compiled, idx, contexts, t_all, device_scalars, finished, results) -> list[int]:
        """Runs the prologue for the parameters ``idx`` at once, then the compiled body for each. Returns the
        parameters it did not update (compiling failed: the caller runs them eagerly)."""
        index = None if len(idx) == t_all.shape[0] else torch.tensor(idx, device=t_all.device)

        def batch(values):  # [len(idx)] fp64, or the one 0-d tensor they all share
            first = values[0]
            if all(v is first for v in values):
                return first
            return torch.stack([v.to(torch.float64) for v in values])

        def column(tensor):
            return tensor if index is None else tensor.index_select(0, index)

        inputs = []
        for name in compiled.prologue_inputs:
            if name == "t":
                inputs.append(column(t_all))
            elif name in finished:
                scope, value = finished[name]
                inputs.append(column(value) if scope == "layer" else value)
            elif name in device_scalars:
                inputs.append(device_scalars[name])
            else:
                inputs.append(batch([contexts[i][2][name] for i in idx]))
        flat, names, stored, j = compiled.flat, compiled.body_buffers, [], 0
        try:
            scalars = compiled.scalars(inputs, len(idx))
            scalar_dtypes = tuple(values[0].dtype for values in scalars)
            for j, i in enumerate(idx):
                buffers = contexts[i][0]
                out = compiled.run([flat(buffers[b]) for b in names], [values[j] for values in scalars], scalar_dtypes)
                results[i] = tuple(out) if out is not None else ()
                stored += [buffers[b] for b in compiled.stored]
        except Exception as exc:  # noqa: BLE001 - a compile (or prologue) failure: warn once, the rest runs eagerly
            compiled.fail(exc)
            return idx[j:]
        finally:
            # the kernels write through pointers: tell autograd the buffers changed, as an in-place op would
            if stored:
                _increment_versions(stored)
        return []


class _CompiledPass:
    """One pass split into an eager prologue (0-d math) and a compiled body (per element)."""

    def __init__(self, fn, dtype, buffers=None):
        import torch.fx as fx

        gm = fx.symbolic_trace(fn, concrete_args={"dtype": dtype})
        graph = gm.graph
        for node in list(reversed(graph.nodes)):  # the check fx adds for the concrete dtype argument
            if node.op == "call_function" and node.target is torch._assert:
                graph.erase_node(node)
        for node in list(reversed(graph.nodes)):
            if node.op != "output" and not node.users and node.op != "placeholder" and _pure(node):
                graph.erase_node(node)
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        for node in placeholders:
            if not node.users:
                graph.erase_node(node)
        vector: set = set()
        for node in graph.nodes:
            if node.op == "placeholder":
                if node.target in buffers if buffers is not None else node.target.startswith("_"):
                    vector.add(node)
            elif node.op != "output" and any(a in vector for a in node.all_input_nodes):
                vector.add(node)
        # 0-d values the per-element body reads: the prologue's outputs
        frontier = []
        for node in graph.nodes:
            if node in vector or node.op == "output":
                for a in node.all_input_nodes:
                    if a not in vector and a not in frontier:
                        frontier.append(a)
        # prologue graph: the scalar nodes, returning the frontier
        pro = fx.Graph()
        env = {}
        self.prologue_inputs = []
        for node in graph.nodes:
            if node in vector or node.op == "output":
                continue
            env[node] = pro.node_copy(node, lambda a: env[a])
            if node.op == "placeholder":
                self.prologue_inputs.append(node.target)
        pro.output(tuple(env[a] for a in frontier))
        self.prologue = fx.GraphModule(gm, pro)
        self.batchable = all(_elementwise(node) for node in pro.nodes if node.op not in ("placeholder", "output"))
        # body graph: the buffers and the frontier as inputs
        body = fx.Graph()
        benv = {}
        self.body_buffers = []
        for node in graph.nodes:
            if node.op == "placeholder" and node in vector:
                benv[node] = body.placeholder(node.target)
                self.body_buffers.append(node.target[1:])
        for k, a in enumerate(frontier):
            benv[a] = body.placeholder(f"s{k}")
        for node in graph.nodes:
            if node in vector and node.op != "placeholder" or node.op == "output":
                benv[node] = body.node_copy(node, lambda a: benv[a])
        body.lint()
        self.body_module = fx.GraphModule(gm, body)
        self.stored = [
            node.args[0].target[1:]
            for node in graph.nodes
            if node.op == "call_method" and node.target == "copy_" and node.args[0].op == "placeholder"
        ]
        # A buffer stored as another buffer's old value, unchanged (b := a, a swap): Inductor (torch 2.13)
        # drops the clone and copies in program order, so b gets a's NEW value. Such passes stay eager.
        self.copies_a_buffer = any(
            node.op == "call_method"
            and node.target == "copy_"
            and _bare_buffer(node.args[1]) not in (None, node.args[0])
            for node in graph.nodes
        )
        self._dynamo_body = None
        self._artifacts: dict = {}
        from torch import _inductor

        self._standalone = getattr(_inductor, "standalone_compile", None)
        self.flat = _flat_view if self._standalone is not None else _flat
        self.failed = False

    def run(self, buffers, scalars, scalar_dtypes=None):
        """The compiled body on 1-D ``buffers`` of one length and 0-d ``scalars``: one artifact per (device,
        serial or parallel, dtypes), sizes symbolic."""
        first = buffers[0]
        device = first.device.type
        serial = device == "cpu" and (first.numel() < _SERIAL_NUMEL or torch.get_num_threads() == 1)
        if scalar_dtypes is None:
            scalar_dtypes = tuple(s.dtype for s in scalars)
        key = (device, serial, tuple(b.dtype for b in buffers), scalar_dtypes)
        fn = self._artifacts.get(key)
        if fn is None:
            fn = self._artifacts[key] = self._compile(buffers + scalars, serial)
        return fn(*buffers, *scalars)

    def _compile(self, args, serial: bool):
        """Inductor without dynamo: traced with symbolic sizes (``make_fx``), compiled by
        ``torch._inductor.standalone_compile``. A call then costs ~10 us instead of dynamo's ~40 us (guards,
        frame evaluation); what dynamo's guards would check is the key of ``self._artifacts`` plus what the
        backend guarantees: 1-D contiguous buffers of one length >= 2, 0-d scalars. Without that API (older
        torch): ``torch.compile(dynamic=True)``."""
        standalone = self._standalone
        if standalone is None:
            if self._dynamo_body is None:
                self._dynamo_body = torch.compile(self.body_module, dynamic=True, backend=_counting_inductor)
            return self._dynamo_body
        from torch.fx.experimental.proxy_tensor import make_fx

        # the size hint steers Inductor's choice of a parallel loop: small for the serial variant
        numel = _EXAMPLE_NUMEL if serial else _EXAMPLE_NUMEL_PARALLEL
        examples = [torch.zeros((numel,) if a.dim() else (), dtype=a.dtype, device=a.device) for a in args]
        with torch.no_grad():
            gm = make_fx(self.body_module, tracing_mode="symbolic")(*examples)
        with _our_inductor_config(serial):
            artifact = standalone(gm, examples, dynamic_shapes="from_graph")
        _STATS["compiles"] += 1
        return artifact

    def scalars(self, inputs, n) -> list[list[torch.Tensor]]:
        """The frontier values for each of ``n`` parameters: [frontier][parameter] 0-d tensors."""
        if self.batchable:
            outs = self.prologue(*inputs)
            seen = set()
            scalars = []
            for out in outs:
                key = out.untyped_storage().data_ptr()
                if key in seen:  # two outputs aliasing one buffer would be seen as aliased inputs
                    out = out.clone()
                seen.add(key)
                if out.dim() == 0:
                    scalars.append([out] * n)
                else:
                    scalars.append(out.expand(n).unbind() if out.numel() == 1 else out.unbind())
            return scalars
        per_param = []
        for j in range(n):
            args = [x if x.dim() == 0 else x[j] for x in inputs]
            per_param.append(self.prologue(*args))
        return [[per_param[j][k] for j in range(n)] for k in range(len(per_param[0]) if per_param else 0)]

    def fail(self, exc) -> None:
        self.failed = True
        _STATS["failures"] += 1
        warnings.warn(
            f"optgen: torch.compile of the CPU fast path failed ({type(exc).__name__}: {str(exc)[:300]}); "
            f"running the passes eagerly (set {COMPILE_ENV}=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=4,
        )


_COMPILED: dict = {}
_EXAMPLE_NUMEL = 1031  # the size the bodies are traced at (symbolic: any size >= 2 runs)
_EXAMPLE_NUMEL_PARALLEL = (1 << 20) + 7
_SERIAL_NUMEL = 1 << 15  # parameters smaller than this run a loop without OpenMP on CPU


def _compiled_pass(fn, dtype, buffers=None):
    """The split and compiled form of one pass for one compute dtype (None when it cannot be made)."""
    key = (fn, dtype)
    entry = _COMPILED.get(key)
    if entry is None:
        try:
            entry = _CompiledPass(fn, dtype, buffers)
        except Exception as exc:  # noqa: BLE001 - tracing failed: eager for good
            entry = False
            _STATS["failures"] += 1
            warnings.warn(
                f"optgen: cannot trace {getattr(fn, '__name__', fn)} for the compiled CPU path "
                f"({type(exc).__name__}: {exc}); running it eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
        _COMPILED[key] = entry
    if entry is False or entry.failed or entry.copies_a_buffer:
        return None
    return entry


def _bare_buffer(node):
    """The placeholder whose value ``node`` is unchanged (through ``to``/``clone``), else None."""
    while isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in ("to", "clone", "contiguous"):
        node = node.args[0]
    return node if isinstance(node, torch.fx.Node) and node.op == "placeholder" else None


def _counting_inductor(gm, example_inputs):
    compiled = _inductor(gm, example_inputs)
    _STATS["compiles"] += 1  # after: dynamo may restart an analysis, calling the backend twice for one graph
    return compiled


def _inductor(gm, example_inputs):
    from torch._dynamo import lookup_backend

    with _our_inductor_config():
        return lookup_backend("inductor")(gm, example_inputs)


@contextlib.contextmanager
def _our_inductor_config(serial: bool = False):
    """The stores-first post-grad pass and the fp32 -> fp64 vector conversion, while our kernels compile;
    ``serial``: a loop without OpenMP (small parameters: a parallel region costs more than it saves, and
    much more when the other cores are busy)."""
    from torch._inductor import config

    stores_first = _stores_first_pass()
    with contextlib.ExitStack() as stack:
        # shapes are the backend's invariant (1-D, one length, 0-d scalars): no per-call size asserts
        stack.enter_context(config.patch({"size_asserts": False}))
        if serial:
            stack.enter_context(config.patch({"cpp.threads": 1}))
        if stores_first is not None and config.post_grad_custom_post_pass is None:
            stack.enter_context(config.patch(post_grad_custom_post_pass=stores_first))
            stack.enter_context(_vector_f32_to_f64())
        yield


@contextlib.contextmanager
def _vector_f32_to_f64():
    """While Inductor generates our kernels: fp32 -> fp64 vector conversions with one instruction per half.

    The reductions accumulate squares in fp64 (``x.double()``). Inductor's C++ backend emits
    ``at::vec::convert<double,2,float,1>``, which has no AVX2/AVX-512 specialisation and converts lane by lane
    through memory (about half the time of LAMB's first pass). The conversion is exact either way, so the
    results are bitwise the same. Only our compiles see it (and their cache key includes this file: the
    stores-first pass's uuid); on any other ISA, or if Inductor's internals differ, nothing is changed.
    """
    try:
        from torch._inductor.codegen.cpp import CppVecKernel
    except ImportError:
        yield
        return
    original = CppVecKernel.__dict__.get("get_to_dtype_expr")
    if original is None:
        yield
        return

    def get_to_dtype_expr(self, src, dtype, src_dtype, rounding=False):
        try:
            if (
                getattr(src, "is_vec", False)
                and src_dtype == torch.float32
                and dtype == torch.float64
                and self._get_num_vectors(torch.float32) == 1
                and self._get_num_vectors(torch.float64) == 2
            ):
                bits = self.vec_isa.bit_width()
                if bits == 512:
                    return (
                        f"at::vec::VectorizedN<double,2>("
                        f"at::vec::Vectorized<double>(_mm512_cvtps_pd(_mm512_castps512_ps256({src}))), "
                        f"at::vec::Vectorized<double>(_mm512_cvtps_pd(_mm512_extractf32x8_ps({src}, 1))))"
                    )
                if bits == 256 and type(self.vec_isa).__name__.startswith("VecAVX2"):
                    return (
                        f"at::vec::VectorizedN<double,2>("
                        f"at::vec::Vectorized<double>(_mm256_cvtps_pd(_mm256_castps256_ps128({src}))), "
                        f"at::vec::Vectorized<double>(_mm256_cvtps_pd(_mm256_extractf128_ps({src}, 1))))"
                    )
        except Exception:  # noqa: BLE001 - anything unexpected: Inductor's own expression
            pass
        return original(self, src, dtype, src_dtype, rounding)

    CppVecKernel.get_to_dtype_expr = get_to_dtype_expr
    try:
        yield
    finally:
        CppVecKernel.get_to_dtype_expr = original


_STORES_FIRST = None


def _stores_first_pass():
    """An Inductor post-grad pass that lets a pass that stores states AND reduces run as one loop.

    After functionalization the stores of a pass (``copy_`` into its input buffers) come last, after the
    reductions, and Inductor fuses a pointwise node into a reduction only when the pointwise node comes first:
    LAMB's first pass became two loops, reading every buffer twice. This pass moves each store right after
    the value it stores, makes later users read the stored buffer instead (same values; in the fused loop
    the load is forwarded from the store), and puts the full reductions last. It gives up (changes nothing)
    unless every read of a stored buffer's old value happens before its store.
    """
    global _STORES_FIRST
    if _STORES_FIRST is None:
        try:
            from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
        except ImportError:  # older torch: two loops, still correct
            _STORES_FIRST = False
            return None

        class StoresFirst(CustomGraphPass):
            def __call__(self, graph) -> None:
                _reorder_stores_first(graph)

            def uuid(self):
                return get_hash_for_files((__file__,))

        _STORES_FIRST = StoresFirst()
    return _STORES_FIRST or None


def _reorder_stores_first(graph) -> None:
    aten = torch.ops.aten
    nodes = list(graph.nodes)
    copies = [n for n in nodes if n.op == "call_function" and n.target is aten.copy_.default]
    if not copies:
        return
    plan = []
    for c in copies:
        dst, src = c.args[0], c.args[1]
        if dst.op != "placeholder" or not isinstance(src, torch.fx.Node) or c.users:
            return
        if src.op == "placeholder":  # a buffer stored as it was (b := a): that copy reads a's old value
            return
        dval, sval = dst.meta.get("val"), src.meta.get("val")
        if dval is None or sval is None or dval.dtype != sval.dtype or dval.shape != sval.shape:
            return
        if any(other is not c and other.args[0] is dst for other in copies):
            return
        ancestors = _ancestors(src)
        # every node that reads the old value of dst (transitively) must feed the store: nothing after it
        # may read the old value
        feeds = ancestors | {src, c}
        for node in _dependents(dst, stop=set(copies) | {src}):
            if node not in ancestors or any(u not in feeds for u in node.users):
                return
        plan.append((c, src))
    for c, src in plan:
        for user in list(src.users):
            if user is not c:
                user.replace_input_with(src, c)
    order = {n: i for i, n in enumerate(nodes)}
    store_set = {c for c, _ in plan}

    def priority(n):
        if n in store_set:
            return 0
        val = n.meta.get("val")
        if n.op == "call_function" and isinstance(val, torch.Tensor) and val.dim() == 0:
            if any(isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() > 0 for a in n.all_input_nodes):
                return 2  # a full reduction: after the stores, so the stores' loop can fuse into it
        return 1

    import heapq

    pending = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(priority(n), order[n], n) for n in nodes if pending[n] == 0 and n.op != "output"]
    heapq.heapify(ready)
    output = next(n for n in nodes if n.op == "output")
    emitted = []
    while ready:
        _, _, n = heapq.heappop(ready)
        emitted.append(n)
        for u in n.users:
            pending[u] -= 1
            if pending[u] == 0 and u is not output:
                heapq.heappush(ready, (priority(u), order[u], u))
    if len(emitted) != len(nodes) - 1:  # not a DAG we understand: leave the order to Inductor
        return
    anchor = output
    for n in reversed(emitted):
        if n.op == "placeholder":
            continue
        anchor.prepend(n)
        anchor = n
    graph.lint()


def _ancestors(node) -> set:
    seen = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _dependents(node, stop) -> set:
    seen = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen and u not in stop:
                seen.add(u)
                stack.append(u)
    return seen


def _increment_versions(tensors) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # older torch: one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 1-D (contiguous): what the standalone-compiled bodies take (no guards look at views)."""
    return t if t.dim() == 1 else t.view(-1)


_ALIASES = None


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor over ``t``'s (contiguous) memory that is not a view: views make dynamo guard on their
    base's shape, so a 2-D parameter after a 1-D one would recompile; an ``nn.Parameter`` would be compiled
    with static shapes. Cached per tensor (weakly)."""
    if type(t) is torch.Tensor and t.dim() == 1 and not t._is_view():
        return t
    global _ALIASES
    if _ALIASES is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _ALIASES = WeakIdKeyDictionary()
    alias = _ALIASES.get(t)
    if (
        alias is None
        or alias.data_ptr() != t.data_ptr()
        or alias.numel() != t.numel()
        or alias.dtype != t.dtype
    ):
        alias = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))
        _ALIASES[t] = alias
    return alias


def _per_item(finished: dict, n: int) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, (scope, value) in finished.items():
        out[name] = list(value.unbind()) if scope == "layer" else [value] * n
    return out


_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos, operator.pow,
    operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne, operator.and_, operator.or_,
    operator.xor, operator.invert, operator.abs,
    torch.sqrt, torch.rsqrt, torch.pow, torch.where, torch.minimum, torch.maximum, torch.clamp, torch.clip,
    torch.abs, torch.sign, torch.exp, torch.log, torch.log1p, torch.expm1, torch.reciprocal, torch.square,
    torch.neg, torch.sin, torch.cos, torch.tanh, torch.sigmoid, torch.floor, torch.ceil, torch.trunc,
    torch.isnan, torch.isinf, torch.isfinite, torch.logical_and, torch.logical_or, torch.logical_not,
    torch.fmin, torch.fmax, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.full_like,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"to", "double", "float", "abs", "sqrt", "neg", "clamp", "reciprocal", "square"}


def _elementwise(node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    return False


def _pure(node) -> bool:
    return not (node.op == "call_method" and node.target.endswith("_")) and node.target is not torch._assert


def _buffers_of(p) -> list[str]:
    seen = []
    for ld in p.loads:
        if ld.buffer not in seen:
            seen.append(ld.buffer)
    for b, _ in p.stores:
        if b not in seen:
            seen.append(b)
    return seen
