"""Run by tests/test_distributed.py: FSDP2-sharded (or DDP) optimizers on gloo, results saved for comparison.

    python tests/dist_worker.py WORLD BACKEND MODE OUT.pt     (MODE: fsdp | fsdp_mixed | hsdp | ddp | fsdp_dcp | fsdp_8bit | reference |
    reference_8bit; a reference runs in one process, WORLD its shard count)
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
    # per-row/column states: the rows of a 2-D weight split over the ranks (column sums all-reduced, column
    # states whole on every rank), whole matrices of a 3-D one, a rank without rows
    "Adafactor": dict(lr=1e-2, weight_decay=0.01),
    "CAME": dict(lr=1e-2, weight_decay=0.01),
}
FACTORED = {"Adafactor", "CAME"}


def optimizer_class(name):
    import optgen

    if name != "RMSNormalizedSGD":
        return getattr(optgen, name)
    spec = optgen.Spec("RMSNormalizedSGD")
    lr = spec.hyper(lr=1e-2)
    spec.update(spec.param, spec.param - lr * spec.grad / (optgen.rms(spec.grad) + 1e-3 * optgen.layer_numel()))
    return optgen.build(spec)
STEPS = 3


class _Mix(torch.nn.Module):
    """A (2, 5, 5) batch of matrices (3 ranks: one holds none) and a (2, 5) weight (3 ranks: one holds no row)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, 5, 5) * 0.3)
        self.v = torch.nn.Parameter(torch.randn(2, 5) * 0.3)

    def forward(self, x):
        return torch.tanh(x @ self.w[0]) @ self.w[1] + x * self.v.sum(0)


def make_model(name=None):
    """Odd sizes: 7 and 5 rows shard unevenly over 2 and 3 ranks (FSDP2 shards dim 0); the factored optimizers
    get 3-D and 2-row parameters too."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(13, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5)]
    return torch.nn.Sequential(*layers, _Mix()) if name in FACTORED else torch.nn.Sequential(*layers)


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


EIGHT_BIT = {
    "AdamW8bit": dict(lr=1e-2, weight_decay=0.01),
    "LAMB8bit": dict(lr=1e-2, weight_decay=0.01),
    "CAME": dict(lr=1e-2, weight_decay=0.01, state_format="8bit"),  # blocks within rows: no shard splits one
}


def make_8bit_model(split: bool):
    """Weights of 8-bit state. Over 2 ranks, the (64, 128) weight's shards hold 4096 elements (whole 256-blocks:
    the blocks of one process), as the (64, 64) one's (2048); with ``split`` the second is (65, 64): 33 and 32
    rows (2112 and 2048 elements), the first shard's last block partial, where one process's block 8 straddles
    the shard boundary. Biases keep fp32 state (below 4096 elements)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 65 if split else 64))


def batches_8bit():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 128, generator=generator) for _ in range(STEPS)]


def reference_8bit(backend, world):
    """Single process. ``whole``: the optimizers over each model's parameters. ``shards``: the split model's
    parameters' rows cut as FSDP2 cuts them over ``world`` ranks, each piece a parameter of its own with blocks of
    its own (8-bit from 2048 elements, so that the weights' pieces are 8-bit as their weights are): AdamW8bit
    sharded must equal it bitwise (element-wise math over the blocks of each shard)."""
    import optgen
    from optgen import quantization

    out = {"whole": {}, "shards": {}}
    for split in (False, True):
        for name, kwargs in EIGHT_BIT.items():
            model = make_8bit_model(split)
            opt = getattr(optgen, name)(model.parameters(), backend=backend, **kwargs)
            out["whole"][name, split] = train(model, opt, batches_8bit(), lambda m: list(m.parameters()))
    model = make_8bit_model(True)
    pieces = [[torch.nn.Parameter(c.detach().clone()) for c in torch.chunk(p, world)] for p in model.parameters()]
    saved, quantization.MIN_NUMEL = quantization.MIN_NUMEL, 2048
    try:
        opt = optgen.AdamW8bit([q for ps in pieces for q in ps], backend=backend, **EIGHT_BIT["AdamW8bit"])
        for x in batches_8bit():
            model.zero_grad()
            model(x).pow(2).mean().backward()
            for p, ps in zip(model.parameters(), pieces):
                for q, g in zip(ps, torch.chunk(p.grad, world)):
                    q.grad = g.clone()
            opt.step()
            with torch.no_grad():
                for p, ps in zip(model.parameters(), pieces):
                    p.copy_(torch.cat([q.detach() for q in ps]))
    finally:
        quantization.MIN_NUMEL = saved
    out["shards"]["AdamW8bit"] = [p.detach().clone() for p in model.parameters()]
    return out


