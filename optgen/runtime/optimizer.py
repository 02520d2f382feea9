"""The ``torch.optim.Optimizer`` that every generated optimizer class extends, and ``build``.

The contract is torch's (see ``torch/optim/adamw.py``): ``params`` or param-group dicts with per-group
hyperparameters, ``defaults``, lazily created state named as torch names it, ``step(closure=None)``,
``zero_grad``, ``state_dict``/``load_state_dict``. Parameters without ``.grad`` are skipped. Bad input
raises before any parameter, state or step count changes.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import math
import operator
import os
import sys
import warnings
from dataclasses import dataclass

import sympy
import torch

from .. import transforms
from ..analysis import plan as make_plan
from ..codegen.printers import torch_code
from ..codegen.render import check_names, source_hash
from ..ir import lower
from ..spec import BoolHyperSymbol, HyperSymbol, Spec, SpecError, StepSymbol
from . import backends, distributed
from .tables import scratch_buffer


def _env_flag(name: str) -> bool:
    """An environment switch: set and neither empty nor "0"."""
    return os.environ.get(name, "0") not in ("", "0")


class GeneratedOptimizer(torch.optim.Optimizer):
    """Base of the classes ``optgen.build`` returns. Subclasses set ``_spec``."""

    # steps whose layout equals the last step's skip the per-parameter checks (see _fast_step)
    _fast_path = True

    # torch.amp.GradScaler then sets ``grad_scale``/``found_inf`` around step() instead of unscaling the
    # gradients itself and reading found_inf on the host (the contract of torch's fused AdamW).
    _step_supports_amp_scaling = True

    _spec: Spec
    _signature: inspect.Signature

    def __init__(self, *args, **kwargs):
        bound = self._signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        params = arguments.pop("params")
        backend = arguments.pop("backend")
        maximize = arguments.pop("maximize")
        master = arguments.pop("master_weights")
        state_dtype = arguments.pop("state_dtype")
        autotune = arguments.pop("autotune")
        if autotune is None:
            autotune = _env_flag("OPTGEN_AUTOTUNE")
        if autotune is True:
            from .autotune import search_mode

            search_mode()  # a bad OPTGEN_AUTOTUNE_SEARCH fails here, not at the first step
        clip = "max_grad_norm" in arguments and not self._spec_clips()
        if clip and arguments["max_grad_norm"] is None:
            arguments.pop("max_grad_norm")
            clip = False
        flags = {f.name: arguments.pop(f.name) for f in self._spec.flags}
        for key, value in list(arguments.items()):
            if value is None:  # None means the default, as for torch's optional arguments
                arguments[key] = self._signature.parameters[key].default
        if backend not in backends.CHOICES:
            raise ValueError(f"Invalid backend: {backend!r} (expected one of {backends.CHOICES})")
        for name, value in {**flags, "maximize": maximize, "master_weights": master, "autotune": autotune}.items():
            if not isinstance(value, bool):
                raise ValueError(f"Invalid {name} value: {value!r} (expected True or False)")
        if state_dtype not in (None, torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r} (expected None, torch.float32, bfloat16, float16 or float64)"
            )
        params = list(params) if not isinstance(params, torch.Tensor) else [params]
        master_requested = master
        if master and _all_full_precision(params):
            warnings.warn("master_weights=True has no effect on fp32/fp64 parameters; ignored", stacklevel=3)
            master = False
        # what the constructor fixes for good (the compiled variant): kept for copies and pickles
        self._configure(dict(flags=flags, maximize=maximize, clip=clip, master=master, state_dtype=state_dtype,
                             backend=backend, autotune=autotune, master_requested=master_requested))  # fmt: skip
        defaults = dict(arguments)
        for key, value in defaults.items():
            self._check_value(key, value)
        self._check_requirements(defaults, "defaults")
        super().__init__(params, defaults)
        self.state = _States(self.state)
        for device in {p.device for g in self.param_groups for p in g["params"]}:
            backends.resolve(backend, device)  # a backend that cannot run on these tensors: say so now

    def _configure(self, config: dict) -> None:
        """Everything derived from the constructor's choices: the IR, the plan and its variants, the backends."""
        self._config = dict(config)
        self._flags = config["flags"]
        self._state_dtype = config["state_dtype"]
        self._backend_choice = config["backend"]
        self._autotune = config["autotune"]
        # options torch.optim keeps per param group but that select optgen's compiled variant
        self._options = {**config["flags"], "maximize": config["maximize"]}
        self._ir = transforms.apply(
            lower(self._spec, config["flags"]), maximize_=config["maximize"], max_grad_norm=config["clip"], master=config["master"]
        )
        self._plan = make_plan(self._ir)
        self._variants = {None: self._plan}
        self._keys = _group_keys(self._ir)
        self._backends = _Backends()
        self._scratch: dict[tuple[int, str], torch.Tensor] = {}
        self._checked: dict[int, tuple] = {}  # id(group) -> (fingerprint of its hyperparameters, values)
        self._generation = 0  # bumped by whatever changes the layout of a step (groups, loaded state)
        self._fast = None

    def __getstate__(self):
        """torch's (defaults, state, param_groups) and the constructor's choices: copy.deepcopy and pickle
        give an optimizer that steps. Backends, tables and compiled kernels are rebuilt on first use."""
        state = super().__getstate__()
        state["_config"] = self._config
        return state

    def __setstate__(self, state):
        config = state.pop("_config", None)
        super().__setstate__(state)  # also torch's load_state_dict: state and param_groups, no configuration
        if not isinstance(self.state, _States):
            self.state = _States(self.state)
        _STATE_EDITS[0] += 1
        if config is not None:
            self._configure(config)
        elif not hasattr(self, "_config"):
            raise RuntimeError(f"{type(self).__name__}: this pickle holds no optgen configuration")

    def __deepcopy__(self, memo):
        import copy

        twin = type(self).__new__(type(self))  # the same class, built or not
        memo[id(self)] = twin
        twin.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return twin

    def __reduce_ex__(self, protocol):
        """Classes made by ``optgen.build`` are not importable by name: their instances pickle with the spec
        and rebuild the class (the built-ins pickle by reference as usual)."""
        cls = type(self)
        module = sys.modules.get(cls.__module__)
        if getattr(module, cls.__qualname__, None) is cls:
            return super().__reduce_ex__(protocol)
        return _rebuilt_instance, (cls._spec,), self.__getstate__()

    def _check_options(self, group: dict, where: str) -> None:
        """torch.optim keeps nesterov, maximize (and amsgrad) per param group; in optgen they select the
        compiled variant at construction. A group (added, loaded from a state dict, or edited) asking for
        another value would be ignored: refuse it, naming the option."""
        for name, value in self._options.items():
            if name in group and bool(group[name]) != value:
                raise ValueError(
                    f"{name}={group[name]!r} in {where}, but this {type(self).__name__} was made with {name}={value}: "
                    f"it selects the compiled update for the whole optimizer; make one with {name}={bool(group[name])}"
                )
        if group.get("amsgrad"):
            raise ValueError(f"amsgrad=True in {where}: {type(self).__name__} has no AMSGrad variant")

    @classmethod
    def _spec_clips(cls) -> bool:
        return any(h.name == "max_grad_norm" for h in cls._spec.hypers)

    def _variant(self, amp_mode):
        """The plan for this step: GradScaler's attributes select the AMP variant (see transforms.amp)."""
        if amp_mode not in self._variants:
            self._variants[amp_mode] = make_plan(transforms.amp(self._ir, unscale=amp_mode == "unscale"))
        return self._variants[amp_mode]

    # -- validation ------------------------------------------------------------------------------------

    def _check_value(self, key: str, value) -> None:
        decls = self._keys[key]
        if decls[0].index is not None:
            if not isinstance(value, (tuple, list)) or len(value) != len(decls):
                raise ValueError(f"Invalid {key} value: {value!r} (expected a tuple of {len(decls)} numbers)")
            items = list(value)
        else:
            items = [value]
        for decl, item in zip(decls, items):
            if isinstance(item, torch.Tensor):
                if item.numel() != 1:
                    raise ValueError(f"Invalid {key} value: a tensor with {item.numel()} elements (expected one)")
                if item.is_complex():
                    raise ValueError(f"Invalid {key} value: complex tensor")
                continue  # device tensors are checked without a host sync: nothing is read here
            problem = decl.check(item)
            if problem:
                raise ValueError(problem)

    def _check_requirements(self, group: dict, where: str) -> None:
        subs = {}
        for decl in self._ir.hypers:
            if decl.key in group:
                value = group[decl.key] if decl.index is None else group[decl.key][decl.index]
                if isinstance(value, torch.Tensor):
                    return  # tensors are not read on the host
                symbol = BoolHyperSymbol(decl.name) if decl.is_bool else HyperSymbol(decl.name)
                subs[symbol] = float(value)
        for req in self._ir.requirements:
            if req.condition.xreplace(subs) is not sympy.true:
                raise ValueError(f"{req.message} ({where})")

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None:
            params = list(params)
        for p in params or []:
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
        if self._config.get("master_requested") and not self._config["master"] and not _all_full_precision(params or []):
            raise ValueError(
                f"{type(self).__name__}: master_weights=True was ignored when the optimizer was made (its parameters "
                f"were all fp32/fp64); this group's bf16/fp16 parameters would get none: make the optimizer with them"
            )
        if params and len({id(p) for p in params}) != len(params):
            # torch warns and would step the tensor twice per step; one launch cannot update it twice
            raise ValueError(f"{type(self).__name__}: a parameter appears twice in one param group; pass it once")
        # Parameters on several devices are allowed: each device gets its own launches (see step()).
        for key, value in param_group.items():
            if key in self._keys:
                self._check_value(key, value)
        self._check_options(param_group, "a param group")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_requirements(merged, "param group")
        super().add_param_group(param_group)
        self._generation = self.__dict__.get("_generation", 0) + 1

    # -- state -------------------------------------------------------------------------------------------

    def _group_values(self, group: dict) -> tuple:
        """The group's hyperparameters in IR order: floats (bools as 0/1), or 1-element tensors as given
        (a capturable lr): those are never read on the host; the backends copy them on the device."""
        values = []
        for decl in self._ir.hypers:
            raw = group.get(decl.key)
            if raw is None:
                raw = self.defaults.get(decl.key, decl.default if decl.index is None else None)
            value = raw if decl.index is None else raw[decl.index]
            values.append(value.reshape(()) if isinstance(value, torch.Tensor) else float(value))
        return tuple(values)

    def _step_values(self, group: dict) -> tuple:
        """The group's hyperparameters for this step, checked again whenever they changed since the last step:
        an LR scheduler or a user may set any value between steps, and the kernels rely on the declared ranges
        (e.g. a power of a base declared positive). A bad value raises before anything is modified."""
        keys = (*self._keys, *self._options, "amsgrad")
        fingerprint = tuple(_fingerprint(group.get(key, self.defaults.get(key))) for key in keys)
        cached = self._checked.get(id(group))
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        self._check_group_at_step(group)
        values = self._group_values(group)
        self._checked[id(group)] = (fingerprint, values)
        return values

    @torch.compiler.disable  # host-side checks (sympy): run as Python, not traced, inside a user's torch.compile
    def _check_group_at_step(self, group: dict) -> None:
        where = next(f"param group {i}" for i, g in enumerate(self.param_groups) if g is group)
        self._check_options(group, f"{where}, at step")
        try:
            for key in self._keys:
                if key in group:
                    self._check_value(key, group[key])
        except ValueError as exc:
            raise ValueError(f"{exc} ({where}, at step)") from None
        self._check_requirements({**self.defaults, **group}, f"{where}, at step")

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        """Create the missing state entries (all on the first step; some after loading a checkpoint of another
        optimizer, e.g. master weights resumed from a torch.optim.AdamW state dict)."""
        state = self.state[param]
        if type(state) is not _ParamState:
            state = self.state[param] = _ParamState(state)
        missing = [decl for decl in self._ir.states if decl.name not in state]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=param.device)
        for decl in self._ir.states:
            value = state.get(decl.name)
            if isinstance(value, torch.Tensor) and value.shape != param.shape:
                # a state dict loaded for other parameters (their order changed), or a state assigned by hand:
                # the kernels would read and write past it
                raise RuntimeError(
                    f"{type(self).__name__}: state {decl.name!r} has shape {tuple(value.shape)} for a parameter of "
                    f"shape {tuple(param.shape)} (a state dict of other parameters, or a state set by hand?)"
                )
        if missing:
            compute = torch.promote_types(param.dtype, torch.float32)
            env = {"torch": torch, "w": param.detach().to(compute), "dtype": compute}  # the printer's names
            for decl, value in zip(self._ir.hypers, self._group_values(group)):
                env[decl.name] = torch.as_tensor(value, dtype=compute, device=param.device)
            for decl in missing:
                # master weights are always full precision; other states follow state_dtype
                dtype = compute if decl.name == transforms.MASTER else (self._state_dtype or compute)
                if decl.init.is_number:
                    state[decl.name] = torch.full_like(param, float(decl.init), dtype=dtype, memory_format=torch.preserve_format)
                else:
                    value = eval(torch_code(decl.init), env)  # printer output over this spec's own symbols
                    state[decl.name] = torch.empty_like(param, dtype=dtype, memory_format=torch.preserve_format).copy_(value)
        return state

    def _scratch_of(self, param: torch.Tensor, name: str) -> torch.Tensor:
        return scratch_buffer(self._scratch, param, name)

    # -- step ----------------------------------------------------------------------------------------------

    def _collect(self):
        """Parameters with gradients, validated before anything is modified."""
        items = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if grad.device != p.device:
                    raise RuntimeError(
                        f"{type(self).__name__}: gradient on {grad.device} for a parameter on {p.device}"
                    )
                if grad.shape != p.shape:
                    raise RuntimeError(
                        f"{type(self).__name__}: gradient of shape {tuple(grad.shape)} for a parameter of "
                        f"shape {tuple(p.shape)}"
                    )
                if p.is_complex() or grad.is_complex():
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
                items.append((group, p, grad))
        # the overlap check walks every parameter's strides: only when the parameters or their storage changed
        key = tuple((id(p), p.data_ptr(), p.shape) for _, p, _ in items)
        if key != self.__dict__.get("_memory_checked"):
            _check_no_shared_memory([p for _, p, _ in items], type(self).__name__)
            self._memory_checked = key
        return items

    def _backend_for(self, device: torch.device, plan):
        backend = backends.resolve(self._backend_choice, device)
        key = (backend.name, str(device), source_hash(plan))
        if key not in self._backends:
            options = {}
            if self._autotune:
                from .autotune import tune

                options["tuner"] = tune
            self._backends[key] = backends.make(backend, plan, options)
        return self._backends[key]

    def _amp(self):
        """GradScaler's ``grad_scale``/``found_inf`` attributes, set around ``step`` (torch's fused contract)."""
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None and grad_scale is None:
            return None, {}
        if found_inf is None:
            found_inf = torch.zeros((), dtype=torch.float32, device=grad_scale.device)
        scalars = {"found_inf": found_inf}
        if grad_scale is not None:
            scalars["grad_scale"] = grad_scale
        return ("unscale" if grad_scale is not None else "gate"), scalars

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._fast_step():
            return loss
        collected = self._collect()
        if not collected:
            return loss
        amp_mode, device_scalars = self._amp()
        plan = self._variant(amp_mode)
        reducer = self._reducer([p for _, p, _ in collected])
        backends = {}  # one backend per device for this step's plan
        for _, p, grad in collected:  # unsupported dtypes fail before any state exists
            if p.device not in backends:
                backends[p.device] = self._backend_for(p.device, plan)
            check = getattr(backends[p.device], "check", None)
            if check is not None:
                check(distributed.local(p), distributed.local(grad), self._state_dtype)
        if len(backends) > 1 and any(slot.scope == "global" for slot in plan.slots):
            # each device's launches would see only its own parameters' share of a global norm
            raise RuntimeError(
                f"{type(self).__name__}: this update reduces over all parameters (a global norm: max_grad_norm, "
                f"NVLAMB) and the parameters are on several devices ({', '.join(map(str, backends))}); keep them "
                f"on one device, or use one optimizer per device with its own clipping"
            )
        groups = {id(group): group for group, _, _ in collected}  # each group once, in order
        values_of = {key: self._step_values(group) for key, group in groups.items()}
        by_backend: dict[int, tuple] = {}
        for group, p, grad in collected:
            backend = backends[p.device]
            state = self._init_state(p, group)
            sharded = distributed.is_sharded(p)
            if distributed.is_dtensor(p):  # FSDP2: the backends work on the local shards
                state = self._local_state(p, state)
                p, grad = p.to_local(), distributed.local(grad)
            item = (p, grad, state, values_of[id(group)])
            entry = by_backend.setdefault(id(backend), (backend, [], []))
            entry[1].append(item)
            entry[2].append(sharded)  # the rows of this backend's partial tables, in item order
        for backend, backend_items, sharded in by_backend.values():
            device = backend_items[0][0].device
            scalars = {k: v.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1) for k, v in device_scalars.items()}
            backend.step(backend_items, self._scratch_of, scalars, None if reducer is None else reducer.rows(sharded))
        self._remember_layout(collected, by_backend, amp_mode, reducer, plan)
        return loss

    # -- the fast path: a step with the layout of the last one ---------------------------------------------

    def _remember_layout(self, collected, by_backend, amp_mode, reducer, plan) -> None:
        """After a full step: when the next steps can be told apart from this one by a few identity and
        metadata compares per tensor (one backend with a fast path, every parameter with a gradient, no
        GradScaler, nothing sharded, plain hyperparameter values), keep what they are compared against."""
        self._fast = None
        if amp_mode is not None or reducer is not None or len(by_backend) != 1 or plan is not self._plan:
            return
        (backend, items, _), = by_backend.values()
        advance = plan.passes[-1].step_advance
        if not hasattr(backend, "fast_step") or not advance.is_number or float(advance) != 1.0:
            return
        params = [p for group in self.param_groups for p in group["params"]]
        if len(params) != len(collected) or any(distributed.is_dtensor(p) for p in params):
            return
        rows = self._plain_group_rows()
        if rows is None:
            return
        group_of = [i for i, group in enumerate(self.param_groups) for _ in group["params"]]
        if not backend.prepare_fast(group_of, rows):
            return
        state_tensors = [v for _, _, state, _ in items for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)]
        self._fast = _FastLayout(
            generation=self._generation,
            backend=backend,
            param_ids=[id(p) for p in params],
            group_sizes=[len(group["params"]) for group in self.param_groups],
            param_ptrs=[p.data_ptr() for p in params],
            param_strides=[p.stride() for p in params],
            param_dtypes=[p.dtype for p in params],
            shapes=[p.shape for p in params],
            grad_dtypes=[g.dtype for _, _, g in collected],
            grad_devices=[g.device for _, _, g in collected],
            state_edits=_STATE_EDITS[0],
            states=self.state,
            state_tensors=state_tensors,
            state_ptrs=[t.data_ptr() for t in state_tensors],
        )

    def _plain_group_rows(self) -> list[tuple] | None:
        """Every group's hyperparameters for this step, or None when one is a tensor (capturable values are
        gathered on the device by the full path)."""
        rows = [self._step_values(group) for group in self.param_groups]
        if any(isinstance(v, torch.Tensor) for row in rows for v in row):
            return None
        return rows

    def _fast_step(self) -> bool:
        """Run the step through the backend's fast path if nothing but gradients and hyperparameter values
        changed since the step that set it up; anything else (or any doubt) takes the full path."""
        fast = self.__dict__.get("_fast")
        if fast is None or fast.generation != self._generation or not self._fast_path:
            return False
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        if [len(group["params"]) for group in self.param_groups] != fast.group_sizes:  # a group added, or a
            return False  # parameter moved between groups
        params = [p for group in self.param_groups for p in group["params"]]
        # Per tensor a handful of C-level attribute reads (map over unbound methods: ~40 ns each). Metadata can
        # change without the tensor object changing (``.data = ``, ``set_``): every step checks it all.
        if list(map(id, params)) != fast.param_ids:
            return False
        grads = list(map(_GRAD, params))
        try:
            if (list(map(_SHAPE, grads)) != fast.shapes or list(map(_DTYPE, grads)) != fast.grad_dtypes
                    or list(map(_DEVICE, grads)) != fast.grad_devices or not all(map(torch.Tensor.is_contiguous, grads))):  # fmt: skip
                return False
        except (AttributeError, TypeError, RuntimeError):  # no gradient, or a layout without strides: the full path says what
            return False
        if (list(map(torch.Tensor.data_ptr, params)) != fast.param_ptrs or list(map(_SHAPE, params)) != fast.shapes
                or list(map(torch.Tensor.stride, params)) != fast.param_strides or list(map(_DTYPE, params)) != fast.param_dtypes):  # fmt: skip
            return False
        if _STATE_EDITS[0] != fast.state_edits or self.state is not fast.states:  # a state entry set or replaced
            return False
        if list(map(torch.Tensor.data_ptr, fast.state_tensors)) != fast.state_ptrs:  # a state's storage swapped in place
            return False
        rows = self._plain_group_rows()
        if rows is None:
            return False
        fast.backend.fast_step(grads, rows)
        return True

    def _reducer(self, params):
        """The all-reduce of partial tables between passes when parameters are sharded (see distributed)."""
        group = distributed.shard_group(params, type(self).__name__)
        if group is None:
            return None
        if getattr(self, "_shard_reducer", None) is None or self._shard_reducer.group is not group:
            self._shard_reducer = distributed.ShardReducer(group)
        return self._shard_reducer

    def _local_state(self, param, state):
        cache = self.__dict__.setdefault("_local_states", {})
        view = cache.get(param)
        if view is None or not view.current(state):
            view = distributed.LocalState(state)
            cache[param] = view
        return view

    def state_dict(self) -> dict:
        """torch's state dict, with plain dicts as each parameter's state."""
        saved = super().state_dict()
        saved["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, then states keep their saved dtype (torch casts floating state to the parameter's
        dtype, which would turn the fp32 moments and master weights of bf16 parameters into bf16) and the
        step count lives on the parameter's device as fp32 (a torch.optim state dict keeps it on the CPU)."""
        for i, group in enumerate(state_dict.get("param_groups", [])):  # before anything is loaded
            self._check_options(group, f"param group {i} of the state dict")
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[param]
            if "step" not in saved and any(name in saved for name in self._ir.state_names):
                # torch.optim's SGD keeps no step count: a saved state means the parameter has stepped, and
                # step 1 is all a first-step test (SGD's momentum buffer) needs. A spec that counts steps
                # (bias correction) cannot know how many: it restarts its count, and says so.
                saved = {**saved, "step": torch.tensor(1.0)}
                if _counts_steps(self._ir):
                    warnings.warn(
                        f"{type(self).__name__}.load_state_dict: a parameter's state has no 'step'; counting from "
                        f"step 1 (bias corrections restart)",
                        stacklevel=2,
                    )
            for key, value in saved.items():
                if key == "step" and isinstance(value, (int, float)):  # torch < 1.12 saved a Python number
                    value = torch.tensor(float(value))
                if not isinstance(value, torch.Tensor):
                    continue
                dtype = torch.float32 if key == "step" else value.dtype
                state[key] = value.detach().to(device=param.device, dtype=dtype, copy=True)
        for backend in self._backends.values():
            invalidate = getattr(backend, "invalidate", None)
            if invalidate:
                invalidate()
        self._generation += 1

    @property
    def plan(self):
        """The pass plan of the chosen variant (``print(opt.plan.describe())``)."""
        return self._plan


