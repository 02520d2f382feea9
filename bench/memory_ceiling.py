"""How close AdamW steps come to this machine's memory ceiling: ``python bench/memory_ceiling.py [--model bert-base-like]``.

Times, interleaved round-robin in one process (medians and the 25-75% spread), over the same number of
parameters: a bare C loop over four flat fp32 buffers that moves AdamW's 28 B per parameter and does nothing
else (``memory_ceiling.c``, built with optgen's C flags: no chunk tables, no per-tensor work), optgen's AdamW (C
kernels) and ``torch.optim.AdamW(fused=True)`` on the set's tensors. A step cannot beat the bare loop by much,
so the bare loop's time over a step's time bounds what any speed-up over that step can be."""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch

import optgen
from optgen.bench import model_shapes
from optgen.runtime import cbuild


def _bare_loop(numel: int):
    lib = cbuild.load_built(Path(__file__).with_name("memory_ceiling.c"), {}, "memory_ceiling")
    fn = lib.adamw_bare
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_float] * 7
    p, g, m, v = (torch.randn(numel) if k < 2 else torch.zeros(numel) for k in range(4))
    args = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), numel, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 0.5, 0.7)
    return (lambda: fn(*args)), (p, g, m, v)


def _optimizer(make, shapes):
    params = [torch.nn.Parameter(torch.randn(shape)) for _, shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    return opt.step, params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base-like")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    shapes = model_shapes(args.model)
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    runs = {
        "bare loop (ceiling)": _bare_loop(numel),
        "optgen AdamW (C)": _optimizer(lambda ps: optgen.AdamW(ps, lr=1e-3, backend="c"), shapes),
        "torch fused AdamW": _optimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), shapes),
    }
    for step, _ in runs.values():  # built, state made, pages touched
        for _ in range(3):
            step()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (step, _) in runs.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    ceiling = statistics.median(times["bare loop (ceiling)"])
    print(f"{args.model}: {numel / 1e6:.2f}M parameters, 28 B/param; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians (25-75%) of {args.rounds} interleaved rounds")  # fmt: skip
    for name, ts in times.items():
        q = statistics.quantiles([t * 1e3 for t in ts], n=4)
        print(f"  {name:22s} {q[1]:7.2f} ms ({q[0]:.2f}-{q[2]:.2f})  {numel * 28 / (q[1] / 1e3) / 1e9:6.1f} GB/s  "
              f"bare loop / this = {ceiling / (q[1] / 1e3):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
