"""Host time of a step against the number of tensors: ``python bench/host_time.py [--counts 10,100,1000]``.

Each parameter has 16 elements, so a step is nearly all host work (Python, checks, table upkeep, the calls).
Three cases per optimizer, its rows interleaved round-robin in one process, each sample in a cache state it
sets: "warm" (the step right after three steps of the same optimizer, gradients kept), "cold" (after a write of
``--flush-mb`` megabytes, more than the last-level cache: none of the optimizer's objects are in cache, as after
a forward and backward pass; gradients kept, as with accumulation or ``zero_grad(set_to_none=False)``) and
"cold, new grads" (also new gradient tensors, ``zero_grad()``'s default then backward). Prints medians and the
25-75% spread in microseconds, and per tensor. "Python reads": the same AdamW with ``OPTGEN_HOST_READS_IN_C=0``
(the fast step's checks and reads from Python, not in C)."""

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
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--flush-mb", type=int, default=96)
    args = parser.parse_args(argv)
    junk = torch.empty(args.flush_mb << 18)
    saved = os.environ.get("OPTGEN_HOST_READS_IN_C")
    try:
        _rows(args, junk)
    finally:
        os.environ.pop("OPTGEN_HOST_READS_IN_C", None)
        if saved is not None:
            os.environ["OPTGEN_HOST_READS_IN_C"] = saved


KINDS = ("optgen AdamW", "optgen AdamW, Python reads", "optgen LAMB", "torch fused AdamW")
MODES = ("warm", "cold", "cold, new grads")


def _rows(args, junk) -> None:
    kinds, modes = KINDS, MODES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.flush_mb} MB written before a cold "
          "step; medians (25-75%) in us per step")  # fmt: skip
    for count in (int(c) for c in args.counts.split(",")):
        runs = {kind: _make(kind, count) for kind in kinds}
        fresh = {kind: [[torch.randn(ELEMENTS) for _ in range(count)] for _ in range(2)] for kind in kinds}
        times = {(kind, mode): [] for kind in kinds for mode in modes}
        for r in range(args.rounds):
            for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:  # no kind always first
                params, opt = runs[kind]
                for mode in modes:
                    os.environ["OPTGEN_HOST_READS_IN_C"] = "0" if kind.endswith("Python reads") else "1"
                    if mode == "warm":
                        for _ in range(3):  # the steps before: same optimizer, its objects in cache (one is not
                            opt.step()  # enough after a cold step: measured 500, 200, 170, 160 us at 1000 tensors)
                    else:
                        if mode == "cold, new grads":  # new tensors, made outside the timed region
                            for p, g in zip(params, fresh[kind][r % 2]):
                                p.grad = g.clone()
                        junk.fill_(float(r))
                    start = time.perf_counter()
                    opt.step()
                    times[(kind, mode)].append(time.perf_counter() - start)
        for kind in kinds:
            cells = []
            for mode in modes:
                q = statistics.quantiles([t * 1e6 for t in times[(kind, mode)]], n=4)
                cells.append(f"{mode} {q[1]:7.1f} ({q[0]:.1f}-{q[2]:.1f}) = {q[1] / count:5.2f}/tensor")
            print(f"{count:5d} tensors  {kind:26s}  " + "   ".join(cells))
        # every step sets the switch: another optimizer's state edit (any optimizer's first steps) sends the next
        # step the full way, which sets the fast path up again and reads the switch then
        for kind in kinds[:3]:
            assert (runs[kind][1]._runner.fast.compiled is None) == kind.endswith("Python reads"), kind


if __name__ == "__main__":
    main()
