"""The compiled CPU path of the torch backend (``optgen.runtime.torch_backend``).

Each generated pass is split into an eager prologue of 0-d math (run once per pass for all parameters) and a
body compiled once per (pass, dtypes) with symbolic sizes. It must give the eager path's results (fp32
tolerance: the fp64 norms may be summed in another order), compile once for parameters of any number and
shape, never recompile when lr changes, and fall back to eager (with one warning) when compiling fails.
"""

import warnings

import torch
from conftest import assert_bitwise, assert_close_rel

import optgen
from optgen.runtime import torch_backend

# Small shapes keep the compiles to the serial kernels (below torch_backend._SERIAL_NUMEL): a few seconds on
# a cold Inductor cache. The 0-d, 1-element and empty parameters and a transposed (non-contiguous) one take
# the eager path inside a compiled step.
SHAPES = [(64, 33), (33,), (5, 3, 3, 3), (1000,), (7,), (2,), (), (1,), (0,), (3, 5, 7)]
SCHEDULE = [(1e-3, 2e-3), (5e-4, 1e-3), (1e-4, 3e-4), (2e-4, 1e-4)]  # lr of the two groups, step by step


def _run(cls, mode, monkeypatch, steps=3, lr_schedule=(), **kwargs):
    monkeypatch.setenv("OPTGEN_COMPILE", mode)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    params.append(torch.nn.Parameter(torch.randn(20, 30, generator=g).t()))  # non-contiguous
    groups = [{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.0}]
    opt = cls(groups, backend="torch", **kwargs)
    for k in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        for group, lr in zip(opt.param_groups, lr_schedule[k] if k < len(lr_schedule) else ()):
            group["lr"] = lr
        opt.step()
    return params, opt


def _check_compiled_matches_eager(cls, monkeypatch):
    eager, eager_opt = _run(cls, "0", monkeypatch, steps=4, lr_schedule=SCHEDULE)
    assert not eager_opt._backends["torch"].last_step_compiled

    before = torch_backend.compile_stats()
    _, opt = _run(cls, "1", monkeypatch, steps=1)
    assert opt._backends["torch"].last_step_compiled
    first = torch_backend.compile_stats()
    assert first["failures"] == before["failures"]
    # at most one compile per pass for 11 parameters of 8 shapes (0 if an earlier test compiled this plan)
    assert first["compiles"] - before["compiles"] <= len(opt.plan.passes)

    compiled, opt = _run(cls, "1", monkeypatch, steps=4, lr_schedule=SCHEDULE)
    assert torch_backend.compile_stats()["compiles"] == first["compiles"], "a new lr or a new step recompiled"
    assert_close_rel(compiled, eager, torch.float32, what=f"{cls.__name__} compiled vs eager")
    for state_c, state_e in zip(opt.state.values(), eager_opt.state.values()):
        for key in state_e:
            assert_close_rel(state_c[key], state_e[key], torch.float32, what=key)


def test_compiled_adamw_matches_eager_and_a_new_lr_does_not_recompile(monkeypatch):
    _check_compiled_matches_eager(optgen.AdamW, monkeypatch)


def test_compiled_lamb_matches_eager_and_a_new_lr_does_not_recompile(monkeypatch):
    # two passes with per-layer norms between them (the prologue of pass 1 is the trust ratio)
    _check_compiled_matches_eager(optgen.LAMB, monkeypatch)


def test_compiled_path_is_chosen_by_size_and_env(monkeypatch):
    monkeypatch.delenv("OPTGEN_COMPILE", raising=False)
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.ones(10)
    opt = optgen.SGD([p], lr=0.1, momentum=0.9)
    opt.step()
    backend = opt._backends["torch"]
    assert backend.compile_mode == "auto"
    assert not backend.last_step_compiled  # 10 elements: far below OPTGEN_COMPILE_MIN_NUMEL
    monkeypatch.setenv("OPTGEN_COMPILE_MIN_NUMEL", "5")
    assert torch_backend.TorchBackend(opt.plan).compile_min_numel == 5
    for value, mode in (("0", "off"), ("off", "off"), ("1", "on"), ("auto", "auto"), ("", "auto")):
        monkeypatch.setenv("OPTGEN_COMPILE", value)
        assert torch_backend.compile_mode() == mode


def test_compile_failure_warns_once_and_falls_back_to_eager(monkeypatch):
    eager, _ = _run(optgen.AdamW, "0", monkeypatch, steps=2)
    monkeypatch.setattr(torch_backend, "_COMPILED", {})  # fresh entries, restored after the test

    def broken(self, args, serial):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch_backend._CompiledPass, "_compile", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback, _ = _run(optgen.AdamW, "1", monkeypatch, steps=2)
    messages = [str(w.message) for w in caught if "fast path failed" in str(w.message)]
    assert len(messages) == 1, messages
    assert_bitwise(fallback, eager, what="eager fallback")


def test_a_state_set_to_another_buffers_old_value_is_right_when_compiling(monkeypatch):
    """b := a, a := b and c := w in one pass: Inductor drops the clones of such bare copies and copies in
    program order (b would get the new a); those passes run eagerly inside a compiled step."""
    spec = optgen.Spec("Swap")
    lr = spec.hyper(lr=1.0)
    w, g = spec.param, spec.grad
    a, b, c = spec.state("a", init=1), spec.state("b", init=2), spec.state("c", init=w)
    spec.update(a, b)
    spec.update(b, a)
    spec.update(c, w)
    spec.update(w, w - lr * g)
    cls = optgen.build(spec)
    monkeypatch.setenv("OPTGEN_COMPILE", "1")
    p = torch.nn.Parameter(torch.arange(100.0))
    opt = cls([p], backend="torch")
    p.grad = torch.ones(100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an eager pass by design, not a compile failure
        opt.step()
    state = opt.state[p]
    assert torch.equal(state["a"], torch.full((100,), 2.0)) and torch.equal(state["b"], torch.ones(100))
    assert torch.equal(state["c"], torch.arange(100.0)) and torch.equal(p.detach(), torch.arange(100.0) - 1)
