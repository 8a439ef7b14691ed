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
    assert replay_collapses(lines(tmp_path / "r"), wider) == []  # a window longer than the run never judges it


def test_peek_jsonl_reads_complete_lines_and_never_cuts_the_file(tmp_path):
    from tta_surgical.runfolder import peek_jsonl

    f = tmp_path / "results.jsonl"
    f.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "tor')
    before = f.read_bytes()
    assert peek_jsonl(f) == [{"a": 1}, {"a": 2}]
    assert f.read_bytes() == before  # a run still writing keeps its last line
