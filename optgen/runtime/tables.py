"""The tables a chunked kernel backend (Triton, C) drives its launches with, and contiguous staging.

Tables (built once, rebuilt only when the set of parameters with gradients or their storage changes):

* chunk table: for each chunk of ``chunk`` elements, its tensor index (int32) and first element (int64);
* per tensor: element count, group index, first chunk and chunk count, and the address (``data_ptr``)
  of each buffer (parameter, gradient, states, scratch) in an int64 table per buffer;
* the step count per chunk (fp32), and each per-layer state per chunk (fp64). ``state["step"]`` and
  ``state[<per-layer state>]`` of each parameter are 0-d views into them (its first chunk), so the last pass
  advances the step and writes the per-layer states inside the kernel, one writer per entry (each chunk's
  program reads and writes its own copy), no extra launch. A zero-size parameter has one chunk of no elements,
  so its step and per-layer states move like every other's;
* the group hyperparameters as fp64 ``[groups, hypers]``, re-uploaded only when a value changes.

Tensors whose buffers share storage dtypes form a partition: one launch per pass per partition. Between
passes, per-chunk partial sums live in ``[chunks, slots]`` tables that a reduce launch folds into
``[tensors, slots]`` (per-layer values; what sharded training all-reduces) and ``[slots]`` (global values).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import quantization
from ..analysis import sums_over_rows
from ..codegen.abi import axis_columns, producer_of
from ..spec import QUANT_SUFFIX

# a factored plan's per-chunk tables (the rest of ChunkTables.factored is per tensor or plan-wide): the chunk's
# first row, first column, rows, columns and matrix, then its first rows in the row and column partial tables
CHUNK_GEOMETRY = ("_chunk_row", "_chunk_col", "_chunk_nrows", "_chunk_ncols", "_chunk_mat", "_chunk_rowpart", "_chunk_colpart")


def lacks_data(t: torch.Tensor) -> bool:
    """A non-empty tensor whose storage was freed in place (``untyped_storage().resize_(0)``): torch reads its
    data pointer as the null pointer plus its offset (a view of a freed flat buffer: not 0)."""
    return t.numel() != 0 and t.data_ptr() == t.storage_offset() * t.element_size()


class ChunkTables:
    """Everything the launches of one step need, for one fixed set of tensors. ``storage(dtype)`` maps a
    buffer's torch dtype to the backend's own name for it (a Triton dtype, a C code) and raises a clear
    TypeError for a dtype the backend cannot take; ``max_cols`` bounds the width of a factored plan's tiles
    (``_row_chunks``)."""

    def __init__(self, plan, items, scratch_of, chunk: int, storage: Callable, max_cols: int | None = None):
        params = [item[0] for item in items]
        device = params[0].device
        self.device = device
        # per-chunk copies of per-parameter scalars: the step count and the per-layer states
        self.chunk_scalars = {"step": torch.float32, **{name: torch.float64 for name in plan.ir.layer_state_names}}
        self.key = tables_key(items, self.chunk_scalars)
        self.buffers: dict[str, list[torch.Tensor]] = {"param": params, "grad": [item[1] for item in items]}
        for name in plan.ir.element_state_names + plan.ir.factored_state_names:
            self.buffers[name] = [item[2][name] for item in items]
        eight_bit = dict(plan.quantized)
        for name in plan.scratch:
            self.buffers[name] = [scratch_of(item[0], name, name in eight_bit and quantization.quantized(
                whole_numel(item[0], item[2]), quantization.block_row(item[0].shape, plan.ir.factored))) for item in items]  # fmt: skip
        if plan.quantized:
            # 8-bit buffers' block scales (a parameter whose state is full precision, below MIN_NUMEL elements, has
            # none: its kernels never read the placeholder) and the maps; chunks start on a block
            if chunk % quantization.BLOCK:
                raise ValueError(f"chunks of {chunk} elements: 8-bit state needs a multiple of {quantization.BLOCK}")
            self.qmap = quantization.map_table(device)
            self._no_scales = torch.zeros(1, dtype=torch.float32, device=device)
            for name in eight_bit:
                scales = name + QUANT_SUFFIX
                if name in plan.scratch:
                    self.buffers[scales] = [scratch_of(item[0], scales, True, quantization.block_row(item[0].shape, plan.ir.factored))
                                            if self.buffers[name][k].dtype == torch.uint8 else self._no_scales for k, item in enumerate(items)]  # fmt: skip
                else:
                    self.buffers[scales] = [item[2].get(scales, self._no_scales) for item in items]
        signature = [tuple(self.buffers[name][i].dtype for name in self.buffers) for i in range(len(params))]
        for sig in signature:
            for dtype in sig:
                storage(dtype)  # a clear error for unsupported dtypes, before anything runs
        order = [i for sig in dict.fromkeys(signature) for i in range(len(params)) if signature[i] == sig]
        numels = [p.numel() for p in params]
        # chunks: (first element, then for factored plans first row, first column, rows, columns, matrix)
        geometry = [_row_chunks(p.shape, chunk, max_cols) if plan.ir.factored else _flat_chunks(p.numel(), chunk) for p in params]
        chunks_of = [len(g) for g in geometry]
        first = [0] * len(params)
        chunk_tensor, chunk_start, chunk_geometry = [], [], []
        self.partitions = []  # (first chunk, chunk count, {buffer: storage name}, tensor indices, {buffer: torch dtype})
        for sig in dict.fromkeys(signature):
            offset = len(chunk_tensor)
            members = [i for i in order if signature[i] == sig]
            for i in members:
                first[i] = len(chunk_tensor)
                chunk_tensor += [i] * chunks_of[i]
                chunk_start += [g[0] for g in geometry[i]]
                chunk_geometry += geometry[i]
            dtypes = {name: storage(dtype) for name, dtype in zip(self.buffers, sig)}
            self.partitions.append((offset, len(chunk_tensor) - offset, dtypes, members, dict(zip(self.buffers, sig))))
        n_chunks = len(chunk_tensor)
        self.chunk = chunk
        self.n_chunks = n_chunks
        self.n_tensors = len(params)
        self.numels = numels
        as_long = dict(dtype=torch.int64, device=device)
        self.chunk_tensor = torch.tensor(chunk_tensor, dtype=torch.int32, device=device)
        self.chunk_start = torch.tensor(chunk_start, **as_long)
        self.numel = torch.tensor(numels, **as_long)
        self.first_chunk = torch.tensor(first, **as_long)
        self.n_chunks_of = torch.tensor(chunks_of, **as_long)
        if plan.ir.factored:
            self._factored_tables(plan, items, chunk_tensor, chunk_geometry, as_long)
        self.values = None
        self.keys = None  # capturable hyperparameters: the tensors' identities per tensor
        self.group_rows = None  # set by use_group_rows: one row per param group
        self.grad_ptrs = None
        self.signature = signature
        self.addr_host = {name: [t.data_ptr() for t in tensors] for name, tensors in self.buffers.items()}
        # addresses only from here: held, the gradients would stay alive through the next backward after
        # zero_grad(set_to_none=True), one extra set of them at the peak (the optimizer holds the rest)
        self.buffers["grad"] = []
        self.addr = {name: torch.tensor(ptrs, **as_long) for name, ptrs in self.addr_host.items()}
        self._aligned: dict[int, bool] = {}
        self.version = 0  # bumped whenever a table is replaced (launchers cache argument tuples by it)
        self.refresh(items)
        # Steps and per-layer states: per chunk, gathered from the parameters' state, whose entries become views.
        self.scalars: dict[str, torch.Tensor] = {}
        for name, dtype in self.chunk_scalars.items():
            table = torch.empty(n_chunks, dtype=dtype, device=device)
            for i, c in enumerate(chunks_of):
                table[first[i] : first[i] + c] = items[i][2][name].to(device=device, dtype=dtype)
                items[i][2][name] = table[first[i]]
            self.scalars[name] = table
        self.step = self.scalars["step"]
        self._views = [[item[2][name] for name in self.chunk_scalars] for item in items]
        self._view_ptrs = [[view.data_ptr() for view in views] for views in self._views]
        # for sync_scalars: each chunk's copy of its tensor's values comes from the tensor's first chunk
        self._first_of_chunk = self.first_chunk[self.chunk_tensor.long()]
        self._versions = {name: table._version for name, table in self.scalars.items()}
        self.partials = {}
        self.layer = {}
        self.globals = {}
        for p in plan.passes:
            if p.produces:
                self.partials[p.index] = torch.empty(max(n_chunks, 1), len(p.produces), dtype=torch.float64, device=device)
                # per-layer values (and, when sharded, the table that is all-reduced)
                self.layer[p.index] = torch.empty(max(self.n_tensors, 1), len(p.produces), dtype=torch.float64, device=device)
                self.globals[p.index] = torch.empty(len(p.produces), dtype=torch.float64, device=device)

    def _factored_tables(self, plan, items, chunk_tensor, geometry, as_long) -> None:
        """Row-aligned chunks' geometry, and the per-row/column/matrix tables of a factored plan: each parameter
        is (B, R, C); its rows, columns and matrices follow the previous parameters' in the plan-wide tables of
        finished values (``[rows, row slots]`` ...), and each chunk's partial sums its own rows of the partial
        tables (a row of k rows' or one row's sums, a row of its columns' sums). A 2-D parameter whose rows FSDP2
        shards (``rows_split``) counts all its rows (``_count_rows``)."""
        device = self.device
        params = [item[0] for item in items]
        shapes = [(math.prod(p.shape[:-2]), p.shape[-2], p.shape[-1]) for p in params]
        self.rows_split = [bool(getattr(item[2], "rows_split", False)) for item in items]
        count_rows = [getattr(item[2], "param_shape", p.shape)[-2] for item, p in zip(items, params)]
        bases = {"row": [0], "col": [0], "mat": [0]}
        for b, r, c in shapes:
            bases["row"].append(bases["row"][-1] + b * r)
            bases["col"].append(bases["col"][-1] + b * c)
            bases["mat"].append(bases["mat"][-1] + b)
        rowpart, colpart = [0], [0]
        for g in geometry:
            rowpart.append(rowpart[-1] + g[3])
            colpart.append(colpart[-1] + g[4])
        columns = list(zip(*geometry)) if geometry else [()] * 6
        self.factored = {name: torch.tensor(list(columns[k + 1]), **as_long) for k, name in enumerate(CHUNK_GEOMETRY[:5])}
        self.factored["_chunk_rowpart"] = torch.tensor(rowpart[:-1], **as_long)
        self.factored["_chunk_colpart"] = torch.tensor(colpart[:-1], **as_long)
        for k, name in enumerate(("_mats", "_rows", "_cols")):
            self.factored[name] = torch.tensor([s[k] for s in shapes], **as_long)
        self.factored["_count_rows"] = torch.tensor(count_rows, **as_long)
        self.axis_shapes = shapes  # (host copies: the sharded step all-reduces split tensors' entries)
        self.col_base = bases["col"][:-1]
        self.mat_base = bases["mat"][:-1]
        for kind in ("row", "col", "mat"):
            self.factored[f"_{kind}_base"] = torch.tensor(bases[kind][:-1], **as_long)
        width = {kind: max(1, len(axis_columns(plan, kind))) for kind in ("row", "col", "matrix")}
        as_double = dict(dtype=torch.float64, device=device)
        self.factored["_rowpart"] = torch.zeros(max(1, rowpart[-1]), width["row"], **as_double)
        # column sums slot-major: the element loops read and add them contiguously
        self.factored["_colpart"] = torch.zeros(width["col"], max(1, colpart[-1]), **as_double)
        self.factored["_colpart_rows"] = max(1, colpart[-1])
        self.factored["_rowtot"] = torch.zeros(max(1, bases["row"][-1]), width["row"], **as_double)
        self.factored["_coltot"] = torch.zeros(width["col"], max(1, bases["col"][-1]), **as_double)
        self.factored["_coltot_rows"] = max(1, bases["col"][-1])
        self.factored["_mattot"] = torch.zeros(max(1, bases["mat"][-1]), width["matrix"], **as_double)

    def still_valid(self, items) -> bool:
        if tables_key(items, self.chunk_scalars) != self.key:
            return False
        grad_dtypes = list(self.buffers).index("grad")
        if any(item[1].dtype != sig[grad_dtypes] for item, sig in zip(items, self.signature)):
            return False  # a gradient changed dtype: it may belong to another partition now
        # each entry still the view into the table: the same object, and still looking at the table (set_ and
        # swap_tensors keep the object; the kernels would go on with the table's value, not the new one)
        return all(
            item[2][name] is view and view.data_ptr() == ptr
            for item, views, ptrs in zip(items, self._views, self._view_ptrs)
            for name, view, ptr in zip(self.chunk_scalars, views, ptrs)
        )

    def aligned(self, partition: int) -> bool:
        """All buffers of the partition's tensors start on 16 bytes (torch's allocations do; views may not)."""
        if partition not in self._aligned:
            members = self.partitions[partition][3]
            if "grad" not in self.addr_host:  # written in place by a fast step (grads_written)
                self.addr_host["grad"] = self.addr["grad"].tolist()
            ptrs = [self.addr_host[name][i] for name in self.buffers for i in members]
            self._aligned[partition] = all(ptr % 16 == 0 for ptr in ptrs)
        return self._aligned[partition]

    def sync_scalars(self) -> None:
        """Step counts and per-layer states written in place since the last step (``state["step"].zero_()`` to
        restart the bias correction, a checkpoint tool's ``copy_``) are spread to all of their tensor's chunks;
        the version counters tell, without reading the device."""
        for name, table in self.scalars.items():
            if table._version != self._versions[name]:
                table.copy_(table[self._first_of_chunk])  # the kernels write every copy alike: only the first can differ
                self._versions[name] = table._version

    def refresh(self, items) -> None:
        """Per-step updates, decided on the host without reading the device: gradients that moved (autograd
        allocates new ones after ``zero_grad(set_to_none=True)``) and hyperparameters that changed (an lr
        schedule) are re-uploaded; nothing else is rebuilt."""
        grads = [item[1] for item in items]
        grad_ptrs = [g.data_ptr() for g in grads]
        if grad_ptrs != self.grad_ptrs:
            self.set_grads(grad_ptrs)
        values = [item[3] for item in items]
        if values == self.values:  # the same tuples (the optimizer keeps one per group while it is unchanged)
            return
        distinct = list({id(row): row for row in values}.values())
        if any(isinstance(v, torch.Tensor) for row in distinct for v in row):
            # Hyperparameters given as device tensors (capturable): gather them on the device every step,
            # a copy kernel instead of a host read; the group structure follows tensor identity.
            keys = [tuple(id(v) if isinstance(v, torch.Tensor) else v for v in row) for row in values]
            groups = list(dict.fromkeys(keys))
            if keys != self.keys:
                self.group = torch.tensor([groups.index(k) for k in keys], dtype=torch.int32).to(self.device)
                self.keys = keys
            rows = [values[keys.index(g)] for g in groups]
            self.hyper = torch.stack(
                [torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in row]) for row in rows]
            )
            self.values = None  # gathered again at every step: the tensors' values may have changed in place
            self.version += 1
            return
        groups = list(dict.fromkeys(values))
        index = [groups.index(v) for v in values]
        self.group = torch.tensor(index, dtype=torch.int32).to(self.device, non_blocking=True)
        self.hyper = torch.tensor(groups, dtype=torch.float64).reshape(len(groups), -1).to(self.device, non_blocking=True)
        self.values = values
        self.keys = None
        self.group_rows = None
        self.version += 1

    def set_grads(self, grad_ptrs: list[int]) -> None:
        """New gradient tensors: their addresses are written into the existing table (launchers' cached
        argument tuples stay valid)."""
        if len(grad_ptrs) == self.addr["grad"].numel():
            self.addr["grad"].copy_(torch.tensor(grad_ptrs, dtype=torch.int64), non_blocking=True)
        else:
            self.addr["grad"] = torch.tensor(grad_ptrs, dtype=torch.int64).to(self.device, non_blocking=True)
            self.version += 1
        self.addr_host["grad"] = grad_ptrs
        self.grad_ptrs = grad_ptrs
        self._aligned.clear()

    def grads_written(self) -> None:
        """New gradient tensors whose addresses were written into the (host) table already: the mirrors are read
        from it when next needed (an O(tensors) read a fast step does not pay)."""
        self.grad_ptrs = None  # compared by the full path: unequal to any list, so it writes the table again
        self.addr_host.pop("grad", None)
        self._aligned.clear()

    def use_group_rows(self, group_of: list[int], rows: list[tuple]) -> None:
        """One hyperparameter row per param group (``group_of[i]``: the row of tensor i): a step that only
        changes values (an lr schedule) then rewrites the rows in place, in O(groups)."""
        self.group = torch.tensor(group_of, dtype=torch.int32).to(self.device)
        self.hyper = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), -1).to(self.device)
        self.group_rows = list(rows)
        self.values = None  # the next refresh() (a step that is not a fast one) rebuilds its own grouping
        self.keys = None
        self.version += 1

    def set_group_rows(self, rows: list[tuple]) -> None:
        if len(rows) != len(self.group_rows):
            raise RuntimeError(f"{len(rows)} hyperparameter rows for tables made for {len(self.group_rows)} groups")
        if rows != self.group_rows:
            self.hyper.copy_(torch.tensor(rows, dtype=torch.float64).reshape(self.hyper.shape), non_blocking=True)
            self.group_rows = list(rows)


def _flat_chunks(numel: int, chunk: int) -> list[tuple]:
    """Chunks of ``chunk`` elements (an empty tensor: one chunk of no elements)."""
    return [(k * chunk, 0, 0, 0, 0, 0) for k in range(max(1, (numel + chunk - 1) // chunk))]


def _row_chunks(shape, chunk: int, max_cols: int | None = None) -> list[tuple]:
    """A (B, R, C) tensor in tiles of one matrix: ``width`` = min(C, ``max_cols``, ``chunk``) columns of
    ``chunk // width`` rows (whole rows when C fits; the Triton kernels hold a tile's row in one block, so their
    tiles are at most a block wide), row bands in order and the tiles of a band left to right: (first element,
    first row b*R + r, first column, rows, columns, matrix b). A tile's row sums are partial when its rows are
    split, its column sums partial over its rows; the reduce step folds them in tile order."""
    rows, cols = shape[-2], shape[-1]
    mats = math.prod(shape[:-2])
    if mats * rows * cols == 0:
        return [(0, 0, 0, 0, 0, 0)]
    width = min(cols, chunk, max_cols or chunk)
    per = max(1, chunk // width)
    out = []
    for b in range(mats):
        for r in range(0, rows, per):
            n = min(per, rows - r)
            for c in range(0, cols, width):
                out.append((b * rows * cols + r * cols + c, b * rows + r, c, n, min(width, cols - c), b))
    return out


def tables_key(items, chunk_scalars):
    """What the tables depend on: the parameters and their storage, and the state tensors and their storage
    but for the per-chunk scalars the tables hold themselves (gradients and hyperparameters are refreshed in
    place, see ``ChunkTables.refresh``)."""
    return [
        (id(p), p.data_ptr(), p.numel(), *[(id(v), v.data_ptr()) for k, v in state.items() if k not in chunk_scalars])
        for p, _, state, _ in items
    ]


class _StagedState(dict):
    """A parameter's state with contiguous twins in place of non-contiguous tensors; ``step`` writes through
    (the step-table view must land in the real state)."""

    def __init__(self, state: dict):
        super().__init__(state)
        self.state = state

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.state[key] = value


class Staging:
    """Kernels address flat memory: non-contiguous parameters and states run on persistent contiguous twins
    that are copied back after the launches (extra copies for those tensors only); gradients are copied."""

    def __init__(self):
        self._twins: dict[int, tuple] = {}
        self.staged = False  # the last step ran some tensor on a twin

    def _twin(self, tensor: torch.Tensor) -> torch.Tensor:
        buf = self._twins.get(id(tensor))
        if buf is None or buf[0] is not tensor:
            buf = (tensor, torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device))
            self._twins[id(tensor)] = buf
        buf[1].copy_(tensor)
        return buf[1]

    def contiguous(self, items):
        """(items on contiguous memory, [(original, twin)] to copy back after the step)."""
        staged, out = [], []
        for p, grad, state, values in items:
            if not p.is_contiguous():
                twin = self._twin(p)
                staged.append((p, twin))
                p = twin
            if not grad.is_contiguous():
                grad = grad.contiguous()
            if any(isinstance(v, torch.Tensor) and k != "step" and not v.is_contiguous() for k, v in state.items()):
                view = _StagedState(state)
                for k, v in state.items():
                    if k != "step" and isinstance(v, torch.Tensor) and not v.is_contiguous():
                        twin = self._twin(v)
                        staged.append((v, twin))
                        dict.__setitem__(view, k, twin)
                state = view
            out.append((p, grad, state, values))
        self.staged = bool(staged)
        return out, staged


def pass_values(t: ChunkTables, plan, p, offset: int, count: int, device_scalars: dict) -> dict:
    """The runtime arguments of pass ``p``'s kernel over one partition (chunks ``[offset, offset + count)``),
    by the names of the kernel ABI (``optgen.codegen.abi.pass_args``): tensors (sliced to the partition) and
    integers. Every launcher takes its argument tuple from here, in the ABI's order."""
    span = slice(offset, offset + count)
    values = {
        "_chunk_tensor": t.chunk_tensor[span],
        "_chunk_start": t.chunk_start[span],
        "_numel": t.numel,
        "_group": t.group,
        "_step": t.step[span],
        "_hyper": t.hyper,
        "_chunk_offset": offset,
    }
    for name in plan.ir.layer_state_names:
        values[f"_layer_{name}"] = t.scalars[name][span]
    if plan.ir.factored:
        values.update(t.factored)
        for name in CHUNK_GEOMETRY:  # per chunk: sliced to the partition, as _chunk_tensor
            values[name] = t.factored[name][span]
    for name, addr in t.addr.items():
        values[f"_{name}_addr"] = addr
    if plan.quantized:
        values["_qmap"] = t.qmap
    for k in p.consumes:
        producer = producer_of(plan, k)
        values[f"_table_{producer}"] = t.layer[producer]
        values[f"_global_{producer}"] = t.globals[producer]
    for name, value in device_scalars.items():
        values[f"_dev_{name}"] = value
    if p.produces:
        values["_partials"] = t.partials[p.index]
    return values


