"""Train a small model with FSDP2 and optgen's LAMB: layer-wise trust ratios stay exact under sharding.

    torchrun --nproc_per_node 2 examples/fsdp_lamb.py            # CPU (gloo)
    torchrun --nproc_per_node 8 examples/fsdp_lamb.py --cuda     # GPUs (nccl)

Each rank holds a dim-0 slice of every parameter (uneven slices are fine). optgen runs each pass on the
local slices and all-reduces one [layers x norms] table between the passes, so ||w|| and ||u|| of every layer
are those of the whole layer: the result equals single-process LAMB.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import optgen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    mesh = init_device_mesh(device, (world,))

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 257), torch.nn.GELU(), torch.nn.LayerNorm(257), torch.nn.Linear(257, 10)
    ).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = optgen.LAMB(optgen.param_groups(model, weight_decay=0.01), lr=1e-2)

    generator = torch.Generator().manual_seed(1234 + rank)  # each rank its own batch
    for step in range(args.steps):
        x = torch.randn(32, 64, generator=generator).to(device)
        y = torch.randint(0, 10, (32,), generator=generator).to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d} loss {loss.item():.4f}")
    if rank == 0:
        print(f"collectives for layer norms: {opt._shard_reducer.collectives} in {args.steps} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
