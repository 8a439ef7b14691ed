"""What the time machinery costs a run that does not need it (issue 22: <= 2% on the classic, waiting protocol).

Two measurements (`benchmarks/time_overhead.py`):

- **end to end**, interleaved: the same `tta-surgical run` (as fast as possible, an update on every batch) in fresh
  processes, round-robin over variants: `old` (a source tree without the machinery, e.g. the commit before it),
  `off` (this tree, machinery off: the default) and `on` (this tree, `runtime.record_times=true`: the schedule, the
  clock, the line fields and the time metrics all run, changing no number). Per variant: the loop's wall time, its
  steps, and the time outside the steps per batch. On a shared machine the spread between rounds is reported beside
  the means: a difference smaller than it is not a measurement.
- **bookkeeping per batch**, in this process: the schedule's decision and accounting, the line fields and the time
  meter for one batch, timed over many batches (microseconds), against a step's time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from tta_surgical.runtime import RuntimeConfig
from tta_surgical.schedule import Scheduler
from tta_surgical.streams.arrival import ArrivalSpec
from tta_surgical.timeliness import TimeMeter

__all__ = ["bookkeeping_us_per_batch", "interleaved_runs", "run_variant", "time_overhead"]


def run_variant(
    src: Path,
    out: Path,
    config: Path,
    stream: Path,
    overrides: Sequence[str],
    data_root: str | None,
    threads: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """One `tta-surgical run` with the package from `src` (PYTHONPATH), in a fresh process; its summary."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if data_root:
        env["TTA_SURGICAL_DATA"] = str(data_root)
    cmd = [sys.executable, "-m", "tta_surgical.cli", "run", "--config", str(config), "--stream", str(stream),
           "--out", str(out), "--overwrite", *overrides, "runtime.progress=false",
           f"runtime.device={device}"]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    total = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"run failed ({src}): {done.stderr.strip()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    timing = summary["timing_this_session"]
    n = int(summary["n_batches"])
    return {
        "process_s": total,
        "loop_s": summary["wall_s_this_session"],
        "step_s": timing["step_s"],
        "outside_steps_ms_per_batch": 1000.0 * (summary["wall_s_this_session"] - timing["step_s"]) / n,
        "online_error": summary["online_error"],
        "n_batches": n,
        "summary": summary,
    }


def interleaved_runs(
    variants: Mapping[str, tuple[Path, Sequence[str]]],
    *,
    config: Path,
    stream: Path,
    overrides: Sequence[str],
    rounds: int,
    data_root: str | None,
    threads: int = 1,
    device: str = "cpu",
    threads_of: Mapping[str, int] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """`rounds` x every variant (name -> (source tree, extra overrides)), round-robin (reversed every other round,
    so no variant always runs first), each in a fresh process: variant -> its runs (`run_variant`). `threads_of`
    gives some variants their own number of torch threads."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                src, extra = variants[name]
                out = Path(tmp) / name
                over = [*overrides, *extra]
                n_threads = (threads_of or {}).get(name, threads)
                runs[name].append(run_variant(src, out, config, stream, over, data_root, n_threads, device))
    return runs


def time_overhead(
    variants: Mapping[str, tuple[Path, Sequence[str]]],
    *,
    config: Path,
    stream: Path,
    overrides: Sequence[str],
    rounds: int,
    data_root: str | None,
    threads: int = 1,
) -> dict[str, Any]:
    """`rounds` x every variant (name -> (source tree, extra overrides)), interleaved; per-variant mean and sd."""
    runs = interleaved_runs(
        variants, config=config, stream=stream, overrides=overrides, rounds=rounds, data_root=data_root,
        threads=threads,
    )  # fmt: skip
    stats = {}
    for name, items in runs.items():
        stats[name] = {
            key: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else None, "values": v}
            for key in ("loop_s", "step_s", "outside_steps_ms_per_batch", "process_s")
            for v in [[x[key] for x in items]]
        }
        stats[name]["online_error"] = items[0]["online_error"]
        stats[name]["identical_error"] = len({x["online_error"] for x in items}) == 1
    return {"rounds": rounds, "variants": stats}


def bookkeeping_us_per_batch(n_batches: int = 20000) -> dict[str, float]:
    """Microseconds per batch of the machinery's own work on an as-fast-as-possible run with the clock on: the
    schedule's plan and done, the results line's time fields, and the time meter's update (no model involved);
    per cost mode (measured: float ms; fixed: exact fractions)."""
    out = {}
    for mode, units in (("measured", None), ("fixed", Fraction(57, 25))):
        rt = RuntimeConfig(record_times=True, cost_mode=mode, cost_ratio=2.28 if units is not None else None)
        sched = Scheduler([200] * n_batches, ArrivalSpec(), rt, forward_ms=250.0, step_units=units)
        meter = TimeMeter()
        t0 = time.perf_counter()
        for i in range(n_batches):
            slot = sched.plan(i)
            sched.done(slot, 500.0)
            meter.update({"correct": 150, "count": 200, "adapted": slot.adapt, "t_ms": sched.times_ms(slot)})
        out[mode] = (time.perf_counter() - t0) * 1e6 / n_batches
    return out
