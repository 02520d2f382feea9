"""The ``torch.optim.Optimizer`` that every generated optimizer class extends, and ``build``.

The contract is torch's (see ``torch/optim/adam.py`` and ``optimizer.py``): ``params`` or param-group dicts
(named parameters too) with per-group hyperparameters and options, ``defaults``, torch's arguments
(``foreach``, ``fused``, ``capturable``, ``differentiable``, ``maximize`` and the spec's flags such as
``nesterov`` or ``amsgrad``) kept in every group, lazily created state named as torch names it,
``step(closure=None)``, ``zero_grad``, ``state_dict``/``load_state_dict`` that cross with torch.optim both
ways. Parameters without ``.grad`` are skipped. Bad input raises torch's exception types and messages before
any parameter, state or step count changes.

This module is the shell (arguments, validation, groups, state dicts, pickling); ``steps.StepRunner`` runs the
steps (variants, backends, the fast path).
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import sys
import warnings

import sympy
import torch

from .. import quantization, settings, transforms
from ..analysis import plan as make_plan
from ..codegen.render import check_names
from ..ir import lower
from ..spec import QUANT_MAP_SUFFIX, QUANT_ROW_SUFFIX, QUANT_SUFFIX, BoolHyperSymbol, HyperSymbol, Spec, SpecError
from . import backends, distributed
from .steps import STATE_EDITS, States, StepRunner, counts_steps, saved_block_row

# torch.optim's implementation options: accepted with torch's defaults and kept in every param group (torch
# resumes an optgen checkpoint with them). optgen is always multi-tensor and always capturable; ``fused=True``
# asks for the device's kernel backend (the C kernels on CPU, Triton on CUDA).
TORCH_OPTIONS = {"foreach": None, "capturable": False, "differentiable": False, "fused": None}
# torch.optim's group keys that select another algorithm: set in a group (or a loaded state dict) of an optimizer
# without that option, they are refused rather than ignored
TORCH_ALGORITHM_SWITCHES = ("maximize", "nesterov", "amsgrad", "decoupled_weight_decay")


class GeneratedOptimizer(torch.optim.Optimizer):
    """Base of the classes ``optgen.build`` returns. Subclasses set ``_spec``."""

    # steps whose layout equals the last step's skip the per-parameter checks (see StepRunner.fast_step)
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
        master = arguments.pop("master_weights")
        state_dtype = arguments.pop("state_dtype")
        state_format = arguments.pop("state_format")
        stochastic_round = arguments.pop("bf16_stochastic_round")
        autotune = arguments.pop("autotune")
        if isinstance(params, torch.Tensor):  # torch's message
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
                + torch.typename(params)
            )
        if autotune is None:
            autotune = settings.flag("OPTGEN_AUTOTUNE")
        if autotune is True:
            from .autotune import search_mode

            search_mode()  # a bad OPTGEN_AUTOTUNE_SEARCH fails here, not at the first step
        clip = "max_grad_norm" in arguments and not self._spec_clips()
        if clip and arguments["max_grad_norm"] is None:
            arguments.pop("max_grad_norm")
            clip = False
        for key, value in list(arguments.items()):
            if value is None and key not in TORCH_OPTIONS:  # None means the default, as for torch's optional arguments
                arguments[key] = self._signature.parameters[key].default
        if backend not in backends.CHOICES:
            raise ValueError(f"Invalid backend: {backend!r} (expected one of {backends.CHOICES})")
        if arguments["fused"] and backend != "auto":
            raise ValueError(
                f"fused=True selects the kernel backend of the parameters' device; backend={backend!r} names "
                f"another choice: pass one of them"
            )
        for name, value in {"master_weights": master, "autotune": autotune}.items():
            if not isinstance(value, bool):
                raise ValueError(f"Invalid {name} value: {value!r} (expected True or False)")
        if state_dtype not in (None, torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r} (expected None, torch.float32, bfloat16, float16 or float64)"
            )
        state_dtype, quantized = _state_format(self._spec, state_format, state_dtype)
        if not isinstance(stochastic_round, bool):
            raise ValueError(f"Invalid bf16_stochastic_round value: {stochastic_round!r} (expected True or False)")
        # what the constructor fixes for good: kept for copies and pickles
        self._configure(dict(clip=clip, master=master, state_dtype=state_dtype, backend=backend, autotune=autotune,
                             master_requested=master, quantized=quantized, stochastic_round=stochastic_round))  # fmt: skip
        defaults = dict(arguments)
        self._check_group(defaults, "the arguments")  # before params are read, as torch's constructors do
        params = list(params)
        if master and _all_full_precision(params):
            warnings.warn("master_weights=True has no effect on fp32/fp64 parameters; ignored", stacklevel=3)
            self._config["master"] = False  # the runner reads this dict: no plan was made yet
        super().__init__(params, defaults)
        self.state = States(self.state)

    def _configure(self, config: dict) -> None:
        """Everything derived from the constructor's choices: the validation IR and the step runner."""
        self._config = dict(config)
        self._state_dtype = config["state_dtype"]
        # Every flag and maximize as a per-group switch: one IR that holds every group key, range and require()
        flags = tuple(f.name for f in self._spec.flags)
        self._checks_ir = transforms.apply(lower(self._spec, runtime=flags), maximize_="runtime", max_grad_norm=config["clip"],
                                           stochastic=config.get("stochastic_round", False))  # fmt: skip
        self._keys = _group_keys(self._checks_ir)
        self._checked_keys = (*self._keys, *TORCH_OPTIONS)
        self._runner = StepRunner(self._spec, self._config)

    def __getstate__(self):
        """torch's (defaults, state, param_groups) and the constructor's choices: copy.deepcopy and pickle
        give an optimizer that steps. Backends, tables and compiled kernels are rebuilt on first use."""
        state = super().__getstate__()
        state["_config"] = self._config
        for key in ("_runner", "_checks_ir", "_keys", "_checked_keys"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        config = state.pop("_config", None)
        super().__setstate__(state)  # also torch's load_state_dict: state and param_groups, no configuration
        if not isinstance(self.state, States):
            self.state = States(self.state)
        STATE_EDITS[0] += 1
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

    @classmethod
    def _spec_clips(cls) -> bool:
        return any(h.name == "max_grad_norm" for h in cls._spec.hypers)

    # -- validation ------------------------------------------------------------------------------------

    def _check_value(self, key: str, value) -> None:
        """One group key against its declarations, with torch.optim's exception types and messages."""
        decls = self._keys[key]
        if decls[0].index is not None:
            if not isinstance(value, (tuple, list)) or len(value) != len(decls):
                raise ValueError(f"Invalid {key} value: {value!r} (expected a tuple of {len(decls)} numbers)")
            items = list(value)
            tensors = [isinstance(item, torch.Tensor) for item in items]
            if any(tensors) and not all(tensors):
                both = "both" if len(items) == 2 else "all"
                raise ValueError(f"{key} must be either {both} floats or {both} Tensors")
        else:
            items = [value]
        for decl, item in zip(decls, items):
            label = decl.label
            if isinstance(item, torch.Tensor):
                if item.numel() != 1:
                    raise ValueError(f"Tensor {label} must be 1-element")
                if item.is_complex():
                    raise ValueError(f"Invalid {label} value: complex tensor")
                continue  # device tensors are checked without a host sync: nothing is read here
            if item is None and decl.none is not None:
                continue  # stands for the declared value (Adafactor's eps1: the fp32 epsilon)
            if not isinstance(item, numbers.Real) and not decl.is_bool:  # a flag's own check says "True or False"
                raise TypeError(
                    f"Invalid {label} value: {item!r} (expected a real number or a 1-element tensor, got "
                    f"{type(item).__name__})"
                )
            problem = decl.check(item)
            if problem:
                raise ValueError(problem)

    def _check_group(self, group: dict, where: str) -> None:
        """A group's (or the constructor's) values: ranges and types, torch's option rules, the spec's require()s."""
        for key in self._keys:
            if key in group:
                self._check_value(key, group[key])
        for key in TORCH_ALGORITHM_SWITCHES:
            if key not in self._keys and group.get(key):  # e.g. a torch.optim.Adam(amsgrad=True) checkpoint
                raise ValueError(
                    f"{key}={group[key]!r} in {where}, but {type(self).__name__} has no {key} variant: it would "
                    f"run another algorithm than the one asked for"
                )
        if group.get("differentiable"):
            raise RuntimeError(
                f"{type(self).__name__}: differentiable=True is not supported: the generated kernels update "
                f"parameters in place, outside autograd (use torch.optim with differentiable=True)"
            )
        if group.get("fused") and group.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if group.get("foreach") and not group.get("capturable") and self._spec.torch_foreach_refuses_tensors:
            # torch's foreach implementations read tensor hyperparameters on the host; torch refuses them
            for key, decls in self._keys.items():
                value = group.get(key)
                values = list(value) if decls[0].index is not None and isinstance(value, (tuple, list)) else [value]
                for decl, item in zip(decls, values):
                    if isinstance(item, torch.Tensor):
                        raise ValueError(f"{decl.label} as a Tensor is not supported for capturable=False and foreach=True")
        self._check_requirements(group, where)

    def _check_requirements(self, group: dict, where: str) -> None:
        subs = {}
        for decl in self._checks_ir.hypers:
            if decl.key in group:
                value = group[decl.key] if decl.index is None else group[decl.key][decl.index]
                if isinstance(value, torch.Tensor):
                    return  # tensors are not read on the host
                symbol = BoolHyperSymbol(decl.name) if decl.is_bool else HyperSymbol(decl.name)
                subs[symbol] = float(decl.none if value is None else value)
        for req in self._checks_ir.requirements:
            if req.condition.xreplace(subs) is not sympy.true:
                raise ValueError(f"{req.message} ({where})")

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group (names, defaults, the duplicate warning, parameters in two groups), then
        optgen's checks; a refused group is removed again, so nothing has changed."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        count = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            self._check_new_group(self.param_groups[-1])
        except BaseException:
            del self.param_groups[count:]
            raise
        self._runner.generation += 1

    def _check_new_group(self, group: dict) -> None:
        name = type(self).__name__
        for p in group["params"]:
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"{name} can only optimize floating point and complex tensors, got one of dtype {p.dtype}")
            if p.is_complex() and self._config["master"]:
                raise TypeError(f"{name}: master_weights=True is for bf16/fp16 parameters, not {p.dtype} ones")
            if p.is_complex() and self._config.get("quantized", ()) != ():
                raise ValueError(f"{name}: 8-bit state (state_format) is for real parameters; a parameter is {p.dtype}")
        if len({id(p) for p in group["params"]}) != len(group["params"]):
            # torch warned (above) and would update the tensor twice; one launch updates it once
            keep = [i for i, p in enumerate(group["params"]) if all(q is not p for q in group["params"][:i])]
            group["params"] = [group["params"][i] for i in keep]
            if "param_names" in group:
                group["param_names"] = [group["param_names"][i] for i in keep]
        if self._config.get("master_requested") and not self._config["master"] and not _all_full_precision(group["params"]):
            raise ValueError(
                f"{name}: master_weights=True was ignored when the optimizer was made (its parameters "
                f"were all fp32/fp64); this group's bf16/fp16 parameters would get none: make the optimizer with them"
            )
        for device in {p.device for p in group["params"]}:
            backends.resolve(self._config["backend"], device)  # a backend that cannot run on these tensors: say so now
        self._check_group(group, "param group")

    @torch.compiler.disable  # host-side checks (sympy): run as Python, not traced, inside a user's torch.compile
    def _check_group_at_step(self, group: dict) -> None:
        where = next(f"param group {i}" for i, g in enumerate(self.param_groups) if g is group)
        merged = {**self.defaults, **group}
        try:
            self._check_group(merged, f"{where}, at step")
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.endswith("at step)") else f"{message} ({where}, at step)") from None

    # -- the step ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._runner.step(self)
        return loss

    @property
    def plan(self):
        """The pass plan of the variant the param groups select (``print(opt.plan.describe())``)."""
        return self._runner.plan(self._runner.options_key(self.param_groups, self.defaults))

    @property
    def _backends(self):
        return self._runner.backends

    def _group_values(self, group: dict) -> tuple:
        return self._runner.group_values(group, self.defaults, self.plan.ir)

    # -- state dicts ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's state dict (every group with torch's option keys), with plain dicts as each parameter's state.
        An 8-bit state is its codes (``<state>``, uint8), its block scales (``<state>_absmax``), its map
        (``<state>_qmap``, 256 fp32 values) and the row its blocks lie within (``<state>_qrow``, 0: blocks of the
        flat tensor): a checkpoint says how to read its codes, whatever loads it."""
        saved = super().state_dict()
        saved["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in saved["state"].items()}
        kinds = self._runner.eight_bit_kinds
        for state in saved["state"].values():
            for name in [n for n, v in state.items() if n in kinds and isinstance(v, torch.Tensor) and v.dtype == torch.uint8]:
                state[name + QUANT_MAP_SUFFIX] = torch.tensor(quantization.MAPS[kinds[name]], dtype=torch.float32)
        return saved

    def _paired_states(self, state_dict: dict) -> list[tuple]:
        """(saved id, parameter, its saved state or {}) for each parameter, in order: torch pairs a state dict's
        parameters with this optimizer's by position."""
        saved_ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
        params = [p for g in self.param_groups for p in g["params"]]
        states = state_dict.get("state", {})
        return [(saved_id, param, states.get(saved_id) or {}) for saved_id, param in zip(saved_ids, params)]

    def _check_sharded_formats(self, pairs: list[tuple], element_states: set) -> None:
        """Sharded (FSDP2) parameters' states load as they were saved (their shards are not converted): an 8-bit
        state with this optimizer's map and block layout, a full-precision one where it keeps full precision."""
        for _, param, saved in pairs:
            if not distributed.is_dtensor(param):
                continue
            row = self._runner.block_row(self, param)
            for name in element_states & set(saved):
                codes, want = saved[name], self._runner.eight_bit(param, name, row)
                eight_bit = isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8
                saved_map = saved.get(name + QUANT_MAP_SUFFIX)
                same = eight_bit == (want is not None) and (not eight_bit or (
                    saved_block_row(saved.get(name + QUANT_ROW_SUFFIX)) == row
                    and (saved_map is None or torch.equal(saved_map.float().cpu(), torch.tensor(quantization.MAPS[want])))))  # fmt: skip
                if not same:
                    raise ValueError(
                        f"load_state_dict: state {name!r} of a sharded parameter was saved in another format (8-bit "
                        f"map or block layout, or full precision) than this optimizer keeps; sharded states load as "
                        f"saved: convert the checkpoint in an unsharded optimizer"
                    )

    def _check_saved_shapes(self, pairs: list[tuple], element_states: set) -> None:
        """Each saved element-wise state has its parameter's shape (codes too): a state dict of other parameters,
        or of these in another order, is refused before anything loads (converting its formats would fail
        half-way)."""
        for index, (_, param, saved) in enumerate(pairs):
            for name in sorted(element_states & set(saved)):
                value = saved[name]
                if isinstance(value, torch.Tensor) and value.shape != param.shape:
                    raise ValueError(
                        f"load_state_dict: state {name!r} of parameter {index} has shape {tuple(value.shape)}, and the "
                        f"parameter has shape {tuple(param.shape)} (a state dict of other parameters, or of these in "
                        f"another order?)"
                    )

    def _without_other_variants(self, saved: dict, state: dict, param: torch.Tensor, saved_id, options) -> dict:
        """A parameter's saved state (and ``state``, its loaded copy) without the states this parameter's variant
        does not keep (an AdamW checkpoint's ``exp_avg_sq`` of a matrix loaded into CAME or Adafactor, which factor
        it): the variant's own states start from their initial values, and the load says what it left out."""
        runner = self._runner
        kept = runner.plan(options, None, runner.shape_key(param)).ir.state_names
        other = {d.name for d in self._spec.states if d.when is not None and d.name not in kept}
        suffixes = (QUANT_SUFFIX, QUANT_MAP_SUFFIX, QUANT_ROW_SUFFIX)
        dropped = [k for k in saved if k in other or any(k.endswith(x) and k[: -len(x)] in other for x in suffixes)]
        if not dropped:
            return saved
        warnings.warn(
            f"{type(self).__name__}.load_state_dict: parameter {saved_id} (shape {tuple(param.shape)}) runs a variant "
            f"without {', '.join(repr(k) for k in dropped if k in other)}: the checkpoint's are left out",
            stacklevel=3,
        )
        for key in dropped:  # (torch's load put them in)
            state.pop(key, None)
        return {k: v for k, v in saved.items() if k not in dropped}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, with each group's options and hyperparameters checked first (a torch checkpoint's
        ``nesterov``, ``amsgrad`` or ``decoupled_weight_decay`` selects the same algorithm here). Floating state
        is cast to the dtype this optimizer keeps it in (torch casts to the parameter's dtype: the same for
        fp32/fp64 parameters; the fp32 moments and master weights of bf16 parameters stay fp32), the step
        count lives on the parameter's device as fp32 (a torch.optim state dict keeps it on the CPU)."""
        forced = self._spec.torch_forced_on_load
        state_dict = _plain_states(state_dict)  # another library's quantized states (torchao's) as values
        for i, group in enumerate(state_dict.get("param_groups", [])):  # before anything is loaded
            merged = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}, **forced}
            self._check_group(merged, f"param group {i} of the state dict")
        layer_states = set(self._checks_ir.layer_state_names)
        numbers = {  # a clear error before anything is loaded
            (saved_id, key): _one_number(key, saved[key])
            for saved_id, saved in state_dict.get("state", {}).items()
            for key in layer_states & set(saved or ())
        }
        element_states = {s.name for s in self._spec.states if s.per == "element"}
        tensor_states = {s.name for s in self._spec.states if s.per != "layer"} | {transforms.MASTER}
        for saved_id, saved in state_dict.get("state", {}).items():
            _check_entry_types(saved or {}, saved_id, tensor_states)
            _check_eight_bit_entries(saved or {}, element_states)
        pairs = self._paired_states(state_dict)
        self._check_saved_shapes(pairs, element_states)
        self._check_sharded_formats(pairs, element_states)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(forced)
        options = self._runner.options_key(self.param_groups, self.defaults)  # (the loaded groups' flags)
        state_names = set(self._checks_ir.state_names) | {transforms.MASTER}
        for saved_id, param, saved in pairs:
            if not saved:
                continue
            state = self.state[param]
            if "step" not in saved and any(name in saved for name in state_names):
                # torch.optim's SGD keeps no step count: a saved state means the parameter has stepped, and
                # step 1 is all a first-step test (SGD's momentum buffer) needs. A spec that counts steps
                # (bias correction) cannot know how many: it restarts its count, and says so.
                saved = {**saved, "step": torch.tensor(1.0)}
                if counts_steps(self._checks_ir):
                    warnings.warn(
                        f"{type(self).__name__}.load_state_dict: a parameter's state has no 'step'; counting from "
                        f"step 1 (bias corrections restart)",
                        stacklevel=2,
                    )
            saved = self._without_other_variants(saved, state, param, saved_id, options)
            for key, value in saved.items():
                if key == "step" and isinstance(value, (int, float)):  # torch < 1.12 saved a Python number
                    value = torch.tensor(float(value))
                if key in layer_states:
                    value = numbers[(saved_id, key)]
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    dtype = torch.float32
                elif key in layer_states:
                    dtype = torch.float64  # a per-layer state: one fp64 number
                elif key in state_names and value.dtype != torch.uint8:  # (uint8: 8-bit codes, checked above)
                    dtype = self._runner.state_dtype(param, key)  # integer values too, cast as torch casts them
                elif key.endswith(QUANT_SUFFIX) and key[: -len(QUANT_SUFFIX)] in element_states:
                    dtype = torch.float32  # block scales (checked floating above): the kernels read fp32
                else:
                    dtype = value.dtype
                state[key] = value.detach().to(device=param.device, dtype=dtype, copy=True)
            self._runner.convert_formats(self, param, state)  # fp32 <-> 8-bit state, as this optimizer keeps it
        self._runner.invalidate()


