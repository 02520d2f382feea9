"""The ``optgen`` command line: list, show, generate, inspect, bench, demo."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from pathlib import Path

from . import settings
from .catalog import default_plan, resolve_spec, summary, variants
from .codegen.render import TARGETS, generated_dir, golden_path, render
from .spec import SpecError
from .specs import BUILTINS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_flags(pairs) -> dict:
    flags = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        if value.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"optgen: --flag {pair}: expected NAME=true|false")
        flags[key] = value.lower() in ("true", "1")
    return flags


def cmd_list(args) -> int:
    specs = {key: factory() for key, factory in BUILTINS.items()}
    key_width = max(map(len, specs))
    name_width = max(len(spec.name) for spec in specs.values())
    indent = " " * (key_width + name_width + 2)
    # The whole summary, wrapped under its column at word boundaries (never a line cut mid-sentence); at least
    # 40 columns of text however narrow the terminal. Dotted names and keyword=value stay whole.
    width = max(shutil.get_terminal_size().columns, len(indent) + 40)
    for key, spec in specs.items():
        head = f"{key:{key_width}s} {spec.name:{name_width}s} "
        text = summary(spec.doc)
        lines = textwrap.wrap(
            text, width, initial_indent=head, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
        )
        print("\n".join(lines) if lines else head.rstrip())
    return 0


def cmd_show(args) -> int:
    spec = resolve_spec(args.name)
    p = default_plan(spec, _parse_flags(args.flag))
    if args.plan:
        print(p.describe())
        return 0
    sys.stdout.write(render(p, args.target))
    return 0


def golden_sources() -> dict[Path, str]:
    """Every generated file of the built-ins: path -> expected content."""
    out = {}
    for factory in BUILTINS.values():
        spec = factory()
        for flags in variants(spec):
            p = default_plan(spec, flags)
            for target in TARGETS:
                out[golden_path(p, target)] = render(p, target)
    return out


def cmd_generate(args) -> int:
    expected = golden_sources()
    present = {p for name, target in TARGETS.items() for p in (generated_dir() / name).glob(f"*{target.suffix}")}
    stale = [p for p, text in expected.items() if not p.is_file() or p.read_text() != text]
    extra = sorted(present - set(expected))
    if args.check:
        for p in stale:
            print(f"stale: {p}")
        for p in extra:
            print(f"unexpected: {p}")
        if stale or extra:
            print("generated/ is out of date: run `optgen generate`", file=sys.stderr)
            return 1
        print(f"generated/ is up to date ({len(expected)} files)")
        return 0
    for p in extra:
        p.unlink()
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(expected[p])
    print(f"wrote {len(stale)} file(s), removed {len(extra)}, {len(expected)} in generated/")
    return 0


def cmd_inspect(args) -> int:
    """Compile the plan's Triton kernels for ``--arch`` with Triton's real compiler (no GPU needed) and report
    the plan's figures and, per kernel, registers, spills, shared memory and the global loads/stores."""
    import os
    import subprocess

    from .inspect_kernels import arch_number, inspect_plan, interpreter_active

    try:
        arch = f"sm_{arch_number(args.arch)}"
    except ValueError as exc:
        print(f"optgen: {exc}", file=sys.stderr)
        return 2
    if interpreter_active():
        # TRITON_INTERPRET=1 replaced triton.language's standard library at import: compile in a clean process.
        if settings.flag("OPTGEN_INSPECT_CHILD"):
            print("optgen: inspect needs TRITON_INTERPRET unset", file=sys.stderr)
            return 2
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["OPTGEN_INSPECT_CHILD"] = "1"
        argv = [sys.executable, "-m", "optgen.cli", "inspect", args.name, "--arch", arch]
        argv += ["--json"] if args.json else []
        for pair in args.flag or []:
            argv += ["--flag", pair]
        return subprocess.run(argv, env=env).returncode
    spec = resolve_spec(args.name)
    p = default_plan(spec, _parse_flags(args.flag))
    report = inspect_plan(p, arch, getattr(args, "dtype", "fp32"))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    flags = ", ".join(f"{k}={v}" for k, v in report["flags"].items()) or "no flags"
    print(
        f"{spec.name} ({flags}) on {arch}, {report['dtype']} parameters: {report['bytes_per_param']} B/param/step, "
        f"{report['launches_per_step']} launch(es)/step, state {report['state_bytes_per_param']} B/param"
    )
    for k in report["kernels"]:
        when = "" if k["launched_per_step"] else " (sharded runs only)"
        print(
            f"  {k['name']} [{k['role']} {k['pass_index']}{when}]: regs {k['registers']}, spills {k['spills']} B, "
            f"shared {k['shared_bytes']} B, warps {k['num_warps']}, vectorized {k['vectorized']}, "
            f"int64 offsets {k['int64_addressing']}"
        )
        print(f"    loads {k['global_loads']}")
        print(f"    stores {k['global_stores']}")
        for note in k.get("notes", []):
            print(f"    note: {note}")
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def cmd_demo(args) -> int:
    from .demo import run

    run(args.out, steps=args.steps, backend=args.backend, state_format=args.state_format, seeds=args.seeds)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="optgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the built-in optimizers").set_defaults(fn=cmd_list)

    show = sub.add_parser("show", help="print the generated source (or --plan) of an optimizer")
    show.add_argument("name", help="built-in name or path/file.py:SPEC")
    show.add_argument("--target", choices=list(TARGETS), default="torch")
    show.add_argument("--plan", action="store_true", help="print the pass plan instead of the source")
    show.add_argument("--flag", action="append", metavar="NAME=BOOL", help="select a variant")
    show.set_defaults(fn=cmd_show)

    gen = sub.add_parser("generate", help="rewrite generated/ (or --check that it is current)")
    gen.add_argument("--check", action="store_true")
    gen.set_defaults(fn=cmd_generate)

    insp = sub.add_parser("inspect", help="compile the Triton kernels for a GPU arch (no GPU needed) and report")
    insp.add_argument("name")
    insp.add_argument("--arch", default="sm_90", help="sm_80 or sm_90")
    insp.add_argument("--json", action="store_true")
    insp.add_argument("--flag", action="append", metavar="NAME=BOOL")
    insp.set_defaults(fn=cmd_inspect)

    bench = sub.add_parser("bench", help="step time of optgen against torch.optim and other optimizers, interleaved")
    bench.add_argument(
        "--optimizers",
        default="adamw,lamb",
        help="comma list of built-ins (adamw, adam, sgd, lamb, lars, nvlamb have peers; also lion, novograd, ...) or path/file.py:SPEC",
    )
    bench.add_argument(
        "--model",
        default=None,
        help="comma list of parameter sets: many-small, tiny-transformer, bert-base-like, bert-base, bert-large, "
        "vit-b32, resnet50, gpt2-small, synthetic:N (default synthetic:4000000 on CPU)",
    )
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    bench.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 parameters and gradients")
    bench.add_argument("--rounds", type=int, default=5, help="timed samples per implementation (interleaved)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    bench.add_argument(
        "--sample-ms",
        type=float,
        default=None,
        help="steps per timed sample: enough for this long (default 20 on CPU, 5 on GPU)",
    )
    bench.add_argument(
        "--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default: torch's"
    )
    bench.add_argument(
        "--impls",
        default=None,
        help="comma list of implementation names to measure alone, as the table names them "
        "('optgen,torch fused', 'optgen autotuned', 'torch.compile(generated)'); default: all",
    )
    bench.add_argument("--skip-impls", default=None, help="comma list of implementation names to leave out")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="write a PNG: effective GB/s against model size")
    bench.add_argument(
        "--merge",
        nargs="+",
        metavar="REPORT.json",
        help="measure nothing: join earlier --json reports of one machine "
        "(a run split into several calls) into one table, --json and --plot",
    )
    bench.set_defaults(fn=cmd_bench)

    demo = sub.add_parser("demo", help="build LAMB from its spec, inspect it, train on real data with four optimizers")
    demo.add_argument("--out", default="optgen-demo", help="directory for the loss-curve PNG")
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    demo.add_argument("--state-format", choices=("fp32", "bf16", "8bit"), default=None, help="the optimizers' state (default fp32)")
    demo.add_argument(
        "--seeds", type=_positive_int, default=1, help="repeat over this many data splits and model inits (seeds 0, 1, ...): mean and lowest accuracy"
    )
    demo.set_defaults(fn=cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as exc:
        print(f"optgen: spec error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
