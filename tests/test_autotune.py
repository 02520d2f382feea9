"""Autotuning of the Triton backend's launch config: on copies (a tuned step equals an untuned one with
the same config), cached per (kernel source, GPU, dtypes, size bucket), the default under the interpreter.

No GPU here: a substitute timer ranks the candidates (``autotune._timer_for``); which config is fastest on a
real GPU is measured by ``optgen bench`` where one is available, never asserted by a test."""

import json
import math

import pytest
import torch

import optgen
from optgen.runtime import autotune, triton_backend
from optgen.runtime.triton_backend import LaunchConfig

DEFAULT = triton_backend.default_config()  # conftest: OPTGEN_CHUNK=256
SMALL_SPACE = [
    DEFAULT,
    LaunchConfig(chunk=512, block=128, num_warps=8, num_stages=1),
    LaunchConfig(chunk=1024, block=256, num_warps=4, num_stages=2),
]
FASTEST = SMALL_SPACE[1]


def test_search_space():
    configs = autotune.candidates(LaunchConfig())
    assert configs[0] == LaunchConfig() and len(configs) == len(set(configs))
    assert all(c.chunk % c.block == 0 for c in configs)
    assert {c.num_warps for c in configs} == set(autotune.WARPS) and {c.num_stages for c in configs} == set(autotune.STAGES)
    assert {c.block for c in configs} == set(autotune.BLOCKS) and {c.chunk for c in configs} == set(autotune.CHUNKS)


def test_size_bucket():
    assert [autotune.size_bucket(n) for n in (0, 1, 2, 3, 1024, 1025)] == [0, 0, 1, 2, 10, 11]


class FakeTimer:
    """Runs the trial (so every candidate really executes) and ranks FASTEST first."""

    def __init__(self):
        self.timed = []

    def __call__(self, fn, config):
        fn()
        self.timed.append(config)
        return 1.0 if config == FASTEST else 2.0 + len(self.timed) * 1e-3


@pytest.fixture
def small_space(tmp_path, monkeypatch):
    """A private cache, the three SMALL_SPACE candidates timed one by one (grid search) by a FakeTimer,
    which is returned (a test may swap in its own timer)."""
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "candidates", lambda default: SMALL_SPACE)
    monkeypatch.setenv("OPTGEN_AUTOTUNE_SEARCH", "grid")
    timer = FakeTimer()
    monkeypatch.setattr(autotune, "_timer_for", lambda device: timer)
    return timer


def _params(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes]


def _grads(sizes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, generator=g) for n in sizes] for _ in range(steps)]