def fsdp_8bit(rank, world, backend, mesh):
    """AdamW8bit and LAMB8bit under FSDP2: 3 steps of each model; of the split one, 2 steps, a DCP checkpoint, a
    fresh optimizer loading it, one more step; each rank's states (placements, global and local shapes, dtype)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    import optgen

    results, resumed, layouts = {}, {}, {}
    for name, kwargs in EIGHT_BIT.items():
        cls = getattr(optgen, name)
        for split in (False, True):
            model = make_8bit_model(split)
            fully_shard(model, mesh=mesh)
            opt = cls(model.parameters(), backend=backend, **kwargs)
            params = train(model, opt, batches_8bit(), lambda m: list(m.parameters()))
            results[name, split] = [p.full_tensor() for p in params]
        layouts[name] = {
            (i, key): (str(v.placements), tuple(v.shape), tuple(v.to_local().shape), str(v.to_local().dtype))
            for i, p in enumerate(opt.param_groups[0]["params"]) for key, v in opt.state[p].items() if hasattr(v, "placements")
        }  # fmt: skip  (not step, nor an 8-bit state's layout entry: plain tensors)
        model = make_8bit_model(True)
        fully_shard(model, mesh=mesh)
        opt = cls(model.parameters(), backend=backend, **kwargs)
        data = batches_8bit()
        train(model, opt, data[:2], lambda m: list(m.parameters()))
        model_sd, optim_sd = get_state_dict(model, opt)
        ckpt = os.path.join(tempfile.gettempdir(), f"optgen_8bit_{os.getppid()}_{name}_{backend}")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
        model2 = make_8bit_model(True)
        fully_shard(model2, mesh=mesh)
        opt2 = cls(model2.parameters(), backend=backend, **kwargs)
        model_sd2, optim_sd2 = get_state_dict(model2, opt2)
        state = {"model": model_sd2, "optim": optim_sd2}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        params = train(model2, opt2, data[2:], lambda m: list(m.parameters()))
        resumed[name] = [p.full_tensor() for p in params]
    gathered = [None] * world
    dist.all_gather_object(gathered, layouts)
    return {"results": results, "resumed": resumed, "layouts": gathered}


def reference(backend):
    """Single process, plain tensors: what every sharded run must reproduce."""

    out = {}
    for name, kwargs in OPTIMIZERS.items():
        model = make_model(name)
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
        # a reduce step that reads its own sum over rows the ranks split: refused before anything changes
        spec = optgen.Spec("RowOfLayer")
        w, g = spec.param, spec.grad
        r, s = spec.state("r", per="row", init=1.0), spec.state("s", per="row", init=1.0)
        r1 = spec.update(r, 0.5 * r + 0.5 * optgen.row_mean(g**2) / optgen.layer_sum(g**2))
        s1 = spec.update(s, r1 / optgen.col_mean(r1))
        spec.update(w, w - 0.1 * g / optgen.sqrt(s1 + 1))
        split = torch.nn.Parameter(distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)]))
        split.grad = distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)])
        before = split.full_tensor().clone()
        opt = optgen.build(spec)([split])
        try:
            opt.step()
        except RuntimeError as exc:
            messages["late"] = str(exc)
        messages["late_unchanged"] = bool(torch.equal(split.full_tensor(), before)) and not opt.state
        # an 8-bit checkpoint of flat blocks into an optimizer keeping row blocks: sharded states are not converted
        wide = torch.nn.Parameter(distribute_tensor(torch.randn(2 * world, 2200), mesh, [Shard(0)]))
        wide.grad = distribute_tensor(torch.randn(2 * world, 2200), mesh, [Shard(0)])
        flat = optgen.AdamW8bit([wide])
        flat.step()
        rows = optgen.CAME([wide], state_format="8bit")
        try:
            rows.load_state_dict({"state": flat.state_dict()["state"], "param_groups": rows.state_dict()["param_groups"]})
        except ValueError as exc:
            messages["layout"] = str(exc)
        messages["layout_unchanged"] = not rows.state
        if rank == 0:
            torch.save({"messages": messages}, out_path)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)

    if mode == "fsdp_8bit":
        out = fsdp_8bit(rank, world, backend, init_device_mesh("cpu", (world,)))
        if rank == 0:
            torch.save(out, out_path)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)

    results, collectives, column_states = {}, {}, {}
    for name, kwargs in OPTIMIZERS.items():
        model = make_model(name)
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
            model2 = make_model(name)
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
        if name in FACTORED:  # per-column states: (placements, the local values) of each, from every rank
            local = {}
            for i, p in enumerate(opt.param_groups[0]["params"]):
                for key, value in opt.state[p].items():
                    if hasattr(value, "placements") and ("col" in key):
                        local[(i, key)] = (str(value.placements), value.to_local().clone())
            gathered = [None] * world
            dist.all_gather_object(gathered, local)
            column_states[name] = gathered
    if rank == 0:
        torch.save({"results": results, "collectives": collectives, "column_states": column_states}, out_path)
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
    if mode == "reference_8bit":
        torch.save(reference_8bit(backend, world), out_path)
        sys.exit(0)
    with tempfile.TemporaryDirectory():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(world, backend, mode, out_path, port), nprocs=world, join=True)
