"""Hardening: numerical edge cases, edge tensors and bad input, on both backends.

Policies (also in README.md):
* gradients of 1e30, 1e-30 or denormals keep LAMB/LARS/NVLAMB finite: reductions accumulate squares in fp64;
* a NaN or Inf gradient propagates into the parameters, as torch.optim does, unless GradScaler's found_inf
  is given (then the step is skipped);
* non-contiguous parameters are updated exactly like contiguous twins;
* parameters that overlap in memory are refused before anything changes.
"""

import pytest
import torch
from conftest import BACKENDS, assert_bitwise

import optgen

LAYERWISE = ["LAMB", "LARS", "NVLAMB"]


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e-40])
@pytest.mark.parametrize("name", LAYERWISE)
def test_extreme_gradients_stay_finite(name, scale, backend):
    torch.manual_seed(0)
    params = [torch.randn(300).requires_grad_(), torch.randn(7, 3).requires_grad_(), torch.zeros(5).requires_grad_()]
    before = [p.detach().clone() for p in params]
    opt = getattr(optgen, name)(params, lr=1e-2, backend=backend)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * scale
        opt.step()
    for p, b in zip(params, before):
        assert torch.isfinite(p).all(), (name, scale)
        if b.norm() > 0:  # the trust ratio bounds a layer's step by lr * ||w||: no blow-up
            assert (p - b).norm() <= 3 * 1e-2 * b.norm().item() + 1e-6


def test_lamb_step_is_invariant_to_gradient_scale(backend):
    """LAMB's update direction m/sqrt(v) does not depend on the gradient's scale (eps aside): 1e-20 and 1e20
    gradients give the same parameters as unit gradients when eps is negligible."""
    results = []
    for scale in (1e-15, 1.0, 1e15):
        torch.manual_seed(0)
        params = [torch.randn(40).requires_grad_(), torch.randn(6, 5).requires_grad_()]
        opt = optgen.LAMB(params, lr=1e-2, eps=1e-30, weight_decay=0.0, backend=backend)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator) * scale
            opt.step()
        results.append([p.detach().clone() for p in params])
    for other in (results[0], results[2]):
        for a, b in zip(other, results[1]):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["AdamW", "LAMB"])
def test_nan_inf_gradients_propagate_like_torch(name, bad, backend):
    param = torch.randn(10).requires_grad_()
    opt = getattr(optgen, name)([param], lr=1e-2, backend=backend)
    grad = torch.randn(10)
    grad[3] = bad
    param.grad = grad
    opt.step()
    reference = torch.randn(10).requires_grad_()
    torch_opt = torch.optim.AdamW([reference], lr=1e-2)
    reference.grad = grad.clone()
    torch_opt.step()
    # torch: the bad element becomes NaN; a layer-wise optimizer spreads it through the layer norm
    assert torch.isnan(param[3]) == torch.isnan(reference[3])
    assert not torch.isfinite(param).all()


def test_non_contiguous_parameters_match_contiguous_twins(backend):
    torch.manual_seed(0)
    transposed = torch.randn(40, 30).t().requires_grad_()
    storage = torch.randn(20, 50)
    sliced = storage[:, 5:17].detach().requires_grad_()
    twins = [transposed.detach().contiguous().clone().requires_grad_(), sliced.detach().contiguous().clone().requires_grad_()]
    opt = optgen.LAMB([transposed, sliced], lr=1e-2, backend=backend)
    twin_opt = optgen.LAMB(twins, lr=1e-2, backend=backend)
    untouched = storage[:, :5].clone()
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=generator) for t in twins]
        transposed.grad, sliced.grad = grads[0].t().contiguous().t(), grads[1]
        twins[0].grad, twins[1].grad = grads[0].clone(), grads[1].clone()
        opt.step()
        twin_opt.step()
    assert not transposed.is_contiguous() and not sliced.is_contiguous()
    assert_bitwise(transposed.detach().contiguous(), twins[0].detach())
    assert_bitwise(sliced.detach().contiguous(), twins[1].detach())
    assert torch.equal(storage[:, :5], untouched)  # the rest of the storage is not written


def test_overlapping_parameters_are_refused_before_any_change(backend):
    base = torch.randn(10, 4)
    a, b = base[:5].detach().requires_grad_(), base[3:].detach().requires_grad_()
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt = optgen.AdamW([a, b], backend=backend)
    snapshot = base.clone()
    with pytest.raises(RuntimeError, match="share memory"):
        opt.step()
    assert torch.equal(base, snapshot)
    assert len(opt.state) == 0