def axes_values(t: ChunkTables, plan, p, device_scalars: dict, phases: int = 3) -> dict:
    """The arguments of the per-row/column reduce step after pass ``p`` (``abi.axes_args``), by ABI name: the
    whole tables (one program per tensor); ``phases``: 1 the folds and the early items, 2 the late items, 3 all."""
    values = {"_first_chunk": t.first_chunk, "_n_chunks": t.n_chunks_of, "_group": t.group, "_hyper": t.hyper, "_step": t.step,
              "_phases": phases}  # fmt: skip
    values.update(t.factored)
    for name, addr in t.addr.items():
        values[f"_{name}_addr"] = addr
    for producer in t.layer:
        values[f"_table_{producer}"] = t.layer[producer]
    for name, value in device_scalars.items():
        values[f"_dev_{name}"] = value
    for name in plan.ir.layer_state_names:
        values[f"_layer_{name}"] = t.scalars[name]
    return values


def over_partitions(t: ChunkTables, plan) -> bool:
    """A factored plan whose storage-dtype partitions disagree on the dtypes of its per-row/column states: its
    reduce step (one program per tensor over every partition, those dtypes compiled in) takes one such, so the
    kernel backends hand such steps to the eager passes, as when fp64 parameters (fp64 math) sit beside others.
    Partitions that differ in element-wise buffers only (a matrix below 4096 elements keeping fp32 state beside
    8-bit ones, bf16 parameters beside fp32) share it."""
    if not plan.ir.factored or len(t.partitions) < 2:
        return False
    # (and on the math's precision: the step is compiled for fp64 math with fp64 parameters)
    axis_dtypes = [
        ({name: partition[2][name] for name in plan.ir.factored_state_names}, partition[4]["param"] == torch.float64)
        for partition in t.partitions
    ]
    return any(dtypes != axis_dtypes[0] for dtypes in axis_dtypes[1:])