def _check_entry_types(saved: dict, saved_id, tensor_states: set) -> None:
    """A saved parameter's states are tensors and its ``step`` a number or a 1-element tensor, before anything
    is loaded: None or a string would load and fail at the step."""
    for key in sorted(tensor_states & set(saved)):
        if not isinstance(saved[key], torch.Tensor):
            raise ValueError(
                f"load_state_dict: state {key!r} of parameter {saved_id} is {type(saved[key]).__name__} "
                f"{str(saved[key])[:40]!r}; it must be a tensor"
            )
    step = saved.get("step")
    if "step" in saved and not (
        (isinstance(step, (int, float)) and not isinstance(step, bool))
        or (isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex() and step.dtype != torch.bool)
    ):
        raise ValueError(
            f"load_state_dict: 'step' of parameter {saved_id} must be a number or a 1-element real tensor "
            f"(got {type(step).__name__} {str(step)[:40]!r})"
        )


def _check_eight_bit_entries(saved: dict, element_states: set) -> None:
    """A checkpoint's 8-bit states whole, before anything is loaded: uint8 codes with their fp32 block scales
    (one per block of 256 codes, the blocks within rows of its ``<state>_qrow`` when it names one: its last
    dimension) and, when saved, a map of 256 values."""
    for name in element_states:
        codes = saved.get(name)
        if not (isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8):
            continue
        scales, table, row = saved.get(name + QUANT_SUFFIX), saved.get(name + QUANT_MAP_SUFFIX), saved.get(name + QUANT_ROW_SUFFIX)
        try:
            row = saved_block_row(row)
        except (TypeError, ValueError, RuntimeError):
            row = -1
        if row is not None and (codes.dim() < 2 or row != codes.shape[-1]):
            raise ValueError(
                f"load_state_dict: {name + QUANT_ROW_SUFFIX!r} must be 0 (flat blocks) or the codes' last dimension, "
                f"{codes.shape[-1] if codes.dim() else None} (got {saved.get(name + QUANT_ROW_SUFFIX)!r})"
            )
        blocks = distributed.scale_count(codes, row)  # (FSDP2: every rank's blocks of its shard)
        if not (isinstance(scales, torch.Tensor) and scales.is_floating_point() and scales.shape == (blocks,)):
            raise ValueError(
                f"load_state_dict: state {name!r} holds 8-bit codes; it needs {name + QUANT_SUFFIX!r}, {blocks} "
                f"floating-point block scales in one dimension (got "
                f"{None if scales is None else tuple(getattr(scales, 'shape', ()))}"
                f"{f' {scales.dtype}' if isinstance(scales, torch.Tensor) else ''})"
            )
        if table is not None and not (isinstance(table, torch.Tensor) and table.is_floating_point() and table.shape == (256,)):
            raise ValueError(
                f"load_state_dict: {name + QUANT_MAP_SUFFIX!r} must be the 256 values of an 8-bit map, one dimension "
                f"(got {tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__})"
            )


