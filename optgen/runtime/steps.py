"""The step of a generated optimizer: which compiled variant runs, on which backend, over which tensors.

``optimizer.GeneratedOptimizer`` is the torch.optim shell (arguments, param groups, state dicts); it hands each
``step()`` to a :class:`StepRunner`, which

* picks the variant of the math: the per-group options (the spec's flags and ``maximize``) that every param
  group agrees on are compiled in; those the groups disagree on become per-group runtime switches of one
  variant (still one launch per pass for all parameters, and a global norm still spans them all); GradScaler's
  attributes select the AMP form (``transforms.amp``);
* validates the parameters with gradients, creates missing state, and runs the backend of each device;
* remembers the layout of a step so that the next one with the same tensors takes the backend's fast path.
"""

from __future__ import annotations

import collections
import operator
from dataclasses import dataclass

import sympy
import torch

from .. import quantization, settings, transforms
from ..analysis import plan as make_plan
from ..analysis import sums_over_rows
from ..codegen.render import load_module, source_hash
from ..ir import lower
from ..spec import QUANT_MAP_SUFFIX, QUANT_ROW_SUFFIX, QUANT_SUFFIX
from . import backends, distributed, host_ptrs
from .tables import lacks_data, scratch_buffer


class StepRunner:
    """Everything a step needs that the constructor's choices fix (``config``), and the caches built from it."""

    def __init__(self, spec, config: dict):
        self.spec = spec
        self.config = config
        self.name = spec.name
        # per-group options that select compiled code: the spec's flags, then maximize
        self.option_names = tuple(f.name for f in spec.flags) + ("maximize",)
        self._plans: dict = {}
        self.backends = _Backends()
        self.scratch: dict[tuple[int, str], torch.Tensor] = {}
        self._values: dict[int, tuple] = {}  # id(group) -> (fingerprint, ir, values, raw values, all immutable)
        self._real_views: dict[int, tuple] = {}  # id(complex parameter) -> (parameter, its real view)
        self.generation = 0  # bumped by whatever changes the layout of a step (groups, loaded state)
        # states kept in 8 bits (state_format) -> their map
        self.eight_bit_kinds = dict(transforms.eight_bit_states(spec.states, config.get("quantized", ())))
        self.fast = None

    # -- variants ------------------------------------------------------------------------------------------

    def options_key(self, groups, defaults: dict) -> tuple:
        """(options every group agrees on, as sorted (name, value) pairs; names of those they disagree on)."""
        rows = [tuple(bool(group.get(name, defaults.get(name, False))) for name in self.option_names) for group in groups]
        fixed, mixed = [], []
        for i, name in enumerate(self.option_names):
            values = {row[i] for row in rows}
            if len(values) == 1:
                fixed.append((name, values.pop()))
            else:
                mixed.append(name)
        return tuple(fixed), tuple(mixed)

    def shape_key(self, param: torch.Tensor) -> tuple:
        """The spec's shape flags for ``param`` (Adafactor factors parameters of 2+ dimensions)."""
        return tuple((f.name, param.dim() >= f.min_ndim) for f in self.spec.shape_flags)

    def plan(self, options_key: tuple, amp_mode: str | None = None, shape_key: tuple = ()):
        """The plan of a variant; each is lowered and planned once."""
        key = (options_key, amp_mode, shape_key)
        plan = self._plans.get(key)
        if plan is None:
            fixed, mixed = dict(options_key[0]), options_key[1]
            maximize = fixed.pop("maximize", None)
            ir = lower(self.spec, {**fixed, **dict(shape_key)}, runtime=tuple(name for name in mixed if name != "maximize"))
            ir = transforms.apply(
                ir,
                maximize_="runtime" if "maximize" in mixed else bool(maximize),
                max_grad_norm=self.config["clip"],
                master=self.config["master"],
                amp_mode=amp_mode,
                quantized=self.config.get("quantized", ()),
                stochastic=self.config.get("stochastic_round", False),
            )
            plan = self._plans[key] = make_plan(ir)
        return plan

    # -- per-group values -------------------------------------------------------------------------------

    def group_values(self, group: dict, defaults: dict, ir) -> tuple:
        """The group's hyperparameters in ``ir``'s order: floats (bools as 0/1), or 1-element tensors as given
        (a capturable lr): those are never read on the host; the backends copy them on the device."""
        values = []
        for decl in ir.hypers:
            raw = group.get(decl.key)
            if raw is None:
                raw = defaults.get(decl.key, decl.default if decl.index is None else None)
            value = raw if decl.index is None else raw[decl.index]
            if value is None and decl.none is not None:
                value = decl.none
            values.append(value.reshape(()) if isinstance(value, torch.Tensor) else float(value))
        return tuple(values)

    def step_values(self, owner, group: dict, ir) -> tuple:
        """The group's values for this step, validated again whenever they changed since the last step: an LR
        scheduler or a user may set any value between steps, and the kernels rely on the declared ranges (e.g.
        a power of a base declared positive). A bad value raises before anything is modified."""
        defaults = owner.defaults
        raw = [group.get(key, defaults.get(key)) for key in owner._checked_keys]
        cached = self._values.get(id(group))
        if cached is not None and cached[1] is ir and cached[4] and all(map(operator.is_, raw, cached[3])):
            return cached[2]  # the very objects of the last step, none of them mutable: the same values
        fingerprint = tuple(map(_fingerprint, raw))
        if cached is not None and cached[0] == fingerprint and cached[1] is ir:
            return cached[2]
        if cached is None or cached[0] != fingerprint:
            owner._check_group_at_step(group)
        values = self.group_values(group, defaults, ir)
        self._values[id(group)] = (fingerprint, ir, values, raw, all(map(_immutable, raw)))
        return values

    # -- state -------------------------------------------------------------------------------------------

    def state_dtype(self, param: torch.Tensor, name: str) -> torch.dtype:
        """The dtype a state of ``param`` is kept in: master weights in the compute dtype (fp32, fp64 for fp64
        parameters), the others in ``state_dtype`` or the compute dtype. Complex parameters keep complex
        states of the matching precision, as torch.optim does."""
        if param.is_complex():
            return param.dtype
        compute = torch.promote_types(param.dtype, torch.float32)
        return compute if name == transforms.MASTER else (self.config["state_dtype"] or compute)

    def eight_bit(self, param: torch.Tensor, name: str, row: int | None) -> str | None:
        """The map of state ``name`` of ``param`` when it is kept in 8 bits (``state_format`` names it, the
        parameter has at least ``quantization.MIN_NUMEL`` elements and ``row``, the row its blocks would lie
        within, is not too short), else None."""
        kind = self.eight_bit_kinds.get(name)
        if kind is None or param.is_complex() or not quantization.quantized(param.numel(), row):
            return None  # (complex parameters are refused when added: this keeps a state made by hand full precision)
        return kind

    def block_row(self, owner, param: torch.Tensor) -> int | None:
        """The row the blocks of ``param``'s 8-bit states lie within: the last dimension's when the variant its
        param group runs reduces over rows or columns (its kernels walk rows), else None (``quantization.block_row``)."""
        plan = self.plan(self.options_key(owner.param_groups, owner.defaults), None, self.shape_key(param))
        return quantization.block_row(param.shape, plan.ir.factored)

    def init_state(self, owner, param: torch.Tensor, values: tuple, plan) -> dict:
        """Create the missing state entries (all on the first step; some after loading a checkpoint of another
        optimizer, e.g. master weights resumed from a torch.optim.AdamW state dict)."""
        ir = plan.ir
        state = owner.state[param]
        if type(state) is not ParamState:
            state = owner.state[param] = ParamState(state)
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=param.device)
        missing = [decl for decl in ir.states if decl.name not in state]
        if missing:
            module = _torch_module(plan)
            hypers = dict(zip((h.name for h in ir.hypers), values))  # the group's values for this step
            real = torch.view_as_real(param.detach()) if param.is_complex() else param.detach()
            row = quantization.block_row(param.shape, ir.factored)
            for decl in missing:
                dtype = self.state_dtype(param, decl.name)
                kind = self.eight_bit(param, decl.name, row)
                if kind is not None and distributed.is_dtensor(param):  # blocks of the local shard (FSDP2)
                    local = distributed.local(real)
                    value = module.initial_state(decl.name, local, local, hypers, torch.float32)
                    codes, scales = quantization.quantize(value, kind, row)
                    state[decl.name], state[decl.name + QUANT_SUFFIX] = distributed.eight_bit_state(param, codes, scales, row)
                    state[decl.name + QUANT_ROW_SUFFIX] = layout_entry(row)
                    continue
                if kind is not None:  # the initial value, quantized
                    value = module.initial_state(decl.name, param, real, hypers, torch.float32)
                    state[decl.name], state[decl.name + QUANT_SUFFIX] = quantization.quantize(value, kind, row)
                    state[decl.name + QUANT_ROW_SUFFIX] = layout_entry(row)
                    continue
                if decl.per in ("row", "column") and distributed.is_dtensor(param):
                    # made from the local shard, then a DTensor: whole-row states sharded like the parameter
                    local = distributed.local(real)
                    value = module.initial_state(decl.name, local, local, hypers, dtype)
                    state[decl.name] = distributed.factored_state(param, value, decl.per, state_shape(decl.per, param.shape, decl.keepdim))
                else:
                    state[decl.name] = module.initial_state(decl.name, param, real, hypers, dtype)
        return state

    def check_state_shapes(self, owner, param: torch.Tensor, ir) -> None:
        """A state of another shape than its parameter (a state dict loaded for other parameters, their order
        changed, or a state assigned by hand): the kernels would read and write past it."""
        state = owner.state.get(param, {})
        for decl in self.spec.states:  # a state of the other variant: the parameter's shape changed between steps
            if decl.name in state and decl.name not in ir.state_names and decl.when is not None:
                raise RuntimeError(
                    f"{self.name}: the parameter now has shape {tuple(param.shape)} and runs the variant "
                    f"{decl.when[0]}={not decl.when[1]}, but its state holds {decl.name!r} of the other one (its shape "
                    f"changed between steps?); clear its state (optimizer.state[param] = {{}}) to start it again"
                )
        self._check_readable(param, state, ir)
        for decl in ir.states:
            value = state.get(decl.name)
            expected = state_shape(decl.per, param.shape, decl.keepdim)
            if isinstance(value, torch.Tensor) and value.shape != expected:  # (before the format: a resized parameter)
                kind = {"element": "", "layer": "one number per layer, ", "row": "one number per row, ", "column": "one number per column, "}[decl.per]
                kind += f"shape {tuple(expected)}"
                raise RuntimeError(
                    f"{self.name}: state {decl.name!r} has shape {tuple(value.shape)} for a parameter of "
                    f"shape {tuple(param.shape)}; it must have {kind} (a state dict of other parameters, the "
                    f"parameter resized, or a state set by hand?)"
                )
            if isinstance(value, torch.Tensor) and decl.per == "element":
                self._check_format(param, decl.name, value, state, quantization.block_row(param.shape, ir.factored))

    def _check_readable(self, param: torch.Tensor, state, ir) -> None:
        """The state tensors the step reads and writes are plain tensors on the parameter's device, each element
        its own memory: a tensor subclass (torchao's quantized states: ``load_state_dict`` converts them), a
        meta or other-device tensor or an expanded one (set by hand) would be read past its memory by the
        kernels, or fail half-way through the step."""
        names = [decl.name for decl in ir.states]
        names += [name + QUANT_SUFFIX for name in names] + [transforms.MASTER]
        for name in names:
            value = state.get(name)
            if not isinstance(value, torch.Tensor):
                continue
            local = distributed.local(value)
            if type(local) not in (torch.Tensor, torch.nn.Parameter):
                why = f"is a {type(value).__name__}; the step reads plain tensors (load_state_dict converts a checkpoint's)"
            elif value.device != param.device:
                why = f"is on {value.device}, and its parameter on {param.device}"
            elif overlaps_itself(local):
                why = f"has elements that share memory (strides {tuple(local.stride())}: expanded?); give it its own (.clone())"
            else:
                continue
            raise RuntimeError(f"{self.name}: state {name!r} of a parameter of shape {tuple(param.shape)} {why}")

    def _check_format(self, param, name: str, value: torch.Tensor, state, row: int | None) -> None:
        """An element-wise state in the form this optimizer keeps it: 8-bit codes with their scales (blocks within
        rows of ``row`` when given), or floats (``load_state_dict`` converts between them; a state set by hand may
        not match)."""
        kind = self.eight_bit(param, name, row)
        if kind is None and value.dtype == torch.uint8:
            raise RuntimeError(
                f"{self.name}: state {name!r} holds 8-bit codes, and this optimizer keeps it in full precision (load "
                f"an 8-bit checkpoint with load_state_dict: it converts)"
            )
        if kind is not None and value.dtype == torch.uint8:
            held = saved_block_row(state.get(name + QUANT_ROW_SUFFIX))
            if held != row:
                raise RuntimeError(
                    f"{self.name}: state {name!r} holds 8-bit codes in {_layout_text(held)}, and the variant this step "
                    f"runs keeps them in {_layout_text(row)} (a flag that decides whether the update reduces over rows "
                    f"changed, or a param group with another value of it was added: groups that disagree run one "
                    f"variant); convert them with optimizer.load_state_dict(optimizer.state_dict())"
                )
        if kind is not None:
            scales = state.get(name + QUANT_SUFFIX)
            count = distributed.scale_count(param, row)  # (FSDP2: every rank's blocks of its shard)
            if value.dtype != torch.uint8 or not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 \
                    or scales.shape != (count,):  # fmt: skip
                raise RuntimeError(
                    f"{self.name}: state {name!r} of a parameter of shape {tuple(param.shape)} must be 8-bit: uint8 codes "
                    f"of its shape and {name + QUANT_SUFFIX!r}, {count} fp32 scales (a state set by hand? "
                    f"load_state_dict converts full-precision state{', but not of sharded parameters' if distributed.is_dtensor(param) else ''})"
                )

    def convert_formats(self, owner, param: torch.Tensor, state: dict) -> None:
        """A loaded state in the form this optimizer keeps it: full-precision values quantized where it keeps
        them in 8 bits, 8-bit codes dequantized where it does not, and codes saved with another map (a LAMB8bit
        checkpoint in an AdamW8bit) or another block layout (an AdamW8bit one in a CAME with 8-bit state) read
        with theirs and quantized with this one's; users may switch formats mid-run. (The entries were checked
        before anything loaded: optimizer._check_eight_bit_entries.)"""
        kinds = {s.name: s.quantize for s in self.spec.states if s.per == "element"}
        row = self.block_row(owner, param)
        for name in kinds:
            saved_map = state.pop(name + QUANT_MAP_SUFFIX, None)
            saved_row = saved_block_row(state.get(name + QUANT_ROW_SUFFIX))  # (sharded: kept as saved, checked before)
            value = state.get(name)
            if not isinstance(value, torch.Tensor) or distributed.is_dtensor(param) or param.is_complex():
                continue
            state.pop(name + QUANT_ROW_SUFFIX, None)  # set again below where the state stays 8-bit
            want = self.eight_bit(param, name, row)
            if value.dtype == torch.uint8:
                table = None if saved_map is None else saved_map.to(value.device, torch.float32)
                own = None if want is None else quantization.map_of(want, value.device)
                if own is not None and (table is None or torch.equal(table, own)) and saved_row == row:
                    state[name + QUANT_ROW_SUFFIX] = layout_entry(row)
                    continue  # codes this optimizer reads as they are
                scales = state.pop(name + QUANT_SUFFIX).to(value.device, torch.float32)
                if table is None:  # saved without its map (an older checkpoint): the spec's own
                    table = quantization.map_of(kinds[name] if kinds[name] in quantization.KINDS else "signed", value.device)
                value = quantization.dequantize(value, scales, table, saved_row)
                state[name] = value.to(self.state_dtype(param, name))
            if want is not None:
                state[name], state[name + QUANT_SUFFIX] = quantization.quantize(value, want, row)
                state[name + QUANT_ROW_SUFFIX] = layout_entry(row)

    # -- the step ----------------------------------------------------------------------------------------

    def collect(self, owner):
        """Parameters with gradients, validated before anything is modified."""
        items = []
        for group in owner.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{self.name} does not support sparse gradients")
                if grad.device != p.device:
                    raise RuntimeError(f"{self.name}: gradient on {grad.device} for a parameter on {p.device}")
                if grad.shape != p.shape:
                    raise RuntimeError(
                        f"{self.name}: gradient of shape {tuple(grad.shape)} for a parameter of shape {tuple(p.shape)}"
                    )
                if grad.is_complex() != p.is_complex():
                    raise RuntimeError(f"{self.name}: gradient of dtype {grad.dtype} for a parameter of dtype {p.dtype}")
                state = owner.state.get(p) or {}
                for what, t in (("", p), ("gradient", grad), *((f"state {k!r}", v) for k, v in state.items())):
                    if isinstance(t, torch.Tensor) and not t.is_meta and not distributed.is_dtensor(t) and lacks_data(t):
                        raise RuntimeError(
                            f"{self.name}: {f'the {what} of ' if what else ''}a parameter of shape {tuple(p.shape)} has "
                            f"no data (its storage was freed "
                            f"in place, e.g. untyped_storage().resize_(0)): the kernels cannot read or write it"
                        )
                items.append((group, p, grad))
        # the overlap check walks every parameter's strides: only when the parameters or their storage changed
        key = tuple((id(p), p.data_ptr(), p.shape) for _, p, _ in items)
        if key != self.__dict__.get("_memory_checked"):
            check_no_shared_memory([p for _, p, _ in items], self.name)
            self._memory_checked = key
        return items

    def backend_for(self, device: torch.device, plan):
        backend = backends.resolve(self.config["backend"], device)
        key = (backend.name, str(device), source_hash(plan))
        if key not in self.backends:
            options = {}
            if self.config["autotune"]:
                from .autotune import tune

                options["tuner"] = tune
            self.backends[key] = backends.make(backend, plan, options)
        return self.backends[key]

    @staticmethod
    def amp(owner):
        """GradScaler's ``grad_scale``/``found_inf`` attributes, set around ``step`` (torch's fused contract)."""
        found_inf = getattr(owner, "found_inf", None)
        grad_scale = getattr(owner, "grad_scale", None)
        if found_inf is None and grad_scale is None:
            return None, {}
        if found_inf is None:
            found_inf = torch.zeros((), dtype=torch.float32, device=grad_scale.device)
        scalars = {"found_inf": found_inf}
        if grad_scale is not None:
            scalars["grad_scale"] = grad_scale
        return ("unscale" if grad_scale is not None else "gate"), scalars

    def step(self, owner) -> None:
        if self.fast_step(owner):
            return
        collected = self.collect(owner)
        if not collected:
            return
        amp_mode, device_scalars = self.amp(owner)
        options_key = self.options_key(owner.param_groups, owner.defaults)
        plan_of = {id(p): self.plan(options_key, amp_mode, self.shape_key(p)) for _, p, _ in collected}
        plans = list({id(q): q for q in plan_of.values()}.values())
        plan = plans[0]
        reducer = self.reducer([p for _, p, _ in collected])
        for group, p, _ in collected:
            if group.get("fused") and p.device.type not in backends.AUTO:  # torch refuses at the step too
                raise RuntimeError(
                    f"`fused=True` requires all the params to be floating point Tensors of supported devices: "
                    f"{sorted(backends.AUTO)} (got a parameter on {p.device.type})"
                )
        backend_of = {}  # one backend per device and variant
        for _, p, grad in collected:  # unsupported dtypes and shapes fail before any state exists
            q = plan_of[id(p)]
            if q.ir.factored and p.dim() < 2:
                raise RuntimeError(
                    f"{self.name}: a parameter of shape {tuple(p.shape)} has fewer than 2 dimensions, and this update "
                    f"reduces over its rows or columns"
                )
            if q.ir.factored and p.is_complex():
                raise RuntimeError(f"{self.name} does not support complex parameters of 2+ dimensions (rows and columns of a complex matrix)")
            if q.ir.factored and distributed.rows_split(p):
                late = late_matrix_reads(q)
                if late:
                    raise RuntimeError(
                        f"{self.name}: {late} sums a per-row value over the rows of a matrix, and a later value of "
                        f"the same reduce step reads it; with FSDP2 sharding the rows of a {tuple(p.shape)} parameter, "
                        f"that sum is partial until an all-reduce the step has no room for"
                    )
            backend = backend_of.setdefault((p.device, id(q)), self.backend_for(p.device, q))
            check = getattr(backend, "check", None)
            if check is not None:
                check(self.real(distributed.local(p)), self.real(distributed.local(grad)), self.config["state_dtype"])
        if len(backend_of) > 1 and any(slot.scope == "global" for q in plans for slot in q.slots):
            # each launch would see only its own parameters' share of a global norm
            places = sorted({str(device) for device, _ in backend_of})
            where = (
                f"are on several devices ({', '.join(places)})" if len(places) > 1
                else f"run {len(plans)} variants of the update (its shape flags: {', '.join(f.name for f in self.spec.shape_flags)})"
            )
            raise RuntimeError(
                f"{self.name}: this update reduces over all parameters (a global norm: max_grad_norm, NVLAMB) and "
                f"the parameters {where}: each would see only its share; keep them on one device and one variant, "
                f"or use one optimizer for each"
            )
        for _, p, _ in collected:  # every check before the first state is created
            self.check_state_shapes(owner, p, plan_of[id(p)].ir)
        groups = {id(group): group for group, _, _ in collected}  # each group once, in order
        # every variant has the same hyperparameters: their values are the group's, whatever the variant
        values_of = {key: self.step_values(owner, group, plan.ir) for key, group in groups.items()}
        by_backend: dict[int, tuple] = {}
        for group, p, grad in collected:
            backend = backend_of[(p.device, id(plan_of[id(p)]))]
            state = self.init_state(owner, p, values_of[id(group)], plan_of[id(p)])
            sharded = distributed.is_sharded(p)
            if distributed.is_dtensor(p) or p.is_complex():  # the backends see local shards, as real numbers
                state = self.backend_state(p, state)
                p, grad = self.real(distributed.local(p)), self.real(distributed.local(grad))
            item = (p, grad, state, values_of[id(group)])
            entry = by_backend.setdefault(id(backend), (backend, [], []))
            entry[1].append(item)
            entry[2].append(sharded)  # the rows of this backend's partial tables, in item order
        for backend, backend_items, sharded in by_backend.values():
            device = backend_items[0][0].device
            scalars = {k: v.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1) for k, v in device_scalars.items()}
            backend.step(backend_items, self.scratch_of, scalars, None if reducer is None else reducer.rows(sharded))
        self.remember_layout(owner, collected, by_backend, amp_mode, reducer, plan, options_key)

    def real(self, tensor: torch.Tensor) -> torch.Tensor:
        """A complex tensor as the real tensor the kernels update (``view_as_real``, as torch.optim does);
        parameters keep one view (the chunk tables are keyed by the tensors' identities)."""
        if not isinstance(tensor, torch.Tensor) or not tensor.is_complex():
            return tensor
        cached = self._real_views.get(id(tensor))
        if cached is not None and cached[0] is tensor and cached[1].data_ptr() == tensor.data_ptr():
            return cached[1]
        view = torch.view_as_real(tensor)
        if isinstance(tensor, torch.nn.Parameter) or tensor.requires_grad:
            self._real_views[id(tensor)] = (tensor, view)
        return view

    def backend_state(self, param, state):
        """The state as the backends see it: local shards (FSDP2), real views of complex tensors."""
        cache = self.__dict__.setdefault("_backend_states", {})
        view = cache.get(param)
        if view is None or not view.current(state):
            view = distributed.LocalState(state, lambda v: self.real(distributed.local(v)))
            view.param_shape = tuple(param.shape)  # the whole parameter's: a column mean divides by all its rows
            view.rows_split = distributed.rows_split(param)  # its column sums are partial on each rank
            cache[param] = view
        return view

    def scratch_of(self, param: torch.Tensor, name: str, eight_bit: bool = False, row: int | None = None) -> torch.Tensor:
        return scratch_buffer(self.scratch, param, name, eight_bit, row)

    def reducer(self, params):
        """The all-reduce of partial tables between passes when parameters are sharded (see distributed)."""
        group = distributed.shard_group(params, self.name)
        if group is None:
            return None
        if getattr(self, "_shard_reducer", None) is None or self._shard_reducer.group is not group:
            self._shard_reducer = distributed.ShardReducer(group)
        return self._shard_reducer

    def invalidate(self) -> None:
        """Loaded state: the backends' tables point at replaced tensors."""
        for backend in self.backends.values():
            invalidate = getattr(backend, "invalidate", None)
            if invalidate:
                invalidate()
        self.generation += 1

    # -- the fast path: a step with the layout of the last one ---------------------------------------------

    def remember_layout(self, owner, collected, by_backend, amp_mode, reducer, plan, options_key) -> None:
        """After a full step: when the next steps can be told apart from this one by a few identity and
        metadata compares per tensor (backends with a fast path, every parameter with a gradient, no GradScaler,
        nothing sharded or complex, plain hyperparameter values), keep what they are compared against. A spec
        with shape flags (Adafactor's matrices and vectors) runs a backend per variant: each takes its
        parameters' gradients, by their index among all parameters."""
        self.fast = None
        if amp_mode is not None or reducer is not None or not isinstance(owner.state, States):
            return  # (a state dict that does not count its edits: one a user assigned to ``opt.state``)
        for backend, _, _ in by_backend.values():
            if not hasattr(backend, "fast_step"):
                return
            advance = backend.plan.passes[-1].step_advance
            if not advance.is_number or float(advance) != 1.0:
                return
        params = [p for group in owner.param_groups for p in group["params"]]
        if len(params) != len(collected) or any(distributed.is_dtensor(p) or p.is_complex() for p in params):
            return
        rows = self.plain_group_rows(owner, plan.ir)
        if rows is None:
            return
        grads = [g for _, _, g in collected]
        if not all(g.is_contiguous() for g in grads):  # the checks below hold strides as they are: contiguous ones
            return
        group_of = [i for i, group in enumerate(owner.param_groups) for _ in group["params"]]
        index_of = {id(p): i for i, p in enumerate(params)}
        fast_backends = []
        for backend, items, _ in by_backend.values():
            indices = [index_of[id(item[0])] for item in items]
            if not backend.prepare_fast([group_of[i] for i in indices], rows):
                return
            fast_backends.append((backend, None if indices == list(range(len(params))) else indices))
        state_tensors = [
            v for _, items, _ in by_backend.values() for _, _, state, _ in items
            for v in state.values() if isinstance(v, torch.Tensor)  # steps too: views into the tables
        ]  # fmt: skip
        host = host_ptrs.helper() if settings.flag("OPTGEN_HOST_READS_IN_C") else None
        compiled = None if host is None else host.layout(params, [indices for _, indices in fast_backends], state_tensors)
        guards = (None, None) if compiled is not None else (_metadata_guard(params), _metadata_guard(grads))
        if compiled is None and None in guards:
            return
        self.fast = FastLayout(
            generation=self.generation,
            backends=fast_backends,
            plan=plan,
            options_key=options_key,
            group_sizes=[len(group["params"]) for group in owner.param_groups],
            state_edits=STATE_EDITS[0],
            states=owner.state,
            compiled=compiled,
            grad_writers=None if compiled is None else [compiled.grads_writer(k) for k in range(len(fast_backends))],
            param_guard=guards[0],
            grad_guard=guards[1],
            param_ids=[id(p) for p in params],
            param_ptrs=[p.data_ptr() for p in params],
            state_tensors=state_tensors,
            state_ptrs=[t.data_ptr() for t in state_tensors],
        )

    def plain_group_rows(self, owner, ir) -> list[tuple] | None:
        """Every group's values for this step, or None when one is a tensor (capturable values are gathered
        on the device by the full path)."""
        rows = [self.step_values(owner, group, ir) for group in owner.param_groups]
        if any(isinstance(v, torch.Tensor) for row in rows for v in row):
            return None
        return rows

    def fast_step(self, owner) -> bool:
        """Run the step through the backend's fast path if nothing but gradients and hyperparameter values
        changed since the step that set it up; anything else (or any doubt) takes the full path."""
        fast = self.fast
        if fast is None or fast.generation != self.generation or not owner._fast_path:
            return False
        if getattr(owner, "grad_scale", None) is not None or getattr(owner, "found_inf", None) is not None:
            return False
        groups = owner.param_groups
        if [len(group["params"]) for group in groups] != fast.group_sizes:  # a group added, or a parameter
            return False  # moved between groups
        if self.options_key(groups, owner.defaults) != fast.options_key:  # a group's flag changed: another variant
            return False
        params = [p for group in groups for p in group["params"]]
        if STATE_EDITS[0] != fast.state_edits or owner.state is not fast.states:  # a state entry set or replaced
            return False
        # Metadata can change without the tensor object changing (``.data =``, ``set_``): every step checks it
        # all, and identities and data pointers; in C where it is built (~10 ns a tensor, gradients read and
        # checked there too), else from Python (a ``.grad`` read, a C++ guard and a pointer read: ~250 ns).
        compiled = fast.compiled
        if compiled is not None:
            if not compiled.same(params):
                return False
        else:
            grads = list(map(_GRAD, params))  # a missing gradient fails its guard: the full path says what
            if not fast.grad_guard.check(*grads) or not fast.param_guard.check(*params):
                return False
            if (
                list(map(id, params)) != fast.param_ids
                or list(map(torch.Tensor.data_ptr, params)) != fast.param_ptrs
                or list(map(torch.Tensor.data_ptr, fast.state_tensors)) != fast.state_ptrs  # a state's storage swapped
            ):
                return False
        rows = self.plain_group_rows(owner, fast.plan.ir)
        if rows is None:
            return False
        for k, (backend, indices) in enumerate(fast.backends):  # every backend's gradients before any runs: all or none
            if compiled is not None:
                taken = backend.fast_grads_written(fast.grad_writers[k])  # read and checked in C
            else:
                taken = backend.fast_grads(grads if indices is None else [grads[i] for i in indices])
            if not taken:
                return False
        for backend, _ in fast.backends:
            backend.fast_step(rows)
        return True


