"""GPU-only checks (skipped on CPU machines): the Triton kernels on CUDA tensors against the torch backend,
and a whole optimizer step captured in a CUDA graph (capturable: tensor lr, steps on the device, no sync)."""

import os

import pytest
import torch
from conftest import TOL, assert_close_rel

import optgen

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(1,), (7,), (65535,), (65536,), (65537,), (3 * 65536 + 5,), (), (0,), (129, 257)]


def run(name, backend, dtype=torch.float32, steps=20):
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda", dtype=dtype).requires_grad_() for s in SHAPES]
    opt = getattr(optgen, name)(params, lr=1e-2, backend=backend)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=generator).to(dtype)
        opt.step()
    return params


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter cannot run CUDA tensors")
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "LARS", "LAMB", "NVLAMB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_equals_torch_backend(name, dtype):
    assert_close_rel(run(name, "triton", dtype), run(name, "torch", dtype), dtype, tol=max(TOL[dtype], 1e-6))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter cannot run CUDA tensors")
def test_step_captured_in_a_cuda_graph():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).cuda()
    lr = torch.tensor(1e-3, device="cuda")
    opt = optgen.LAMB(model.parameters(), lr=lr)
    x = torch.randn(64, 256, device="cuda")
    for _ in range(3):  # warm up on a side stream: tables, compiled kernels
        model(x).square().mean().backward()
        opt.step()
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        model(x).square().mean().backward()
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter cannot run CUDA tensors")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_parameters_on_a_gpu_that_is_not_the_current_one():
    """Triton launches on the current device: the backend of cuda:1 must make cuda:1 current."""
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda:1").requires_grad_() for s in SHAPES]
    twins = [p.detach().clone().to("cuda:0").requires_grad_() for p in params]
    opts = [optgen.LAMB(ps, lr=1e-2, backend="triton") for ps in (params, twins)]
    with torch.cuda.device(0):
        for _ in range(3):
            for p, q in zip(params, twins):
                p.grad = torch.ones_like(p)
                q.grad = torch.ones_like(q)
            for opt in opts:
                opt.step()
    for p, q in zip(params, twins):
        assert torch.equal(p.detach().cpu(), q.detach().cpu())
