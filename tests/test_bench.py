"""The latency harness (`tta_surgical.bench`, `tta-surgical bench`): tiny CPU grids, contracts, failures, autograd,
the method labels, and the benchmark scripts as thin wrappers."""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tta_surgical import bench
from tta_surgical.bench import (
    BenchSpec,
    attach_ratios,
    autograd_report,
    labels,
    measure,
    parse_method,
    quick_spec,
    run_bench,
)
from tta_surgical.data.context import DataContext
from tta_surgical.metrics import json_safe

REPO = Path(__file__).resolve().parents[1]

CELL_KEYS = {
    "model",
    "method",
    "batch_size",
    "device",
    "precision",
    "channels_last",
    "compile",
    "latency_ms",
    "images_per_s",
    "peak_memory_mb",
    "peak_memory_kind",
    "ratio_to_inference",
    "ratio_to_reference",
    "error",
}


def tiny(**kw) -> BenchSpec:
    base = {"batch_sizes": (4,), "warmup": 1, "iters": 2, "autograd": False}
    base.update(kw)
    return quick_spec(**base)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    n = torch.get_num_threads()
    try:  # module-scoped: runs before the per-test thread fixture, so restore the count itself
        result = run_bench(quick_spec(batch_sizes=(8,), warmup=1, iters=3), out, threads=1, log=None)
    finally:
        torch.set_num_threads(n)
    return out, result


def test_quick_grid_writes_every_contract_key(quick_run):
    out, result = quick_run
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk == json.loads(json.dumps(json_safe(result)))
    cells = on_disk["cells"]
    assert [c["method"] for c in cells] == ["inference", "tent", "surgical:block1", "reference_tent"]
    for c in cells:
        assert CELL_KEYS <= set(c), CELL_KEYS - set(c)
        assert c["error"] is None, c["error"]
        assert (c["model"], c["batch_size"], c["device"], c["precision"]) == ("resnet20", 8, "cpu", "fp32")
        # The fast path (channels_last by default) is for the package's methods; the baselines stay plain.
        fast = c["method"] in ("tent", "surgical:block1")
        assert c["channels_last"] is fast and c["compile"] is False
        assert c["optim_implementation"] == ("auto" if fast else None)
        lat = c["latency_ms"]
        assert set(lat) == {"p50", "p95", "p99", "mean"}
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        # images/s follows from the timed steps: batch / mean latency
        assert c["images_per_s"] == pytest.approx(8 / (lat["mean"] / 1000), rel=1e-6)
        assert c["peak_memory_mb"] > 0 and c["peak_memory_kind"] == "cpu_process_peak_rss"
        assert c["input_size"] == 32
    meta = on_disk["meta"]
    for key in ("date", "machine", "versions", "threads", "git", "device", "spec", "timing", "memory"):
        assert key in meta
    assert {"platform", "processor", "cpu_count", "device_name"} <= set(meta["machine"])
    assert meta["machine"]["device_name"] == "cpu"
    assert meta["threads"] == 1 and meta["finished"] is True
    assert meta["versions"]["torch"] == torch.__version__
    assert (out / "bench.md").read_text().count("| resnet20 |") == 4


def test_ratios_inference_is_one_and_tent_is_compared_with_the_reference(quick_run):
    cells = {c["method"]: c for c in quick_run[1]["cells"]}
    assert cells["inference"]["ratio_to_inference"] == 1.0
    for name in ("tent", "surgical:block1", "reference_tent"):
        c = cells[name]
        assert c["ratio_to_inference"] == pytest.approx(
            c["latency_ms"]["p50"] / cells["inference"]["latency_ms"]["p50"]
        )
    tent, ref = cells["tent"], cells["reference_tent"]
    assert tent["ratio_to_reference"] == pytest.approx(tent["images_per_s"] / ref["images_per_s"])
    assert ref["ratio_to_reference"] == 1.0
    assert cells["surgical:block1"]["ratio_to_reference"] is None