def layout_entry(row: int | None) -> torch.Tensor:
    """An 8-bit state's ``<state>_qrow`` entry: the row its blocks lie within, 0 for blocks of the flat tensor."""
    return torch.tensor(row or 0, dtype=torch.int64)


def _layout_text(row: int | None) -> str:
    return "blocks of the flat tensor" if row is None else f"blocks within rows of {row}"


def saved_block_row(entry) -> int | None:
    """The block row a checkpoint's 8-bit state was saved with (its ``<state>_qrow``: 0, or none at all in
    checkpoints from before factored 8-bit states, is blocks of the flat tensor)."""
    row = 0 if entry is None else int(entry.item() if isinstance(entry, torch.Tensor) else entry)
    return row or None


def late_matrix_reads(plan) -> str | None:
    """The first per-matrix sum over rows made by a late item of a reduce step (one that runs after the pass
    boundary's all-reduce) that a later item of the same step reads (such a sum is partial when FSDP2 shards the
    rows: the step all-reduces it after its items), or None."""
    for p in plan.passes:
        made = set()
        for item in p.late_reduce_items:
            read = made & {s.name for s in item[2].free_symbols}
            if read:
                return sorted(read)[0]
            made |= {plan.slots[k].name for k in sums_over_rows(plan.slots, [item])}
    return None


