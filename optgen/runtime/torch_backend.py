"""The torch backend: runs the generated pure-torch passes one parameter at a time, operation by operation.

It works on any device and dtype, and is the oracle the Triton and C kernels are tested against. Math runs
in fp32 (fp64 for fp64 parameters). Per-layer reductions are the values the pass returns; global ones are
summed over all parameters in a fixed order. No ``.item()``: nothing here waits for the device, and dynamo
can trace it (``opt.step()`` inside a user's ``torch.compile``).

It is the path for tensors on devices without a kernel target (neither CUDA nor CPU), for ``backend="torch"``,
and where the C kernels cannot be built (no compiler). On CPU the C backend replaced the Inductor-compiled
form of these passes that lived here: it was slower at every size measured (bench/results).
"""

from __future__ import annotations

import torch

from .. import quantization
from ..analysis import sums_over_rows
from ..codegen.abi import eager_pass_buffers, layer_state_args
from ..codegen.render import load_module, reduce_step_args, stochastic_round
from ..spec import QUANT_SUFFIX
from ..transforms import AMP_SKIP
from .steps import state_shape
from .tables import whole_numel


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class TorchBackend:
    name = "torch"
    options = ()  # constructor options the optimizer may pass (runtime/backends.py)

    def __init__(self, plan):
        self.plan = plan
        self.module = load_module(plan, "torch")
        self._hyper_cache: dict = {}
        self.eight_bit_kinds = dict(plan.quantized)  # 8-bit buffers -> their map

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

    def step(self, items, scratch_of, device_scalars=None, reducer=None) -> None:
        """``items``: one per parameter with a gradient: (param, grad, state dict, hyper values tuple)."""
        self._step_eager(items, scratch_of, device_scalars or {}, reducer)
        self._advance(items, device_scalars or {})

    # -- eager: every operation of a pass, one parameter at a time -------------------------------------

    def _step_eager(self, items, scratch_of, device_scalars, reducer) -> None:
        plan = self.plan
        kinds = self.eight_bit_kinds
        contexts = []
        for param, grad, state, values in items:
            dtype = compute_dtype(param.dtype)
            t = state["step"].to(device=param.device, dtype=torch.float64) + 1
            buffers = {"param": param, "grad": grad}
            for name in plan.ir.element_state_names:
                buffers[name] = state[name]
            for name in plan.ir.layer_state_names:
                buffers[f"layer_{name}"] = state[name]
            for decl in plan.ir.states:
                if decl.per in ("row", "column"):  # the passes broadcast them: the reduced dimension kept as 1
                    buffers[decl.name] = state[decl.name].view(state_shape(decl.per, param.shape))
            eight_bit = quantization.quantized(whole_numel(param, state), quantization.block_row(param.shape, plan.ir.factored))
            for name in plan.scratch:
                buffers[name] = scratch_of(param, name, name in kinds and eight_bit)
            for name in kinds:  # 8-bit buffers' scales (full-precision ones, a small tensor's, have none)
                if buffers[name].dtype == torch.uint8:
                    scales = name + QUANT_SUFFIX
                    row = quantization.block_row(param.shape, plan.ir.factored)
                    buffers[scales] = scratch_of(param, scales, True, row) if name in plan.scratch else state[scales]
            hypers = self._hyper_tensors(values, param.device, torch.float64)
            if plan.ir.factored:  # a (B, R, C) parameter's row and column lengths (all its rows), as per-step scalars
                shape = {"n_cols": param.shape[-1], "n_rows": getattr(state, "param_shape", param.shape)[-2]}
                hypers = {**hypers, **{k: torch.tensor(float(v), dtype=torch.float64, device=param.device) for k, v in shape.items()}}
            hypers = {**hypers, "_sr_tensor": len(contexts)}  # the tensor's index (stochastic rounding's counter)
            contexts.append((buffers, dtype, t, hypers))
        finished: list[dict[str, torch.Tensor]] = [dict() for _ in items]
        # 2-D parameters whose rows FSDP2 splits over the ranks: their column sums and sums over rows are partial
        split = [bool(getattr(state, "rows_split", False)) for _, _, state, _ in items] if reducer is not None else [False] * len(items)
        for p, fn in zip(plan.passes, self.module.PASSES):
            results = []
            for (buffers, dtype, t, hypers), reds in zip(contexts, finished):
                results.append(self._eager_pass(p, fn, buffers, dtype, t, hypers, device_scalars, reds))
            # Split rows: the early items run before the pass boundary's all-reduce and their sums over rows ride
            # it; the late items after it, their sums over rows in one more all-reduce (none in the built-ins).
            phased = any(split) and bool(p.reduce_items)
            made = [{} for _ in items]
            extra = self._axis_values(p, results, finished, split)  # split parameters' column sums: partial
            if phased:
                for (buffers, _, t, hypers), reds, done in zip(contexts, finished, made):
                    self._reduce_step(p, buffers, t, hypers, device_scalars, reds, 1, done)
                extra += self._over_rows(p, finished, split, early=True)
            if p.produces:
                self._finish(p, results, finished, reducer, extra)
            if p.reduce_items:
                for (buffers, _, t, hypers), reds, done in zip(contexts, finished, made):
                    self._reduce_step(p, buffers, t, hypers, device_scalars, reds, 2 if phased else 3, done)
                if phased:
                    reducer.sum_(self._over_rows(p, finished, split, early=False))

    def _over_rows(self, p, finished, split, early: bool) -> list:
        """The sums over rows that the early (late) items of the reduce step after ``p`` made for the parameters
        whose rows are split: partial on each rank."""
        slots = self.plan.slots
        names = [slots[k].name for k in sums_over_rows(slots, p.early_reduce_items if early else p.late_reduce_items)]
        return [reds[name] for name in names for reds, s in zip(finished, split) if s]

    def _axis_values(self, p, results, finished, split) -> list:
        """The pass's per-row/column sums, each parameter's own; those of column sums of parameters whose rows
        are split are partial: returned, to be summed over the ranks in place."""
        plan = self.plan
        extra = []
        for col, (k, _) in enumerate(p.produces):
            if plan.slots[k].scope in ("row", "col"):
                for reds, r, s in zip(finished, results, split):
                    value = r[col]
                    if s and plan.slots[k].scope == "col":
                        value = value.to(torch.float64, copy=True)
                        extra.append(value)
                    reds[plan.slots[k].name] = value
        return extra

    def _finish(self, p, results, finished, reducer, extra) -> None:
        """The pass's per-layer and global values, through the [tensors, slots] table (sharded, one all-reduce
        makes every value exact; the ``extra`` partial sums of parameters whose rows are split ride it)."""
        plan = self.plan
        whole = [(col, plan.slots[k]) for col, (k, _) in enumerate(p.produces) if plan.slots[k].scope in ("layer", "global")]
        if not whole:
            if reducer is not None and extra:  # the split column sums' collective, with an empty table
                reducer(torch.zeros(len(results), 0, dtype=torch.float64, device=extra[0].device), [], extra=extra)
            return
        table = torch.stack([torch.stack([r[col].to(torch.float64) for col, _ in whole]) for r in results])
        if reducer is not None:
            reducer(table, [slot.op for _, slot in whole], extra=extra)
        for i, (_, slot) in enumerate(whole):
            column = table[:, i]
            if slot.scope == "layer":
                values = column.unbind()
            else:
                total = column.sum() if slot.op == "sum" else column.amax()
                values = [total] * len(results)
            for reds, value in zip(finished, values):
                reds[slot.name] = value  # fp64, like the per-step scalars it feeds

    def _reduce_step(self, p, buffers, t, hypers, device_scalars, reds, phases: int, made: dict) -> None:
        """The reduce step after pass ``p`` for one parameter: its per-row/column states, its per-matrix sums
        (``phases``: 1 the early items, 2 the late ones, 3 all; ``made``: the sums made by an earlier call)."""
        plan = self.plan
        scalars = {"t": t, **hypers, **{d: v.reshape(()) for d, v in device_scalars.items()}, **reds}
        scalars.update({name: buffers[f"layer_{name}"].to(torch.float64) for name in plan.ir.layer_state_names})
        # (a value the pass boundary finishes is not there yet for the early items, which do not read it)
        kwargs = {a: buffers[a[1:]] if a.startswith("_") else scalars.get(a) for a in reduce_step_args(plan, p)}
        reds.update(self.module.REDUCES[p.index](**kwargs, _phases=phases, _made=made))

    def _eager_pass(self, p, fn, buffers, dtype, t, hypers, device_scalars, reds):
        """One pass over one parameter (a zero-size one too: its reductions are their identities, and its
        per-layer states move like any other's)."""
        plan = self.plan
        kwargs = {f"_{b}": buffers[b] for b in eager_pass_buffers(plan, p)}
        kwargs.update({f"_layer_{name}": buffers[f"layer_{name}"] for name in layer_state_args(plan, p)})
        kwargs.update({f"_{name}": buffers[name] for name, _ in p.axis_loads})
        kwargs["dtype"] = dtype
        kwargs["t"] = t
        kwargs.update({h: hypers[h] for h in (*p.hypers, *p.shape_reads)})
        if stochastic_round(plan) and any(b == "param" for b, _ in p.stores):
            kwargs.update(_sr_tensor=hypers["_sr_tensor"], sr_seed=hypers["sr_seed"])
        kwargs.update({d: device_scalars[d].reshape(()) for d in p.device_scalars})
        kwargs.update({plan.slots[k].name: reds[plan.slots[k].name] for k in p.consumes})
        # 8-bit states: dequantized to fp32 for the pass, the new values quantized block by block after it (the
        # kernels do the same in registers: the pass's own math reads the new values before rounding)
        kinds = self.eight_bit_kinds
        eight_bit = [b for b in eager_pass_buffers(plan, p) if b in kinds and buffers[b].dtype == torch.uint8]
        row = quantization.block_row(buffers["param"].shape, plan.ir.factored)  # (factored: blocks within rows)
        for b in eight_bit:
            kwargs[f"_{b}"] = quantization.dequantize(buffers[b], buffers[b + QUANT_SUFFIX], kinds[b], row)
        result = fn(**kwargs)
        stored = {b for b, _ in p.stores}
        # a skipped step (GradScaler) keeps codes and scales: requantizing dequantized values is not the identity
        skipped = device_scalars[AMP_SKIP].reshape(()) != 0 if AMP_SKIP in p.device_scalars else None
        for b in eight_bit:
            if b in stored:
                codes, scales = quantization.quantize(kwargs[f"_{b}"], kinds[b], row)
                kept = buffers[b + QUANT_SUFFIX][: scales.numel()]  # (FSDP2: the rank's blocks, then padding)
                if skipped is not None:
                    codes = torch.where(skipped, buffers[b], codes)
                    scales = torch.where(skipped, kept, scales)
                buffers[b].copy_(codes)
                kept.copy_(scales)
        return result

    def _advance(self, items, device_scalars) -> None:
        steps = [state["step"] for _, _, state, _ in items]
        last = self.plan.passes[-1]
        advance = self.module.step_advance(**{d: device_scalars[d].reshape(()) for d in last.device_scalars})
        if isinstance(advance, torch.Tensor):
            for step in steps:
                step.add_(advance.to(device=step.device, dtype=step.dtype))
        else:
            torch._foreach_add_(steps, advance)