_GRAD, _SHAPE, _DTYPE, _DEVICE = (operator.attrgetter(name) for name in ("grad", "shape", "dtype", "device"))
# Edits of any optimizer's state dicts (entries set, replaced or removed): a fast step compares a count.
_STATE_EDITS = [0]


class _CountsEdits:
    """Mixed into a dict: every mutating method counts a state edit. Written with ``super()`` (not by
    wrapping dict's slots): dynamo traces these inside a user's ``torch.compile``."""

    __slots__ = ()

    def __setitem__(self, key, value):
        _STATE_EDITS[0] += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _STATE_EDITS[0] += 1
        super().__delitem__(key)

    def pop(self, *args):
        _STATE_EDITS[0] += 1
        return super().pop(*args)

    def popitem(self):
        _STATE_EDITS[0] += 1
        return super().popitem()

    def clear(self):
        _STATE_EDITS[0] += 1
        super().clear()

    def update(self, *args, **kwargs):
        _STATE_EDITS[0] += 1
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        _STATE_EDITS[0] += 1
        return super().setdefault(key, default)


class _ParamState(_CountsEdits, dict):
    """A parameter's state, as torch.optim keeps it (a dict of tensors), counting its edits: a fast step must
    notice a state tensor replaced by assignment. ``state_dict()`` hands out plain dicts."""

    __slots__ = ()