def _plain_states(state_dict: dict) -> dict:
    """``state_dict`` with its states as plain tensors, checked before anything loads: a quantized tensor subclass
    of another library (torchao's 8-bit, 4-bit and FP8 optimizer states) is replaced by its values
    (``dequantize()``), or, where it holds 8-bit codes of flat blocks of 256, by those codes, their scales and
    their map (a state kept in 8 bits with the same map and blocks loads as it was); either is then kept in this
    optimizer's format; a subclass that cannot say its values, or a tensor without any (on the meta device),
    is refused: the kernels would read memory it does not have."""
    states = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(states, dict):
        return state_dict
    converted = {}
    for saved_id, saved in states.items():
        for key, value in (saved.items() if isinstance(saved, dict) else ()):
            if not isinstance(value, torch.Tensor):
                continue
            if value.device.type == "meta":
                raise ValueError(f"load_state_dict: state {key!r} of parameter {saved_id} is on the meta device: it holds no values")
            if type(value) in (torch.Tensor, torch.nn.Parameter) or distributed.is_dtensor(value):
                continue
            codes = _blockwise_codes(value)
            if codes is not None:  # kept as the codes they are (requantizing values moves a block's scale)
                entries = converted.setdefault(saved_id, dict(saved))
                entries[key], entries[key + QUANT_SUFFIX], entries[key + QUANT_MAP_SUFFIX] = codes
                continue
            try:
                with torch.no_grad():
                    plain = value.dequantize()
            except Exception as error:  # noqa: BLE001 - any failure: a subclass this optimizer cannot read
                plain, why = None, f": {type(error).__name__}: {error}"
            else:
                why = f" (it gave a {type(plain).__name__} of shape {tuple(getattr(plain, 'shape', ()))})"
            if type(plain) is not torch.Tensor or plain.shape != value.shape or not plain.is_floating_point():
                raise ValueError(
                    f"load_state_dict: state {key!r} of parameter {saved_id} is a {type(value).__name__}, and its "
                    f"values could not be read as a plain floating-point tensor of its shape with dequantize(){why}"
                )
            converted.setdefault(saved_id, dict(saved))[key] = plain
    return {**state_dict, "state": {**states, **converted}} if converted else state_dict


