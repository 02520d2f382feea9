"""Run by tests/test_distributed.py: FSDP2-sharded (or DDP) optimizers on gloo, results saved for comparison.

    python tests/dist_worker.py WORLD BACKEND MODE OUT.pt     (MODE: fsdp | fsdp_mixed | hsdp | ddp | fsdp_dcp | reference)
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OPTIMIZERS = {
    "LAMB": dict(lr=1e-2, weight_decay=0.01),
    "LARS": dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02),
    "NVLAMB": dict(lr=1e-2, max_grad_norm=0.1),
    "RMSNormalizedSGD": dict(lr=1e-2),  # layer means: the element count of the whole (sharded) parameter
    "NovoGrad": dict(lr=1e-2, weight_decay=0.01),  # a per-layer state: the same number on every rank
}


def optimizer_class(name):
    import optgen

    if name != "RMSNormalizedSGD":
        return getattr(optgen, name)
    spec = optgen.Spec("RMSNormalizedSGD")
    lr = spec.hyper(lr=1e-2)
    spec.update(spec.param, spec.param - lr * spec.grad / (optgen.rms(spec.grad) + 1e-3 * optgen.layer_numel()))
    return optgen.build(spec)
STEPS = 3


def make_model():
    """Odd sizes: 7 and 5 rows shard unevenly over 2 and 3 ranks (FSDP2 shards dim 0)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5))


def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 13, generator=generator) for _ in range(STEPS)]


def train(model, opt, data, params_of):
    for x in data:
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in params_of(model)]


def reference(backend):
    """Single process, plain tensors: what every sharded run must reproduce."""

    out = {}
    for name, kwargs in OPTIMIZERS.items():
        model = make_model()
        opt = optimizer_class(name)(model.parameters(), backend=backend, **kwargs)
        out[name] = train(model, opt, batches(), lambda m: list(m.parameters()))
    return out


def worker(rank, world, backend, mode, out_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import optgen

    if mode == "errors":
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        messages = {}
        bad = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
        bad.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
        before = bad.full_tensor().clone()
        try:
            optgen.LAMB([bad]).step()
        except ValueError as exc:
            messages["dim1"] = str(exc)
        messages["dim1_unchanged"] = bool(torch.equal(bad.full_tensor(), before))
        a = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        if world > 1:  # the same ranks in another order: another mesh
            from torch.distributed.device_mesh import DeviceMesh

            reversed_mesh = DeviceMesh("cpu", list(reversed(range(world))))
            b = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), reversed_mesh, [Shard(0)]))
            for p in (a, b):
                p.grad = torch.zeros_like(p)
            try:
                optgen.LAMB([a, b]).step()
            except ValueError as exc:
                messages["meshes"] = str(exc)
        if rank == 0:
            torch.save({"messages": messages}, out_path)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)

    results, collectives = {}, {}
    for name, kwargs in OPTIMIZERS.items():
        model = make_model()
        if mode == "hsdp":  # 2-D mesh: replicate x shard; norms reduce over the shard dimension only
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
            fully_shard(model, mesh=mesh)
        elif mode == "fsdp_mixed":  # a parameter FSDP leaves unsharded, next to sharded ones
            mesh = init_device_mesh("cpu", (world,))
            fully_shard(model, mesh=mesh, ignored_params={model[2].bias})
        elif mode.startswith("fsdp"):
            mesh = init_device_mesh("cpu", (world,))
            fully_shard(model, mesh=mesh)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
        opt = optimizer_class(name)(model.parameters(), backend=backend, **kwargs)
        data = batches()
        if mode == "fsdp_dcp":
            # two steps, checkpoint with torch.distributed.checkpoint, resume a fresh optimizer, one more step
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            train(model, opt, data[:2], lambda m: list(m.parameters()))
            model_sd, optim_sd = get_state_dict(model, opt)
            ckpt = os.path.join(os.path.dirname(out_path), f"ckpt_{name}")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
            model2 = make_model()
            fully_shard(model2, mesh=mesh)
            opt2 = optimizer_class(name)(model2.parameters(), backend=backend, **kwargs)
            model_sd2, optim_sd2 = get_state_dict(model2, opt2)
            state = {"model": model_sd2, "optim": optim_sd2}
            dcp.load(state, checkpoint_id=ckpt)
            set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
            model, opt, data = model2, opt2, data[2:]
        params = train(model, opt, data, lambda m: list(m.parameters()))
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
        results[name] = full
        reducer = getattr(opt._runner, "_shard_reducer", None)
        collectives[name] = reducer.collectives if reducer is not None else 0
    if rank == 0:
        torch.save({"results": results, "collectives": collectives}, out_path)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without running C++ destructors: a gloo worker thread torn down at interpreter exit can call
    # std::terminate ("terminate called without an active exception") on a loaded machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    world, backend, mode, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    if mode == "reference":
        torch.save({"results": reference(backend)}, out_path)
        sys.exit(0)
    with tempfile.TemporaryDirectory():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(world, backend, mode, out_path, port), nprocs=world, join=True)
