"""Autotuning of the Triton backend's launch configuration, on copies, with an on-disk cache.

A step's launches share one :class:`~optgen.runtime.triton_backend.LaunchConfig`: the chunk size (work per
program, and the layout of the chunk and partial tables), the block size (elements per loop iteration),
``num_warps`` and ``num_stages``. The chunk size shapes the tables the whole step uses, so a config is chosen
per step, not per kernel: each candidate runs complete steps of the optimizer's plan, timed with
``triton.testing.do_bench``. Every candidate compiles every kernel of the plan, so the grid (:func:`candidates`,
72 configs) is searched by coordinate descent (:func:`_descend`, 12 to 21 timings) unless
``OPTGEN_AUTOTUNE_SEARCH=grid``.

The trials never touch the training run. They step a private copy of the parameters, gradients and states
(up to ``OPTGEN_AUTOTUNE_MAX_ELEMENTS`` elements, 2**27 by default: the largest tensors first, which
dominate the time), so a tuned step gives the result the same config would give untuned: bitwise for
element-wise optimizers, and up to the summation order of the fp64 norms for layer-wise ones.

Results are cached in ``<cache dir>/autotune.json`` under the key (generated source hash, GPU name, buffer
dtypes, size bucket = the power of two of the element count), so a given model tunes once per machine.
Under ``TRITON_INTERPRET=1`` there is no GPU to time: the default config is used unless a test passes its
own ``timer``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from .. import settings
from ..codegen.render import cache_dir, source_hash
from .tables import scratch_buffer
from .triton_backend import TritonBackend

BLOCKS = (512, 1024, 2048, 4096)
CHUNKS = (16384, 65536, 262144)
WARPS = (4, 8)
STAGES = (1, 2, 3)


def candidates(default) -> list:
    """The search space: every (chunk, block, warps, stages) with the block dividing the chunk, the
    default first (a tie keeps it)."""
    out = [default]
    for chunk, block, warps, stages in itertools.product(CHUNKS, BLOCKS, WARPS, STAGES):
        if chunk % block == 0 and chunk >= block:
            config = replace(default, chunk=chunk, block=block, num_warps=warps, num_stages=stages)
            if config not in out:
                out.append(config)
    return out


# Coordinate descent: the axes in the order they are searched; block and warps together (how much work a
# program's threads hold at once), then the chunk (work per program), then the pipelining depth.
AXES = (("block", "num_warps"), ("chunk",), ("num_stages",))


def search_mode() -> str:
    """``OPTGEN_AUTOTUNE_SEARCH``: 'descent' (default: 12 to 21 of the 72 candidates compiled and timed) or 'grid'
    (all of them: each is a compile of every kernel of the plan, seconds each)."""
    return settings.choice("OPTGEN_AUTOTUNE_SEARCH")


def _neighbours(configs, current, axis) -> list:
    """The candidates that differ from ``current`` on ``axis`` only (``current`` included when a candidate)."""
    fixed = [f for f in asdict(current) if f not in axis]
    return [c for c in configs if all(getattr(c, f) == getattr(current, f) for f in fixed)]


def _descend(configs, start, measure, rounds: int = 3):
    """Coordinate descent over the candidate grid from ``start``: along each axis in turn, move to the fastest
    neighbour; again while a round moved (memoised ``measure``: a config is timed once). Elementwise kernels
    are memory-bound and their axes nearly separable, so this finds the grid's best in 12 to 21 timings, not 72
    (the test plants a separable cost; ``OPTGEN_AUTOTUNE_SEARCH=grid`` times them all)."""
    current = start
    measure(current)
    for _ in range(rounds):
        moved = False
        for axis in AXES:
            options = _neighbours(configs, current, axis) or [current]
            best = min(options, key=lambda c: (measure(c), c != current))
            if best != current:
                current, moved = best, True
        if not moved:
            break
    return current


def size_bucket(numel: int) -> int:
    return max(0, math.ceil(math.log2(max(numel, 1))))


def cache_key(plan, items, device: torch.device) -> str:
    """(kernel source, GPU, buffer dtypes, size bucket, Triton version): what the best config depends on."""
    import triton

    numel = sum(item[0].numel() for item in items)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for item in items for t in _buffers(item)})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{source_hash(plan)}|{name}|{','.join(dtypes)}|2^{size_bucket(numel)}|triton {triton.__version__}"


def _buffers(item):
    p, grad, state, _ = item
    return [p, grad, *(v for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor))]


def _cache_path():
    return cache_dir() / "autotune.json"


def _read_table() -> dict:
    """The cache file's table; empty when it is missing, unreadable or not a JSON object."""
    try:
        table = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def valid(config) -> bool:
    """A config the kernels can run: positive sizes, power-of-two blocks (``tl.arange``), whole blocks per
    chunk (the unmasked loop and the alignment hints rely on it)."""
    sizes = (config.chunk, config.block, config.reduce_block, config.num_warps)
    if not all(type(v) is int and v > 0 for v in (*sizes, config.num_stages)):
        return False
    powers = (config.block, config.reduce_block, config.num_warps)
    return all(v & (v - 1) == 0 for v in powers) and config.chunk % config.block == 0


