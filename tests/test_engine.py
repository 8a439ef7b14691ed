"""Contracts of the online engine, its files, resume, reset policy, the CLI, and Tent against a plain reference loop.

Tiny real streams: the CIFAR-10 test set corrupted on the fly, 16 images per batch, the pretrained ResNet-20
from the shared data folder. Torch runs single-threaded here: on a shared 2-core machine two OpenMP threads
per process spin against each other and are ~10x slower.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tta_surgical.config import load_config
from tta_surgical.data.context import DataContext
from tta_surgical.engine import RESULTS_FILE, STATE_FILE, run
from tta_surgical.metrics import ErrorMeter, percentile
from tta_surgical.render import compare_markdown, plot_errors, summary_markdown

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("gaussian_noise", "brightness")
SUMMARY_KEYS = {
    "method",
    "model",
    "errors",
    "mean_error",
    "online_error",
    "images_per_s",
    "latency_ms",
    "peak_memory_mb",
    "peak_memory_kind",
    "n_skipped_updates",
    "n_images",
    "device",
}
LINE_KEYS = {"batch_index", "domain", "severity", "correct", "count", "loss", "latency_ms", "n_skipped"}


def _need_corruptions(*names: str) -> None:
    from tta_surgical.corruptions import CORRUPTIONS

    missing = [n for n in names if n not in CORRUPTIONS]
    if missing:
        pytest.skip(f"corruptions not registered yet: {missing}")


def tiny_cfg(config: str = "tent", *extra: str, domains=DOMAINS, n: int = 32, batch: int = 16):
    """2 domains x 2 batches of 16 (severity 5, reset per domain), CPU, no progress bar."""
    _need_corruptions(*domains)
    return load_config(
        REPO / "configs" / f"{config}.yaml",
        overrides=[
            f"stream.domains=[{','.join(domains)}]",
            "stream.severities=[5]",
            f"stream.n_examples={n}",
            f"stream.batch_size={batch}",
            "stream.reset=per_domain",
            "runtime.device=cpu",
            "runtime.progress=false",
            *extra,
        ],
    )


def read_lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / RESULTS_FILE).read_text().splitlines() if x.strip()]


def numbers(lines: list[dict]) -> list[tuple]:
    """What must be identical between runs (timings are not)."""
    return [(r["batch_index"], r["domain"], r["correct"], r["count"], r["n_skipped"], r.get("pred")) for r in lines]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_root):
    """One uninterrupted tent run (reset per domain), predictions recorded; shared by several tests."""
    out = tmp_path_factory.mktemp("baseline")
    summary = run(tiny_cfg(), out, data=data_root, record_predictions=True)
    return out, summary


@pytest.fixture(scope="module")
def continual(tmp_path_factory, data_root):
    """The same without resets: the adapted state carries across the domain boundary."""
    out = tmp_path_factory.mktemp("continual")
    summary = run(tiny_cfg("tent", "stream.reset=never"), out, data=data_root, record_predictions=True)
    return out, summary


# ------------------------------------------------------------------------------------------------- files


def test_output_files_and_summary_contract(baseline):
    out, summary = baseline
    for name in ("config.yaml", "results.jsonl", "state.pt", "summary.json", "summary.md"):
        assert (out / name).is_file(), name
    assert SUMMARY_KEYS <= set(summary)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["errors"] == summary["errors"] and saved["online_error"] == summary["online_error"]
    assert list(summary["errors"]) == list(DOMAINS)
    assert summary["n_images"] == 64 and summary["method"] == "tent" and summary["model"] == "resnet20"
    assert summary["peak_memory_kind"] == "cpu_process_peak_rss" and summary["peak_memory_mb"] > 0
    assert set(summary["latency_ms"]) >= {"p50", "p95", "p99"}
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p95"] <= summary["latency_ms"]["p99"]
    assert summary["images_per_s"] > 0
    # Where the loop time went: the parts add up to it, and the steps are the per-batch latencies.
    timing = summary["timing_this_session"]
    assert set(timing) == {"data_s", "step_s", "checkpoint_s", "other_s"} and min(timing.values()) >= 0
    assert sum(timing.values()) == pytest.approx(summary["wall_s_this_session"], abs=1e-5)
    assert timing["data_s"] > 0 and timing["checkpoint_s"] > 0  # corruption generation; 2 checkpoints written

    lines = read_lines(out)
    assert timing["step_s"] == pytest.approx(sum(r["latency_ms"] for r in lines) / 1000, rel=1e-4)
    assert [r["batch_index"] for r in lines] == [0, 1, 2, 3]
    assert all(LINE_KEYS <= set(r) for r in lines)
    assert [r["domain"] for r in lines] == ["gaussian_noise"] * 2 + ["brightness"] * 2
    assert [r["reset"] for r in lines] == [False, False, True, False]
    assert all(len(r["pred"]) == r["count"] == 16 for r in lines)
    # The summary's errors are exactly those of the lines.
    for d in DOMAINS:
        c = sum(r["correct"] for r in lines if r["domain"] == d)
        assert summary["errors"][d] == pytest.approx(100 * (1 - c / 32))
    assert summary["mean_error"] == pytest.approx(sum(summary["errors"].values()) / 2)
    assert summary["online_error"] == pytest.approx(100 * (1 - sum(r["correct"] for r in lines) / 64))

    cfg_saved = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg_saved["method"]["name"] == "tent" and cfg_saved["stream"]["n_examples"] == 32
    md = (out / "summary.md").read_text()
    assert "| gaussian_noise |" in md and "online error" in md and "images / s" in md


def test_same_seed_reproduces_exactly(baseline, tmp_path, data_root):
    out, summary = baseline
    again = run(tiny_cfg(), tmp_path / "again", data=data_root, record_predictions=True)
    assert again["errors"] == summary["errors"]
    assert again["online_error"] == summary["online_error"]
    assert numbers(read_lines(tmp_path / "again")) == numbers(read_lines(out))


def test_existing_run_is_not_overwritten(baseline, data_root):
    out, _ = baseline
    with pytest.raises(FileExistsError, match="resume"):
        run(tiny_cfg(), out, data=data_root)


# ------------------------------------------------------------------------------------------------- resume


class Crash(RuntimeError):
    pass


def crash_after(k: int):
    def hook(batch_index: int, record: dict) -> None:
        if batch_index == k:
            raise Crash

    return hook


def test_resume_after_crash_equals_uninterrupted(continual, tmp_path, data_root):
    # Continual (no reset): the resumed run must restore the adapted model and optimiser state, not restart.
    out, summary = continual
    cfg = tiny_cfg("tent", "stream.reset=never")
    folder = tmp_path / "crashy"

    def crash_after_batch_2(batch_index: int, record: dict) -> None:
        if batch_index == 2:  # the middle of the second domain
            raise Crash

    with pytest.raises(Crash):
        run(cfg, folder, data=data_root, on_batch=crash_after_batch_2, record_predictions=True)
    assert len(read_lines(folder)) == 3  # batch 2 was written before the crash
    ckpt = torch.load(folder / STATE_FILE, weights_only=True)
    assert ckpt["next_batch"] == 2 and ckpt["n_lines"] == 2  # checkpoint at the end of the first domain

    seen: list[int] = []
    resumed = run(
        cfg, folder, data=data_root, resume=True, on_batch=lambda i, r: seen.append(i), record_predictions=True
    )
    assert seen == [2, 3]  # the unfinished domain is redone, the finished one is not
    assert resumed["errors"] == summary["errors"] and resumed["online_error"] == summary["online_error"]
    assert resumed["resumed_from_batch"] == 2
    assert numbers(read_lines(folder)) == numbers(read_lines(out))
    # The final adapted model and optimiser state are bit-identical too.
    a = torch.load(out / STATE_FILE, weights_only=True)["method"]["state"]
    b = torch.load(folder / STATE_FILE, weights_only=True)["method"]["state"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) and torch.equal(sa[k]["step"], sb[k]["step"])
    assert torch.equal(a["rng"], b["rng"])
    counters = [torch.load(f / STATE_FILE, weights_only=True)["method"]["counters"] for f in (out, folder)]
    assert counters[0] == counters[1] and counters[0]["n_updates"] == 4

    # Resuming a finished run changes nothing.
    done = run(cfg, folder, data=data_root, resume=True, record_predictions=True)
    assert done["errors"] == summary["errors"] and len(read_lines(folder)) == 4


def test_resume_of_a_finished_run_leaves_it_untouched(baseline, tmp_path, data_root, capsys):
    """--resume on a finished run changes no byte (the summary keeps its wall time and timing), says so in one
    line and exits 0; the Python call returns the stored summary."""
    import shutil

    from tta_surgical.cli import main

    src, summary = baseline
    out = tmp_path / "finished"
    shutil.copytree(src, out)
    files = lambda: {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".lock"}  # noqa: E731
    before = files()
    assert run(tiny_cfg(), out, data=data_root, resume=True) == json.loads(before["summary.json"])
    assert files() == before
    argv = ["run", "--config", str(REPO / "configs" / "tent.yaml"), "--out", str(out), "--data-root", str(data_root),
            "--resume", "stream.domains=[gaussian_noise,brightness]", "stream.severities=[5]", "stream.n_examples=32",
            "stream.batch_size=16", "stream.reset=per_domain", "runtime.device=cpu",
            "runtime.progress=false"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [f"{out}: the run is finished (4 batches); nothing to resume, its files are left as they are "
                       "(--overwrite runs it again)"]  # fmt: skip
    assert files() == before
    assert main([*argv, "optim.lr=1e-2"]) == 2 and "optim.lr" in capsys.readouterr().err  # another config: an error


def test_resume_with_changed_config_is_an_error(baseline, data_root):
    out, _ = baseline
    with pytest.raises(ValueError, match=r"optim\.lr"):
        run(tiny_cfg("tent", "optim.lr=1e-4"), out, data=data_root, resume=True)


def test_resume_with_changed_execution_settings_gives_the_same_numbers(continual, tmp_path, data_root):
    """Only execution settings may differ on resume (progress bar, memory layout, optimiser kernels): they move
    results by floating-point rounding, so the predictions and errors stay those of the uninterrupted run.
    Continual, so the second domain depends on the adapted state the resume restores."""
    out, summary = continual
    folder = tmp_path / "changed"
    with pytest.raises(Crash):
        run(tiny_cfg("tent", "stream.reset=never"), folder, data=data_root, on_batch=crash_after(3),
            record_predictions=True)  # fmt: skip
    changed = ("runtime.progress=true", "runtime.channels_last=false", "optim.implementation=for-loop")
    seen: list[int] = []
    resumed = run(tiny_cfg("tent", "stream.reset=never", *changed), folder, data=data_root, resume=True,
                  on_batch=lambda i, r: seen.append(i), record_predictions=True)  # fmt: skip
    assert seen == [2, 3] and resumed["resumed_from_batch"] == 2  # it really computed the second domain
    assert numbers(read_lines(folder)) == numbers(read_lines(out))
    assert resumed["errors"] == summary["errors"] and resumed["online_error"] == summary["online_error"]
    a = torch.load(out / STATE_FILE, weights_only=True)["method"]["state"]["model"]
    b = torch.load(folder / STATE_FILE, weights_only=True)["method"]["state"]["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)  # a tenth of an Adam step (lr 1e-3)
    # The saved config is still the run's own (the execution settings of a resume are not recorded over it).
    assert yaml.safe_load((folder / "config.yaml").read_text())["runtime"]["channels_last"] is True


# ------------------------------------------------------------------------------------------------- reset


def test_reset_policy_per_domain_vs_never(baseline, continual, tmp_path, data_root, monkeypatch):
    out, _ = baseline
    ckpt = torch.load(out / STATE_FILE, weights_only=True)
    assert ckpt["method"]["counters"]["n_resets"] == 1  # once, before the second domain
    never_out, _ = continual
    never_ckpt = torch.load(never_out / STATE_FILE, weights_only=True)["method"]
    assert never_ckpt["counters"]["n_resets"] == 0

    import tta_surgical.engine as engine

    calls: list[int] = []
    real = engine.build_method

    def spy(*a, **k):
        m = real(*a, **k)
        orig = m.reset
        m.reset = lambda: (calls.append(m.n_steps), orig())[1]
        return m

    monkeypatch.setattr(engine, "build_method", spy)
    never = never_ckpt["state"]["model"]
    per_domain = ckpt["method"]["state"]["model"]
    # Without the reset the second domain continues from the first domain's adapted parameters.
    assert not torch.equal(never["bn1.weight"], per_domain["bn1.weight"])
    lines_never, lines_reset = read_lines(never_out), read_lines(out)
    assert numbers(lines_never)[:2] == numbers(lines_reset)[:2]  # identical up to the reset point
    assert [r["reset"] for r in lines_never] == [False] * 4

    run(tiny_cfg("tent", "stream.reset=episodic"), tmp_path / "epi", data=data_root)
    assert calls == [1, 2, 3]  # before every batch but the first (the model starts from the source)


# ------------------------------------------------------------------------------------------------- Tent oracle


def _reference_module():
    spec = importlib.util.spec_from_file_location("reference_tent", REPO / "benchmarks" / "reference_tent.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reference_tent", mod)
    spec.loader.exec_module(mod)
    return mod


def test_tent_matches_plain_reference_loop(baseline, data_root):
    from tta_surgical.models import create_model
    from tta_surgical.streams import build_stream

    out, _ = baseline
    cfg = tiny_cfg()
    model, _ = create_model("resnet20", data=data_root)
    batches = list(build_stream(cfg.stream, data=DataContext.resolve(data_root, data_root / "frost")))
    preds, ref_state = _reference_module().reference_tent(model, batches, lr=1e-3)

    ours = torch.tensor([p for r in read_lines(out) for p in r["pred"]])
    assert torch.equal(ours, preds)  # every prediction, in stream order
    final = torch.load(out / STATE_FILE, weights_only=True)["method"]["state"]["model"]
    bn = [k for k in ref_state if k.endswith((".weight", ".bias")) and "bn" in k]
    assert len(bn) == 2 * 19  # every BN layer of ResNet-20 (stem + 9 units x 2)
    for k, v in ref_state.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # ... and they did adapt (the comparison is not between two untouched models).
    assert not torch.equal(ref_state["bn1.weight"], model.state_dict()["bn1.weight"])


# ------------------------------------------------------------------------------------------------- real data


def test_norm_beats_source_on_severe_noise(tmp_path, data_root):
    kw = {"domains": ("gaussian_noise",), "n": 400, "batch": 200}
    src = run(tiny_cfg("source", **kw), tmp_path / "source", data=data_root)
    norm = run(tiny_cfg("norm", **kw), tmp_path / "norm", data=data_root)
    # ResNet-20 on Gaussian noise severity 5: the source model is badly broken, test-batch BN statistics fix much.
    assert src["errors"]["gaussian_noise"] > 50
    assert norm["errors"]["gaussian_noise"] < src["errors"]["gaussian_noise"] - 15
    assert src["n_skipped_updates"] == norm["n_skipped_updates"] == 0


@pytest.mark.parametrize(
    "order,sev,keys",
    [
        ("mixed", "[5]", {"gaussian_noise", "brightness"}),
        ("gradual", "[4,5]", {"gaussian_noise@4", "gaussian_noise@5", "brightness@4", "brightness@5"}),
    ],
)
def test_domain_keys_of_mixed_and_gradual_streams(tmp_path, data_root, order, sev, keys):
    cfg = tiny_cfg("source", f"stream.order={order}", f"stream.severities={sev}", "stream.reset=never", n=16)
    summary = run(cfg, tmp_path / order, data=data_root)
    assert set(summary["errors"]) == keys
    assert summary["n_images"] == 16 * len(keys) + (16 * 2 if order == "gradual" else 0)  # ramp 4,5,4


# ------------------------------------------------------------------------------------------------- CLI


def _stream_file(tmp_path: Path) -> Path:
    _need_corruptions("brightness")
    p = tmp_path / "tiny.yaml"
    p.write_text("stream:\n  source: cifar10\n  domains: [brightness]\n  severities: [5]\n  batch_size: 16\n")
    return p


def test_cli_run_end_to_end_with_overrides(tmp_path, data_root, capsys):
    from tta_surgical.cli import main

    out = tmp_path / "cli"
    argv = ["run", "--config", str(REPO / "configs" / "tent.yaml"), "--stream", str(_stream_file(tmp_path))]
    argv += ["--data-root", str(data_root), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main([*argv, "stream.n_examples=32", "optim.lr=2e-3"]) == 0
    printed = capsys.readouterr().out
    assert "| brightness |" in printed and "online error" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.002 and saved["runtime"]["device"] == "cpu" and saved["stream"]["n_examples"] == 32
    assert json.loads((out / "summary.json").read_text())["n_images"] == 32

    assert main([*argv, "stream.n_examples=32", "optim.lr=2e-3"]) == 2  # would overwrite: refused
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume", "stream.n_examples=32", "optim.lr=1e-3"]) == 2  # different config
    assert "optim.lr" in capsys.readouterr().err
    assert main([*argv, "--resume", "stream.n_examples=32", "optim.lr=2e-3"]) == 0


def test_cli_compare_side_by_side(tmp_path, data_root, capsys):
    from tta_surgical.cli import main

    out = tmp_path / "cmp"
    argv = ["compare", "--configs", str(REPO / "configs" / "source.yaml"), str(REPO / "configs" / "norm.yaml")]
    argv += ["stream.n_examples=16"]  # an override right after the configs is still an override
    argv += ["--stream", str(_stream_file(tmp_path)), "--data-root", str(data_root), "--out", str(out)]
    argv += ["--device", "cpu", "--no-progress", "stream.batch_size=8"]
    assert main(argv) == 0
    md = (out / "compare.md").read_text()
    assert "| error % | source | norm |" in md and "| brightness |" in md and "**mean**" in md
    data = json.loads((out / "compare.json").read_text())
    assert set(data["errors"]["brightness"]) == {"source", "norm"}
    assert data["summaries"]["norm"]["n_images"] == 16 and data["summaries"]["norm"]["batch_size"] == 8
    assert (out / "source" / "summary.json").is_file() and (out / "norm" / "summary.json").is_file()
    capsys.readouterr()
    assert main(argv) == 0  # the second time reuses both finished runs
    assert capsys.readouterr().out.count("reusing") == 2


# ------------------------------------------------------------------------------------------------- metrics, report


def test_metrics_accumulators():
    m = ErrorMeter()
    m.update("a", 3, 4)
    m.update("b", 0, 4)
    m.update("a", 4, 4)
    assert m.errors() == {"a": pytest.approx(12.5), "b": 100.0}
    assert m.mean_error() == pytest.approx(56.25)
    assert m.online_error() == pytest.approx(100 * 5 / 12)
    with pytest.raises(ValueError):
        m.update("a", 5, 4)
    vals = [float(v) for v in np.random.default_rng(0).random(37)]
    for q in (0, 50, 95, 99, 100):
        assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))
    assert math.isnan(percentile([], 50))


def test_report_tables_and_plot_message(monkeypatch, tmp_path):
    a = {"method": "source", "model": "m", "errors": {"x": 50.0, "y": 30.0}, "mean_error": 40.0, "online_error": 40.0}
    b = {"method": "tent", "model": "m", "errors": {"x": 20.0, "y": 35.0}, "mean_error": 27.5, "online_error": 27.5}
    table = compare_markdown({"source": a, "tent": b})
    assert "| x | 50.00 | **20.00** |" in table and "| y | **30.00** | 35.00 |" in table
    assert "| **mean** | 40.00 | **27.50** |" in table
    assert "| **mean** | **40.00** |" in summary_markdown(a)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install"):
        plot_errors({"source": a}, tmp_path / "p.png")


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_bf16_channels_last_close_to_cpu(baseline, tmp_path, data_root):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, cpu = baseline
    cfg = tiny_cfg("tent", "runtime.device=cuda")
    gpu = run(cfg, tmp_path / "gpu", data=data_root)
    assert gpu["peak_memory_kind"] == "cuda_max_allocated" and gpu["device"].startswith("cuda")
    # Corruptions drawn on another device differ, so only closeness is expected.
    assert abs(gpu["online_error"] - cpu["online_error"]) < 15
    fast = run(
        tiny_cfg("tent", "runtime.device=cuda", "runtime.precision=bf16", "runtime.channels_last=true"),
        tmp_path / "bf16",
        data=data_root,
    )
    assert abs(fast["online_error"] - gpu["online_error"]) < 10


def test_runtime_num_workers_reaches_the_stream(tmp_path, data_root, monkeypatch):
    import tta_surgical.engine as engine

    real, seen = engine.build_stream, []

    def spy(*a, **kw):
        seen.append(kw["data"].num_workers)
        return real(*a, **kw)

    monkeypatch.setattr(engine, "build_stream", spy)
    run(tiny_cfg("source", "runtime.num_workers=0", n=16), tmp_path / "w", data=data_root)
    assert seen == [0]