def split_rows(t: ChunkTables, plan) -> bool:
    """Whether a factored plan's step has parameters whose rows FSDP2 splits over the ranks."""
    return plan.ir.factored and any(t.rows_split)


def boundary_all_reduce(t: ChunkTables, plan, p, reducer) -> None:
    """Sharded: the one all-reduce after pass ``p`` of its ``[tensors, slots]`` table and, in the same collective,
    for the parameters whose rows are split, their column sums and the sums over rows that the reduce step's
    early items made (its first phase: the folds, then those items)."""
    extra = []
    if plan.ir.factored:
        columns = axis_columns(plan, "col")
        width = {i: t.axis_shapes[i][0] * t.axis_shapes[i][2] for i, split in enumerate(t.rows_split) if split}
        for k, _ in p.produces:
            if plan.slots[k].scope == "col":
                extra += [t.factored["_coltot"][columns[k], t.col_base[i] : t.col_base[i] + n] for i, n in width.items()]
        extra += _sums_over_split_rows(t, plan, p.early_reduce_items)
    if p.reduce_after or p.fold_after or extra:
        reducer(t.layer[p.index], [plan.slots[k].op for k, _ in p.produces], extra=extra)


def matrix_all_reduce(t: ChunkTables, plan, p, reducer) -> None:
    """Sharded: the sums over rows that the late items of the reduce step after ``p`` made, partial for the
    parameters whose rows are split: one more all-reduce after them (none in the built-ins)."""
    reducer.sum_(_sums_over_split_rows(t, plan, p.late_reduce_items))


