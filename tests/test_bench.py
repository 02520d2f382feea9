"""``optgen bench``: a smoke test (no timing is asserted) and the parameter-set recipes."""

import json
import os
from pathlib import Path

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
    from optgen.catalog import resolve_spec

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
    """bench/gpu_suite.sh is what a lent GPU session runs, in one call: every stage must work before a GPU is
    there (the CUDA steps are skipped, bench measures tiny sets), within the device's limit of 8 files back."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OPTGEN_SUITE_DEVICE="cpu", OPTGEN_SUITE_MODELS="synthetic:20000",
               OPTGEN_SUITE_ARGS="--rounds 1 --warmup 0 --sample-ms 0")  # fmt: skip
    done = subprocess.run(["bash", str(root / "bench" / "gpu_suite.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    assert files == {"suite.txt", "env.txt", "tests.log", "sanitizer.log", "bench.log", "bench.json", "bench.png"}
    suite = (out / "suite.txt").read_text()
    for line in ("env ", "tests-collect ", "sanitize-plain ", "bench-synthetic-20000 ", "bench-factored ", "bench-merge "):
        assert any(row.startswith(line) and " ok " in row for row in suite.splitlines()), (line, suite)
    for step in ("tests", "sanitize", "bench-autotuned", "bench-compiled"):
        assert any(row.startswith(f"{step} ") and "skipped: no CUDA" in row for row in suite.splitlines()), (step, suite)
    assert "total " in suite.splitlines()[-1]
    assert "copy bandwidth cpu" in (out / "env.txt").read_text()
    assert "test_every_variant_equals_the_torch_oracle" in (out / "tests.log").read_text()
    assert "LAMB: 2 steps" in (out / "sanitizer.log").read_text()
    report = json.loads((out / "bench.json").read_text())
    assert {r["optimizer"] for r in report["results"]} == {"adamw", "lamb", "lars", "nvlamb", "adafactor", "came"}
    assert report["config"]["models"] == ["synthetic:20000", "tiny-transformer"]
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    # OPTGEN_SUITE_STAGES: a rerun of some stages only
    again = subprocess.run(["bash", str(root / "bench" / "gpu_suite.sh"), str(tmp_path / "env-only")], capture_output=True,
                           text=True, timeout=300, env=dict(env, OPTGEN_SUITE_STAGES="env"))  # fmt: skip
    assert again.returncode == 0 and {p.name for p in (tmp_path / "env-only").iterdir()} == {"suite.txt", "env.txt"}


def test_impls_select_rows_and_merge_relates_runs():
    """--impls/--skip-impls: the rows a run measures (a GPU session times its slow-to-start rows in runs of their
    own); merge relates rows of one optimizer and set across runs; bad names fail before anything runs."""
    quiet = dict(models=["synthetic:2000"], rounds=1, warmup=0, log=lambda line: None, sample_ms=0)
    main_run = bench.run(["adamw"], skip=["torch fused", "Torch For-Loop"], **quiet)
    assert [r["impl"] for r in main_run["results"]] == ["optgen", "optgen eager", "torch foreach"]
    assert not main_run["skipped"] and main_run["config"]["skip_impls"] == ["torch fused", "Torch For-Loop"]
    alone = bench.run(["adamw"], only=["torch fused"], **quiet)
    assert [r["impl"] for r in alone["results"]] == ["torch fused"] and alone["results"][0]["vs"] == {}
    merged = bench.merge([main_run, alone])
    fused = next(r for r in merged["results"] if r["impl"] == "torch fused")
    assert set(fused["vs"]) == {"optgen", "optgen eager", "torch foreach"}
    optgen_row = next(r for r in merged["results"] if r["impl"] == "optgen")
    assert optgen_row["vs"]["torch fused"] == pytest.approx(fused["step_ms"] / optgen_row["step_ms"])
    assert all(r["launch_config"] is None for r in merged["results"])  # no Triton on CPU
    # a GPU-only row's name is known on CPU too, and selects nothing there
    assert bench.run(["lamb"], only=["optgen autotuned"], **quiet)["results"] == []
    with pytest.raises(SystemExit, match="unknown implementation.*'torch fusd'"):
        bench.run(["adamw"], only=["torch fusd"], **quiet)
    with pytest.raises(SystemExit, match="unknown implementation"):
        main(["bench", "--model", "synthetic:2000", "--optimizers", "adamw", "--skip-impls", "optgen,nope"])


def test_triton_rows_report_their_launch_config():
    """The 'optgen autotuned' row's launch_config is the config its tuning chose (here: the Triton backend in the
    interpreter, conftest's chunk and block)."""
    import optgen

    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(7, 5))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = optgen.LAMB(params, backend="triton")
    opt.step()
    assert bench._launch_config(opt) == {"chunk": 256, "block": 64, "reduce_block": 256, "num_warps": 4, "num_stages": 3}
    eager = optgen.LAMB(params, backend="torch")
    eager.step()
    assert bench._launch_config(eager) is None


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


