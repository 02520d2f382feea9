"""Low-precision optimizer state: blockwise 8-bit states (optgen.quantization) and bf16 stochastic rounding.

The kernels (C, Triton in the interpreter) against the eager torch oracle, codes and scales bitwise; the
quantizer against torchao's; plan figures against the issue's targets; checkpoints across formats; bad input.
"""

import copy
import math

import pytest
import torch
from conftest import BACKENDS, assert_bitwise, assert_close_rel, make_grads, run_steps

import optgen
from optgen import quantization
from optgen.catalog import default_plan
from optgen.specs import BUILTINS

# above MIN_NUMEL (8-bit; 5000: a partial last block), exactly MIN_NUMEL, small ones (full-precision state), empty
SHAPES = [(96, 70), (5000,), (4096,), (10,), (0,), (3, 1, 4)]


def _params(shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _run(cls, backend, steps=4, dtype=torch.float32, shapes=SHAPES, **kwargs):
    params = _params(shapes, dtype)
    opt = cls(params, backend=backend, **kwargs)
    run_steps(opt, params, make_grads(shapes, steps, dtype=dtype))
    return params, opt


def _eight_bit(opt, params):
    """Every 8-bit state tensor of ``opt``: (codes, scales) by (parameter index, state name)."""
    out = {}
    for i, p in enumerate(params):
        for name, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                out[(i, name)] = (value, opt.state[p][name + "_absmax"])
    return out


# -- the maps and the quantizer ----------------------------------------------------------------------------


def test_maps_are_torchao_maps():
    quant_utils = pytest.importorskip("torchao.optim.quant_utils")
    for signed, kind in ((True, "signed"), (False, "unsigned")):
        assert quantization.MAPS[kind] == tuple(quant_utils.create_dynamic_map(signed))
        assert len(quantization.MAPS[kind]) == 256 and list(quantization.MAPS[kind]) == sorted(quantization.MAPS[kind])


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_reference_quantizer_equals_torchao(kind):
    quant_utils = pytest.importorskip("torchao.optim.quant_utils")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256 * 64, generator=gen) * torch.rand(256 * 64, generator=gen) ** 6  # many decades
    if kind == "unsigned":
        x = x.abs()
    x[:256] = 0  # an all-zero block
    qmap = torch.tensor(quant_utils.create_dynamic_map(kind == "signed"), dtype=torch.float32)
    scaled, scale = quant_utils.scale_tensor(x, 256)
    codes, scales = quantization.quantize(x, kind)
    assert_bitwise(codes, quant_utils.quantize_8bit_with_qmap(scaled, qmap))
    assert_bitwise(scales, scale)
    assert_bitwise(quantization.dequantize(codes, scales, kind), quant_utils.dequant_with_qmap(codes, qmap, scale))


@pytest.mark.parametrize("kind", quantization.KINDS)
def test_the_c_quantizers_tables_give_the_searchs_codes(kind):
    """The C kernels' quantizer reads a bucket count and a threshold (quantization.search_tables) instead of
    searching: the same code for every float -- random bit patterns (every binade, both signs, NaN, infinities),
    each threshold and the float just below it, the map's values, zeros."""
    thresholds, counts = quantization.search_tables(kind)
    table = quantization.map_of(kind)
    bits = torch.randint(-(2**31), 2**31, (1_000_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    x = torch.cat([
        bits.to(torch.int32).view(torch.float32),
        thresholds[1:256], torch.nextafter(thresholds[1:256], torch.tensor(-3.0)), table,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, math.nan, -math.nan, math.inf, -math.inf, 1e-45, -1e-45]),
        torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 2 - 1,
    ])  # fmt: skip
    below = counts[quantization.search_index(x)].long()
    assert_bitwise(below + (x >= thresholds[below + 1]).long(), quantization._codes(x, table))


def _copy_spec():
    """A state that takes the gradient as it is: the kernels' stored codes are the quantizer's of g."""
    spec = optgen.Spec("CopyGrad")
    lr = spec.hyper(lr=0.0)
    m = spec.state("m")
    m1 = spec.update(m, spec.grad)
    spec.update(spec.param, spec.param - lr * m1)
    return spec


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_codes_equal_torchao(backend):
    """The codes a kernel stores for a state are torchao's quantizer's on the same values (same maps, blocks)."""
    quant_utils = pytest.importorskip("torchao.optim.quant_utils")
    cls = optgen.build(_copy_spec())
    p = torch.nn.Parameter(torch.zeros(256 * 40))
    opt = cls([p], state_format="8bit", backend=backend)
    gen = torch.Generator().manual_seed(5)
    p.grad = torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen) ** 4
    opt.step()
    qmap = torch.tensor(quant_utils.create_dynamic_map(True), dtype=torch.float32)
    scaled, scale = quant_utils.scale_tensor(p.grad, 256)
    assert_bitwise(opt.state[p]["m"], quant_utils.quantize_8bit_with_qmap(scaled, qmap))
    assert_bitwise(opt.state[p]["m_absmax"], scale)


# -- the kernels against the oracle -------------------------------------------------------------------------

CASES = [
    ("AdamW8bit", {}),
    ("LAMB8bit", {}),
    ("AdamW8bit", {"amsgrad": True}),
    ("Adam", {"state_format": "8bit", "weight_decay": 0.1}),
    ("SGD", {"state_format": "8bit", "momentum": 0.9, "nesterov": True}),
    ("Lion", {"state_format": "8bit"}),
    ("AdaBelief", {"state_format": "8bit"}),
    ("LARS", {"state_format": "8bit"}),
    ("NVLAMB", {"state_format": "8bit"}),
    ("LAMB", {"state_format": {"exp_avg_sq": "8bit"}}),
]


@pytest.mark.parametrize("backend", ["c", "triton"])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{sorted(k)}" for n, k in CASES])
def test_kernels_equal_the_oracle(backend, name, kwargs):
    cls = getattr(optgen, name)
    expected, oracle = _run(cls, "torch", **kwargs)
    actual, opt = _run(cls, backend, **kwargs)
    assert_close_rel(actual, expected, what=name)
    states, reference = _eight_bit(opt, actual), _eight_bit(oracle, expected)
    assert states.keys() == reference.keys() and states  # the large tensors' states are 8-bit, the others not
    assert {i for i, _ in states} == {i for i, s in enumerate(SHAPES) if math.prod(s) >= quantization.MIN_NUMEL}
    for key, (codes, scales) in states.items():
        assert_bitwise(codes, reference[key][0], f"{key} codes")
        assert_bitwise(scales, reference[key][1], f"{key} scales")


