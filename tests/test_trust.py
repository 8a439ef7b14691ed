"""Runs that survive misuse and long streams: the writer lock, durable results, collapse detection and policy."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tta_surgical.collapse import CollapseMonitor
from tta_surgical.config import ConfigError, RuntimeConfig, load_config
from tta_surgical.engine import RESULTS_FILE, run
from tta_surgical.runfolder import FolderInUseError, JsonlWriter, RunFolder, folder_lock, read_jsonl

REPO = Path(__file__).resolve().parents[1]


def cfg_for(config: str = "tent", *extra: str, domains=("gaussian_noise", "fog"), n: int = 400, batch: int = 100):
    return load_config(
        REPO / "configs" / f"{config}.yaml",
        overrides=[
            f"stream.domains=[{','.join(domains)}]",
            f"stream.n_examples={n}",
            f"stream.batch_size={batch}",
            "stream.reset=never",
            "runtime.device=cpu",
            "runtime.progress=false",
            "runtime.collapse_window=400",
            *extra,
        ],
    )


def lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / RESULTS_FILE).read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------------------ the lock


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from tta_surgical.runfolder import folder_lock\n"
        f"with folder_lock({str(folder)!r}, 'test holder'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_fails_at_once_naming_the_folder_and_holder(tmp_path, data_root):
    folder = tmp_path / "busy"
    holder = _hold_lock(folder)
    cfg = cfg_for("norm")
    try:
        t0 = time.perf_counter()
        with pytest.raises(FolderInUseError, match=f"{folder}.*in use.*pid {holder.pid}.*test holder"):
            run(cfg, folder, data=data_root)
        assert time.perf_counter() - t0 < 1.0
        assert not (folder / RESULTS_FILE).exists()  # nothing was written by the refused run
        cli = subprocess.run(
            [sys.executable, "-m", "tta_surgical", "run", "--config", "configs/norm.yaml", "--out", str(folder),
             "--data-root", str(data_root), "stream.n_examples=10"],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 2 and "in use" in cli.stderr and str(folder) in cli.stderr
        assert "Traceback" not in cli.stderr
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock, nothing stale is left behind
        holder.wait()
    summary = run(cfg_for("norm", "stream.n_examples=100"), folder, data=data_root, overwrite=True)
    assert summary["n_images"] == 200


def test_lock_is_reentrant_within_a_process(tmp_path):
    with folder_lock(tmp_path / "f"), folder_lock(tmp_path / "f"):
        with folder_lock(tmp_path / "g"):
            pass
    with folder_lock(tmp_path / "f"):  # released after the outer block
        pass


# ------------------------------------------------------------------------------------------------ JSON lines


def test_read_jsonl_drops_a_torn_last_line_and_keeps_n(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3}\n{"a": 4')  # crash mid-write
    assert [r["a"] for r in read_jsonl(path)] == [1, 2, 3]
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n{"a": 3}\n'
    assert [r["a"] for r in read_jsonl(path, keep=2)] == [1, 2]
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    with pytest.raises(OSError, match="holds 2 complete lines but the checkpoint expects 5"):
        read_jsonl(path, keep=5)
    path.write_bytes(b'{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(OSError, match="line 2 is not valid JSON"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_checkpoint_never_counts_lines_not_on_disk(tmp_path, data_root, monkeypatch):
    """Every state.pt write comes after an fsync of results.jsonl holding all the lines it counts."""
    events: list[tuple[str, int]] = []
    real_sync, real_save = JsonlWriter.sync, RunFolder.save_checkpoint

    def sync(self):
        real_sync(self)
        events.append(("sync", len(self.path.read_text().splitlines())))

    def save(self, state, writer=None):
        real_save(self, state, writer)
        events.append(("checkpoint", int(state["n_lines"])))

    monkeypatch.setattr(JsonlWriter, "sync", sync)
    monkeypatch.setattr(RunFolder, "save_checkpoint", save)
    run(cfg_for("tent", "stream.n_examples=200"), tmp_path / "d", data=data_root)
    checkpoints = [i for i, e in enumerate(events) if e[0] == "checkpoint"]
    assert len(checkpoints) == 2  # the domain boundary and the end
    for i in checkpoints:
        assert events[i - 1][0] == "sync" and events[i - 1][1] >= events[i][1]


# ------------------------------------------------------------------------------------------------ collapse


def _rec(i: int, entropy: float, top: int, share: float, n: int = 100) -> dict:
    return {"batch_index": i, "count": n, "pred_entropy": entropy, "top_class": top, "top_class_share": share}


def test_monitor_flags_one_class_with_falling_entropy():
    mon = CollapseMonitor(window_images=500, share=0.6, entropy_ratio=0.5)
    assert not mon.observe(_rec(0, 1.0, 3, 0.2))
    flags = [mon.observe(_rec(i, 0.05, 7, 0.9)) for i in range(1, 12)]
    assert flags.index(True) == 3  # batches 0-4 fill the 500-image window; 4 of its 5 batches are collapsed
    assert flags.count(True) == 2  # then the window restarts: reported once per window


def test_default_window_judges_a_short_stream():
    """The shipped window (runtime.collapse_window's default) fits a short run: the lr=1000 Tent pattern of a
    1,500-image stream at batch 100 (first batch sane, then one class, zero entropy) is flagged before its end."""
    window = RuntimeConfig().collapse_window
    mon = CollapseMonitor(window_images=window)
    records = [_rec(0, 0.36, 3, 0.15)] + [_rec(i, 0.0, 7, 0.99) for i in range(1, 15)]
    flags = [mon.observe(r) for r in records]
    assert True in flags and flags.index(True) == window // 100 - 1  # the first full window


@pytest.mark.parametrize(
    "records",
    [
        [_rec(i, 0.05, i // 2 % 10, 0.9) for i in range(1, 30)],  # label shift: the dominant class keeps changing
        [_rec(i, 0.9, 7, 0.9) for i in range(1, 30)],  # concentrated but no more confident than at the start
        [_rec(i, 0.05, 7, 0.3) for i in range(1, 30)],  # confident but not concentrated
    ],
    ids=["label-shift", "entropy-not-fallen", "not-concentrated"],
)
def test_monitor_ignores_what_is_not_collapse(records):
    mon = CollapseMonitor(window_images=500, share=0.6, entropy_ratio=0.5)
    mon.observe(_rec(0, 1.0, 3, 0.2))
    assert not any(mon.observe(r) for r in records)


def test_collapse_policies_on_a_diverging_tent(tmp_path, data_root):
    """Tent at lr=1000 collapses to one class; warn counts it, reset recovers, stop ends the run; a sane Tent
    on the same stream raises nothing."""
    fast = ["optim.lr=1000", "stream.n_examples=600"]
    warn = run(cfg_for("tent", *fast), tmp_path / "warn", data=data_root)
    assert warn["n_collapse_warnings"] >= 1 and warn["on_collapse"] == "warn"
    rec = lines(tmp_path / "warn")[warn["collapse_batches"][0]]
    assert rec["top_class_share"] >= 0.6 and rec["pred_entropy"] < 0.1
    reset = run(cfg_for("tent", *fast, "runtime.on_collapse=reset"), tmp_path / "reset", data=data_root)
    assert reset["n_resets"] == reset["n_collapse_warnings"] >= 1
    after = lines(tmp_path / "reset")[reset["collapse_batches"][0] + 1]
    assert after["reset"] is True
    assert reset["online_error"] < warn["online_error"]
    stop = run(cfg_for("tent", *fast, "runtime.on_collapse=stop"), tmp_path / "stop", data=data_root)
    assert stop["stopped_on_collapse_at_batch"] == stop["collapse_batches"][0]
    assert len(lines(tmp_path / "stop")) == stop["collapse_batches"][0] + 1
    sane = run(cfg_for("tent", "stream.n_examples=600"), tmp_path / "sane", data=data_root)
    assert sane["n_collapse_warnings"] == 0 and sane["collapse_batches"] == []


def test_results_lines_carry_loss_and_prediction_statistics(tmp_path, data_root):
    run(cfg_for("tent", "stream.n_examples=200"), tmp_path / "t", data=data_root)
    for rec in lines(tmp_path / "t"):
        assert rec["loss"] is not None and rec["loss"] >= 0
        assert 0 <= rec["pred_entropy"] and 0 < rec["top_class_share"] <= 1 and 0 <= rec["top_class"] < 10
        assert rec["n_filtered"] == 0 and rec["method_reset"] is None
    run(cfg_for("norm", "stream.n_examples=200"), tmp_path / "n", data=data_root)
    assert all(rec["loss"] is None for rec in lines(tmp_path / "n"))  # no update, no loss


def test_collapse_settings_are_validated():
    for bad in ("runtime.on_collapse=explode", "runtime.collapse_share=0", "runtime.collapse_window=0"):
        with pytest.raises(ConfigError, match="runtime"):
            cfg_for("tent", bad)


def test_resume_rebuilds_the_collapse_monitor(tmp_path, data_root):
    """Replaying the kept lines gives the monitor the state it had: a resumed run flags the same batches."""
    cfg = cfg_for("tent", "optim.lr=1000", "stream.n_examples=600", "runtime.on_collapse=reset")
    full = run(cfg, tmp_path / "full", data=data_root)

    class Crash(Exception):
        pass

    def crash(i: int, _rec: dict) -> None:
        if i == 8:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, tmp_path / "part", data=data_root, on_batch=crash)
    resumed = run(cfg, tmp_path / "part", data=data_root, resume=True)
    assert resumed["collapse_batches"] == full["collapse_batches"] and resumed["errors"] == full["errors"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("latency_ms", "warmup")} for r in rs]  # noqa: E731
    assert strip(lines(tmp_path / "part")) == strip(lines(tmp_path / "full"))


def test_env_has_no_lock_leftovers(tmp_path):
    folder = tmp_path / "x"
    with folder_lock(folder):
        assert (folder / ".lock").is_file()
    assert os.access(folder / ".lock", os.R_OK)


def test_prediction_stats_report_a_confident_batch_as_zero_entropy():
    """One-hot logits have entropy -0.0 in float arithmetic; the results line and the warning say 0.0."""
    from tta_surgical.collapse import batch_prediction_stats

    logits = torch.full((4, 3), -1e4)
    logits[:, 1] = 1e4
    correct, entropy, top, share = batch_prediction_stats(logits, torch.tensor([1, 1, 0, 1]))
    assert (correct, top, share) == (3, 1, 1.0)
    assert entropy == 0.0 and math.copysign(1.0, entropy) == 1.0


def test_replaying_results_lines_gives_the_runs_collapse_batches(tmp_path, data_root):
    """replay_collapses over a finished run's results lines = the collapse_batches its summary reports."""
    from tta_surgical.collapse import replay_collapses

    cfg = cfg_for("tent", "optim.lr=1000", "stream.n_examples=600", "runtime.on_collapse=warn")
    summary = run(cfg, tmp_path / "r", data=data_root)
    assert summary["collapse_batches"]  # the diverging Tent collapses
    rt = cfg.runtime
    mon = CollapseMonitor(rt.collapse_window, rt.collapse_share, rt.collapse_entropy_ratio)
    assert replay_collapses(lines(tmp_path / "r"), mon) == summary["collapse_batches"]
    wider = CollapseMonitor(10**6, rt.collapse_share, rt.collapse_entropy_ratio)
    # a window longer than the run never fills: only the two domains (600 images each) are judged, at their ends
    assert replay_collapses(lines(tmp_path / "r"), wider) == [5, 11]


def test_peek_jsonl_reads_complete_lines_and_never_cuts_the_file(tmp_path):
    from tta_surgical.runfolder import peek_jsonl

    f = tmp_path / "results.jsonl"
    f.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "tor')
    before = f.read_bytes()
    assert peek_jsonl(f) == [{"a": 1}, {"a": 2}]
    assert f.read_bytes() == before  # a run still writing keeps its last line


# ------------------------------------------------------------------------------------------------ collapse per domain


def _seg(i: int, entropy: float, top: int, share: float, n: int = 200, reset: bool = False, end: bool = False):
    return {**_rec(i, entropy, top, share, n), "reset": reset, "segment_end": end}


def _reset_per_domain(domains: int = 4) -> list[dict]:
    """The quick start stream at lr=1000 (reset per domain, 500 images: batches of 200, 200, 100): a sane first
    prediction after each reset, then one class with zero entropy, a different class in every domain."""
    out = []
    for d in range(domains):
        i = 3 * d
        out += [
            _seg(i, 0.4, 3, 0.12, reset=d > 0),
            _seg(i + 1, 0.0, d + 5, 0.8),
            _seg(i + 2, 0.0, d + 5, 0.88, n=100, end=True),
        ]
    return out


def test_monitor_judges_a_short_domain_after_each_reset():
    """The run window (1,000 images) never fills between two resets 500 images apart; the segment is judged at its
    end on its two batches after the reference batch."""
    mon = CollapseMonitor(window_images=1000)
    assert [r["batch_index"] for r in _reset_per_domain() if mon.observe(r)] == [2, 5, 8, 11]
    assert mon.last_flag["over"] == "segment" and mon.last_flag["batches"] == 2 and mon.last_flag["top_class"] == 8


def test_monitor_takes_a_new_reference_after_a_reset():
    """After a reset the reference is the new first batch: a domain on which the source model is already confident
    (entropy 0.2) is judged against that, not against the noisy first domain of the run (entropy 1.0)."""
    first = [_seg(0, 1.0, 3, 0.15)] + [_seg(i, 0.9, i % 10, 0.15, end=i == 6) for i in range(1, 7)]
    easy = [_seg(7, 0.2, 2, 0.7, reset=True)] + [_seg(i, 0.15, 2, 0.7, end=i == 20) for i in range(8, 21)]
    mon = CollapseMonitor(window_images=1000)
    assert not any(mon.observe(r) for r in first + easy)  # 0.15 > 0.5 * 0.2: as confident as the source model
    assert mon.reference_entropy == 0.2


@pytest.mark.parametrize(
    "records",
    [
        # label shift within short reset-per-domain segments: the dominant class changes from batch to batch
        [_seg(3 * d + k, 0.4 if k == 0 else 0.05, (3 * d + k) % 10, 0.9, reset=d > 0 and k == 0, end=k == 2)
         for d in range(4) for k in range(3)],
        # one confident batch after the reference is not evidence: a segment needs 2 judged batches
        [_seg(2 * d + k, 0.4 if k == 0 else 0.0, 7, 0.95, reset=d > 0 and k == 0, end=k == 1)
         for d in range(4) for k in range(2)],
        # concentrated in short domains, but no more confident than the reference
        [_seg(3 * d + k, 0.4, 7, 0.9, reset=d > 0 and k == 0, end=k == 2) for d in range(4) for k in range(3)],
    ],
    ids=["label-shift-short-domains", "one-batch-after-reference", "entropy-not-fallen"],
)  # fmt: skip
def test_monitor_ignores_short_domains_that_are_not_collapsed(records):
    mon = CollapseMonitor(window_images=1000)
    assert not any(mon.observe(r) for r in records)


def quickstart_cfg(*extra: str):
    """The issue's case on a budget: the quick start (Tent, reset per domain, batch 200), 500 images per domain."""
    return load_config(
        REPO / "configs" / "quickstart.yaml",
        stream=REPO / "streams" / "quickstart.yaml",
        overrides=[
            "stream.domains=[gaussian_noise,fog]",
            "stream.n_examples=500",
            "runtime.device=cpu",
            "runtime.progress=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def reset_per_domain_collapse(tmp_path_factory, data_root):
    """Tent at lr=1000 on the reset-per-domain quick start stream, 2 domains of 500 images: it collapses within
    each domain (80-90% of every batch one class, zero entropy) and the class changes from domain to domain."""
    out = tmp_path_factory.mktemp("qs_collapse")
    return out, run(quickstart_cfg("optim.lr=1000"), out, data=data_root)


def test_collapse_within_reset_domains_is_flagged_on_stderr_and_in_the_summary(reset_per_domain_collapse, capsys):
    out, summary = reset_per_domain_collapse
    recs = lines(out)
    assert [r["reset"] for r in recs] == [False, False, False, True, False, False]
    assert [r["segment_end"] for r in recs] == [False, False, True, False, False, True]
    assert summary["n_collapse_warnings"] == 2 and summary["collapse_batches"] == [2, 5]
    md = (out / "summary.md").read_text()
    assert "collapse suspected 2 times (batches 2, 5" in md and "| collapse warnings | 2 (batches 2, 5) |" in md
    assert summary["status"] == "complete" and summary["n_batches"] == summary["n_batches_planned"] == 6


def test_collapse_warning_goes_to_stderr(tmp_path, data_root, capsys):
    run(quickstart_cfg("optim.lr=1000", "stream.domains=[fog]"), tmp_path / "w", data=data_root)
    captured = capsys.readouterr()
    assert "warning: collapse suspected at batch 2 (fog)" in captured.err and "collapse" not in captured.out
    assert "over this domain's 2 batches (300 images)" in captured.err


def test_sane_quickstart_runs_raise_no_collapse(tmp_path, data_root):
    summary = run(quickstart_cfg(), tmp_path / "sane", data=data_root)
    assert summary["n_collapse_warnings"] == 0
    assert "| collapse warnings | none |" in (tmp_path / "sane" / "summary.md").read_text()


def test_replay_and_resume_give_the_runs_flags_on_reset_domains(reset_per_domain_collapse, tmp_path, data_root):
    """Pure function of the lines: replayed (also from lines without `segment_end`, as older runs wrote them) and
    rebuilt on resume, the flags are the run's."""
    from tta_surgical.collapse import replay_collapses

    out, summary = reset_per_domain_collapse
    rt = quickstart_cfg().runtime
    monitor = lambda: CollapseMonitor(rt.collapse_window, rt.collapse_share, rt.collapse_entropy_ratio)  # noqa: E731
    assert replay_collapses(lines(out), monitor()) == summary["collapse_batches"]
    older = [{k: v for k, v in r.items() if k != "segment_end"} for r in lines(out)]
    assert replay_collapses(older, monitor()) == summary["collapse_batches"]

    class Crash(Exception):
        pass

    def crash(i: int, _rec: dict) -> None:
        if i == 4:
            raise Crash

    cfg = quickstart_cfg("optim.lr=1000")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "part", data=data_root, on_batch=crash)
    resumed = run(cfg, tmp_path / "part", data=data_root, resume=True)
    assert resumed["collapse_batches"] == summary["collapse_batches"] and resumed["errors"] == summary["errors"]


# ------------------------------------------------------------------------------------------------ stop, and resume


def _files(folder: Path) -> dict[str, bytes]:
    """The run's files (not the writer lock, which records its last holder)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def test_stopped_run_says_so_and_resumes_only_when_asked(tmp_path, data_root, capsys):
    from tta_surgical.cli import main

    cfg = quickstart_cfg("optim.lr=1000", "runtime.on_collapse=stop")
    folder = tmp_path / "stop"
    summary = run(cfg, folder, data=data_root)
    assert summary["status"] == "stopped_on_collapse" and summary["stopped_on_collapse_at_batch"] == 2
    assert summary["n_batches"] == 3 and summary["n_batches_planned"] == 6
    assert summary["n_images"] == 500 and summary["n_images_planned"] == 1000
    md = (folder / "summary.md").read_text()
    assert "Stopped on collapse at batch 2" in md and "| batches | 3 of 6 |" in md
    assert "stopping the run" in capsys.readouterr().err

    # --resume leaves it as it is, says so in one line, exit 0
    before = _files(folder)
    args = ["run", "--config", str(REPO / "configs" / "quickstart.yaml"), "--stream",
            str(REPO / "streams" / "quickstart.yaml"), "--out", str(folder), "--data-root", str(data_root),
            "stream.domains=[gaussian_noise,fog]", "stream.n_examples=500", "runtime.device=cpu",
            "runtime.progress=false", "optim.lr=1000", "runtime.on_collapse=stop"]  # fmt: skip
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "stopped on collapse at batch 2" in out[0] and "--continue-after-stop" in out[0]
    assert _files(folder) == before
    assert run(cfg, folder, data=data_root, resume=True) == summary and _files(folder) == before

    # asked explicitly: it continues past the stop (and at lr=1000 stops again in the next domain)
    assert main([*args, "--resume", "--continue-after-stop"]) == 0
    again = json.loads((folder / "summary.json").read_text())
    assert again["resumed_from_batch"] == 3 and again["stopped_on_collapse_at_batch"] == 5
    assert again["collapse_batches"] == [2, 5] and again["n_batches"] == 6
    assert len(lines(folder)) == 6
    assert main([*args, "--continue-after-stop"]) == 2  # only with --resume
    assert "--resume" in capsys.readouterr().err