def test_small_parameter_sets():
    """Where per-tensor and per-launch costs show: 200 tensors of 1000 elements, and a d=64 transformer."""
    many = bench.model_shapes("many-small")
    assert len(many) == 200 and {shape for _, shape in many} == {(1000,)}
    assert len({name for name, _ in many}) == 200
    tiny = dict(bench.model_shapes("tiny-transformer"))
    assert len(tiny) == 36  # 4 embedding tensors + 2 layers x 16
    for i in range(2):
        layer = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            assert tiny[f"{layer}.attention.self.{proj}.weight"] == (64, 64)
            assert tiny[f"{layer}.attention.self.{proj}.bias"] == (64,)
        assert tiny[f"{layer}.attention.output.dense.weight"] == (64, 64)
        assert tiny[f"{layer}.intermediate.dense.weight"] == (256, 64)
        assert tiny[f"{layer}.intermediate.dense.bias"] == (256,)
        assert tiny[f"{layer}.output.dense.weight"] == (64, 256)
        assert tiny[f"{layer}.output.dense.bias"] == (64,)
    norms = {name: shape for name, shape in tiny.items() if "LayerNorm" in name}
    assert len(norms) == 10 and set(norms.values()) == {(64,)}  # embeddings' and two per layer, weight and bias
    assert all(shape[-1] == 64 for name, shape in tiny.items() if "embeddings" in name)


def _import_without_timm(real_import):
    def fake(module):
        if module.split(".")[0] == "timm":
            raise ModuleNotFoundError("No module named 'timm'")
        return real_import(module)

    return fake


def test_timm_peers_skipped_with_the_reason_when_not_importable(monkeypatch):
    import optgen

    monkeypatch.setattr(bench, "_import", _import_without_timm(bench._import))
    for optimizer, cls, impl in (("lamb", optgen.LAMB, "timm Lamb"), ("lars", optgen.LARS, "timm Lars")):
        row = next(i for i in bench.implementations(optimizer, cls, "cpu") if i.impl == impl)
        assert row.make is None and "timm.optim not importable" in row.skip and "No module named 'timm'" in row.skip
    report = bench.run(["lars"], models=["synthetic:1000"], rounds=1, warmup=0, log=lambda line: None, sample_ms=0)
    assert "timm Lars" not in {r["impl"] for r in report["results"]}
    assert any(s["impl"] == "timm Lars" and "not importable" in s["reason"] for s in report["skipped"])


def test_timm_peers_are_rows_when_importable(monkeypatch):
    """A stand-in for timm.optim records what the bench builds its Lamb and Lars with: the bench's settings,
    timm's global gradient clip off (the other LAMB rows have none), once with timm's default path and once with its
    foreach path (timm's default on CPU is the slower per-tensor loop)."""
    import types

    built = {"Lamb": [], "Lars": []}

    def stand_in(name):
        class Recorded(torch.optim.SGD):
            def __init__(self, params, **kwargs):
                built[name].append(kwargs)
                super().__init__(params, lr=kwargs["lr"])

        return Recorded

    fake_timm_optim = types.SimpleNamespace(Lamb=stand_in("Lamb"), Lars=stand_in("Lars"))
    real_import = bench._import
    monkeypatch.setattr(bench, "_import", lambda module: fake_timm_optim if module == "timm.optim" else real_import(module))
    report = bench.run(["lamb", "lars"], models=["synthetic:1000"], rounds=1, warmup=0, log=lambda line: None, sample_ms=0)
    rows = {(r["optimizer"], r["impl"]) for r in report["results"]}
    assert {("lamb", "timm Lamb"), ("lamb", "timm Lamb foreach"), ("lars", "timm Lars"), ("lars", "timm Lars foreach")} <= rows
    assert not any(s["impl"].startswith("timm") for s in report["skipped"])
    lamb = {**bench.HYPERS["lamb"], "max_grad_norm": None}
    assert built["Lamb"] == [lamb, {**lamb, "foreach": True}]
    assert built["Lars"] == [bench.HYPERS["lars"], {**bench.HYPERS["lars"], "foreach": True}]


def test_timm_peers_run_when_timm_is_installed():
    """timm's package imports torchvision (which does not install beside every torch); its optimizers need only
    torch, and the bench loads them without it."""
    import importlib.util

    import optgen

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")

    params = [torch.nn.Parameter(torch.ones(4, 4))]
    params[0].grad = torch.ones(4, 4)
    for optimizer, cls, impl in (("lamb", optgen.LAMB, "timm Lamb"), ("lars", optgen.LARS, "timm Lars")):
        for row in (i for i in bench.implementations(optimizer, cls, "cpu") if i.impl.startswith(impl)):
            opt = row.make(params)
            assert type(opt).__name__ == impl.split()[1]
            opt.step()


def _fake_loads(monkeypatch, start: float, end: float):
    loads = iter([(start, start, start), (end, end, end)])
    monkeypatch.setattr(bench, "load_average", lambda: next(loads))