def _blockwise_codes(value: torch.Tensor):
    """(codes, scales, map) of a tensor subclass that holds 8-bit codes of flat blocks of 256 elements, with one
    scale a block and a map of 256 values (torchao's ``OptimState8bit``: ``codes``, ``scale``, ``qmap``), else None."""
    codes, scales, table = (getattr(value, name, None) for name in ("codes", "scale", "qmap"))
    if not all(type(t) is torch.Tensor for t in (codes, scales, table)):
        return None
    if codes.dtype != torch.uint8 or codes.numel() != value.numel() or not scales.is_floating_point():
        return None
    if scales.numel() != quantization.n_blocks(value.numel()) or table.numel() != 256:
        return None
    return codes.detach().reshape(value.shape), scales.detach().reshape(-1), table.detach().reshape(-1).float()


def _one_number(key: str, value):
    """A per-layer state from a checkpoint as one fp64 number: a Python number, a 0-d tensor of any real dtype, or
    a tensor whose elements all hold the layer's value (optgen before per-layer states kept one per element)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    if not isinstance(value, torch.Tensor) or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"load_state_dict: per-layer state {key!r} must be a real number, got {value!r}")
    if value.numel() == 1:
        return value.reshape(())
    flat = value.reshape(-1)
    if value.numel() and bool((flat == flat[0]).all()):
        return flat[0].clone()
    raise ValueError(
        f"load_state_dict: per-layer state {key!r} has {value.numel()} different values; it holds one number per layer"
    )


_REBUILT: dict = {}


def _rebuilt_instance(spec):
    """An empty instance of ``build(spec)`` for unpickling (``__setstate__`` fills it): the class built from
    this very spec object when there is one (a copy in this process), else a new build (a pickle)."""
    entry = _REBUILT.get(id(spec))
    cls = entry[1] if entry is not None and entry[0] is spec else build(spec)
    return cls.__new__(cls)


STATE_FORMATS = ("fp32", "bf16", "8bit")


def _state_format(spec: Spec, state_format, state_dtype):
    """``state_format``: None (the class's default: 8 bits in AdamW8bit, else fp32 or ``state_dtype``), ``"fp32"``,
    ``"bf16"``, ``"8bit"`` (every element-wise state the spec does not mark exact in blockwise 8 bits, the others
    fp32), or a dict ``{state: "8bit" | "fp32"}`` choosing states (those it does not name keep the class's default: 8 bits in AdamW8bit, else fp32;
    ``"fp32"`` means full precision, ``state_dtype`` if given). Returns (state_dtype, quantized: () none, None
    all that may be, or a tuple of names); a clear error for anything else, before the optimizer exists."""
    if state_format is None:  # the class's default, as when not given (AdamW8bit: 8 bits)
        state_format = spec.state_format
    if state_format is None:
        return state_dtype, ()
    named = state_format if isinstance(state_format, dict) else None
    if named is None and state_format not in STATE_FORMATS:
        raise ValueError(f"Invalid state_format: {state_format!r} (expected one of {STATE_FORMATS}, or a dict state -> '8bit'/'fp32')")
    if named is None and state_format != "8bit":
        wanted = torch.float32 if state_format == "fp32" else torch.bfloat16
        if state_dtype not in (None, wanted):
            raise ValueError(f"state_format={state_format!r} and state_dtype={state_dtype} disagree: give one of them")
        return wanted, ()
    element = {s.name: s for s in spec.states if s.per == "element"}
    if named is not None:
        for name, fmt in named.items():
            if name not in {s.name for s in spec.states}:
                raise ValueError(f"state_format names {name!r}, which is not a state of {spec.name} (states: {', '.join(s.name for s in spec.states)})")
            if fmt not in ("8bit", "fp32"):
                raise ValueError(f"state_format[{name!r}] = {fmt!r}: a state's format is '8bit' or 'fp32'")
            if fmt == "8bit" and name not in element:
                raise ValueError(f"state_format: {name!r} is one number per layer, row or column: only element-wise states take 8 bits")
            if fmt == "8bit" and element[name].quantize == "exact":
                raise ValueError(f"state_format: {spec.name} marks state {name!r} exact (spec.state(..., quantize='exact')): it cannot be kept in 8 bits")
        unnamed = [name for name, _ in transforms.eight_bit_states(spec.states) if name not in named]
        defaults = unnamed if spec.state_format == "8bit" else []
        quantized = tuple(name for name, fmt in named.items() if fmt == "8bit") + tuple(defaults)
    else:
        quantized = None
        if not transforms.eight_bit_states(spec.states):
            raise ValueError(f"state_format='8bit': {spec.name} has no element-wise state that may be kept in 8 bits")
    return state_dtype, quantized


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


def _shown_default(decl):
    """A hyperparameter's default as the constructor shows it (None where None stands for a value)."""
    return None if decl.default_none else decl.default


def _signature_for(spec: Spec) -> inspect.Signature:
    ir = lower(spec)
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
    for key, decls in _group_keys(ir).items():
        default = _shown_default(decls[0]) if decls[0].index is None else tuple(_shown_default(d) for d in decls)
        params.append(inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    for flag in spec.flags:
        params.append(inspect.Parameter(flag.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=flag.default))
    keyword = inspect.Parameter.KEYWORD_ONLY
    if not any(h.name == "max_grad_norm" for h in spec.hypers):
        params.append(inspect.Parameter("max_grad_norm", keyword, default=None))
    params.append(inspect.Parameter("maximize", keyword, default=False))
    for name, default in TORCH_OPTIONS.items():
        params.append(inspect.Parameter(name, keyword, default=default))
    params.append(inspect.Parameter("master_weights", keyword, default=False))
    params.append(inspect.Parameter("state_dtype", keyword, default=None))
    params.append(inspect.Parameter("state_format", keyword, default=spec.state_format))
    params.append(inspect.Parameter("bf16_stochastic_round", keyword, default=False))
    params.append(inspect.Parameter("backend", keyword, default="auto"))
    params.append(inspect.Parameter("autotune", keyword, default=None))
    return inspect.Signature(params)


def build(spec: Spec) -> type[torch.optim.Optimizer]:
    """Compile ``spec`` into a ``torch.optim.Optimizer`` subclass (every flag variant is checked now)."""
    if not isinstance(spec, Spec):
        raise TypeError(f"build() takes an optgen.Spec, got {type(spec).__name__}")
    names = [f.name for f in spec.flags] + [f.name for f in spec.shape_flags]
    for values in itertools.product((False, True), repeat=len(names)):
        check_names(make_plan(lower(spec, dict(zip(names, values)))))
    for values in itertools.product((False, True), repeat=len(spec.shape_flags)):  # groups that disagree
        shape = dict(zip((f.name for f in spec.shape_flags), values))
        check_names(make_plan(lower(spec, shape, runtime=tuple(f.name for f in spec.flags))))
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
        default = _shown_default(decls[0]) if decls[0].index is None else tuple(_shown_default(d) for d in decls)
        d = decls[0]
        if d.is_bool:
            rng = "True or False"
        else:
            rng = f"{'(' if d.lo_open else '['}{d.lo:g}, {d.hi if math.isfinite(d.hi) else 'inf'}{')' if d.hi_open else ']'}"
        lines.append(f"    {key}: default {default!r}, in {rng}. {d.doc}".rstrip())
    for flag in spec.flags:
        lines.append(f"    {flag.name}: compile-time flag, default {flag.default} (per param group, as in torch.optim).")
    if not any(h.name == "max_grad_norm" for h in spec.hypers):
        lines.append("    max_grad_norm: None, or divide all gradients by max(1, ||g||_global/max_grad_norm) in the step.")
    lines.append("    maximize: ascend instead of descend (g -> -g).")
    lines.append("    foreach, capturable: accepted as torch.optim's (optgen is always multi-tensor and capturable).")
    lines.append("    fused: True runs the kernels of the parameters' device (C on CPU, Triton on CUDA), refusing others.")
    lines.append("    differentiable: only False (the kernels update in place, outside autograd).")
    lines.append("    master_weights: keep fp32 copies of bf16/fp16 parameters as state; write the model's weights from them.")
    lines.append("    state_dtype: dtype of the optimizer states (default fp32; fp64 for fp64 parameters).")
    lines.append("    state_format: 'fp32', 'bf16' or '8bit' (blockwise 8-bit states, optgen.quantization), or {state: '8bit'}.")
    lines.append("    bf16_stochastic_round: bf16 parameters take their update rounded stochastically (no master copy).")
    lines.append("    backend: 'auto' (Triton on CUDA tensors, C on CPU ones, torch otherwise), 'torch', 'triton' or 'c'.")
    lines.append(
        "    autotune: time the Triton backend's launch configs on copies of the tensors at the first step and"
        " keep the fastest (cached on disk per kernel, GPU, dtypes and size); default: OPTGEN_AUTOTUNE=1 in the"
        " environment, else off."
    )
    return "\n".join(lines)


__all__ = ["GeneratedOptimizer", "build", "SpecError"]