def test_adapting_cells_carry_the_autograd_report(quick_run):
    cells = {c["method"]: c for c in quick_run[1]["cells"]}
    assert "saved_tensors" not in cells["inference"]
    # Tent adapts the 19 BatchNorm layers of ResNet-20 (scale and shift): ours and the plain loop agree.
    for name in ("tent", "reference_tent"):
        assert cells[name]["grad_params"] == 38 and cells[name]["adapted_tensors"] == 38
    assert cells["surgical:block1"]["grad_blocks"] == {"block1": 18}
    assert cells["surgical:block1"]["saved_mb"] < cells["tent"]["saved_mb"]
    assert cells["tent"]["skipped_updates"] == 0


def test_failing_cells_record_the_error_and_the_grid_goes_on(tmp_path, monkeypatch):
    real = measure.build_runner

    def build(model, ms, dtype, *rest, **kw):
        if ms.label == "tent":
            raise RuntimeError("boom: forced failure")
        return real(model, ms, dtype, *rest, **kw)

    monkeypatch.setattr(measure, "build_runner", build)
    spec = tiny(models=("resnet20", "no_such_model"), methods=("tent", "reference_tent"))
    result = run_bench(spec, tmp_path, threads=1, log=None)
    cells = json.loads((tmp_path / "bench.json").read_text())["cells"]
    assert len(cells) == len(result["cells"]) == 6  # (inference, tent, reference_tent) x 2 models
    by = {(c["model"], c["method"]): c for c in cells}
    tent = by["resnet20", "tent"]
    assert tent["error"] == "RuntimeError: boom: forced failure" and tent["error_stage"] == "build"
    assert tent["latency_ms"] is None and tent["ratio_to_inference"] is None and tent["ratio_to_reference"] is None
    assert by["resnet20", "reference_tent"]["error"] is None  # the cell after the failure ran
    assert by["resnet20", "reference_tent"]["latency_ms"]["p50"] > 0
    for m in ("inference", "tent", "reference_tent"):
        err = by["no_such_model", m]["error"]
        assert "unknown model 'no_such_model'" in err and "resnet20" in err  # it lists the valid names
    assert "boom" in (tmp_path / "bench.md").read_text()


def test_compile_failure_is_recorded_per_cell(tmp_path, monkeypatch):
    def broken_compile(self, *a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    result = run_bench(tiny(methods=("norm",), compile=True), tmp_path, threads=1, log=None)
    plain, cell = result["cells"]
    # The inference baseline is never compiled; the method's cell records the failure and the grid goes on.
    assert plain["method"] == "inference" and plain["compile"] is False and plain["error"] is None
    assert cell["compile"] is True and cell["error_stage"] == "compile" and "no compiler here" in cell["error"]


def test_results_are_written_after_every_cell(tmp_path):
    seen = []

    def cell_fn(*args):
        seen.append(len(json.loads((tmp_path / "bench.json").read_text())["cells"]))
        if len(seen) == 3:
            raise KeyboardInterrupt  # an interrupted bench keeps what it measured
        return bench.run_cell(*args)

    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny(methods=("inference", "norm", "tent")), tmp_path, threads=1, log=None, cell_fn=cell_fn)
    assert seen == [0, 1, 2]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [c["method"] for c in saved["cells"]] == ["inference", "norm"]
    assert saved["meta"]["finished"] is False


def test_inference_is_always_measured_first():
    spec = BenchSpec(methods=("tent", "inference", "tent", "norm"))
    assert spec.grid_methods() == ("inference", "tent", "norm")
    assert spec.n_cells() == len(spec.batch_sizes) * 3


def test_parse_method_and_early_validation():
    s = parse_method("surgical:block1+block2")
    assert s.cfg.name == "surgical" and s.cfg.blocks == ("block1", "block2") and s.cfg.kind == "all" and s.adapts
    a = parse_method("autorgn")
    assert a.cfg.weighting == "auto-rgn" and a.cfg.blocks == ("all",) and a.cfg.kind == "all"
    assert parse_method("tent").cfg.kind == "norm"
    assert not parse_method("norm").adapts and not parse_method("inference").adapts
    assert parse_method("reference_tent").adapts
    with pytest.raises(ValueError, match="valid: inference"):
        parse_method("tnet")
    with pytest.raises(ValueError, match="names no block"):
        parse_method("surgical:")
    with pytest.raises(ValueError, match="unknown bench method"):
        BenchSpec(methods=("tent", "bogus"))
    with pytest.raises(ValueError, match="precision"):
        BenchSpec(precisions=("fp16",))
    with pytest.raises(ValueError, match="iters"):
        BenchSpec(iters=0)