def test_adjacent_views_of_one_buffer_are_fine(backend):
    base = torch.randn(10, 4)
    params = [base[:5].detach().requires_grad_(), base[5:].detach().requires_grad_()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    for p, t in zip(params, twins):
        p.grad = torch.ones_like(p)
        t.grad = torch.ones_like(t)
    optgen.AdamW(params, backend=backend).step()
    optgen.AdamW(twins, backend=backend).step()
    for p, t in zip(params, twins):
        assert_bitwise(p.detach(), t.detach())


# -- int64 indexing: a tensor past 2**31 elements ----------------------------------------------------------
# A real one takes 8 GiB per fp32 buffer (32 GiB for LAMB), more than this machine has. The kernels' index math
# is exercised instead on a small allocation seen through shifted tables: every buffer's base address moves
# down by SHIFT elements and every chunk start and tensor size up by SHIFT, so each program computes offsets
# in [SHIFT, SHIFT + n) -- past 2**31 and 2**32 -- that land on the real elements only if the offset
# arithmetic is 64-bit all the way (an int32 wrap would address memory gigabytes away). The PTX side (64-bit
# address arithmetic in the compiled kernels) is checked by tests/test_aot.py.
SHIFT = 2**32 + 2**31 + 256  # a multiple of 16 elements: the buffers stay 16-byte aligned


class _ShiftedTables:
    """The backend's tables as a tensor at element offset SHIFT of a much larger allocation would have them."""

    def __init__(self, tables):
        self._tables = tables

    def __getattr__(self, name):
        return getattr(self._tables, name)

    @property
    def chunk_start(self):
        return self._tables.chunk_start + SHIFT

    @property
    def numel(self):
        return self._tables.numel + SHIFT

    @property
    def addr(self):
        size = {name: dtype.itemsize for name, dtype in zip(self._tables.buffers, self._tables.signature[0])}
        return {name: a - SHIFT * size[name] for name, a in self._tables.addr.items()}


@pytest.mark.parametrize("name", ["AdamW", "LAMB", "NVLAMB"])
def test_kernel_offsets_past_2_pow_31_elements_are_int64(name, monkeypatch):
    from optgen.runtime.triton_backend import TritonBackend

    cls = getattr(optgen, name)
    torch.manual_seed(0)
    sizes = [3 * 256 + 5, 256, 17]  # chunk-straddling, whole chunks and a tail (OPTGEN_CHUNK=256 in conftest)
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = [[torch.randn(n) for n in sizes] for _ in range(3)]
    expected_opt, shifted_opt = cls(twins, backend="triton", lr=1e-2), cls(params, backend="triton", lr=1e-2)
    original = TritonBackend._tables_for
    shifted = []

    def tables_for(self, items, scratch_of, *rest):
        tables = _ShiftedTables(original(self, items, scratch_of, *rest))
        shifted.append(tables)
        return tables

    for step_grads in grads:
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        expected_opt.step()
        with monkeypatch.context() as m:
            m.setattr(TritonBackend, "_tables_for", tables_for)
            shifted_opt.step()
    assert shifted and int(shifted[-1].chunk_start.max()) > 2**32 and shifted[-1].chunk_start.dtype == torch.int64
    for p, q in zip(params, twins):
        assert torch.equal(p, q)  # the same elements, the same arithmetic: bitwise
    for p, q in zip(params, twins):
        for key, value in expected_opt.state[q].items():
            assert torch.equal(shifted_opt.state[p][key], value), key


@pytest.mark.parametrize("make", [lambda ps: optgen.NVLAMB(ps), lambda ps: optgen.AdamW(ps, max_grad_norm=1.0)],
                         ids=["NVLAMB", "AdamW_max_grad_norm"])  # fmt: skip
def test_a_global_norm_over_parameters_on_several_devices_is_refused(make):
    """Each device's launches would see only its own share of the global norm (a silently wrong clip): refused
    before anything changes. The meta device stands in for a second GPU here."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, device="meta"))
    a.grad, b.grad = torch.ones(3), torch.ones(3, device="meta")
    opt = make([a, b])
    with pytest.raises(RuntimeError, match=r"reduces over all parameters .* on several devices \(cpu, meta\)"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(a.detach(), torch.ones(3))
    optgen.LAMB([a, b]).step()  # per-layer norms only: each device on its own is exact


NAN_MAX_SPEC = '''
import optgen


def spec():
    s = optgen.Spec("MaxNaN")
    lr = s.hyper(lr=0.1)
    w, g = s.param, s.grad
    s.update(w, w - lr * g / (optgen.layer_max(abs(g)) + optgen.global_max(g * g) + 1))
    return s
'''


def test_a_nan_reaches_layer_and_global_maxima_on_both_backends(tmp_path):
    """tl.max and a bare tl.maximum drop NaN (torch.amax keeps it): a NaN gradient vanished from the Triton
    backend's maxima and moved only its own element, while the torch backend made the layer NaN."""
    from conftest import CHUNK, assert_spec_file_compiles

    namespace: dict = {}
    exec(NAN_MAX_SPEC, namespace)
    cls = optgen.build(namespace["spec"]())
    n = 3 * CHUNK + 5
    for backend in BACKENDS:
        for where_nan in (0, CHUNK + 1, n - 1):  # first chunk, a middle chunk, the masked tail
            p, q = torch.nn.Parameter(torch.ones(n)), torch.nn.Parameter(torch.ones(7))
            p.grad, q.grad = torch.ones(n), torch.ones(7)
            p.grad[where_nan] = float("nan")
            cls([p, q], backend=backend).step()
            assert torch.isnan(p).all() and torch.isnan(q).all(), (backend, where_nan)  # layer max, global max
        p = torch.nn.Parameter(torch.ones(n))
        p.grad = torch.ones(n)
        cls([p], backend=backend).step()
        assert torch.isfinite(p).all()
    assert_spec_file_compiles(tmp_path, NAN_MAX_SPEC)  # tl.reduce with a NaN-keeping combine, compiled for sm_90
