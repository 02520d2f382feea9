"""Host time of a step against the number of tensors: ``python bench/host_time.py [--counts 10,100,1000]``.

Each parameter has 16 elements, so a step is nearly all host work (Python, checks, table upkeep, the calls).
Two loops per optimizer, interleaved round-robin in one process: gradients kept between steps (accumulation,
``zero_grad(set_to_none=False)``) and new gradient tensors before every step (``zero_grad()``'s default, then
backward). Prints medians and the 25-75% spread in microseconds, and per tensor. "Python reads": the same AdamW
with ``OPTGEN_HOST_READS_IN_C=0`` (identities and data pointers read from Python, not in C)."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import optgen

ELEMENTS = 16


def _make(kind: str, count: int):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(ELEMENTS, generator=gen)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(ELEMENTS, generator=gen)
    opt = {
        "optgen AdamW": lambda: optgen.AdamW(params, lr=1e-3),
        "optgen AdamW, Python reads": lambda: optgen.AdamW(params, lr=1e-3),
        "optgen LAMB": lambda: optgen.LAMB(params, lr=1e-3),
        "torch fused AdamW": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True),
    }[kind]()
    in_c = os.environ.get("OPTGEN_HOST_READS_IN_C")
    os.environ["OPTGEN_HOST_READS_IN_C"] = "0" if kind.endswith("Python reads") else "1"
    try:
        for _ in range(3):  # state, tables, compiled objects: built before timing (the fast path set up)
            opt.step()
    finally:
        os.environ.pop("OPTGEN_HOST_READS_IN_C")
        if in_c is not None:
            os.environ["OPTGEN_HOST_READS_IN_C"] = in_c
    return params, opt


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    kinds = ("optgen AdamW", "optgen AdamW, Python reads", "optgen LAMB", "torch fused AdamW")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians (25-75%) in us per step")
    for count in (int(c) for c in args.counts.split(",")):
        runs = {kind: _make(kind, count) for kind in kinds}
        fresh = {kind: [[torch.randn(ELEMENTS) for _ in range(count)] for _ in range(2)] for kind in kinds}
        times = {(kind, mode): [] for kind in kinds for mode in ("kept", "new")}
        for r in range(args.rounds):
            # Each round starts with the next kind: the one run right after torch's step (which leaves little of
            # the others' objects in cache) changes, so no kind pays the coldest caches every round.
            for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
                params, opt = runs[kind]
                for mode in ("kept", "new"):
                    if mode == "new":  # new tensors, made outside the timed region
                        for p, g in zip(params, fresh[kind][r % 2]):
                            p.grad = g.clone()
                    start = time.perf_counter()
                    opt.step()
                    times[(kind, mode)].append(time.perf_counter() - start)
        for kind in kinds:
            cells = []
            for mode in ("kept", "new"):
                q = statistics.quantiles([t * 1e6 for t in times[(kind, mode)]], n=4)
                cells.append(f"{mode} grads {q[1]:8.1f} ({q[0]:.1f}-{q[2]:.1f}) = {q[1] / count:5.2f}/tensor")
            print(f"{count:5d} tensors  {kind:26s}  " + "   ".join(cells))


if __name__ == "__main__":
    main()