def test_every_registered_method_is_a_label_and_blocks_need_an_adapting_method():
    from tta_surgical.methods import METHODS

    for name in METHODS.names():
        ms = parse_method(name)
        assert ms.kind == "method" and ms.cfg.name == name and ms.adapts == METHODS.get(name).adapts
        assert name in bench.DEFAULT_METHODS and name in labels.valid_labels()
    for name in (n for n in METHODS.names() if not METHODS.get(n).adapts):
        with pytest.raises(ValueError, match="adapts no parameters"):
            parse_method(f"{name}:block1")
    tent_block1 = parse_method("tent:block1")  # every adapting method takes any blocks (kind all for a label)
    assert tent_block1.cfg.blocks == ("block1",) and tent_block1.cfg.kind == "all"
    ordered = labels.baseline_first(["tent", " ", "inference", "tent", "norm"], "inference")
    assert ordered == ("inference", "tent", "norm")
    assert labels.split_args(["tent,norm", "surgical:block1"]) == ("tent", "norm", "surgical:block1")
    assert labels.safe_label("surgical:block1+block2") == "surgical-block1+block2"


def test_a_newly_registered_method_is_a_label_built_by_method_config(monkeypatch):
    # No list of method names in the bench: a method registered tomorrow is a label (with blocks when it adapts),
    # and its settings come from config.method_config, the one constructor.
    from tta_surgical.methods import METHODS

    class Fresh:
        adapts = True

    calls = []

    def fake_config(name, **settings):
        calls.append((name, settings))
        return type("Cfg", (), {"name": name})()

    monkeypatch.setitem(METHODS._items, "fresh", Fresh)
    monkeypatch.setattr(labels, "method_config", fake_config)
    assert parse_method("fresh").kind == "method" and parse_method("fresh:block2+block3").adapts
    assert calls == [("fresh", {}), ("fresh", {"blocks": ("block2", "block3"), "kind": "all"})]
    assert "fresh" in labels.valid_labels()


@pytest.mark.parametrize(
    ("label", "config"),
    [("source", "source"), ("norm", "norm"), ("tent", "tent"), ("surgical:block1", "surgical_block1"),
     ("surgical:all", "surgical_all"), ("autorgn", "surgical_autorgn")],
)  # fmt: skip
def test_a_label_is_the_method_of_its_shipped_config(label, config):
    # The stream timing once read configs/<name>.yaml; it now builds the method from the label: the same settings.
    from tta_surgical.config import load_config

    assert parse_method(label).cfg == load_config(REPO / "configs" / f"{config}.yaml").method


def test_attach_ratios_groups_by_model_batch_device_precision():
    def cell(method, p50, ips, bs=16, prec="fp32", error=None):
        c = measure.new_cell("m", method, bs, torch.device("cpu"), prec, BenchSpec())
        if error:
            c["error"] = error
        else:
            c["latency_ms"] = {"p50": p50, "p95": p50, "p99": p50, "mean": p50}
            c["images_per_s"] = ips
        return c

    cells = [
        cell("inference", 10.0, 1600.0),
        cell("tent", 25.0, 640.0),
        cell("reference_tent", 20.0, 800.0),
        cell("tent", 30.0, 100.0, prec="bf16"),  # no bf16 baseline in this run
        cell("inference", None, None, bs=64, error="OutOfMemoryError: ..."),
        cell("norm", 40.0, 1600.0, bs=64),
    ]
    attach_ratios(cells)
    assert [c["ratio_to_inference"] for c in cells] == [1.0, 2.5, 2.0, None, None, None]
    assert [c["ratio_to_reference"] for c in cells] == [None, 0.8, 1.0, None, None, None]