def _sums_over_split_rows(t: ChunkTables, plan, items) -> list:
    """The ``_mattot`` entries of ``items``' sums over rows (a column mean of a per-row state) for the parameters
    whose rows are split."""
    columns = axis_columns(plan, "matrix")
    over_rows = [columns[key] for key in sums_over_rows(plan.slots, items)]
    return [t.factored["_mattot"][t.mat_base[i], c : c + 1] for c in over_rows for i, split in enumerate(t.rows_split) if split]


def reduce_launches(t: ChunkTables, p, sharded: bool) -> tuple[list, list]:
    """The reduce launches after pass ``p``, as (programs, {ABI name: value}), before and after the all-reduce
    of sharded training. Unsharded: one launch, ``n_tensors`` segment-reduce programs if the pass has
    per-layer values, plus one program that folds the global values from the chunk partials. Sharded: every
    pass with partials is segment-reduced, its ``[tensors, slots]`` table all-reduced (one collective), then
    the global values are folded from the all-reduced table (a one-program launch), so they are exact and the
    same on every rank."""
    segments = t.n_tensors if (p.reduce_after or sharded) else 0
    before, after = [], []
    if not sharded:
        if segments or p.fold_after:
            values = {**segment_reduce_values(t, p), "_n_segments": segments, "_fold_rows": t.n_chunks}
            before.append((segments + int(p.fold_after), values))
        return before, after
    if segments:
        before.append((segments, segment_reduce_values(t, p)))
    if p.fold_after:
        after.append((1, {**segment_reduce_values(t, p), "_n_segments": 0, "_fold": t.layer[p.index], "_fold_rows": t.n_tensors}))
    return before, after