class _States(_CountsEdits, collections.defaultdict):
    """The optimizer's ``state`` (parameter -> state dict), counting parameters' state dicts set or removed."""

    def __init__(self, states=None):
        super().__init__(dict, states or {})

    def __reduce__(self):  # pickles (and deep-copies) as a plain defaultdict of plain dicts
        return collections.defaultdict, (dict, {k: dict(v) for k, v in self.items()})


@dataclass
class _FastLayout:
    """What a fast step compares against (see ``GeneratedOptimizer._fast_step``)."""

    generation: int
    backend: object
    param_ids: list
    group_sizes: list
    param_ptrs: list
    param_strides: list
    param_dtypes: list
    shapes: list  # of the parameters, and of their gradients
    grad_dtypes: list
    grad_devices: list
    state_edits: int
    states: object
    state_tensors: list
    state_ptrs: list


def _counts_steps(ir) -> bool:
    """Whether the update uses the step count beyond a first-step test (t == 1)."""
    for _, expr in ir.updates:
        steps = [s for s in expr.free_symbols if isinstance(s, StepSymbol)]
        if not steps:
            continue
        first = {e: sympy.true for e in expr.atoms(sympy.Eq, sympy.Ne) if e.free_symbols <= set(steps)}
        if any(isinstance(s, StepSymbol) for s in expr.xreplace(first).free_symbols):
            return True
    return False