def test_autograd_report_block1_saves_less_and_grads_only_block1():
    from tta_surgical.models import block_map, create_model

    torch.manual_seed(0)
    model, _ = create_model("resnet20", pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rep = {m: autograd_report(model, m, x) for m in ("surgical:block1", "surgical:all", "tent")}
    for k, v in model.state_dict().items():  # reports run on copies
        assert torch.equal(v, before[k]), k

    b1, full, tent = rep["surgical:block1"], rep["surgical:all"], rep["tent"]
    block1 = block_map(model)["block1"]
    assert b1["grad_blocks"] == {"block1": len(block1)} and b1["grad_params"] == len(block1) == 18
    assert b1["grad_numel"] == sum(dict(model.named_parameters())[n].numel() for n in block1)
    assert full["grad_params"] == len(list(model.parameters())) == 59
    assert tent["grad_params"] == 38
    assert b1["frozen_with_grad"] == full["frozen_with_grad"] == tent["frozen_with_grad"] == 0
    # Autograd records nothing before the first tensor that requires a gradient: adapting block 1 skips the stem.
    assert b1["saved_tensors"] < full["saved_tensors"] and b1["saved_mb"] < full["saved_mb"]
    assert b1["unpacked_tensors"] == b1["saved_tensors"]  # the backward reads everything it saved
    # Weight gradients only where parameters adapt: block 1's backward is cheaper than all blocks'.
    assert 0 < b1["backward_gflops"] < full["backward_gflops"]
    assert b1["forward_gflops"] == full["forward_gflops"] > 0


def test_autograd_report_on_a_built_method_resets_it():
    from tta_surgical.config import method_config
    from tta_surgical.methods import build_method
    from tta_surgical.models import create_model

    torch.manual_seed(0)
    model, _ = create_model("resnet20", pretrained=False)
    method = build_method(model, method_config("surgical", blocks=("block3",), kind="norm"))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rep = autograd_report(model, method, batch_size=2)
    assert rep["grad_blocks"] == {"block3": 12} and rep["autograd_batch_size"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), k


def _bench_parser() -> argparse.ArgumentParser:
    from tta_surgical.commands import bench as cmd

    parser = argparse.ArgumentParser()
    cmd.configure(parser)
    parser.set_defaults(_main=cmd.main)
    return parser


def test_cli_options_map_onto_the_spec():
    from tta_surgical.commands.bench import spec_from_args

    args = _bench_parser().parse_args(
        ["--models", "resnet20,resnet32", "--methods", "tent", "surgical:block1,autorgn", "--batch-sizes", "1,16",
         "64", "--precision", "fp32,bf16", "--channels-last", "--warmup", "3", "--iters", "7", "--device", "cpu"]
    )  # fmt: skip
    spec = spec_from_args(args)
    assert spec.models == ("resnet20", "resnet32")
    assert spec.methods == ("tent", "surgical:block1", "autorgn")
    assert spec.batch_sizes == (1, 16, 64) and spec.precisions == ("fp32", "bf16")
    assert spec.channels_last and not spec.compile and (spec.warmup, spec.iters) == (3, 7)
    quick = spec_from_args(_bench_parser().parse_args(["--quick", "--iters", "1"]))
    assert quick.methods == bench.QUICK_METHODS and quick.batch_sizes == (16,) and quick.device == "cpu"
    assert (quick.warmup, quick.iters) == (2, 1)
    with pytest.raises(ValueError, match="integers"):
        spec_from_args(_bench_parser().parse_args(["--batch-sizes", "big"]))


def test_cli_end_to_end_quick(tmp_path, monkeypatch, capsys):
    from tta_surgical import cli

    monkeypatch.setitem(cli.COMMANDS, "bench", "tta_surgical.commands.bench")
    out = tmp_path / "q"
    rc = cli.main(["bench", "--quick", "--threads", "1", "--warmup", "0", "--iters", "1", "--no-autograd",
                   "--out", str(out)])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    assert [c["method"] for c in data["cells"]] == list(bench.QUICK_METHODS)
    assert all(c["error"] is None and c["batch_size"] == 16 for c in data["cells"])
    assert data["cells"][0]["ratio_to_inference"] == 1.0
    assert not any(isinstance(v, float) and math.isnan(v) for c in data["cells"] for v in c["latency_ms"].values())
    printed = capsys.readouterr().out
    assert "| resnet20 | reference_tent | 16 |" in printed and "4 cells, 0 failed" in printed
    assert (out / "bench.md").is_file()


def test_latency_script_wraps_the_cli(tmp_path):
    script = REPO / "benchmarks" / "latency.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["--quick", "--methods", "inference", "--warmup", "0", "--iters", "1", "--threads", "1"]
    argv += ["--out", str(tmp_path)]
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    cells = json.loads((tmp_path / "bench.json").read_text())["cells"]
    assert [c["method"] for c in cells] == ["inference"]
    assert "1 cells, 0 failed" in done.stdout


def test_benchmark_scripts_are_thin_wrappers():
    # The logic lives in the package or in benchmarks.studies (tests import it from there); a script holds its
    # argparse and nothing else.
    scripts = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name != "__init__.py")
    assert {p.stem for p in scripts} >= {"latency", "stream_timing", "reference_tent", "corruption_speed"}
    for path in scripts:
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        assert all(name in ("main", "build_parser") or name.startswith("add_") for name in defined), (path, defined)
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert any(n.module.startswith(("tta_surgical", "benchmarks.studies")) for n in imports), path.name