@pytest.mark.parametrize("backend", ["c", "triton"])
def test_bf16_parameters(backend):
    # one step: the Triton interpreter truncates bf16 stores (the GPU and the others round to nearest), one ulp a step
    expected, oracle = _run(optgen.AdamW8bit, "torch", dtype=torch.bfloat16, steps=1)
    actual, opt = _run(optgen.AdamW8bit, backend, dtype=torch.bfloat16, steps=1)
    assert_close_rel(actual, expected, torch.bfloat16)
    for key, (codes, _) in _eight_bit(opt, actual).items():
        assert_bitwise(codes, _eight_bit(oracle, expected)[key][0], f"{key} codes")


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_layout_and_memory(backend):
    params, opt = _run(optgen.AdamW8bit, backend, steps=1)
    big, small = params[0], params[3]
    state = opt.state[big]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].shape == big.shape
    assert state["exp_avg_absmax"].shape == (math.ceil(big.numel() / 256),)
    assert opt.state[small]["exp_avg"].dtype == torch.float32  # below 4096 elements: full precision
    partial = opt.state[params[1]]["exp_avg_sq_absmax"]  # 5000 elements: the last block holds 136
    assert partial.shape == (20,) and (partial > 0).all()
    nbytes = sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"))
    assert nbytes / big.numel() <= 2.04


def test_plan_figures_meet_the_targets():
    adamw, lamb = default_plan(BUILTINS["adamw8bit"]()), default_plan(BUILTINS["lamb8bit"]())
    assert adamw.state_bytes_per_param == 2 + 8 / 256 <= 2.04  # two moments, scales included
    assert "exp_avg in 8 bits (signed map); exp_avg_sq in 8 bits (unsigned map) -> 2.03125 B/param" in adamw.describe()
    # traffic: 16 B of codes, parameters and gradients, plus 4 B of scale per 256 elements read and written
    assert adamw.bytes_per_param == 16 + 4 * 4 / 256
    # LAMB8bit: pass 1 moments (and the update, 8-bit, for pass 2), pass 2 the parameter and the update
    assert [p.bytes_per_param for p in lamb.passes] == [8 + 5 * (1 + 4 / 256), 8 + (1 + 4 / 256)]
    assert lamb.bytes_per_param == 22 + 6 * 4 / 256
    assert default_plan(BUILTINS["adamw"]()).bytes_per_param == 28 and default_plan(BUILTINS["lamb"]()).bytes_per_param == 40


def test_lamb8bit_never_rereads_8bit_moments():
    """Pass 2 applies the update pass 1 computed (stored, 8-bit) and whose norm it took: never a value rebuilt
    from 8-bit moments (a second moment rounded to 0 would make m / eps)."""
    lamb = default_plan(BUILTINS["lamb8bit"]())
    assert [ld.buffer for ld in lamb.passes[1].loads] == ["param", "scratch_0"]
    assert "re-read 8-bit states' new values" in lamb.notes[0]


# -- fidelity ------------------------------------------------------------------------------------------------


def _train(make_opt, steps=200):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen)
    y = torch.tanh(x @ (torch.randn(64, 32, generator=gen) / 8)) + 0.01 * torch.randn(512, 32, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt = make_opt(model.parameters())
    for i in range(steps):
        opt.zero_grad()
        rows = slice((i * 64) % 512, (i * 64) % 512 + 64)
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
    loss = torch.nn.functional.mse_loss(model(x), y).item()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), start, loss


# Documented distances (README): after 200 steps of a 3-layer MLP, ||w_8bit - w_fp32|| / ||w_fp32 - w_0||.
# Measured: AdamW8bit 0.0236 (torchao's AdamW8bit from torch's AdamW: 0.0239), LAMB8bit 0.0345.
FIDELITY = {"AdamW": 0.03, "LAMB": 0.04}


def test_adamw8bit_is_as_close_to_adamw_as_torchao():
    adam = pytest.importorskip("torchao.optim")
    kwargs = dict(lr=3e-3, weight_decay=0.01)
    ref, start, ref_loss = _train(lambda p: torch.optim.AdamW(p, **kwargs))
    ao, _, _ = _train(lambda p: adam.AdamW8bit(p, **kwargs))
    full, _, _ = _train(lambda p: optgen.AdamW(p, **kwargs))
    eight, _, loss = _train(lambda p: optgen.AdamW8bit(p, **kwargs))
    travel = (ref - start).norm()
    ours, theirs = ((eight - full).norm() / travel).item(), ((ao - ref).norm() / travel).item()
    assert ours <= FIDELITY["AdamW"] and ours <= theirs * 1.05, (ours, theirs)
    assert abs(loss - ref_loss) <= 0.05 * ref_loss


def test_lamb8bit_stays_near_lamb():
    kwargs = dict(lr=3e-3, weight_decay=0.01)
    full, start, full_loss = _train(lambda p: optgen.LAMB(p, **kwargs))
    eight, _, loss = _train(lambda p: optgen.LAMB8bit(p, **kwargs))
    assert ((eight - full).norm() / (full - start).norm()).item() <= FIDELITY["LAMB"]
    assert abs(loss - full_loss) <= 0.05 * full_loss