_REBUILT: dict = {}


def _rebuilt_instance(spec):
    """An empty instance of ``build(spec)`` for unpickling (``__setstate__`` fills it): the class built from
    this very spec object when there is one (a copy in this process), else a new build (a pickle)."""
    entry = _REBUILT.get(id(spec))
    cls = entry[1] if entry is not None and entry[0] is spec else build(spec)
    return cls.__new__(cls)


def _fingerprint(value):
    """A hyperparameter value as a comparable key: a tensor by identity (comparing tensors by value would read
    them on the host: a GPU sync per step)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_fingerprint(v) for v in value))
    return (type(value).__name__, value)


def _memory_span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) a (possibly strided) tensor can touch in its storage."""
    size = t.element_size()
    start = t.storage_offset() * size
    extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1 if t.numel() else 0
    return start, start + extent * size


def _check_no_shared_memory(params, name: str) -> None:
    """Two parameters in one optimizer that overlap in memory would each be updated from a value the other
    already changed (torch's for-loop order, a race in one launch): refused, before anything changes."""
    spans = {}
    for p in params:
        if p.numel() == 0:
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


class _Backends(dict):
    """Backends by (kind, device, plan); ``backends["triton"]`` is the only one of that kind (inspection)."""

    def __getitem__(self, key):
        if isinstance(key, str):
            found = [b for k, b in self.items() if k[0] == key]
            if len(found) != 1:
                raise KeyError(f"{len(found)} {key} backends: name one by (kind, device, plan hash)")
            return found[0]
        return super().__getitem__(key)