def test_interleaved_group_times_methods_round_robin(tmp_path, monkeypatch):
    order = []
    real = measure.build_runner

    def build(model, ms, *rest, **kw):
        runner = real(model, ms, *rest, **kw)
        step = runner.step

        def spy(x):
            order.append(ms.label)
            return step(x)

        runner.step = spy
        return runner

    monkeypatch.setattr(measure, "build_runner", build)
    spec = tiny(methods=("tent", "reference_tent"), warmup=1, iters=3, interleave=True)
    cells = run_bench(spec, tmp_path, threads=1, log=None)["cells"]
    assert [c["method"] for c in cells] == ["inference", "tent", "reference_tent"]
    assert all(c["interleaved"] and c["error"] is None and c["latency_ms"]["p50"] > 0 for c in cells)
    # Warm-up one method after another, then the timed steps in turn.
    assert order[:3] == ["inference", "tent", "reference_tent"]
    assert order[3:] == ["inference", "tent", "reference_tent"] * 3
    assert cells[0]["ratio_to_inference"] == 1.0 and cells[1]["ratio_to_reference"] is not None
    with pytest.raises(ValueError, match="interleave and compile"):
        tiny(interleave=True, compile=True)


def test_interleaved_failure_drops_only_that_cell(tmp_path, monkeypatch):
    real = measure.build_runner

    def build(model, ms, *rest, **kw):
        runner = real(model, ms, *rest, **kw)
        if ms.label == "tent":
            calls = [0]
            step = runner.step

            def flaky(x):
                calls[0] += 1
                if calls[0] > 1:  # the warm-up step passes, the first timed step fails
                    raise RuntimeError("out of memory (simulated)")
                return step(x)

            runner.step = flaky
        return runner

    monkeypatch.setattr(measure, "build_runner", build)
    cells = run_bench(tiny(methods=("tent", "norm"), warmup=1, iters=3, interleave=True), tmp_path, threads=1,
                      log=None)["cells"]  # fmt: skip
    by = {c["method"]: c for c in cells}
    assert by["tent"]["error_stage"] == "measure" and "simulated" in by["tent"]["error"]
    assert by["norm"]["error"] is None and by["inference"]["error"] is None


