"""The fast step's checks and reads in C against the same from Python (``OPTGEN_HOST_READS_IN_C=0``), A/B:
``python bench/host_reads_ab.py [--counts 100,1000] [--rounds 300]``.

Two AdamW optimizers over 16-element tensors (a step is nearly all host work), alternating which steps first
each round, medians in microseconds. Four cases: gradients kept or new before every step, and no flush (the
step right after the other optimizer's) or flushed (``--flush-mb`` written before every step, more than the
last-level cache, as a forward and backward pass would leave it). One untimed round first: making the second
optimizer edits state, which sends the first one's next step the full way."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import optgen

ELEMENTS = 16


def _make(in_c: str, count: int):
    os.environ["OPTGEN_HOST_READS_IN_C"] = in_c  # read when the fast path is set up (the steps below)
    try:
        params = [torch.nn.Parameter(torch.randn(ELEMENTS)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn(ELEMENTS)
        opt = optgen.AdamW(params, lr=1e-3)
        for _ in range(3):
            opt.step()
    finally:
        os.environ.pop("OPTGEN_HOST_READS_IN_C")
    return params, opt


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,1000")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--flush-mb", type=int, default=96)
    args = parser.parse_args(argv)
    junk = torch.empty(args.flush_mb << 18)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians in us per step")
    for count in (int(c) for c in args.counts.split(",")):
        for flush in (False, True):
            for new in (False, True):
                runs = {"C": _make("1", count), "Python": _make("0", count)}
                assert [opt._runner.fast.compiled is not None for _, opt in runs.values()] == [True, False]
                times = {kind: [] for kind in runs}
                for r in range(-1, args.rounds):
                    for kind in ("C", "Python") if r % 2 else ("Python", "C"):
                        params, opt = runs[kind]
                        # set before every step: another optimizer's state edit sends a step the full way, which
                        # sets the fast path up again and reads the switch then
                        os.environ["OPTGEN_HOST_READS_IN_C"] = "1" if kind == "C" else "0"
                        if new:
                            for p in params:
                                p.grad = torch.randn(ELEMENTS)
                        if flush:
                            junk.fill_(float(r))
                        start = time.perf_counter()
                        opt.step()
                        if r >= 0:
                            times[kind].append(time.perf_counter() - start)
                os.environ.pop("OPTGEN_HOST_READS_IN_C")
                assert [opt._runner.fast.compiled is not None for _, opt in runs.values()] == [True, False]
                c, py = (statistics.median(times[k]) * 1e6 for k in ("C", "Python"))
                print(f"{count:5d} tensors  {'flushed' if flush else 'no flush':8s}  {'new' if new else 'kept':4s} grads  "
                      f"C reads {c:8.1f}   Python reads {py:8.1f}   Python / C {py / c:4.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
