"""``optgen bench``: a smoke test (no timing is asserted) and the parameter-set recipes."""

import json

import pytest
import torch

from optgen import bench
from optgen.cli import main


def test_bench_smoke_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(
        [
            "bench",
            "--model",
            "synthetic:200000",
            "--optimizers",
            "adamw,lamb",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--sample-ms",
            "0",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert {"device", "versions", "results"} <= set(report)
    assert report["device"]["type"] == "cpu"
    assert report["versions"]["torch"] == torch.__version__
    impls = {(r["optimizer"], r["impl"]) for r in report["results"]}
    assert {("adamw", "optgen"), ("adamw", "torch fused"), ("lamb", "optgen")} <= impls
    for row in report["results"]:
        assert {"optimizer", "impl", "step_ms"} <= set(row)
        assert row["step_ms"] > 0 and row["params"] == 200000
    # on CPU the GPU-only peers are listed as skipped, with the reason
    assert any(s["impl"] == "bitsandbytes LAMB" and s["reason"] for s in report["skipped"])
    assert out_png.stat().st_size > 0 and out_png.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "adamw on synthetic:200000" in table and "skipped:" in table


def test_bench_recipes_shapes():
    counts = {name: (bench.numel(bench.model_shapes(name)), len(bench.model_shapes(name))) for name in bench.RECIPES}
    assert counts["bert-base-like"] == (49_213_440, 100)
    assert abs(counts["bert-large"][0] - 335_141_888) < 1e6
    assert abs(counts["gpt2-small"][0] - 124_439_808) < 1e3
    assert abs(counts["resnet50"][0] - 25_557_032) < 1e3 and counts["resnet50"][1] == 161
    assert abs(counts["vit-b32"][0] - 88_224_232) < 1e3
    for n in (1, 7, 99, 100, 1000, 200_000, 4_000_000):
        shapes = bench.model_shapes(f"synthetic:{n}")
        assert bench.numel(shapes) == n and len(shapes) <= 100
    with pytest.raises(SystemExit):
        bench.model_shapes("no-such-model")


def test_bench_takes_any_catalog_entry_or_built_class():
    import optgen

    assert bench.resolve_optimizer("lion") == ("lion", optgen.Lion, True)
    assert bench.resolve_optimizer(optgen.LAMB) == ("lamb", optgen.LAMB, True)  # its peers and settings
    custom = optgen.build(optgen.layer_adaptive(optgen.BUILTINS["lion"], name="MyLion"))
    assert bench.resolve_optimizer(custom) == ("MyLion", custom, False)
    sgd_named = optgen.build(optgen.BUILTINS["lion"]())
    sgd_named._spec.name = "sgd"  # a user's spec named like a built-in: no peers, no built-in settings
    impls = bench.implementations("sgd", sgd_named, "cpu", builtin=False)
    assert [i.impl for i in impls] == ["optgen", "optgen eager"]
    assert bench.bytes_per_param(custom, torch.float32) == 32  # the plan's bytes, not a table's
    assert bench.bytes_per_param(optgen.LAMB, torch.bfloat16) == 40 - 4 * 2  # param and grad read/written as bf16
    report = bench.run([custom], models=["synthetic:1000"], rounds=1, warmup=1, log=lambda line: None, sample_ms=0)
    assert {r["impl"] for r in report["results"]} == {"optgen", "optgen eager"}
    assert all(r["optimizer"] == "MyLion" for r in report["results"])
    with pytest.raises(SystemExit, match="unknown optimizer"):  # before anything is measured
        bench.run(["lamb", "no-such"], models=["synthetic:1000"], log=lambda line: None)


def test_a_built_class_in_a_users_file(tmp_path):
    from optgen.cli import resolve_spec

    (tmp_path / "mine.py").write_text(
        "import optgen\nspec = optgen.Spec('Mine')\nlr = spec.hyper(lr=0.1)\n"
        "spec.update(spec.param, spec.param - lr * spec.grad)\nMine = optgen.build(spec)\n"
    )
    assert resolve_spec(f"{tmp_path / 'mine.py'}:Mine").name == "Mine"
    name, cls, builtin = bench.resolve_optimizer(f"{tmp_path / 'mine.py'}:Mine")
    assert (name, builtin) == ("Mine", False) and bench.bytes_per_param(cls, torch.float32) == 12


def test_merge_joins_reports_of_one_machine(tmp_path, capsys):
    paths = []
    for model, optimizer in (("synthetic:20000", "adamw"), ("synthetic:40000", "lamb")):
        path = tmp_path / f"{model.replace(':', '-')}.json"
        argv = ["bench", "--model", model, "--optimizers", optimizer, "--rounds", "1", "--warmup", "0", "--sample-ms", "0"]
        assert main([*argv, "--json", str(path)]) == 0
        paths.append(path)
    reports = [json.loads(p.read_text()) for p in paths]
    out_json, out_png = tmp_path / "merged.json", tmp_path / "merged.png"
    assert main(["bench", "--merge", *map(str, paths), "--json", str(out_json), "--plot", str(out_png)]) == 0
    merged = json.loads(out_json.read_text())
    assert [r["model"] for r in merged["results"]] == [r["model"] for rep in reports for r in rep["results"]]
    assert merged["config"]["models"] == ["synthetic:20000", "synthetic:40000"]
    assert merged["config"]["optimizers"] == ["adamw", "lamb"]
    best = max(rep["device"]["copy_gbps"] for rep in reports)
    assert merged["device"]["copy_gbps"] == best
    for row in merged["results"]:
        assert row["copy_pct"] == pytest.approx(row["gbps"] / best * 100)
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "lamb on synthetic:40000" in capsys.readouterr().out
    # runs that would not compare are refused, naming why
    other = dict(reports[1], versions={**reports[1]["versions"], "torch": "0.0"})
    with pytest.raises(ValueError, match="versions"):
        bench.merge([reports[0], other])
    other = dict(reports[1], device={**reports[1]["device"], "name": "NVIDIA H100"})
    with pytest.raises(ValueError, match="NVIDIA H100"):
        bench.merge([reports[0], other])
    with pytest.raises(SystemExit, match="merge"):
        main(["bench", "--merge", str(tmp_path / "missing.json")])


def test_gpu_suite_script_dry_run_on_cpu(tmp_path):
    """bench/gpu_suite.sh is what a lent GPU session runs: its stages must work before a GPU is there."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OPTGEN_SUITE_DEVICE="cpu", OPTGEN_SUITE_SMALL="synthetic:20000",
               OPTGEN_SUITE_ARGS="--rounds 1 --warmup 0 --sample-ms 0")  # fmt: skip
    done = subprocess.run(["bash", str(root / "bench" / "gpu_suite.sh"), "bench-small", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=root)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "bench-small.json").read_text())
    assert {r["optimizer"] for r in report["results"]} == {"adamw", "lamb", "lars", "nvlamb"}
    assert (tmp_path / "bench-small.png").exists() and (tmp_path / "bench-small.log").stat().st_size > 0
    bad = subprocess.run(["bash", str(root / "bench" / "gpu_suite.sh"), "nonsense", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr


@pytest.mark.parametrize("model", ["synthetic:0", "synthetic:-5", "synthetic:abc", "nonsense"])
def test_bad_models_fail_before_anything_is_measured(model, capsys):
    with pytest.raises(SystemExit, match="optgen bench: (bad|unknown) model"):
        main(["bench", "--model", f"synthetic:1000,{model}", "--optimizers", "adamw"])
    assert "first step" not in capsys.readouterr().out  # nothing ran


def test_a_users_spec_file_imports_its_neighbours(tmp_path, capsys):
    """As `python file.py` does, the file's folder is searched first (the CLI raised ModuleNotFoundError);
    and sys.path is left as it was."""
    import sys

    (tmp_path / "optgen_test_neighbour.py").write_text(
        "def body(spec):\n    lr = spec.hyper(lr=0.1)\n    spec.update(spec.param, spec.param - lr * spec.grad)\n"
    )
    (tmp_path / "with_neighbour.py").write_text(
        "import optgen\nfrom optgen_test_neighbour import body\nspec = optgen.Spec('Neighbour')\nbody(spec)\n"
    )
    before = list(sys.path)
    assert main(["show", f"{tmp_path / 'with_neighbour.py'}:spec", "--plan"]) == 0
    assert "Neighbour (no flags): 1 pass(es)" in capsys.readouterr().out
    assert sys.path == before