@pytest.mark.gpu
def test_gpu_bench_cells_interleaved_and_sequential(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for interleave in (False, True):
        spec = quick_spec(device="cuda", batch_sizes=(4,), warmup=2, iters=5, interleave=interleave,
                          precisions=("fp32", "bf16"))  # fmt: skip
        cells = run_bench(spec, tmp_path / str(interleave), log=None)["cells"]
        assert len(cells) == 2 * len(bench.QUICK_METHODS)
        for c in cells:
            assert c["error"] is None, c["error"]
            assert c["device"].startswith("cuda") and c["latency_ms"]["p50"] > 0
            kind = "cuda_resident_plus_step_peak" if interleave else "cuda_max_allocated"
            assert c["peak_memory_kind"] == kind and c["peak_memory_mb"] > 0
        assert all(c["ratio_to_reference"] for c in cells if c["method"] == "tent")


def test_cli_choices_match_the_config_vocabulary():
    # The bench command spells the choices out (importing the config would import torch for --help).
    from tta_surgical.config import COMPILE_MODES, OPTIM_IMPLEMENTATIONS

    choices = {a.dest: tuple(a.choices) for a in _bench_parser()._actions if a.choices}
    assert choices["compile_mode"] == COMPILE_MODES and choices["optim_impl"] == OPTIM_IMPLEMENTATIONS


# ------------------------------------------------------------------------------ the other benchmarks' logic


def test_compare_with_engine_agrees_with_the_plain_loop(data_root):
    from tta_surgical.bench.reference import TOLERANCE_POINTS, compare_with_engine

    res = compare_with_engine(
        REPO / "configs" / "tent.yaml", REPO / "streams" / "cifar10c_reset.yaml", n_examples=20, batch_size=10,
        domains="fog,gaussian_noise", data=DataContext.resolve(str(data_root), data_root / "frost"),
    )  # fmt: skip
    assert res["n_images"] == 40 and set(res["engine_errors"]) == {"fog", "gaussian_noise"}
    assert res["difference_points"] == 0.0 and res["max_abs_per_batch_correct_diff"] == 0
    assert res[f"within_{TOLERANCE_POINTS}_points"] is True
    with pytest.raises(ValueError, match="not a tent config"):
        compare_with_engine(REPO / "configs" / "norm.yaml", REPO / "streams" / "cifar10c_reset.yaml", n_examples=8)


def test_accuracy_on_the_fly_equals_make_cifar10c_files(data_root, tmp_path):
    from benchmarks.studies.accuracy import AccuracyOptions, run_cifar10c_accuracy
    from tta_surgical.data.make_cifar10c import make_cifar10c

    frost = data_root / "frost"
    make_cifar10c(data_root, tmp_path / "c10c", corruptions=["fog"], severities=[3, 5], limit=40, frost_dir=frost,
                  progress=False)  # fmt: skip
    opts = AccuracyOptions(data_root=str(data_root), reference=str(tmp_path / "c10c"), corruptions=("fog",),
                           severities=(3, 5), limit=40, frost_dir=str(frost), out=tmp_path / "acc.json")  # fmt: skip
    logged = []
    res = run_cifar10c_accuracy(opts, log=logged.append)
    # Generated on the fly "exactly as make-cifar10c writes them": the same images, so the same errors.
    assert res["errors"]["fog"]["5"] == res["reference_errors"]["fog"]["5"] and res["n_images"] == 40
    assert res["mean_errors"] == {"3": res["errors"]["fog"]["3"], "5": res["errors"]["fog"]["5"]}
    assert json.loads((tmp_path / "acc.json").read_text())["provenance"]["versions"]["torch"] == torch.__version__
    table = next(t for t in logged if t.startswith("| corruption |")).splitlines()
    assert table[0] == "| corruption | s3 | s5 | reference s5 | diff s5 |" and table[-1].endswith("| +0.00 |")


def test_corruption_speed_writes_rows_summary_and_provenance(tmp_path):
    from benchmarks.studies.corruption_speed import SpeedOptions, run_corruption_speed

    opts = SpeedOptions(corruptions=("brightness", "gaussian_noise"), quick=True, reference=False,
                        out=tmp_path / "speed.json")  # fmt: skip
    res = run_corruption_speed(opts, log=None)
    assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(res))
    assert [r["corruption"] for r in res["rows"]] == ["brightness", "gaussian_noise"]
    assert all(r["ours_32_img_s"] > 0 and r["numpy_224_img_s"] is None for r in res["rows"])
    assert (res["meta"]["batch32"], res["meta"]["repeats"]) == (100, 1) and res["meta"]["machine"]["device_name"]
    assert res["summary"]["mean_ours_32_img_s_benchmark15"] > 0 and res["summary"]["mean_ratio_224"] is None