def _all_full_precision(params) -> bool:
    tensors = []
    for p in params:
        tensors += list(p["params"]) if isinstance(p, dict) else [p]
    return all(t.dtype in (torch.float32, torch.float64) for t in tensors)


def _group_keys(ir) -> dict[str, list]:
    keys: dict[str, list] = {}
    for decl in ir.hypers:
        keys.setdefault(decl.key, []).append(decl)
    return keys


def _signature_for(spec: Spec) -> inspect.Signature:
    ir = lower(spec)
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
    for key, decls in _group_keys(ir).items():
        default = decls[0].default if decls[0].index is None else tuple(d.default for d in decls)
        params.append(inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    for flag in spec.flags:
        params.append(inspect.Parameter(flag.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=flag.default))
    keyword = inspect.Parameter.KEYWORD_ONLY
    if not any(h.name == "max_grad_norm" for h in spec.hypers):
        params.append(inspect.Parameter("max_grad_norm", keyword, default=None))
    params.append(inspect.Parameter("maximize", keyword, default=False))
    params.append(inspect.Parameter("master_weights", keyword, default=False))
    params.append(inspect.Parameter("state_dtype", keyword, default=None))
    params.append(inspect.Parameter("backend", keyword, default="auto"))
    params.append(inspect.Parameter("autotune", keyword, default=None))
    return inspect.Signature(params)


def build(spec: Spec) -> type[torch.optim.Optimizer]:
    """Compile ``spec`` into a ``torch.optim.Optimizer`` subclass (every flag variant is checked now)."""
    if not isinstance(spec, Spec):
        raise TypeError(f"build() takes an optgen.Spec, got {type(spec).__name__}")
    for values in itertools.product((False, True), repeat=len(spec.flags)):
        check_names(make_plan(lower(spec, dict(zip((f.name for f in spec.flags), values)))))
    _check_default_requirements(spec)
    signature = _signature_for(spec)
    doc = (spec.doc or f"{spec.name} optimizer generated by optgen.") + _arguments_doc(spec)
    cls = type(spec.name, (GeneratedOptimizer,), {"_spec": spec, "_signature": signature, "__doc__": doc})
    cls.__init__ = _make_init(signature)
    cls.__module__ = "optgen"
    _REBUILT[id(spec)] = (spec, cls)  # what an unpickled or copied instance of this spec gets
    return cls


def _check_default_requirements(spec: Spec) -> None:
    """The defaults (flags and hyperparameters as declared) must meet the spec's own ``require()``s: else
    every optimizer made without arguments would fail, and the spec's author learns it only then."""
    ir = lower(spec)
    subs = {}
    for decl in ir.hypers:
        symbol = BoolHyperSymbol(decl.name) if decl.is_bool else HyperSymbol(decl.name)
        subs[symbol] = float(decl.default)
    for req in ir.requirements:
        if req.condition.xreplace(subs) is not sympy.true:
            raise SpecError(f"{spec.name}: the defaults do not meet require(): {req.message} [{req.where}]")


def _make_init(signature):
    def __init__(self, *args, **kwargs):
        GeneratedOptimizer.__init__(self, *args, **kwargs)

    __init__.__signature__ = signature
    return __init__


def _arguments_doc(spec: Spec) -> str:
    ir = lower(spec)
    lines = ["", "", "Args:", "    params: parameters or param-group dicts."]
    for key, decls in _group_keys(ir).items():
        default = decls[0].default if decls[0].index is None else tuple(d.default for d in decls)
        d = decls[0]
        if d.is_bool:
            rng = "True or False"
        else:
            rng = f"{'(' if d.lo_open else '['}{d.lo:g}, {d.hi if math.isfinite(d.hi) else 'inf'}{')' if d.hi_open else ']'}"
        lines.append(f"    {key}: default {default!r}, in {rng}. {d.doc}".rstrip())
    for flag in spec.flags:
        lines.append(f"    {flag.name}: compile-time flag, default {flag.default}.")
    if not any(h.name == "max_grad_norm" for h in spec.hypers):
        lines.append("    max_grad_norm: None, or divide all gradients by max(1, ||g||_global/max_grad_norm) in the step.")
    lines.append("    maximize: ascend instead of descend (g -> -g).")
    lines.append("    master_weights: keep fp32 copies of bf16/fp16 parameters as state; write the model's weights from them.")
    lines.append("    state_dtype: dtype of the optimizer states (default fp32; fp64 for fp64 parameters).")
    lines.append("    backend: 'auto' (Triton on CUDA tensors, torch otherwise), 'torch' or 'triton'.")
    lines.append(
        "    autotune: time the Triton backend's launch configs on copies of the tensors at the first step and"
        " keep the fastest (cached on disk per kernel, GPU, dtypes and size); default: OPTGEN_AUTOTUNE=1 in the"
        " environment, else off."
    )
    return "\n".join(lines)


__all__ = ["GeneratedOptimizer", "build", "SpecError"]
