"""Sharded parameters (FSDP2 / DTensor): exact layer-wise norms with one collective per pass boundary.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a DTensor sharded on dim 0 (uneven shards
allowed), so each rank holds a slice of each layer. A trust ratio computed on the slice would be wrong. The
backends therefore run every pass on the local shards and, between passes, hand this module the
``[tensors, slots]`` table of partial reductions; ONE ``all_reduce`` of that table over the shard group
(sum columns; max columns in a second call only if the plan has max reductions) makes every per-layer and
global value exact. DTensor's own per-op reductions are never used (they would be one collective per tensor).

Replicated parameters (DDP, plain tensors) need no collective. On a 2-D mesh (HSDP: Replicate x Shard) the
table is reduced over the shard dimension only: the replicas hold the same values.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import quantization

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without DTensor: nothing is ever sharded
    DTensor = None


def is_dtensor(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor):
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard_group(params, optimizer_name: str):
    """The process group the partial sums must be reduced over (None when nothing is sharded).

    Raises a clear error for layouts whose layer norms cannot be assembled by one all-reduce: a shard on a
    dimension other than 0, partial placements, or parameters on different meshes.
    """
    groups = {}
    for p in params:
        if not is_dtensor(p):
            continue
        mesh = p.device_mesh
        shard_dims = []
        for mesh_dim, placement in enumerate(p.placements):
            if isinstance(placement, Shard):
                if placement.dim != 0:
                    raise ValueError(
                        f"{optimizer_name}: a parameter is sharded on dim {placement.dim}; layer-wise norms "
                        "support parameters sharded on dim 0 (FSDP2's layout) or replicated"
                    )
                shard_dims.append(mesh_dim)
            elif not isinstance(placement, Replicate):
                raise ValueError(f"{optimizer_name}: unsupported DTensor placement {placement} (use Shard(0)/Replicate)")
        if len(shard_dims) > 1:
            raise ValueError(f"{optimizer_name}: a parameter is sharded over {len(shard_dims)} mesh dimensions")
        if shard_dims:
            groups[(mesh, shard_dims[0])] = (mesh, shard_dims[0])  # DeviceMesh compares by ranks and type
    if not groups:
        return None
    if len(groups) > 1:
        raise ValueError(
            f"{optimizer_name}: parameters are sharded over different meshes or mesh dimensions; one optimizer "
            "reduces its layer norms over one shard group (use one optimizer per mesh)"
        )
    mesh, dim = next(iter(groups.values()))
    return mesh.get_group(dim)


def is_sharded(tensor) -> bool:
    """A DTensor with a ``Shard`` placement: each rank holds part of it, its partial sums are summed over ranks."""
    return is_dtensor(tensor) and any(isinstance(placement, Shard) for placement in tensor.placements)


class ShardReducer:
    """All-reduces a ``[tensors, slots]`` partial table in place; counts its collectives (tests read it).

    Only the rows of sharded parameters are reduced: a plain tensor beside them (FSDP2's ``ignored_params``)
    or a ``Replicate()`` DTensor already holds its whole partial on every rank, and summing it over the ranks
    would multiply its norms (and its share of a global norm) by the world size."""

    def __init__(self, group):
        self.group = group
        self.collectives = 0

    def rows(self, sharded: list[bool]):
        """The reducer for one backend's table, whose rows are parameters that are (or are not) sharded."""
        return self if all(sharded) else _RowReducer(self, sharded)

    def __call__(self, table: torch.Tensor, ops: list[str], sharded: list[bool] | None = None, extra=()) -> None:
        """All-reduce the rows of ``table`` (of sharded parameters when ``sharded`` is given) by their columns'
        ``ops``; ``extra`` tensors (the column sums of parameters whose rows are sharded) are summed in the same
        collective as the sum columns."""
        mask = None
        if sharded is not None:
            if not any(sharded):  # every rank has the same layout: all skip the collective alike
                return
            mask = torch.tensor(sharded, dtype=torch.bool, device=table.device)[:, None]
        if mask is None and all(op == "sum" for op in ops) and not extra:
            dist.all_reduce(table, op=dist.ReduceOp.SUM, group=self.group)
            self.collectives += 1
            return
        for op_name, reduce_op, identity in (("sum", dist.ReduceOp.SUM, 0.0), ("max", dist.ReduceOp.MAX, -math.inf)):
            columns = [i for i, op in enumerate(ops) if op == op_name]
            others = list(extra) if op_name == "sum" else []
            if columns or others:
                part = table[:, columns]
                if mask is not None:
                    part = torch.where(mask, part, identity)
                reduced = self._all_reduce([part, *others], reduce_op)
                if columns:
                    table[:, columns] = reduced[0] if mask is None else torch.where(mask, reduced[0], table[:, columns])
                for target, value in zip(others, reduced[1:]):
                    target.copy_(value)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks in place, in one collective (none when there are none)."""
        if tensors:
            for target, value in zip(tensors, self._all_reduce(list(tensors), dist.ReduceOp.SUM)):
                target.copy_(value)

    def _all_reduce(self, parts: list[torch.Tensor], reduce_op) -> list[torch.Tensor]:
        """One all-reduce of ``parts`` packed into one buffer; the reduced parts, in their shapes."""
        flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
        dist.all_reduce(flat, op=reduce_op, group=self.group)
        self.collectives += 1
        out, offset = [], 0
        for p in parts:
            out.append(flat[offset : offset + p.numel()].view(p.shape).to(p.dtype))
            offset += p.numel()
        return out


class _RowReducer:
    """A :class:`ShardReducer` bound to the rows of one backend's table."""

    def __init__(self, reducer: ShardReducer, sharded: list[bool]):
        self.reducer, self.sharded = reducer, list(sharded)

    def __call__(self, table: torch.Tensor, ops: list[str], extra=()) -> None:
        self.reducer(table, ops, self.sharded, extra)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        self.reducer.sum_(tensors)


def rows_split(param) -> bool:
    """A 2-D parameter sharded on dim 0 (FSDP2): each rank holds some of its rows, so its column sums (and sums
    over its rows) are partial and its column states are kept whole on every rank. Parameters of more
    dimensions shard whole matrices: their row and column statistics are local."""
    return is_sharded(param) and param.dim() == 2


def factored_state(param, local_value: torch.Tensor, per: str, shape: tuple):
    """A per-row/column state of the DTensor ``param``, of global ``shape``, from its local value: sharded like
    the parameter, but a column state of a parameter whose rows are split, which every rank holds whole
    (``Replicate``)."""
    placements = list(param.placements)
    if per == "column" and rows_split(param):
        placements = [Replicate() if isinstance(p, Shard) else p for p in placements]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_value, param.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def _shard_ranks(tensor) -> int:
    """How many ranks share the rows of a DTensor sharded on dim 0 (its shard mesh dimension's size), else 1."""
    if not is_sharded(tensor):
        return 1
    dim = next(i for i, placement in enumerate(tensor.placements) if isinstance(placement, Shard))
    return tensor.device_mesh.size(dim)


def scale_slots(tensor, row: int | None = None) -> int:
    """The block scales each rank keeps for an 8-bit state of ``tensor`` (a parameter, or the codes of its
    state): blocks of 256 of the rank's own shard, none straddling a shard boundary, as many slots on every rank
    as the largest shard needs (FSDP2 shards dim 0 as ``torch.chunk``: the first ranks hold ``ceil(rows /
    ranks)`` rows). Not sharded: the tensor's blocks. ``row``: blocks within rows (``quantization.block_row``)."""
    ranks = _shard_ranks(tensor)
    if ranks == 1 or tensor.dim() == 0 or tensor.shape[0] == 0:
        return quantization.n_blocks(tensor.numel(), row)
    rows = tensor.shape[0]
    return quantization.n_blocks(math.ceil(rows / ranks) * (tensor.numel() // rows), row)


def scale_count(tensor, row: int | None = None) -> int:
    """The length of the block-scale state of an 8-bit state of ``tensor``: every rank's ``scale_slots``."""
    return _shard_ranks(tensor) * scale_slots(tensor, row)


def eight_bit_state(param, codes: torch.Tensor, scales: torch.Tensor, row: int | None = None):
    """An 8-bit state of the DTensor ``param`` from its local shard's codes and block scales: the codes placed
    like the parameter; the scales as ``scale_slots`` per shard rank (the rank's blocks, then zeros its kernels
    never read), so that the scale state is an evenly sharded DTensor (DCP saves and reloads it as it is)."""
    slots = scale_slots(param, row)
    padded = torch.zeros(slots, dtype=torch.float32, device=scales.device)
    padded[: scales.numel()] = scales
    codes = DTensor.from_local(codes, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())
    scales = DTensor.from_local(padded, param.device_mesh, param.placements, run_check=False,
                                shape=torch.Size([scale_count(param, row)]), stride=(1,))  # fmt: skip
    return codes, scales


class LocalState(dict):
    """One parameter's state as the backends see it: ``view`` of each entry (by default the local shard of a
    DTensor); ``step`` writes through, so the kernel backends' step-table view lands in the real state."""

    def __init__(self, state: dict, view=local):
        super().__init__({k: view(v) for k, v in state.items()})
        self.state = state
        self.sources = {k: id(v) for k, v in state.items()}

    def current(self, state: dict) -> bool:
        return state is self.state and self.sources == {k: id(v) for k, v in state.items()}

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.state[key] = value
        self.sources[key] = id(value)