def state_shape(per: str, shape: torch.Size, keepdim: bool = True) -> tuple:
    """The shape of a state of granularity ``per`` for a parameter of ``shape``: per row/column the parameter's
    with its last/second-to-last dimension 1 (torch's Adafactor's), or without it (``keepdim=False``, CAME's)."""
    if per == "layer":
        return ()
    out = list(shape)
    axis = {"row": -1, "column": -2}.get(per)
    if axis is not None and len(out) >= -axis:
        if keepdim:
            out[axis] = 1
        else:
            del out[axis]
    return tuple(out)


@torch.compiler.disable  # file reads and an import: run as Python, not traced, inside a user's torch.compile
def _torch_module(plan):
    """The generated torch module of ``plan``: it holds the states' initial values (``initial_state``)."""
    return load_module(plan, "torch")


_GRAD = operator.attrgetter("grad")


def _metadata_guard(tensors: list):
    """For fast steps that check from Python (no compiled helper, ``host_ptrs``): a check, in one C++ call, that
    each of ``tensors`` still has its dtype, device, layout (dispatch keys), ``requires_grad``, sizes and strides:
    dynamo's ``TensorGuards`` (``guard.check(*tensors)``; ~35 ns a tensor where reading the same from Python takes
    ~250). Not its storage: data pointers are compared apart. None where this torch lacks it or builds it
    otherwise (its module is private): those steps then take the full path."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        guard = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                             dynamic_dims_strides=[list(t.stride()) for t in tensors])  # fmt: skip
        return guard if guard.check(*tensors) else None
    except Exception:  # noqa: BLE001 - any failure means: no fast path
        return None
# Edits of any optimizer's state dicts (entries set, replaced or removed): a fast step compares a count.
STATE_EDITS = [0]


class _CountsEdits:
    """Mixed into a dict: every mutating method counts a state edit. Written with ``super()`` (not by
    wrapping dict's slots): dynamo traces these inside a user's ``torch.compile``."""

    __slots__ = ()

    def __setitem__(self, key, value):
        STATE_EDITS[0] += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        STATE_EDITS[0] += 1
        super().__delitem__(key)

    def pop(self, *args):
        STATE_EDITS[0] += 1
        return super().pop(*args)

    def popitem(self):
        STATE_EDITS[0] += 1
        return super().popitem()

    def clear(self):
        STATE_EDITS[0] += 1
        super().clear()

    def update(self, *args, **kwargs):
        STATE_EDITS[0] += 1
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        STATE_EDITS[0] += 1
        return super().setdefault(key, default)


class ParamState(_CountsEdits, dict):
    """A parameter's state, as torch.optim keeps it (a dict of tensors), counting its edits: a fast step must
    notice a state tensor replaced by assignment. ``state_dict()`` hands out plain dicts."""

    __slots__ = ()


class States(_CountsEdits, collections.defaultdict):
    """The optimizer's ``state`` (parameter -> state dict), counting parameters' state dicts set or removed."""

    def __init__(self, states=None):
        super().__init__(dict, states or {})

    def __reduce__(self):  # pickles (and deep-copies) as a plain defaultdict of plain dicts
        return collections.defaultdict, (dict, {k: dict(v) for k, v in self.items()})


@dataclass
class FastLayout:
    """What a fast step compares against (see ``StepRunner.fast_step``)."""

    generation: int
    backends: list  # (backend, the indices of its parameters among all, or None for all of them in order)
    plan: object
    options_key: tuple
    group_sizes: list
    state_edits: int
    states: object
    compiled: object  # host_ptrs.Layout: the checks and reads in C; or None, and the ones below from Python
    grad_writers: list | None  # compiled: per backend, its gradients' addresses into its table
    param_guard: object  # _metadata_guard of the parameters
    grad_guard: object  # and of their gradients
    param_ids: list
    param_ptrs: list
    state_tensors: list
    state_ptrs: list


class _Backends(dict):
    """Backends by (kind, device, plan); ``backends["triton"]`` is the only one of that kind (inspection)."""

    def __getitem__(self, key):
        if isinstance(key, str):
            found = [b for k, b in self.items() if k[0] == key]
            if len(found) != 1:
                raise KeyError(f"{len(found)} {key} backends: name one by (kind, device, plan hash)")
            return found[0]
        return super().__getitem__(key)


def _fingerprint(value):
    """A hyperparameter value as a comparable key: a tensor by identity and storage (comparing tensors by value
    would read them on the host: a GPU sync per step; ``set_`` swaps the storage under the same object)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value.data_ptr())
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_fingerprint(v) for v in value))
    return (type(value).__name__, value)