def _run(cls, params, grads, **kwargs):
    opt = cls(params, backend="triton", lr=1e-2, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("name", ["AdamW", "LAMB"])
def test_tuned_step_equals_untuned_step_with_the_chosen_config(name, tmp_path, monkeypatch, small_space):
    timer = small_space
    cls = getattr(optgen, name)
    sizes = [3 * 256 + 5, 1000, 17, 1]
    grads = _grads(sizes, 3)
    tuned_params = _params(sizes)
    tuned = _run(cls, tuned_params, grads, autotune=True)
    backend = next(iter(tuned._backends.values()))
    assert backend.config == FASTEST
    assert timer.timed == SMALL_SPACE  # every candidate ran, on copies
    # the reference: no tuning, the chosen config from the start
    monkeypatch.setattr(triton_backend, "default_config", lambda: FASTEST)
    reference_params = _params(sizes)
    reference = _run(cls, reference_params, grads, autotune=False)
    for p, q in zip(tuned_params, reference_params):
        assert torch.equal(p, q)  # bitwise: the trials touched nothing of the run
        for key, value in reference.state[q].items():
            assert torch.equal(tuned.state[p][key], value), key
    assert float(tuned.state[tuned_params[0]]["step"]) == 3.0


def test_cache_is_used_and_keyed(tmp_path, monkeypatch, small_space):
    timer = small_space
    sizes = [300, 40]
    _run(optgen.AdamW, _params(sizes), _grads(sizes, 1), autotune=True)
    assert len(timer.timed) == len(SMALL_SPACE)
    table = json.loads((tmp_path / "autotune.json").read_text())
    (key, entry), = table.items()
    import triton

    assert key.split("|")[1:] == ["cpu", "float32", "2^9", f"triton {triton.__version__}"]
    assert entry["chunk"] == FASTEST.chunk

    def no_timing(device):
        raise AssertionError("a cached config must not be timed again")

    monkeypatch.setattr(autotune, "_timer_for", no_timing)
    opt = _run(optgen.AdamW, _params(sizes), _grads(sizes, 1), autotune=True)  # same key: from the cache
    assert next(iter(opt._backends.values())).config == FASTEST
    monkeypatch.setattr(autotune, "_timer_for", lambda device: timer)
    _run(optgen.AdamW, _params([5000]), _grads([5000], 1), autotune=True)  # another size bucket: tuned
    assert len(timer.timed) == 2 * len(SMALL_SPACE)
    assert len(json.loads((tmp_path / "autotune.json").read_text())) == 2


def test_interpreter_uses_the_default_config(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    sizes = [300]
    opt = _run(optgen.LAMB, _params(sizes), _grads(sizes, 1), autotune=True)
    assert next(iter(opt._backends.values())).config == DEFAULT
    assert not (tmp_path / "autotune.json").exists()


def test_autotune_env_default_and_validation(monkeypatch):
    monkeypatch.setenv("OPTGEN_AUTOTUNE", "1")
    assert optgen.AdamW(_params([3]), backend="triton")._config["autotune"] is True
    monkeypatch.delenv("OPTGEN_AUTOTUNE")
    assert optgen.AdamW(_params([3]), backend="triton")._config["autotune"] is False
    with pytest.raises(ValueError, match="autotune"):
        optgen.AdamW(_params([3]), autotune="yes")


def test_trials_are_bounded_to_the_largest_tensors(monkeypatch):
    monkeypatch.setenv("OPTGEN_AUTOTUNE_MAX_ELEMENTS", "1000")
    items = [(torch.zeros(n), torch.zeros(n), {"step": torch.zeros(()), "m": torch.zeros(n)}, (0.1,)) for n in (10, 900, 200, 50)]
    copies = autotune._copies(items, 1000)
    assert [c[0].numel() for c in copies] == [10, 900, 50]  # largest first while they fit, in their order
    assert all(c[0].data_ptr() not in {i[0].data_ptr() for i in items} for c in copies)


def test_tuning_under_grad_scaler_runs_the_trials_with_its_scalars(tmp_path, monkeypatch, small_space):
    """GradScaler's fused contract sets grad_scale/found_inf: the trials need them (found_inf zero, so they
    time the update), and the tuned run equals the untuned one."""
    timer = small_space
    sizes = [300, 40]
    grads = _grads(sizes, 2)

    def run(params, **kwargs):
        opt = optgen.AdamW(params, backend="triton", lr=1e-2, **kwargs)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone() * 4.0
            opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
            opt.step()
        return opt

    tuned_params = _params(sizes)
    tuned = run(tuned_params, autotune=True)
    assert timer.timed == SMALL_SPACE and next(iter(tuned._backends.values())).config == FASTEST
    monkeypatch.setattr(triton_backend, "default_config", lambda: FASTEST)
    reference_params = _params(sizes)
    run(reference_params, autotune=False)
    for p, q in zip(tuned_params, reference_params):
        assert torch.equal(p, q)


def test_nothing_is_cached_when_no_candidate_runs(tmp_path, monkeypatch, small_space):
    def broken(fn, config):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(autotune, "_timer_for", lambda device: broken)
    opt = _run(optgen.AdamW, _params([300]), _grads([300], 1), autotune=True)
    assert next(iter(opt._backends.values())).config == DEFAULT
    assert not (tmp_path / "autotune.json").exists()


@pytest.mark.parametrize(
    "content",
    ["[]", "null", "not json", '{"KEY": [1, 2]}', '{"KEY": {"chunk": 1000, "block": 64}}', '{"KEY": {"chunk": 512, "block": 0}}',
     '{"KEY": {"chunk": 512, "block": 96}}', '{"KEY": {"chunk": true, "block": 1}}', '{"KEY": {"chunk": 512, "nonsense": 1}}'],
)  # fmt: skip
def test_a_bad_cache_file_or_entry_means_tuning_again(content, tmp_path, small_space):
    sizes = [300]
    params = _params(sizes)
    opt = optgen.AdamW(params, backend="triton", autotune=True)
    plan = opt.plan
    state = {"step": torch.zeros(()), "exp_avg": torch.zeros(300), "exp_avg_sq": torch.zeros(300)}
    items = [(params[0], torch.zeros(300), state, opt._group_values(opt.param_groups[0]))]
    key = autotune.cache_key(plan, items, params[0].device)
    (tmp_path / "autotune.json").write_text(content.replace("KEY", key.replace('"', '\\\\"')))
    assert autotune.load_cached(key, DEFAULT) is None
    assert autotune.tune(plan, items, DEFAULT, progress=False) == FASTEST  # tuned, and the file repaired
    assert autotune.load_cached(key, DEFAULT) == FASTEST


def _store_many(cache_dir, worker, count):
    import os

    os.environ["OPTGEN_CACHE_DIR"] = cache_dir
    for i in range(count):
        autotune.store(f"worker{worker}|key{i}", LaunchConfig(chunk=LaunchConfig().block * (1 + i % 4)))


def test_concurrent_writers_keep_every_entry(tmp_path, monkeypatch):
    """Processes tuning at once (one per GPU of a node) share the cache file: each read-modify-write holds
    the lock, so no process's entries are lost (without it, 88 to 112 of the 160 were, in three runs)."""
    import multiprocessing

    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_store_many, args=(str(tmp_path), w, 40)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    table = json.loads((tmp_path / "autotune.json").read_text())
    assert sorted(table) == sorted(f"worker{w}|key{i}" for w in range(4) for i in range(40))
    assert all(autotune.load_cached(key, DEFAULT) is not None for key in table)


class _NoKernels:
    """A backend whose step does nothing: the search alone is under test."""

    def __init__(self, config):
        self.config = config

    def step(self, *args, **kwargs):
        pass


def _planted_cost(config, best):
    """A separable cost over the real grid with its minimum at ``best`` (what a memory-bound kernel's
    landscape roughly is), plus a small interaction so that the axes are not perfectly independent."""
    cost = 1.0
    cost += 0.3 * abs(math.log2(config.block) - math.log2(best.block))
    cost += 0.2 * abs(config.num_warps - best.num_warps) / 4
    cost += 0.25 * abs(math.log2(config.chunk) - math.log2(best.chunk))
    cost += 0.05 * abs(config.num_stages - best.num_stages)
    cost += 0.01 * (config.block == 4096 and config.num_warps == 4)
    return cost


def test_descent_finds_the_grids_best_in_a_fraction_of_the_timings(tmp_path, monkeypatch):
    """Whichever of the 72 grid configs the planted cost favours, coordinate descent from the default finds
    it, timing each config once and at most 21 of them (12 when the first round does not move)."""
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    default = LaunchConfig()
    grid = autotune.candidates(default)
    assert len(grid) == 72
    params = _params([300])
    state = {"step": torch.zeros(()), "exp_avg": torch.zeros(300), "exp_avg_sq": torch.zeros(300)}
    opt = optgen.AdamW(params, backend="triton")
    items = [(params[0], torch.zeros(300), state, opt._group_values(opt.param_groups[0]))]
    counts = []
    for planted, best in enumerate(grid):
        timed = []

        def timer(fn, config, best=best, timed=timed):
            fn()
            timed.append(config)
            return _planted_cost(config, best)

        (tmp_path / "autotune.json").unlink(missing_ok=True)
        found = autotune.tune(opt.plan, items, default, timer=timer, progress=False, make_backend=_NoKernels)
        assert found == best, planted
        assert len(timed) == len(set(timed)) <= 21, planted  # each config compiled and timed once
        counts.append(len(timed))
        if planted % 17 == 0:  # the grid search times all 72, and agrees
            monkeypatch.setenv("OPTGEN_AUTOTUNE_SEARCH", "grid")
            timed.clear()
            (tmp_path / "autotune.json").unlink()
            assert autotune.tune(opt.plan, items, default, timer=timer, progress=False, make_backend=_NoKernels) == best
            assert len(timed) == 72
            monkeypatch.delenv("OPTGEN_AUTOTUNE_SEARCH")
    assert min(counts) == 12


def test_search_mode_is_checked_when_the_optimizer_is_made(monkeypatch):
    monkeypatch.setenv("OPTGEN_AUTOTUNE_SEARCH", "exhaustive")
    with pytest.raises(ValueError, match="OPTGEN_AUTOTUNE_SEARCH='exhaustive': expected 'descent' or 'grid'"):
        optgen.AdamW(_params([3]), backend="triton", autotune=True)
    optgen.AdamW(_params([3]), backend="triton")  # not tuning: the variable is not read