# -- NaN and infinity stay in their block --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_gradient_spoils_only_its_block(backend, bad):
    p = torch.nn.Parameter(torch.ones(256 * 20))
    opt = optgen.AdamW8bit([p], backend=backend)
    p.grad = torch.ones(p.shape)
    p.grad[256 * 7 + 3] = bad
    opt.step()
    values = quantization.dequantize(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_absmax"], "signed").view(20, 256)
    assert not torch.isfinite(values[7]).any()  # the block's scale is NaN or inf: no value of it is finite
    others = torch.cat([values[:7], values[8:]])
    assert torch.isfinite(others).all() and torch.isfinite(p.detach().view(20, 256)[torch.arange(20) != 7]).all()


# -- checkpoints -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_round_trip_is_bitwise(backend):
    grads = make_grads(SHAPES, 4)
    straight = _params()
    opt = optgen.AdamW8bit(straight, backend=backend)
    run_steps(opt, straight, grads)
    resumed = _params()
    first = optgen.AdamW8bit(resumed, backend=backend)
    run_steps(first, resumed, grads[:2])
    saved = first.state_dict()
    assert saved["state"][0]["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in saved["state"][0]
    second = optgen.AdamW8bit(resumed, backend=backend)
    second.load_state_dict(saved)
    run_steps(second, resumed, grads[2:])
    assert_bitwise([p.detach() for p in resumed], [p.detach() for p in straight])
    for (index, name), (codes, scales) in _eight_bit(second, resumed).items():
        assert_bitwise(codes, opt.state[straight[index]][name])
        assert_bitwise(scales, opt.state[straight[index]][name + "_absmax"])


def test_checkpoints_convert_between_formats():
    params = _params()
    full = optgen.AdamW(params)
    run_steps(full, params, make_grads(SHAPES, 3))
    eight = optgen.AdamW8bit(params)
    eight.load_state_dict(full.state_dict())  # fp32 -> 8-bit: quantized
    for p in params:
        fp32 = full.state[p]["exp_avg_sq"]
        if p.numel() >= quantization.MIN_NUMEL:
            codes, scales = quantization.quantize(fp32, "unsigned")
            assert_bitwise(eight.state[p]["exp_avg_sq"], codes)
            assert_bitwise(eight.state[p]["exp_avg_sq_absmax"], scales)
        else:
            assert_bitwise(eight.state[p]["exp_avg_sq"], fp32)
    back = optgen.AdamW(params)
    back.load_state_dict(eight.state_dict())  # 8-bit -> fp32: dequantized
    for p in params:
        state = back.state[p]
        assert state["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in state
        assert_close_rel(state["exp_avg"], full.state[p]["exp_avg"], tol=0.05)  # 8-bit rounding, relative to the max
    run_steps(back, params, make_grads(SHAPES, 1))  # and it steps
    torch_adamw = torch.optim.AdamW(params)
    torch_adamw.load_state_dict(back.state_dict())  # torch takes it too


# -- bad input ----------------------------------------------------------------------------------------------------


def test_bad_state_formats_fail_at_construction():
    p = [torch.nn.Parameter(torch.zeros(5000))]
    spec = optgen.Spec("Exact")
    lr = spec.hyper(lr=1e-3)
    s = spec.state("total", quantize="exact")
    t = spec.update(s, s + spec.grad)
    spec.update(spec.param, spec.param - lr * t)
    exact = optgen.build(spec)
    with pytest.raises(ValueError, match="marks state 'total' exact"):
        exact(p, state_format={"total": "8bit"})
    with pytest.raises(ValueError, match="no element-wise state that may be kept in 8 bits"):
        exact(p, state_format="8bit")
    with pytest.raises(ValueError, match="not a state of AdamW"):
        optgen.AdamW(p, state_format={"exp_avg_sqq": "8bit"})
    with pytest.raises(ValueError, match="Invalid state_format"):
        optgen.AdamW(p, state_format="4bit")
    with pytest.raises(ValueError, match="8-bit state .* is for real parameters; a parameter is torch.complex64"):
        optgen.AdamW8bit([torch.nn.Parameter(torch.zeros(5000, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating point"):  # every optimizer refuses integer parameters
        optgen.AdamW8bit([torch.zeros(5000, dtype=torch.int32)])
    with pytest.raises(ValueError, match="disagree"):
        optgen.AdamW(p, state_format="fp32", state_dtype=torch.bfloat16)
    with pytest.raises(optgen.SpecError, match="quantize='half'"):
        optgen.Spec("X").state("m", quantize="half")


def test_a_state_set_by_hand_in_the_wrong_form_is_refused_before_anything_changes():
    p = torch.nn.Parameter(torch.ones(5000))
    opt = optgen.AdamW8bit([p], backend="c")
    opt.state[p]["exp_avg"] = torch.zeros(5000)
    opt.state[p]["step"] = torch.tensor(0.0)
    p.grad = torch.ones(5000)
    with pytest.raises(RuntimeError, match="must be 8-bit"):
        opt.step()
    assert (p == 1).all() and opt.state[p]["step"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_the_kernels_cannot_read_is_refused_before_anything_changes(backend):
    """A state set by hand as a tensor subclass, on the meta device or expanded (elements sharing memory): the C
    kernels read past such memory (a crash), the torch path failed half-way through the step."""

    class Wrapped(torch.Tensor):
        pass

    bad_states = {
        "a tensor subclass": lambda t: t.as_subclass(Wrapped),
        "on the meta device": lambda t: t.to("meta"),
        "expanded": lambda t: t.reshape(-1)[:1].expand(t.shape),
    }
    whys = {"a tensor subclass": "is a Wrapped", "on the meta device": "is on meta", "expanded": "has elements that share memory"}
    for what, make_bad in bad_states.items():
        params = _params()
        opt = optgen.AdamW8bit(params, backend=backend)
        run_steps(opt, params, make_grads(SHAPES, 1))
        state = opt.state[params[3]]  # a (10,) parameter: fp32 state
        state["exp_avg"] = make_bad(state["exp_avg"].clone())
        before = {i: {k: v.clone() for k, v in opt.state[p].items() if v.device.type != "meta"} for i, p in enumerate(params)}
        weights = [p.detach().clone() for p in params]
        for p, g in zip(params, make_grads(SHAPES, 1, seed=5)[0]):
            p.grad = g
        with pytest.raises(RuntimeError, match=f"state 'exp_avg' of a parameter of shape \\(10,\\) {whys[what]}"):
            opt.step()
        assert_bitwise([p.detach() for p in params], weights)
        for i, p in enumerate(params):
            for key, value in before[i].items():
                assert_bitwise(opt.state[p][key], value, f"{what}: {key}")


def test_torchao_checkpoints_load_in_any_format():
    """torchao's AdamW8bit keeps its states as tensor subclasses: they load as their codes (AdamW8bit's are
    torchao's, bitwise: same maps and blocks) or values, and the next steps follow torchao's where both keep a
    parameter's state in the same format (torchao: 8 bits for multiples of 256 elements only)."""
    torchao_optim = pytest.importorskip("torchao.optim")
    shapes = [(64, 128), (5000,), (10,)]  # torchao keeps 8 bits for a multiple of 256 elements only
    params = _params(shapes)
    theirs = torchao_optim.AdamW8bit(params, lr=1e-2)
    run_steps(theirs, params, make_grads(shapes, 3))
    saved = theirs.state_dict()
    for backend in BACKENDS:
        for cls in (optgen.AdamW8bit, optgen.AdamW):
            mine = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = cls(mine, lr=1e-2, backend=backend)
            opt.load_state_dict(saved)
            for p, q in zip(params, mine):
                for name in ("exp_avg", "exp_avg_sq"):
                    value, loaded = theirs.state[p][name], opt.state[q][name]
                    assert type(loaded) is torch.Tensor
                    values = (value.dequantize() if hasattr(value, "codes") else value).view(p.shape).float()
                    if loaded.dtype != torch.uint8:
                        assert_bitwise(loaded, values, name)
                    elif hasattr(value, "codes"):  # codes of the same map and blocks: as they were
                        assert_bitwise((loaded, opt.state[q][name + "_absmax"]), (value.codes.view(p.shape), value.scale), name)
                    else:
                        kind = "signed" if name == "exp_avg" else "unsigned"
                        assert_bitwise((loaded, opt.state[q][name + "_absmax"]), quantization.quantize(values, kind), name)
            grads = make_grads(shapes, 2, seed=9)
            run_steps(opt, mine, grads)
            reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
            again = torchao_optim.AdamW8bit(reference, lr=1e-2)
            again.load_state_dict(saved)
            run_steps(again, reference, grads)
            same = [i for i, p in enumerate(params) if (opt.state[mine[i]]["exp_avg"].dtype == torch.uint8) == hasattr(theirs.state[p]["exp_avg"], "codes")]
            assert same == ([0, 2] if cls is optgen.AdamW8bit else [1, 2])  # parameters both keep in the same format
            assert_close_rel([mine[i] for i in same], [reference[i] for i in same], tol=1e-5, what=f"{cls.__name__} {backend}")


def test_a_checkpoint_the_optimizer_cannot_read_changes_nothing():
    """Found at load, before anything changes: another parameter's states (wrong shapes, which the conversion to
    row blocks failed on half-way), a map not of 256 values in one dimension, scales not one per block in one
    dimension, a tensor subclass without values, states on the meta device. Scales of another float dtype load
    as fp32."""
    shapes = [(37, 300), (5000,)]
    params = _params(shapes)
    opt = optgen.CAME(params, state_format="8bit", backend="c")
    run_steps(opt, params, make_grads(shapes, 1))
    saved = opt.state_dict()

    class Wrapped(torch.Tensor):
        pass

    def edited(index, **entries):
        return {**saved, "state": {**saved["state"], index: {**saved["state"][index], **entries}}}

    swapped = {**saved, "state": {0: saved["state"][1], 1: saved["state"][0]}}
    exp_avg = saved["state"][0]["exp_avg"]
    cases = [
        (swapped, r"state 'exp_avg' of parameter 0 has shape \(5000,\), and the parameter has shape \(37, 300\)"),
        (edited(0, exp_avg_qmap=saved["state"][0]["exp_avg_qmap"].view(16, 16)), r"'exp_avg_qmap' must be the 256 values of an 8-bit map, one dimension \(got \(16, 16\)\)"),
        (edited(1, exp_avg_absmax=saved["state"][1]["exp_avg_absmax"].view(-1, 1)), r"'exp_avg_absmax', 20 floating-point block scales in one dimension \(got \(20, 1\)"),
        (edited(0, exp_avg=exp_avg.float().as_subclass(Wrapped)), r"state 'exp_avg' of parameter 0 is a Wrapped"),
        (edited(1, exp_avg_sq=torch.empty(5000, device="meta")), r"state 'exp_avg_sq' of parameter 1 is on the meta device"),
        (edited(1, exp_avg=None), r"state 'exp_avg' of parameter 1 is NoneType 'None'; it must be a tensor"),
        (edited(0, exp_avg_res_row="x"), r"state 'exp_avg_res_row' of parameter 0 is str 'x'; it must be a tensor"),
        (edited(1, step="3"), r"'step' of parameter 1 must be a number or a 1-element real tensor \(got str '3'\)"),
    ]
    target = optgen.CAME(params, lr=0.5, state_format="8bit", backend="c")
    run_steps(target, params, make_grads(shapes, 1, seed=3))
    before = {i: {k: v.clone() for k, v in target.state[p].items()} for i, p in enumerate(params)}
    for state_dict, message in cases:
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(state_dict)
        assert target.param_groups[0]["lr"] == 0.5
        for i, p in enumerate(params):
            assert set(target.state[p]) == set(before[i])
            for key, value in before[i].items():
                assert_bitwise(target.state[p][key], value, key)
    for dtype in (torch.float16, torch.float64):
        target.load_state_dict(edited(1, exp_avg_absmax=saved["state"][1]["exp_avg_absmax"].to(dtype)))
        assert target.state[params[1]]["exp_avg_absmax"].dtype == torch.float32
        run_steps(target, params, make_grads(shapes, 1, seed=4))


def test_an_adamw8bit_checkpoint_resumes_in_came():
    """Switching from AdamW8bit to CAME mid-run: the first moment carries over (in CAME's row blocks); AdamW's
    per-element second moment of a matrix, which CAME factors, is left out (said in a warning) and CAME's
    factored moments start afresh; vectors keep theirs (CAME's own per-element exp_avg_sq)."""
    shapes = [(40, 300), (5000,)]
    params = _params(shapes)
    adamw = optgen.AdamW8bit(params, backend="c")
    run_steps(adamw, params, make_grads(shapes, 2))
    saved = adamw.state_dict()
    came = optgen.CAME(params, state_format="8bit", backend="c")
    with pytest.warns(UserWarning, match=r"parameter 0 \(shape \(40, 300\)\) runs a variant without 'exp_avg_sq'"):
        came.load_state_dict({**saved, "param_groups": [{**came.param_groups[0], "params": [0, 1]}]})
    matrix, vector = (came.state[p] for p in params)
    assert not any(k.startswith("exp_avg_sq") for k in matrix)
    assert vector["exp_avg_sq"].dtype == torch.uint8
    values = quantization.dequantize(saved["state"][0]["exp_avg"], saved["state"][0]["exp_avg_absmax"], "signed")
    assert_bitwise((matrix["exp_avg"], matrix["exp_avg_absmax"]), quantization.quantize(values, "signed", row=300))
    run_steps(came, params, make_grads(shapes, 2, seed=1))
    assert "exp_avg_sq_row" in matrix or any("row" in k for k in came.state[params[0]])
    assert all(torch.isfinite(p).all() for p in params)


def test_integer_states_load_as_torch_casts_them():
    """A checkpoint whose moments are integers (torch.optim casts them to the parameter's dtype): the same here,
    into fp32 and into 8-bit state; the step then matches torch.optim.AdamW's."""
    for shape in [(10,), (5000,)]:
        source = _params([shape])
        opt = optgen.AdamW(source, backend="c")
        run_steps(opt, source, make_grads([shape], 1))
        saved = opt.state_dict()
        saved = {**saved, "state": {0: {**saved["state"][0], "exp_avg": torch.arange(shape[0]) % 3 - 1}}}
        reference = [torch.nn.Parameter(source[0].detach().clone())]
        torch_opt = torch.optim.AdamW(reference)
        torch_opt.load_state_dict(copy.deepcopy(saved))
        grads = make_grads([shape], 1, seed=2)
        run_steps(torch_opt, reference, grads)
        for cls in (optgen.AdamW, optgen.AdamW8bit):
            params = [torch.nn.Parameter(source[0].detach().clone())]
            loaded = cls(params, backend="c")
            loaded.load_state_dict(copy.deepcopy(saved))
            assert loaded.state[params[0]]["exp_avg"].dtype == (torch.uint8 if cls is optgen.AdamW8bit and shape[0] >= 4096 else torch.float32)
            run_steps(loaded, params, grads)
            if cls is optgen.AdamW:
                assert_close_rel(params[0], reference[0], what="AdamW from an integer exp_avg")


def test_a_resized_parameter_is_named_as_such():
    param = torch.nn.Parameter(torch.randn(5000))
    opt = optgen.AdamW8bit([param], backend="c")
    run_steps(opt, [param], make_grads([(5000,)], 1))
    param.data = torch.randn(3000)
    param.grad = torch.randn(3000)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' has shape \(5000,\) for a parameter of shape \(3000,\).*resized"):
        opt.step()


def test_none_state_format_is_the_classs_default():
    p = [torch.nn.Parameter(torch.zeros(5000))]
    p[0].grad = torch.ones(5000)
    opt = optgen.AdamW8bit(p, state_format=None)
    opt.step()
    assert opt.state[p[0]]["exp_avg"].dtype == torch.uint8


# -- bf16 stochastic rounding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "c"])  # Triton: bitwise the same bits (the test below); 1000 steps
def test_stochastic_rounding_keeps_small_updates(backend):  # in the interpreter would take minutes
    """4096 bf16 weights at 1.0 taking 1000 updates of -1e-4 (1/39 of a bf16 ulp there) end at 0.9 on average."""
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = optgen.SGD([p], lr=1e-4, bf16_stochastic_round=True, backend=backend)
    for _ in range(1000):
        p.grad = torch.ones(4096, dtype=torch.bfloat16)
        opt.step()
    assert abs(p.float().mean().item() - 0.90) <= 0.01
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    assert ((nearest.float() - 1e-4).bfloat16() == 1).all()  # rounding to nearest would keep them at 1.0


SR_SHAPES = [(96, 70), (5000,), (10,), (0,), (3, 1, 4)]


@pytest.mark.parametrize(("name", "kwargs"), [("AdamW", {}), ("AdamW8bit", {}), ("LAMB", {}), ("Adafactor", {})])
def test_stochastic_rounding_is_bitwise_across_backends_and_runs(name, kwargs):
    cls = getattr(optgen, name)
    shapes = [s for s in SR_SHAPES if len(s) >= 2] if name == "Adafactor" else SR_SHAPES
    runs = {}
    for backend in BACKENDS:
        for attempt in range(2 if backend == "c" else 1):
            params, _ = _run(cls, backend, dtype=torch.bfloat16, shapes=shapes, bf16_stochastic_round=True, **kwargs)
            runs[(backend, attempt)] = [p.detach() for p in params]
    first = runs[("torch", 0)]
    for key, params in runs.items():
        assert_bitwise(params, first, str(key))
    plain, _ = _run(cls, "torch", dtype=torch.bfloat16, shapes=shapes, **kwargs)
    assert any(not torch.equal(a, b) for a, b in zip(plain, first))  # it does round otherwise


def test_stochastic_rounding_resumes_bitwise_and_seeds_differ():
    grads = make_grads(SR_SHAPES, 6, dtype=torch.bfloat16)
    straight = _params(SR_SHAPES, torch.bfloat16)
    opt = optgen.AdamW(straight, bf16_stochastic_round=True, backend="c")
    run_steps(opt, straight, grads)
    resumed = _params(SR_SHAPES, torch.bfloat16)
    first = optgen.AdamW(resumed, bf16_stochastic_round=True, backend="c")
    run_steps(first, resumed, grads[:3])
    second = optgen.AdamW(resumed, bf16_stochastic_round=True, backend="c")
    second.load_state_dict(first.state_dict())
    run_steps(second, resumed, grads[3:])
    assert_bitwise([p.detach() for p in resumed], [p.detach() for p in straight])
    other = _params(SR_SHAPES, torch.bfloat16)
    seeded = optgen.AdamW(other, bf16_stochastic_round=True, backend="c")
    seeded.param_groups[0]["sr_seed"] = 7
    run_steps(seeded, other, grads)
    assert not torch.equal(other[0], straight[0])
    for bad in (-1.0, 1.5):  # a fraction would be truncated to another seed's bits
        with pytest.raises(ValueError, match="sr_seed"):
            seeded.param_groups[0]["sr_seed"] = bad
            seeded.step()
    with pytest.raises(ValueError, match=r"Invalid sr_seed value: 2.5 \(expected an integer\)"):
        optgen.AdamW([{"params": other, "sr_seed": 2.5}], bf16_stochastic_round=True)


def test_stochastic_rounding_leaves_other_dtypes_alone():
    fp32 = _params(SR_SHAPES)
    plain = _params(SR_SHAPES)
    grads = make_grads(SR_SHAPES, 3)
    run_steps(optgen.AdamW(fp32, bf16_stochastic_round=True, backend="c"), fp32, grads)
    run_steps(optgen.AdamW(plain, backend="c"), plain, grads)
    assert_bitwise([p.detach() for p in fp32], [p.detach() for p in plain])
    with pytest.raises(ValueError, match="bf16_stochastic_round"):
        optgen.AdamW(fp32, bf16_stochastic_round=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_complex_parameter_added_later_is_refused(backend):
    """(The C kernels would walk the real view's 2n floats past an n-element code table.)"""
    p = torch.nn.Parameter(torch.ones(5000))
    opt = optgen.AdamW8bit([p], backend=backend)
    with pytest.raises(ValueError, match="is for real parameters"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(5000, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1
    p.grad = torch.ones(5000)
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW8bit", "CAME"])
def test_a_skipped_step_keeps_codes_and_scales(backend, name):
    """GradScaler's skipped step stores the old values again; requantizing them would not give the same codes
    (the signed map has no -1: a block whose largest value is negative would shrink its scale every skip). CAME:
    the row-tile loops' blocks."""
    shape = (256 * 16,) if name == "AdamW8bit" else (20, 300)
    p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    opt = optgen.AdamW8bit([p], backend=backend) if name == "AdamW8bit" else optgen.CAME([p], state_format="8bit", backend=backend)
    p.grad = -torch.rand(p.shape) - 0.5  # negative moments: every block's largest magnitude is negative
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    weights = p.detach().clone()
    for _ in range(3):  # GradScaler's contract with fused optimizers: it sets these around step()
        p.grad = torch.randn(p.shape)
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
    assert_bitwise(p.detach(), weights)
    assert any(v.dtype == torch.uint8 for v in before.values())
    for key, value in before.items():
        assert_bitwise(opt.state[p][key], value, key)


def test_a_broken_8bit_checkpoint_changes_nothing():
    params = _params()
    opt = optgen.AdamW8bit(params, lr=0.5)
    run_steps(opt, params, make_grads(SHAPES, 1))
    saved = opt.state_dict()
    del saved["state"][0]["exp_avg_absmax"]
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    other = optgen.AdamW8bit(params, lr=0.001)
    run_steps(other, params, make_grads(SHAPES, 1))
    other_before = {k: v.clone() for k, v in other.state[params[0]].items()}
    with pytest.raises(ValueError, match="'exp_avg' holds 8-bit codes; it needs 'exp_avg_absmax'"):
        other.load_state_dict(saved)
    assert other.param_groups[0]["lr"] == 0.001
    for key, value in other_before.items():
        assert_bitwise(other.state[params[0]][key], value, key)
    assert before  # (the saving optimizer is untouched too)


def test_a_checkpoint_says_which_map_reads_its_codes():
    """LAMB8bit keeps its second moment with the squared map, AdamW8bit with the unsigned one: a checkpoint carries
    its maps, so the codes are read with the map that wrote them and quantized again with the loader's."""
    params = _params()
    lamb = optgen.LAMB8bit(params)
    run_steps(lamb, params, make_grads(SHAPES, 2))
    saved = lamb.state_dict()
    assert torch.equal(saved["state"][0]["exp_avg_sq_qmap"], torch.tensor(quantization.MAPS["square"]))
    adamw = optgen.AdamW8bit(params)
    adamw.load_state_dict(saved)
    p = params[0]
    written = quantization.dequantize(lamb.state[p]["exp_avg_sq"], lamb.state[p]["exp_avg_sq_absmax"], "square")
    read = quantization.dequantize(adamw.state[p]["exp_avg_sq"], adamw.state[p]["exp_avg_sq_absmax"], "unsigned")
    assert_close_rel(read, written, tol=0.02)
    assert "exp_avg_sq_qmap" not in adamw.state[p]
    fp32 = optgen.AdamW(params)
    fp32.load_state_dict(saved)
    assert_close_rel(fp32.state[p]["exp_avg_sq"], written, tol=1e-6)
    run_steps(adamw, params, make_grads(SHAPES, 1))


def test_a_dict_names_the_states_it_changes():
    p = [torch.nn.Parameter(torch.zeros(5000))]
    opt = optgen.AdamW8bit(p, state_format={"exp_avg": "fp32"})
    p[0].grad = torch.ones(5000)
    opt.step()
    assert opt.state[p[0]]["exp_avg"].dtype == torch.float32 and opt.state[p[0]]["exp_avg_sq"].dtype == torch.uint8
    opt = optgen.AdamW(p, state_format={"exp_avg_sq": "8bit"})
    opt.step()
    assert opt.state[p[0]]["exp_avg"].dtype == torch.float32 and opt.state[p[0]]["exp_avg_sq"].dtype == torch.uint8


# -- 8-bit state in the factored variants (Adafactor, CAME): blocks within rows -------------------------------

# rows of 300: a full and a partial block each (the tests' C chunks of 256 cut them at the block boundary, Triton's
# tiles are a block wide); rows of 64: a block each; 3-D: whole matrices; (2, 1100): rows cut into several tiles;
# 1-D: the flat variant, flat blocks
FACTORED_SHAPES = [(37, 300), (300, 64), (3, 40, 130), (2, 1100), (5000,), (64,), (10, 256), (600, 8)]
# (10, 256): a matrix below 4096 elements, (600, 8): rows shorter than MIN_ROW: fp32 state beside the 8-bit ones
# (another storage partition of the same kernels: its reduce step shares theirs)


def test_row_blocks_are_each_rows_own_blocks():
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(0))
    codes, scales = quantization.quantize(x, "signed", row=300)
    assert codes.shape == (7, 300) and scales.shape == (14,) == (quantization.n_blocks(2100, row=300),)
    values = quantization.dequantize(codes, scales, "signed", row=300)
    for r in range(7):  # each row quantized alone by the flat (torchao's) quantizer
        row_codes, row_scales = quantization.quantize(x[r], "signed")
        assert_bitwise(codes[r], row_codes)
        assert_bitwise(scales[2 * r : 2 * r + 2], row_scales)
        assert_bitwise(values[r], quantization.dequantize(row_codes, row_scales, "signed"))
    assert quantization.block_row((7, 300), True) == 300 and quantization.block_row((300,), True) is None
    assert quantization.block_row((7, 300), False) is None


def _factored_run(name, backend, steps=4):
    params = _params(FACTORED_SHAPES)
    start = [p.detach().clone() for p in params]
    opt = getattr(optgen, name)(params, lr=1e-2, weight_decay=0.01, state_format="8bit", backend=backend)
    run_steps(opt, params, make_grads(FACTORED_SHAPES, steps))
    return params, start, opt


@pytest.mark.parametrize("backend", ["c", "triton"])
@pytest.mark.parametrize("name", ["CAME", "Adafactor"])
def test_factored_kernels_equal_the_oracle(backend, name):
    """The row-tile loops' 8-bit loads and stores against the eager oracle. Codes may differ by one step where a
    value lies on a rounding boundary: the kernels sum rows and columns in tiles, the oracle whole (CAME's first
    moment of a (2, 1100) weight: 1 code in 2200 after 4 steps, the same in C and Triton)."""
    expected, start, oracle = _factored_run(name, "torch")
    actual, _, opt = _factored_run(name, backend)
    for kernels in opt._backends.values():  # every step ran the kernels: none handed to the eager passes
        assert kernels.name == backend and getattr(kernels, "_eager_backend", None) is None
    for a, e, s, shape in zip(actual, expected, start, FACTORED_SHAPES):
        step = (e - s).abs().max()
        assert (a - e).abs().max() <= 0.01 * step, (shape, float((a - e).abs().max()), float(step))
    states, reference = _eight_bit(opt, actual), _eight_bit(oracle, expected)
    big = {i for i, s in enumerate(FACTORED_SHAPES) if math.prod(s) >= quantization.MIN_NUMEL and s[-1] >= quantization.MIN_ROW}
    assert states.keys() == reference.keys() and {i for i, _ in states} == (big if name == "CAME" else {4})
    for key, (codes, scales) in states.items():
        shape = FACTORED_SHAPES[key[0]]
        assert scales.shape == (quantization.n_blocks(math.prod(shape), shape[-1] if len(shape) > 1 else None),)
        flips = (codes.int() - reference[key][0].int()).abs()
        assert flips.max() <= 1 and (flips > 0).float().mean() <= 1e-3, (key, int((flips > 0).sum()))
        assert_close_rel(scales, reference[key][1], tol=1e-5, what=f"{key} scales")


def test_factored_8bit_checkpoint_round_trip_and_conversion():
    """CAME with 8-bit first moments: a checkpoint resumes bitwise; an fp32-state checkpoint loads into it
    quantized in row blocks (and the reverse dequantizes)."""
    grads = make_grads(FACTORED_SHAPES, 4)
    straight = _params(FACTORED_SHAPES)
    opt = optgen.CAME(straight, state_format="8bit", backend="c")
    run_steps(opt, straight, grads)
    resumed = _params(FACTORED_SHAPES)
    first = optgen.CAME(resumed, state_format="8bit", backend="c")
    run_steps(first, resumed, grads[:2])
    second = optgen.CAME(resumed, state_format="8bit", backend="c")
    second.load_state_dict(first.state_dict())
    run_steps(second, resumed, grads[2:])
    assert_bitwise([p.detach() for p in resumed], [p.detach() for p in straight])
    full = _params(FACTORED_SHAPES)
    fp32 = optgen.CAME(full, backend="c")
    run_steps(fp32, full, grads[:2])
    eight = optgen.CAME(full, state_format="8bit", backend="c")
    eight.load_state_dict(fp32.state_dict())
    m, codes = fp32.state[full[0]]["exp_avg"], eight.state[full[0]]["exp_avg"]
    scales = eight.state[full[0]]["exp_avg_absmax"]
    assert codes.dtype == torch.uint8 and scales.shape == (37 * 2,)
    assert_bitwise((codes, scales), quantization.quantize(m, "signed", row=300))
    back = optgen.CAME(full, backend="c")
    back.load_state_dict(eight.state_dict())
    assert_bitwise(back.state[full[0]]["exp_avg"], quantization.dequantize(codes, scales, "signed", row=300))


def test_came_8bit_stays_near_came():
    """CAME's confidence term (u - m)^2 amplifies any rounding of m: over 200 steps of the MLP the weights move
    off the fp32-state run's (8-bit: 0.64 of the distance it travels, bf16 state: 0.41), while the final loss
    stays within 1e-4 (measured: 1e-6)."""
    kwargs = dict(lr=3e-3, weight_decay=0.01)
    full, start, full_loss = _train(lambda p: optgen.CAME(p, **kwargs))
    eight, _, loss = _train(lambda p: optgen.CAME(p, state_format="8bit", **kwargs))
    half, _, _ = _train(lambda p: optgen.CAME(p, state_format="bf16", **kwargs))
    travel = (full - start).norm()
    assert ((eight - full).norm() / travel).item() <= 2 * ((half - full).norm() / travel).item()
    assert abs(loss - full_loss) <= 1e-4 * full_loss


def test_checkpoints_say_their_block_layout():
    """An AdamW8bit checkpoint (flat blocks) loads into CAME with 8-bit state (row blocks) read with its own
    layout, and back: a (2, 2200) state has 18 scales either way, so only the saved layout tells them apart."""
    p = torch.nn.Parameter(torch.randn(2, 2200, generator=torch.Generator().manual_seed(0)))
    adamw = optgen.AdamW8bit([p], backend="c")
    for k in range(2):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * torch.linspace(0.01, 10, 4400).view(2, 2200)
        adamw.step()
    saved = adamw.state_dict()["state"][0]
    assert int(saved["exp_avg_qrow"]) == 0
    values = quantization.dequantize(saved["exp_avg"], saved["exp_avg_absmax"], "signed")
    came = optgen.CAME([p], state_format="8bit", backend="c")
    came.load_state_dict({**adamw.state_dict(), "param_groups": [{**came.param_groups[0], "params": [0]}]})
    state = came.state[p]
    assert_bitwise((state["exp_avg"], state["exp_avg_absmax"]), quantization.quantize(values, "signed", row=2200))
    again = came.state_dict()["state"][0]
    assert int(again["exp_avg_qrow"]) == 2200
    back = optgen.AdamW8bit([p], backend="c")
    back.load_state_dict({**came.state_dict(), "param_groups": [{**back.param_groups[0], "params": [0]}]})
    read = quantization.dequantize(state["exp_avg"], state["exp_avg_absmax"], "signed", row=2200)
    assert_bitwise((back.state[p]["exp_avg"], back.state[p]["exp_avg_absmax"]), quantization.quantize(read, "signed"))
    broken = {**again, "exp_avg_qrow": torch.tensor(7)}
    before = {k: v.clone() for k, v in back.state[p].items()}
    with pytest.raises(ValueError, match="'exp_avg_qrow' must be 0 .flat blocks. or the codes' last dimension, 2200"):
        back.load_state_dict({"state": {0: broken}, "param_groups": [{**back.param_groups[0], "params": [0]}]})
    for key, value in before.items():
        assert_bitwise(back.state[p][key], value, key)


def test_the_block_layout_follows_the_groups_flags():
    """A spec whose flag decides whether it reduces over rows: the layout is its group's variant's, from the first
    step on (the state of a variant without row reductions keeps flat blocks)."""
    spec = optgen.Spec("RowNorm")
    lr = spec.hyper(lr=1e-3)
    rownorm = spec.flag(rownorm=True)
    m = spec.state("exp_avg")
    m1 = spec.update(m, 0.9 * m + 0.1 * spec.grad)
    spec.update(spec.param, spec.param - lr * optgen.where(rownorm, m1 / optgen.sqrt(optgen.row_mean(spec.grad**2) + 1e-8), m1))
    cls = optgen.build(spec)
    for flag, scales in ((False, 24), (True, 40)):
        p = torch.nn.Parameter(torch.randn(20, 300))
        opt = cls([p], state_format="8bit", rownorm=flag, backend="c")
        for _ in range(3):
            p.grad = torch.randn(p.shape)
            opt.step()
        assert opt.state[p]["exp_avg_absmax"].shape == (scales,)
        assert int(opt.state_dict()["state"][0]["exp_avg_qrow"]) == (300 if flag else 0)
    # the flag flipped between steps: codes of the other layout are refused before anything changes; a state
    # dict round trip converts them
    opt.param_groups[0]["rownorm"] = False
    before, weights = {k: v.clone() for k, v in opt.state[p].items()}, p.detach().clone()
    with pytest.raises(RuntimeError, match="holds 8-bit codes in blocks within rows of 300, and the variant this step runs keeps them in blocks of the flat tensor"):
        opt.step()
    assert_bitwise(p.detach(), weights)
    for key, value in before.items():
        assert_bitwise(opt.state[p][key], value, key)
    values = quantization.dequantize(before["exp_avg"], before["exp_avg_absmax"], "signed", row=300)
    opt.load_state_dict(opt.state_dict())
    assert_bitwise((opt.state[p]["exp_avg"], opt.state[p]["exp_avg_absmax"]), quantization.quantize(values, "signed"))
    opt.step()


def test_8bit_tables_whatever_the_default_dtype(monkeypatch):
    """The quantizer's tables are fp32 whatever torch's default dtype (float64 made them twice as long)."""
    monkeypatch.setattr(quantization, "_map_table", quantization._map_table.__wrapped__)
    monkeypatch.setattr(quantization, "search_tables", quantization.search_tables.__wrapped__)
    p = torch.nn.Parameter(torch.randn(8192))
    expected = torch.nn.Parameter(p.detach().clone())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        table = quantization.map_table()
        opt = optgen.AdamW8bit([p], backend="c")
        p.grad = torch.randn(8192, dtype=torch.float32)
        opt.step()
    finally:
        torch.set_default_dtype(default)
    assert table.dtype == torch.float32 and table.numel() == quantization.SEARCH_OFFSET + 3 * quantization.SEARCH_STRIDE
    oracle = optgen.AdamW8bit([expected], backend="torch")
    expected.grad = p.grad.clone()
    oracle.step()
    assert_close_rel(p.detach(), expected.detach())
    for name in ("exp_avg", "exp_avg_sq"):
        assert_bitwise(opt.state[p][name], oracle.state[expected][name], name)


def test_a_value_a_later_pass_divides_by_is_not_stored_in_8bits():
    """Three passes: sqrt(m^2 + eps) is stored for pass 1 and divided by in pass 2. In 8 bits the small ones
    round to 0 and the step is infinite; the planner keeps it fp32."""
    spec = optgen.Spec("ThreePass")
    lr = spec.hyper(lr=1e-3)
    m = spec.state("exp_avg")
    m1 = spec.update(m, 0.9 * m + 0.1 * spec.grad)
    x = optgen.sqrt(m1**2 + 1e-8)
    n2 = optgen.norm(optgen.Max(x, optgen.norm(x) / 100))
    spec.update(spec.param, spec.param - lr * n2 * spec.grad / x / 1000)
    opt_cls = optgen.build(spec)
    p = torch.nn.Parameter(torch.randn(4096))
    opt = opt_cls([p], state_format="8bit", backend="c")
    plan = opt.plan
    assert len(plan.passes) == 3 and plan.scratch and not any(name in plan.scratch for name, _ in plan.quantized[1:])
    p.grad = torch.randn(4096) * torch.cat([torch.full((2000,), 1e-6), torch.ones(2096)])
    opt.step()
    assert torch.isfinite(p).all()


def test_narrow_rows_keep_full_precision_state():
    """Blocks within rows shorter than MIN_ROW would cost more than fp32 in scales (a (16384, 1) weight: 5 B an
    element): such states stay fp32; a row of 16 costs 1.25 B."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((16384, 1), (64, 64, 3, 3), (512, 16))]
    opt = optgen.CAME(params, state_format="8bit", backend="c")
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert [opt.state[p]["exp_avg"].dtype for p in params] == [torch.float32, torch.float32, torch.uint8]
    assert opt.state[params[2]]["exp_avg_absmax"].shape == (512,)
