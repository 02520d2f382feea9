"""Helpers of bench/gpu_suite.sh (run with the GPU machine's own python3: torch 2.11, Triton 3.6).

    python3 bench/gpu_checks.py env [DEVICE]     versions, the device, a measured device-to-device copy bandwidth
    python3 bench/gpu_checks.py step [DEVICE]    one LAMB and one NVLAMB step (two each) on a small model, the
                                                 workload compute-sanitizer's racecheck and memcheck run

DEVICE: cuda (default) or cpu (the suite's dry run). The correctness checks are tests/test_cuda.py and the
timings ``optgen bench``; this file holds only what neither is.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

import optgen
from optgen import bench


def env(device: str) -> int:
    import triton

    versions = bench.versions()
    for module in ("sympy", "jinja2", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001 - missing: say so
            versions[module] = f"missing ({type(exc).__name__})"
    versions["triton"] = triton.__version__
    print("python", platform.python_version(), sys.executable)
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("optgen from", os.path.dirname(optgen.__file__))
    if device == "cuda":
        if not torch.cuda.is_available():
            print("torch.cuda.is_available() is False")
            return 1
        p = torch.cuda.get_device_properties(0)
        print(f"{torch.cuda.get_device_name()}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
              f"capability {torch.cuda.get_device_capability()}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)")  # fmt: skip
    # the denominator of bench's %copy: dst.copy_(src), bytes read + written, median of 7, at 1 and 4 GiB on CUDA
    for mib in (1024, 4096) if device == "cuda" else (256,):
        t0 = time.perf_counter()
        gbps = bench.copy_bandwidth(device, mib)
        print(f"copy bandwidth {device} {mib} MiB: {gbps:.1f} GB/s ({time.perf_counter() - t0:.1f} s)")
    return 0


def step(device: str) -> int:
    """Two steps each of LAMB and NVLAMB (the Triton kernels on CUDA) on a small model with odd sizes, at the
    default launch configuration and at a small chunk (4096: the model's matrices span several chunks, so the
    per-chunk partials and their reduction run)."""
    shapes = [shape for _, shape in bench.model_shapes("tiny-transformer")] + [(), (7,), (4099,), (33, 129)]
    for chunk, block in ((None, None), (4096, 512)):
        if chunk:
            os.environ["OPTGEN_CHUNK"], os.environ["OPTGEN_BLOCK"] = str(chunk), str(block)
        for cls in (optgen.LAMB, optgen.NVLAMB):
            gen = torch.Generator(device=device).manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in shapes]
            opt = cls(params, lr=1e-2)
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn(p.shape, device=device, generator=gen)
                opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            finite = all(bool(torch.isfinite(p).all()) for p in params)
            paths = sorted({b.name for b in opt._backends.values()})
            print(f"{cls.__name__}: 2 steps on {len(shapes)} tensors, chunk {chunk or 'default'}, backend {','.join(paths)}, finite {finite}", flush=True)
            if not finite:
                return 1
    return 0


def main(argv) -> int:
    if len(argv) < 2 or argv[1] not in ("env", "step"):
        print(__doc__, file=sys.stderr)
        return 2
    device = argv[2] if len(argv) > 2 else "cuda"
    return {"env": env, "step": step}[argv[1]](device)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