def _immutable(value) -> bool:
    """A value that cannot change while it is the same object (not a tensor: ``set_`` swaps its storage)."""
    if isinstance(value, tuple):
        return all(map(_immutable, value))
    return value is None or isinstance(value, (bool, int, float, str))


def _memory_span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) a (possibly strided) tensor can touch in its storage."""
    size = t.element_size()
    start = t.storage_offset() * size
    extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1 if t.numel() else 0
    return start, start + extent * size


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (a stride of 0, as ``expand`` makes, or strides that
    interleave): each dimension, by increasing stride, must step past everything the smaller ones reach."""
    reach = 0
    for stride, size in sorted((abs(s), n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_no_shared_memory(params, name: str) -> None:
    """Two parameters in one optimizer that overlap in memory would each be updated from a value the other
    already changed (torch's for-loop order, a race in one launch): refused, before anything changes.
    Meta tensors have no memory to share."""
    spans = {}
    for p in params:
        if p.numel() == 0 or p.device.type == "meta":
            continue
        p = p.to_local() if hasattr(p, "to_local") else p
        start, end = _memory_span(p)
        spans.setdefault(p.untyped_storage().data_ptr(), []).append((start, end, tuple(p.shape)))
    for ranges in spans.values():
        if len(ranges) < 2:
            continue
        ranges.sort()
        reach, shape0 = ranges[0][1], ranges[0][2]
        for s1, e1, shape1 in ranges[1:]:
            if s1 < reach:
                raise RuntimeError(
                    f"{name}: two parameters share memory (shapes {shape0} and {shape1}); an optimizer cannot "
                    "update overlapping parameters consistently: pass the shared tensor once"
                )
            if e1 > reach:
                reach, shape0 = e1, shape1


def counts_steps(ir) -> bool:
    """Whether the update uses the step count beyond a first-step test (t == 1)."""
    from ..spec import StepSymbol

    for _, expr in ir.updates:
        steps = [s for s in expr.free_symbols if isinstance(s, StepSymbol)]
        if not steps:
            continue
        first = {e: sympy.true for e in expr.atoms(sympy.Eq, sympy.Ne) if e.free_symbols <= set(steps)}
        if any(isinstance(s, StepSymbol) for s in expr.xreplace(first).free_symbols):
            return True
    return False