def segment_reduce_values(t: ChunkTables, p, first: int = 0, end: int | None = None) -> dict:
    """The reduce launch of pass ``p`` that folds the per-layer values of tensors ``[first, end)`` (all of them by
    default; a block of the C backend's blocked schedule) and no global value, by kernel ABI name: row views
    of the per-tensor tables."""
    end = t.n_tensors if end is None else end
    return {"_partials": t.partials[p.index], "_first_chunk": t.first_chunk[first:end], "_n_chunks": t.n_chunks_of[first:end],
            "_out": t.layer[p.index][first:end], "_global": t.globals[p.index], "_n_segments": end - first,
            "_fold": t.partials[p.index], "_fold_rows": 0}  # fmt: skip


def whole_numel(param, state) -> int:
    """The elements of the whole parameter whose local part is ``param`` (FSDP2: of every rank's shard, from the
    backend's view of its state): whether its states and scratch are 8-bit is one decision on every rank, as
    in one process."""
    shape = getattr(state, "param_shape", None)
    return param.numel() if shape is None else math.prod(shape)


def scratch_buffer(cache: dict, param: torch.Tensor, name: str, eight_bit: bool = False, row: int | None = None) -> torch.Tensor:
    """The scratch buffer ``name`` of ``param`` (values a pass stores for a later one), kept in ``cache``:
    the compute dtype, made again when the parameter's shape or device changed. ``eight_bit``: 8-bit codes
    (``name``) or their block scales (``name`` ending in ``_absmax``; optgen.quantization)."""
    key = (id(param), name)
    buf = cache.get(key)
    if eight_bit and name.endswith(QUANT_SUFFIX):
        shape, dtype = (quantization.n_blocks(param.numel(), row),), torch.float32
    else:
        shape, dtype = param.shape, torch.uint8 if eight_bit else torch.promote_types(param.dtype, torch.float32)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != param.device:
        buf = torch.empty(shape, dtype=dtype, device=param.device) if eight_bit else torch.empty_like(param, dtype=dtype)
        cache[key] = buf
    return buf