def load_cached(key: str, default):
    """The cached config for ``key``, or None (missing, or an entry that is not a valid config)."""
    entry = _read_table().get(key)
    if not isinstance(entry, dict):
        return None
    fields = asdict(default)
    if any(k not in fields or type(v) is not int for k, v in entry.items()):
        return None
    config = replace(default, **entry)
    return config if valid(config) else None


def store(key: str, config) -> None:
    """Adds ``key`` to the cache file. Processes tuning at once (one per GPU of a node) each add their own
    entries: the read-modify-write holds an exclusive lock, so no entry of another process is lost."""
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        table = _read_table()
        table[key] = asdict(config)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: readers (who take no lock) never see a half-written file


@contextlib.contextmanager
def _locked(lock_path):
    """An exclusive advisory lock on ``lock_path`` (``fcntl.flock``); where there is no fcntl (Windows) no
    lock: the last writer's table wins, which loses at most a tuning result."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gpu_timer(fn: Callable[[], None], config) -> float:
    """Median milliseconds of ``fn`` (one optimizer step under ``config``) by Triton's benchmark helper."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _timer_for(device: torch.device):
    """How candidates are timed on ``device``: CUDA only (tests substitute a timer for the interpreter)."""
    return _gpu_timer if device.type == "cuda" else None


def _copies(items, max_elements: int):
    """Private copies of the largest items up to ``max_elements`` elements (at least one item)."""
    order = sorted(range(len(items)), key=lambda i: -items[i][0].numel())
    chosen, total = [], 0
    for i in order:
        n = items[i][0].numel()
        if chosen and total + n > max_elements:
            continue
        chosen.append(i)
        total += n
    copies = []
    for i in sorted(chosen):
        p, grad, state, values = items[i]
        twin = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        copies.append((p.detach().clone(), grad.detach().clone(), twin, values))
    return copies


def tune(plan, items, default, *, device_scalars=None, timer=None, progress=True, make_backend=None):
    """The fastest config for ``plan`` on ``items`` (cached), timed on copies of them.

    ``timer(fn, config)`` returns the time of ``fn``, a step under ``config``; by default ``do_bench`` on CUDA
    and nothing elsewhere (then ``default`` is returned and nothing is cached). ``device_scalars`` are the
    step's (GradScaler's ``grad_scale``/``found_inf``): the trials run with them, ``found_inf`` zero so that
    they time the update rather than a skipped step. If no candidate runs, nothing is cached."""
    device = items[0][0].device
    key = cache_key(plan, items, device)
    cached = load_cached(key, default)
    if cached is not None:
        return cached
    timer = timer or _timer_for(device)
    if timer is None:
        return default  # the interpreter: nothing to time
    make_backend = make_backend or (lambda config: TritonBackend(plan, config))
    max_elements = settings.count("OPTGEN_AUTOTUNE_MAX_ELEMENTS")
    try:
        trial_items = _copies(items, max_elements)
    except torch.OutOfMemoryError:  # no room for copies: the default config, tuned another time
        if progress:
            print("optgen autotune: out of memory for the trial copies; using the default config", file=sys.stderr)
        return default
    scalars = {k: (torch.zeros_like(v) if k == "found_inf" else v) for k, v in (device_scalars or {}).items()}
    scratch: dict = {}  # the trials' own scratch buffers

    def trial_scratch(p, name, eight_bit=False, row=None):
        return scratch_buffer(scratch, p, name, eight_bit, row)

    configs = candidates(default)
    times: dict = {}  # config -> seconds (inf: it failed); each config is compiled and timed once

    def measure(config) -> float:
        if config in times:
            return times[config]
        backend = make_backend(config)
        try:
            backend.step(trial_items, trial_scratch, scalars)  # compiles this config's kernels
            elapsed = timer(lambda backend=backend: backend.step(trial_items, trial_scratch, scalars), config)
        except Exception as exc:  # noqa: BLE001 - a config the GPU cannot run (shared memory, registers) is skipped
            elapsed = math.inf
            if progress:
                print(f"\noptgen autotune: {config} failed: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        times[config] = elapsed
        if progress:
            best_time = min(times.values())
            total = max(len(times), expected)
            done = int(30 * len(times) / total)
            print(
                f"\roptgen autotune {plan.ir.name}: [{'#' * done}{' ' * (30 - done)}] {len(times)}/{total}"
                f"  best {best_time * 1e3 if best_time < math.inf else math.nan:.1f} us",
                end="",
                file=sys.stderr,
                flush=True,
            )
        return elapsed

    if search_mode() == "grid":
        expected = len(configs)
        for config in configs:
            measure(config)
    else:
        expected = 1 + sum(len(_neighbours(configs, default, axis)) - 1 for axis in AXES)
        _descend(configs, default, measure)
    if progress:
        print(file=sys.stderr)
    best = min(times, key=lambda c: (times[c], c != default))  # a tie keeps the default
    best_time = times[best]
    if best_time < math.inf:
        store(key, best)
    return best