def test_trust_warnings_for_a_busy_machine_and_copy_above_100(monkeypatch, tmp_path, capsys):
    cores = bench.os.cpu_count()
    _fake_loads(monkeypatch, start=cores, end=0.0)  # busy at the start only
    monkeypatch.setattr(bench, "steal_jiffies", lambda: 0)  # no steal: this VM's own would warn in the quiet run
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 1e-6)  # every row far above the copy
    out_json = tmp_path / "busy.json"
    argv = ["bench", "--model", "synthetic:1000", "--optimizers", "sgd", "--rounds", "1", "--warmup", "0", "--sample-ms", "0"]
    assert main([*argv, "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    load_warnings = [w for w in report["warnings"] if "load average" in w]
    assert len(load_warnings) == 1 and "at the start of the run" in load_warnings[0] and f"{cores:.2f}" in load_warnings[0]
    copy_warnings = [w for w in report["warnings"] if "copy bandwidth" in w]
    assert len(copy_warnings) == 1 and copy_warnings[0].startswith(f"{len(report['results'])} row(s) above 100%")
    table = capsys.readouterr().out
    assert "WARNING" in table and all(w in table for w in report["warnings"])

    # a quiet machine and a copy no row reaches: no warning, none printed
    _fake_loads(monkeypatch, start=0.0, end=0.0)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 1e6)
    quiet_json = tmp_path / "quiet.json"
    assert main([*argv, "--json", str(quiet_json)]) == 0
    assert json.loads(quiet_json.read_text())["warnings"] == []
    assert "WARNING" not in capsys.readouterr().out

    # merged: each run's load warning, named by run; the copy warning for the merged denominator
    merged = bench.merge([report, json.loads(quiet_json.read_text())])
    assert [w for w in merged["warnings"] if "load average" in w] == [load_warnings[0].replace("of the run", "of run 1")]
    assert not any("copy bandwidth" in w for w in merged["warnings"])  # the quiet run's copy is the denominator


def test_the_runs_own_threads_are_not_other_work():
    """At its end a run's own threads are in the 1-minute load average; only the rest counts against trust."""
    threads = 2
    own_after_10_min = bench.own_load(threads, 600)
    assert own_after_10_min == pytest.approx(threads, rel=1e-3) and bench.own_load(threads, 0) == 0
    own_only = [(None, [threads, 0, 0], own_after_10_min)]
    assert bench.trust_warnings(bench._load_warning_inputs(own_only), threads, []) == []
    with_other_work = [(None, [threads + 1.5, 0, 0], own_after_10_min)]
    (warning,) = bench.trust_warnings(bench._load_warning_inputs(with_other_work), threads, [])
    assert "at the end of the run" in warning and "1.50" in warning


def test_rows_whose_samples_lost_cpu_to_other_guests_are_flagged(monkeypatch):
    """Steal time (the hypervisor running other guests on the VM's cores) is invisible to the load average: the
    rows whose samples it fell in carry it in ``steal_pct`` and one warning names the worst; rows without any
    have 0, and without /proc/stat every row has None and nothing is flagged."""
    ticks = {"now": 0}
    real_step = torch.optim.SGD.step

    def stealing_step(self, *args, **kwargs):  # torch's SGD rows lose 1 s of ticks a step; optgen's none
        ticks["now"] += 100 * (bench.os.cpu_count() or 1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", stealing_step)
    monkeypatch.setattr(bench, "steal_jiffies", lambda: ticks["now"])
    report = bench.run(["sgd"], models=["synthetic:1000"], rounds=2, warmup=0, log=lambda line: None, sample_ms=0)
    rows = {r["impl"]: r for r in report["results"]}
    assert rows["optgen"]["steal_pct"] == 0 and rows["torch fused"]["steal_pct"] > 100
    (warning,) = [w for w in report["warnings"] if "steal time" in w]
    assert warning.startswith("3 row(s) lost more than 5% of the CPU time") and "sgd torch" in warning
    merged = bench.merge([report])
    assert [w for w in merged["warnings"] if "steal time" in w] == [warning]

    monkeypatch.setattr(bench, "steal_jiffies", lambda: None)  # not Linux
    report = bench.run(["sgd"], models=["synthetic:1000"], rounds=1, warmup=0, log=lambda line: None, sample_ms=0)
    assert all(r["steal_pct"] is None for r in report["results"])
    assert not any("steal time" in w for w in report["warnings"])


def test_steal_ticks_are_read_from_proc_stat():
    if not bench.os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    first = bench.steal_jiffies()
    assert isinstance(first, int) and first >= 0 and bench.steal_jiffies() >= first


@pytest.mark.parametrize("script", ["host_time", "host_reads_ab"])
def test_host_time_scripts_run(script, capsys, monkeypatch):
    """The host-time scripts of bench/ (their figures are in the README) run, on a few tensors and rounds."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("OPTGEN_HOST_READS_IN_C", raising=False)
    module.main(["--counts", "3", "--rounds", "4", "--flush-mb", "1"])
    out = capsys.readouterr().out
    assert "3 tensors" in out and "Python" in out
    assert "OPTGEN_HOST_READS_IN_C" not in os.environ  # the scripts leave the switch as they found it
