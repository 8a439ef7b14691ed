"""The online test-time adaptation loop: one method over one stream, measured, written as it goes, resumable.

`run(cfg, out_dir)` = lock the run folder (`runfolder`), `build(cfg)` -> (model, method, stream), then for every
batch of the stream, in order: apply the reset policy (the stream's `reset_before`, or a collapse reset), `logits =
method.step(x)` (predict, then adapt; the prediction comes from the same forward as the update), account the
batch and append one JSON line to `results.jsonl`. At every domain boundary (and at the end) the engine makes the
results lines durable and writes a checkpoint `state.pt` atomically (at a domain boundary the disk work overlaps the
next batch: `RunFolder.save_checkpoint(background=True)`), so a crash loses at most the current domain (and the one
before it, if it strikes in the fraction of a second before that domain's checkpoint is on disk):
`run(..., resume=True)` restores method, optimiser, stream position and RNG states, drops the lines written after
the checkpoint, replays the kept ones into the meters and the collapse monitor, and continues; an interrupted and
resumed run ends with exactly the numbers of an uninterrupted one. `summarize` turns the meters into
`summary.json` / `summary.md`, written when the run ends (at the end of the stream, or where the collapse policy
`stop` stopped it); a run that has ended is left untouched by `resume` (unless `continue_after_stop`). Under time
pressure (`stream.arrival`, update budgets, asynchronous adaptation) the pacer (`tta_surgical.pacing`) runs each batch
instead: the method's step, or only a prediction by the latest weights, as the schedule decides; without it the loop is
exactly the classic one.

Files in `out_dir`: `config.yaml` (the resolved config), `results.jsonl`, `state.pt`, `summary.json`,
`summary.md`, `.lock` (the writer lock; see `runfolder`).
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._version import __version__
from .config import Config
from .data.context import DataContext, DataLike
from .guards import (
    Alarm,
    CollapseMonitor,
    DriftMonitor,
    Fallback,
    Guard,
    Ledger,
    describe_alarm,
    guard_summary,
    reference_stats,
)
from .guards.collapse import prediction_stats
from .hostmem import reuse_freed_memory
from .methods import METHODS, MethodContext, build_method
from .methods.bn import batchnorm_layers, uses_batch_statistics
from .methods.settings import method_config
from .metrics import (
    BatchTimer,
    ErrorMeter,
    LatencyMeter,
    domain_key,
    group_correct,
    json_safe,
    peak_memory,
    reset_peak_memory,
)
from .models import create_model_from_config
from .pacing import make_pacer
from .render import summary_markdown
from .runfolder import JsonlWriter, RunFolder, config_differences, plain_config, read_jsonl
from .runtime import describe_device, pick_device, rng_state, seed_everything, set_rng_state
from .streams import build_stream, source_class
from .timeliness import TimeMeter, time_summary

__all__ = [
    "CONFIG_FILE",
    "RESULTS_FILE",
    "STATE_FILE",
    "SUMMARY_FILE",
    "SUMMARY_MD",
    "Built",
    "build",
    "config_differences",
    "describe_stream",
    "ended_note",
    "finished_summary",
    "load_summary",
    "pick_device",
    "plain_config",
    "run",
    "seed_everything",
]

CONFIG_FILE, RESULTS_FILE, STATE_FILE = RunFolder.CONFIG, RunFolder.RESULTS, RunFolder.STATE
SUMMARY_FILE, SUMMARY_MD = RunFolder.SUMMARY, RunFolder.SUMMARY_MD
# summary.json "status": the stream ran to its end, or the collapse policy stopped it.
COMPLETE, STOPPED = "complete", "stopped_on_collapse"
# 2: the method interface v2 (registered state, counters inside the method's state_dict).
STATE_VERSION = 2
STATE_KEYS = ("version", "method", "next_batch", "n_lines", "rng")  # what `_Loop.restore` reads from state.pt
AUTO_CHECKPOINT_EVERY = 50  # batches, for streams without domain boundaries
# The loop's time, per part: waiting for the next batch (reading or generating it; on a GPU only the host side of
# generation), moving it to the device in the model's memory format, the adaptation step (device-synchronised),
# the guard's reference forward on checked batches, the results line's statistics (one host sync), writing it, the
# meters and the guard's detectors, the progress bar, and the checkpoints; `other_s` in the summary is what none of
# them covers (resets, hooks, the loop itself).
TIMING_KEYS = (
    "data_s", "input_s", "step_s", "guard_s", "record_s", "write_s", "monitor_s", "progress_s", "checkpoint_s"
)

BatchHook = Callable[[int, dict[str, Any]], None]

# ----------------------------------------------------------------------------------------------- building


@dataclass
class Built:
    """What a config builds: the model on its device, the method that owns it, the stream, and facts about them."""

    model: torch.nn.Module
    info: Any
    method: Any
    stream: Any
    device: torch.device
    multi_severity: bool
    # The guard's frozen reference (a `norm` or `source` method on a copy of the source model), or None.
    reference: Any = None


def build(cfg: Config, *, data: DataLike = None, source: Any = None) -> Built:
    """Model (on the device, channels_last if set), method (configured, compiled if set) and stream of `cfg`.

    data: where the data lives (`DataContext`; a folder = the data root; None = $TTA_SURGICAL_DATA).
    source: an open stream source of kind `cfg.stream.source` (e.g. a `streams.MemorySource` for images held in
        memory); None = open it from `cfg.stream.path` / the data root.
    """
    rt = cfg.runtime
    data = DataContext.of(data).with_workers(rt.num_workers)
    device = pick_device(rt.device)
    model, info = create_model_from_config(cfg.model, data)
    model = model.to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ref_kind = reference_kind(cfg, model)
    ref_model = copy.deepcopy(model) if ref_kind is not None else None  # before the method configures the model
    kind = source_class(cfg.stream.source)
    context = MethodContext(seed=int(rt.seed), source_images=kind.source_samples(data), source_note=kind.samples_note)
    # The method autocasts its own forwards (bf16) and keeps its loss and BN statistics in fp32.
    autocast = torch.bfloat16 if rt.precision == "bf16" else None
    method = build_method(model, cfg.method, cfg.optim, autocast_dtype=autocast, context=context)
    _check_batch_size(cfg, model)
    if rt.compile:
        # In-place compile keeps parameter names (block maps match on them) and the state_dict keys.
        model.compile(mode=rt.compile_mode)
    stream = build_stream(cfg.stream, data=data, device=device, source=source)
    reference = None
    if ref_kind is not None:  # the guard's reference: never compiled, never adapted
        reference = build_method(ref_model, method_config(ref_kind), autocast_dtype=autocast)
    return Built(model, info, method, stream, device, _multi_severity(stream, cfg.stream), reference)


def reference_kind(cfg: Config, model: torch.nn.Module) -> str | None:
    """The guard's reference for `cfg` on `model`: `norm` or `source` (`runtime.guard_reference`, auto = norm where
    the model has BatchNorm layers and the method normalises with test-batch statistics), or None: no guard
    (`on_collapse` off), none asked for, a method that keeps no adapted state (source, norm, LAME: nothing can
    drift, nothing to reset)."""
    rt = cfg.runtime
    if rt.on_collapse == "off" or rt.guard_reference == "none":
        return None
    method = METHODS.get(cfg.method.name)
    stateless = not (method.adapts or method.updates_norm_statistics)
    # Under `fallback` a method that rewrites predictions without state (LAME) gets a reference to fall back to; the
    # references themselves (source, norm) never do.
    if stateless and (rt.on_collapse != "fallback" or cfg.method.name in ("source", "norm")):
        return None
    has_bn, batches = bool(batchnorm_layers(model)), cfg.stream.batch_size >= 2
    kind = rt.guard_reference
    if kind == "auto":  # normalise as the method does: a method on source statistics is judged against the source
        source_stats = getattr(cfg.method, "bn_stats", "batch") == "source"
        kind = "norm" if has_bn and batches and not source_stats else "source"
    elif kind == "norm" and not (has_bn and batches):
        why = "this model has no BatchNorm layer" if not has_bn else "one image per batch gives no batch statistics"
        raise ValueError(
            f"runtime.guard_reference=norm normalises the reference with the test batch's BatchNorm statistics, but "
            f"{why}; use runtime.guard_reference=auto or source"
        )
    return kind


def _check_batch_size(cfg: Config, model: torch.nn.Module) -> None:
    """Batches of one image where BatchNorm normalises with the batch's own statistics: refused, as the Python API
    refuses them (`tta_surgical.adapt`)."""
    if cfg.stream.batch_size < 2 and uses_batch_statistics(model):
        raise ValueError(
            f"stream.batch_size={cfg.stream.batch_size} with method {cfg.method.name}, which normalises with the "
            "BatchNorm statistics of the test batch: one image cannot give them; use stream.batch_size >= 2, or a "
            "method that does not need them (source, lame, memo, rotta)"
        )


# ----------------------------------------------------------------------------------------------- the loop state


@dataclass
class _Tally:
    """Everything the summary is computed from; rebuilt exactly by replaying the results lines on resume."""

    guard: Guard
    errors: ErrorMeter = field(default_factory=ErrorMeter)
    latency: LatencyMeter = field(default_factory=LatencyMeter)
    ledger: Ledger = field(default_factory=Ledger)
    time: TimeMeter = field(default_factory=TimeMeter)
    nonfinite: int = 0
    alarms: list[Alarm] = field(default_factory=list)
    selections: dict[str, int] = field(default_factory=dict)  # `blocks: auto`: "adapted, bn_stats" -> batches
    n_lines: int = 0
    pending_reset: bool = False
    fallback: Fallback | None = None  # `on_collapse: fallback`: whether the next batch is served by the reference

    @property
    def collapses(self) -> list[int]:
        """The batches of the one-class collapse alarms."""
        return [a.batch for a in self.alarms if a.detector == "collapse"]

    def account(self, rec: dict[str, Any], policy: str) -> list[Alarm]:
        """Add one results line; the alarms it raises (then, with policy reset, the next batch resets)."""
        self.n_lines += 1
        self.nonfinite += not rec.get("finite", True)
        by = rec.get("by_domain")
        for k, (c, n) in (by or {rec["domain"]: (rec["correct"], rec["count"])}).items():
            self.errors.update(k, int(c), int(n))
        self.latency.update(float(rec["latency_ms"]), int(rec["count"]), warmup=bool(rec.get("warmup", False)))
        self.ledger.add(rec)
        self.time.update(rec)
        if rec.get("selected") is not None:
            choice = f"{rec['selected']}, {rec['bn_stats']}"
            self.selections[choice] = self.selections.get(choice, 0) + 1
        self.pending_reset = False
        if policy == "off":
            return []
        alarms = self.guard.observe(rec)
        self.alarms += alarms
        self.pending_reset = bool(alarms) and policy in ("reset", "fallback")
        if self.fallback is not None:
            self.fallback.observe(rec, bool(alarms))
        return alarms

    @property
    def serve_reference(self) -> bool:
        """Whether the next batch's served predictions are the reference's (`on_collapse: fallback`, untrusted)."""
        return self.fallback is not None and self.fallback.active


def _guard(cfg: Config, reference: Any) -> Guard:
    rt = cfg.runtime
    collapse = CollapseMonitor(rt.collapse_window, rt.collapse_share, rt.collapse_entropy_ratio)
    drift = DriftMonitor(rt.guard_window, flip=rt.guard_flip) if reference is not None else None
    return Guard(collapse, drift)


def _round(batch: Any, spec: Any) -> int | None:
    """The batch's round for its domain key: only streams with several rounds key their domains per round."""
    return batch.plan.round if spec.rounds > 1 and batch.plan is not None else None


def _segment_ends(plan: list[Any], spec: Any, multi: bool) -> list[bool]:
    """Per planned batch: whether it is the last of its segment (the next batch starts another domain or is reset
    by the stream's policy, or there is none). The collapse monitor judges a segment there (`segment_end`)."""
    keys = [
        (int(p.domain_index), domain_key(p.domain, p.severity, multi, p.round if spec.rounds > 1 else None))
        for p in plan
    ]
    return [
        i + 1 == len(plan) or bool(plan[i + 1].reset_before) or keys[i + 1] != keys[i] for i in range(len(plan))
    ]


def _serve_reference(rec: dict[str, Any], batch: Any, ref_logits: torch.Tensor, spec: Any, multi: bool) -> None:
    """Make `rec` count the reference's predictions as the served ones (`on_collapse: fallback`): `correct` (and
    `by_domain`) become the reference's, the adapted model's count moves to `adapted_correct`; its signals (entropy,
    class shares, `ref_flip`) stay on the line, for the detectors judge the adapted model in the shadow."""
    rec["adapted_correct"] = rec["correct"]
    rec["correct"] = rec["ref_correct"]
    rec["served"] = "reference"
    by_domain = _by_domain(batch, ref_logits, spec, multi)
    if by_domain is not None:
        rec["by_domain"] = by_domain


def _record(batch: Any, logits: torch.Tensor, method: Any, ms: float, spec: Any, multi: bool) -> dict[str, Any]:
    """The results line of one batch: accuracy, the method's report, the collapse statistics, the latency."""
    correct, entropy, top, share, finite = prediction_stats(logits, batch.y)  # one host sync for all of them
    last = method.last
    rec: dict[str, Any] = {
        "batch_index": int(batch.batch_index),
        "domain": domain_key(batch.domain, batch.severity, multi, _round(batch, spec)),
        "severity": int(batch.severity),
        "correct": correct,
        "count": int(logits.shape[0]),
        "loss": last.loss,
        "pred_entropy": entropy,
        "top_class": top,
        "top_class_share": share,
        "latency_ms": round(float(ms), 4),
        "n_skipped": int(method.n_skipped),
        "n_filtered": int(last.n_filtered),
        "method_reset": last.method_reset,
        "reset": bool(batch.reset_before),
        "finite": finite,
    }
    if last.adapted is not None:  # `blocks: auto`: what this batch adapted, with which BatchNorm statistics (not
        # `adapted`: under time pressure that key says whether the batch got an update at all)
        rec["selected"], rec["bn_stats"] = last.adapted, last.bn_stats
    by_domain = _by_domain(batch, logits, spec, multi)
    if by_domain is not None:
        rec["by_domain"] = by_domain
    return json_safe(rec)


def _by_domain(batch: Any, logits: torch.Tensor, spec: Any, multi: bool) -> dict[str, list[int]] | None:
    """(correct, count) per domain of a batch that mixes domains (mixed streams); None for a one-domain batch."""
    keys = _item_keys(batch, spec, multi)
    if keys is None:
        return None
    ok = (logits.argmax(dim=1) == batch.y.to(logits.device)).tolist()
    return {k: list(v) for k, v in group_correct(ok, keys).items()}


# ----------------------------------------------------------------------------------------------- the run


def run(
    cfg: Config,
    out_dir: str | os.PathLike,
    *,
    data: DataLike = None,
    resume: bool = False,
    overwrite: bool = False,
    on_batch: BatchHook | None = None,
    checkpoint_every: int | None = None,
    record_predictions: bool = False,
    source: Any = None,
    on_start: Callable[[Built], None] | None = None,
    continue_after_stop: bool = False,
) -> dict[str, Any]:
    """Run `cfg.method` on `cfg.model` over `cfg.stream`, write results to `out_dir`, return the summary.

    data: where the data lives (`DataContext`; a folder = the data root; None = $TTA_SURGICAL_DATA).
    resume: continue from `out_dir/state.pt` (the config must equal the saved `config.yaml`; a folder with no
        checkpoint starts afresh). A run that has ended (its `summary.json` is written: finished, or stopped by
        `runtime.on_collapse=stop`) is left untouched, byte for byte, and its summary returned (`ended_note` says
        which). Without it, a folder that already holds a run is an error unless `overwrite`.
    continue_after_stop: with `resume`, continue a run that the collapse policy stopped, past the stop.
    on_batch: called as `on_batch(batch_index, record)` after each batch's line is written (progress, tests).
    checkpoint_every: also checkpoint every N batches; None = only at domain boundaries, or every
        `AUTO_CHECKPOINT_EVERY` batches for a stream with none (mixed).
    record_predictions: also store each batch's predicted labels (`"pred"`) in results.jsonl.
    source: an open stream source (e.g. a `streams.MemorySource`), passed to `build`.
    on_start: called with what was built (model, method, stream) before the first batch (the CLI names the stream).
    Raises `runfolder.FolderInUseError` at once when another process is writing `out_dir`.
    """
    folder = RunFolder(out_dir)
    with folder.lock():
        ended = _ended(folder, cfg, resume, continue_after_stop)
        if ended is not None:
            return ended
        checkpoint = _open_folder(folder, cfg, resume, overwrite)
        if cfg.runtime.host_memory == "reuse":
            reuse_freed_memory()
        seed_everything(int(cfg.runtime.seed))
        built = build(cfg, data=data, source=source)
        if not built.stream.plan:
            raise ValueError("the stream is empty: check stream.domains, stream.n_examples and the data")
        if on_start is not None:
            on_start(built)
        loop = _Loop(cfg, folder, built, checkpoint_every, record_predictions, on_batch)
        if checkpoint is not None:
            loop.restore(checkpoint)
            # From here the run is not ended (a stopped run continues past its stop): no summary until it ends.
            folder.clear((SUMMARY_FILE, SUMMARY_MD))
        else:
            folder.write_config(cfg)
            folder.results.write_bytes(b"")
            folder.clear((STATE_FILE, SUMMARY_FILE))
        wall_s = loop.run()
        summary = summarize(cfg, built, loop, wall_s)
        folder.write_summary(summary, summary_markdown(summary))
    return summary


def _stopped(summary: dict[str, Any]) -> bool:
    return summary.get("status") == STOPPED or summary.get("stopped_on_collapse_at_batch") is not None


def _ended(folder: RunFolder, cfg: Config, resume: bool, continue_after_stop: bool) -> dict[str, Any] | None:
    """On resume, the summary of a run that has ended (and must stay as it is), else None (the run goes on)."""
    if not resume:
        return None
    summary = folder.final_summary()
    if summary is None:
        return None
    folder.check_config(cfg)  # resuming with another config is an error, finished or not
    if continue_after_stop and _stopped(summary):
        return None
    return summary


def ended_note(out_dir: str | os.PathLike, continue_after_stop: bool = False) -> str | None:
    """The one line `run --resume` says about a run that has ended and is left as it is; None when it goes on."""
    summary = RunFolder(out_dir).final_summary()
    if summary is None or (continue_after_stop and _stopped(summary)):
        return None
    ran, planned = summary.get("n_batches"), summary.get("n_batches_planned", summary.get("n_batches"))
    if _stopped(summary):
        return (
            f"{out_dir}: the run was stopped on collapse at batch {summary.get('stopped_on_collapse_at_batch')} "
            f"(runtime.on_collapse=stop; {ran} of {planned} batches ran) and is left as it is; to continue past the "
            "stop, add --continue-after-stop to --resume"
        )
    return (
        f"{out_dir}: the run is finished ({ran} batches); nothing to resume, its files are left as they are "
        "(--overwrite runs it again)"
    )


def _open_folder(folder: RunFolder, cfg: Config, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (config and version checked), or None for a fresh run."""
    folder.refuse_existing(resume, overwrite)
    if not resume:
        return None
    checkpoint = folder.load_checkpoint(required=STATE_KEYS)
    if checkpoint is None:
        return None  # nothing to resume: a fresh run
    if not folder.file(CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"cannot resume: {folder.file(CONFIG_FILE)} is missing next to {folder.file(STATE_FILE)}"
        )
    folder.check_config(cfg)
    if checkpoint.get("version") != STATE_VERSION:
        raise ValueError(
            f"{folder.file(STATE_FILE)} has checkpoint version {checkpoint.get('version')}, expected {STATE_VERSION} "
            "(written by another version of tta-surgical); start a new run (--overwrite, or another --out)"
        )
    return checkpoint


class _Loop:
    """The batch loop of one run and its bookkeeping (tally, timing, checkpoints)."""

    def __init__(
        self,
        cfg: Config,
        folder: RunFolder,
        built: Built,
        checkpoint_every: int | None,
        record_predictions: bool,
        on_batch: BatchHook | None,
    ) -> None:
        self.cfg, self.folder, self.built = cfg, folder, built
        self.policy = cfg.runtime.on_collapse
        self.tally = _Tally(_guard(cfg, built.reference))
        if self.policy == "fallback" and built.reference is not None:
            self.tally.fallback = Fallback(self.tally.guard.drift)
        self.guard_every = int(cfg.runtime.guard_every)
        self.start = 0
        self.peak_before = 0.0
        self.resumed = False
        self.record_predictions, self.on_batch = record_predictions, on_batch
        plan = built.stream.plan
        if checkpoint_every is None and len({p.domain_index for p in plan}) <= 1 < len(plan):
            checkpoint_every = AUTO_CHECKPOINT_EVERY  # one segment (a mixed stream) has no domain boundary
        self.checkpoint_every = checkpoint_every
        self.fingerprint = built.stream.fingerprint()
        self.segment_ends = _segment_ends(plan, cfg.stream, built.multi_severity)
        # Where this session's loop time goes (summary `timing_this_session`; the rest is `other_s`). The guard's
        # reference forwards on checked batches are timed apart (guard_s) and counted in the latency.
        self.timing = dict.fromkeys(TIMING_KEYS, 0.0)
        self.stopped_at: int | None = None
        self.cpu_s = 0.0  # CPU time of this process (all its threads) over the loop: the wall time on a busy machine
        self.cpu_step_s = 0.0  # the part of cpu_s spent inside `method.step`: the rest is the engine's own work
        # Time pressure (stream.arrival, update budgets, async adaptation): None = the classic loop, unchanged.
        self.pacer = make_pacer(cfg, built)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Resume: the method, RNGs and position from the checkpoint; meters and monitor from the kept lines."""
        if checkpoint.get("stream_fingerprint") != self.fingerprint:
            raise ValueError(
                f"cannot resume {self.folder.path}: the stream's batch plan differs from the checkpoint's (same "
                "config, other data? check --data-root / stream.path); start a new run in another folder"
            )
        self.built.method.load_state_dict(checkpoint["method"])
        if self.pacer is not None:
            self.pacer.load_state_dict(checkpoint.get("pacer"))
        set_rng_state(checkpoint["rng"])
        self.start = int(checkpoint["next_batch"])
        self.peak_before = float(checkpoint.get("peak_memory_mb", 0.0))
        for rec in read_jsonl(self.folder.results, keep=int(checkpoint["n_lines"])):
            self.tally.account(rec, self.policy)
        self.resumed = True

    def save_checkpoint(self, next_batch: int, writer: JsonlWriter, background: bool = False) -> None:
        """Checkpoint the run before batch `next_batch`; `background`: the disk work overlaps the next batches
        (`RunFolder.save_checkpoint`), `checkpoint_s` then counts only the state's serialisation."""
        t0 = time.perf_counter()
        peak, _ = peak_memory(self.built.device)
        state = {
            "version": STATE_VERSION,
            "method": self.built.method.state_dict(),
            "next_batch": next_batch,
            "n_lines": self.tally.n_lines,
            "rng": rng_state(),
            "peak_memory_mb": max(peak, self.peak_before),
            "stream_fingerprint": self.fingerprint,
        }
        if self.pacer is not None:
            state["pacer"] = self.pacer.state_dict()
        self.folder.save_checkpoint(state, writer, background=background)  # the lines it counts are synced first
        self.timing["checkpoint_s"] += time.perf_counter() - t0

    def _due(self, batch: Any, prev_segment: tuple[int, str] | None, segment: tuple[int, str]) -> bool:
        """A checkpoint before this batch: at a domain boundary (the state now ends the previous domain), or every
        `checkpoint_every` batches."""
        done = batch.batch_index - self.start
        periodic = bool(self.checkpoint_every) and done > 0 and done % self.checkpoint_every == 0
        return (prev_segment is not None and segment != prev_segment) or periodic

    def run(self) -> float:
        """Process the batches from `start` to the end (or to a collapse stop); returns the wall time."""
        built, rt = self.built, self.cfg.runtime
        stream = built.stream
        reset_peak_memory(built.device)
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        bar = _progress(len(stream), self.start, self.cfg.method.name, rt.progress)
        try:
            self._loop(stream, bar)
        except BaseException:
            self.folder.wait_checkpoint(raise_error=False)  # no disk work of this run may outlive its lock
            raise
        finally:
            if self.pacer is not None:  # an update still running in the background ends (or raises) here
                self.pacer.close()
        if bar is not None:
            bar.close()
        self.cpu_s = time.process_time() - t_cpu
        return time.perf_counter() - t_wall

    def _loop(self, stream: Any, bar: Any) -> None:
        built, prev = self.built, None
        with JsonlWriter(self.folder.results) as writer:
            t = time.perf_counter()
            for batch in stream.iter_from(self.start):
                t = self._lap("data_s", t)
                key = domain_key(batch.domain, batch.severity, built.multi_severity, _round(batch, self.cfg.stream))
                segment = (int(batch.domain_index), key)
                if self._due(batch, prev, segment):
                    self.save_checkpoint(batch.batch_index, writer, background=True)
                prev = segment
                rec = self._step(batch, first=batch.batch_index == self.start)
                t = time.perf_counter()
                alarms = self.tally.account(rec, self.policy)
                if alarms:  # on the line too (informative: a replay recomputes them from the signals)
                    rec["alarms"] = [a.detector for a in alarms]
                t = self._lap("monitor_s", t)
                writer.write(rec)
                self._lap("write_s", t)
                for alarm in alarms:
                    self._on_alarm(alarm, rec, bar)
                if bar is not None:
                    t = time.perf_counter()
                    bar.update(1)
                    bar.set_postfix(err=f"{self.tally.errors.online_error():.1f}%", refresh=False)
                    self._lap("progress_s", t)
                if self.on_batch is not None:
                    self.on_batch(int(batch.batch_index), rec)
                if self.stopped_at is not None:
                    break
                t = time.perf_counter()
            end = len(stream) if self.stopped_at is None else self.stopped_at + 1
            self.save_checkpoint(end, writer)  # waits for the one before; on disk when the run returns

    def _step(self, batch: Any, first: bool) -> dict[str, Any]:
        built, rt = self.built, self.cfg.runtime
        reset = bool(batch.reset_before or self.tally.pending_reset)
        if reset and self.pacer is None:
            built.method.reset()
        t = time.perf_counter()
        x = batch.x.to(built.device, non_blocking=True)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._lap("input_s", t)
        cpu = time.process_time()
        if self.pacer is None:
            with BatchTimer(built.device) as timer:
                logits = built.method.step(x)
            ms, timed, report = timer.ms, None, built.method
        else:  # adapt or only predict, as the schedule says (the pacer applies the reset in its place)
            logits, ms, timed, report = self.pacer.run(int(batch.batch_index), x, reset)
        self.cpu_step_s += time.process_time() - cpu
        self.timing["step_s"] += float(ms) / 1000.0
        ref_logits, guard_ms = None, 0.0
        serve_reference = self.tally.serve_reference
        checked = int(batch.batch_index) % self.guard_every == 0 and _adapted(built.method)
        if built.reference is not None and (checked or serve_reference):
            with BatchTimer(built.device) as guard_timer:
                ref_logits = built.reference.step(x)
            guard_ms = float(guard_timer.ms)
            self.timing["guard_s"] += guard_ms / 1000.0
        t = time.perf_counter()
        rec = _record(batch, logits, report, ms + guard_ms, self.cfg.stream, built.multi_severity)
        if ref_logits is not None:
            rec.update(json_safe(reference_stats(logits, ref_logits, batch.y)))
        if serve_reference and ref_logits is not None:
            _serve_reference(rec, batch, ref_logits, self.cfg.stream, built.multi_severity)
            logits = ref_logits
        rec["reset"] = reset
        rec["segment_end"] = self.segment_ends[int(batch.batch_index)]
        rec["warmup"] = first
        if self.record_predictions:
            rec["pred"] = logits.argmax(dim=1).tolist()
        if timed is not None:
            rec.update(timed)
        self._lap("record_s", t)
        return rec

    def _lap(self, key: str, since: float) -> float:
        """Add the time since `since` to `timing[key]`; returns now (the start of the next lap)."""
        now = time.perf_counter()
        self.timing[key] += now - since
        return now

    def _on_alarm(self, alarm: Alarm, rec: dict[str, Any], bar: Any) -> None:
        """Say it on stderr (a progress bar shares stderr: write through it), then act on the policy."""
        action = {
            "warn": "",
            "reset": "; resetting the method",
            "fallback": f"; resetting the method and serving the reference ({_reference_name(self.built)}) until the "
            "adapted model agrees with it again",
            "stop": "; stopping the run",
        }[self.policy]
        what = describe_alarm(alarm, _reference_name(self.built))
        msg = f"warning: {what[0]} suspected at batch {alarm.batch} ({rec['domain']}): {what[1]}"
        msg += f"{action} (runtime.on_collapse={self.policy})"
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)
        if self.policy == "stop":
            self.stopped_at = alarm.batch


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="batch")


# ----------------------------------------------------------------------------------------------- the summary


def summarize(cfg: Config, built: Built, loop: _Loop, wall_s: float) -> dict[str, Any]:
    """The run's summary.json: errors (per domain, mean, online), speed, memory, the method's counters."""
    method, tally, timing = built.method, loop.tally, loop.timing
    peak, peak_kind = peak_memory(built.device)
    lat = tally.latency.summary()
    errors_by_round, online_by_round = tally.errors.by_round()
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "model_pretrained": bool(getattr(built.info, "pretrained", True)),
        "model_warnings": list(getattr(built.info, "warnings", ())),
        "method_warnings": list(method.warnings),
        "adapted_tensors": len(method.params()),
        "adapted_numel": sum(p.numel() for _, p in method.params()),
        "stream": describe_stream(cfg.stream),
        "stream_fingerprint": loop.fingerprint,
        "errors": tally.errors.errors(),
        "mean_error": tally.errors.mean_error(),
        "online_error": tally.errors.online_error(),
        "errors_by_round": errors_by_round,
        "online_errors_by_round": online_by_round,
        "images_per_s": tally.latency.images_per_s(),
        "latency_ms": {k: lat[k] for k in ("p50", "p95", "p99", "mean")},
        "latency_batches": lat["n_batches"],
        "latency_warmup_batches_excluded": lat["n_warmup_batches"],
        "peak_memory_mb": max(peak, loop.peak_before),
        "peak_memory_kind": peak_kind,
        "n_updates": int(method.n_updates),
        "n_skipped_updates": int(method.n_skipped),
        "n_filtered": int(method.n_filtered),
        "n_resets": int(method.n_resets),
        "n_method_resets": int(method.n_method_resets),
        "method_resets_by_kind": dict(sorted(method.method_resets_by_kind.items())),
        "selection_counts": dict(sorted(tally.selections.items())) if tally.selections else None,
        "n_nonfinite_batches": tally.nonfinite,
        "n_collapse_warnings": len(tally.collapses),
        "collapse_batches": list(tally.collapses),
        "on_collapse": cfg.runtime.on_collapse,
        **guard_summary(tally.alarms, tally.ledger, _reference_name(built), cfg.runtime.on_collapse),
        **(tally.fallback.summary() if tally.fallback is not None else {}),
        "stopped_on_collapse_at_batch": loop.stopped_at,
        "status": COMPLETE if loop.stopped_at is None else STOPPED,
        "n_images": tally.errors.n_images,
        "n_batches": tally.n_lines,
        "n_images_planned": built.stream.n_images,
        "n_batches_planned": len(built.stream),
        # segments whose single-image last batch was merged into the previous one (streams.batch_bounds)
        "n_single_image_batches_merged": sum(len(p) > cfg.stream.batch_size for p in built.stream.plan),
        "batch_size": int(cfg.stream.batch_size),
        "device": describe_device(built.device),
        "precision": cfg.runtime.precision,
        "wall_s_this_session": wall_s,
        "cpu_s_this_session": round(loop.cpu_s, 6),
        "cpu_s_step_this_session": round(loop.cpu_step_s, 6),
        "timing_this_session": {
            **{k: round(v, 6) for k, v in timing.items()},
            "other_s": round(max(wall_s - sum(timing.values()), 0.0), 6),
        },
        "resumed_from_batch": loop.start if loop.resumed else None,
        "protocol": _protocol(cfg),
        **time_summary(tally.time, cfg.runtime, loop.pacer.summary() if loop.pacer is not None else None),
        "versions": {"tta_surgical": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    return json_safe(summary)



def _adapted(method: Any) -> bool:
    """Whether the model that predicted may have moved from the source: not while `blocks: auto` serves the source
    model itself (nothing can drift; a `norm` reference would only see label shift there and call it drift)."""
    selector = getattr(method, "selector", None)
    return selector is None or not selector.serving_source()

def _reference_name(built: Built) -> str | None:
    return built.reference.cfg.name if built.reference is not None else None


def _protocol(cfg: Config) -> str:
    """What the stream did while the method was busy: wait (as fast as possible: the classic protocol), realistic,
    queue; async (or `realistic+async`) when predictions never wait for updates."""
    arrival = cfg.stream.arrival
    if not arrival.timed:
        return "async" if cfg.runtime.async_adapt else "wait"
    return f"{arrival.protocol}+async" if cfg.runtime.async_adapt else arrival.protocol


def _item_keys(batch: Any, spec: Any, multi: bool) -> list[str] | None:
    """Per-sample domain names when a batch mixes domains (mixed streams), else None (one domain per batch)."""
    plan = batch.plan
    if plan is None or len(plan.domain_ids) == 0:
        return None
    ids, sev = np.asarray(plan.domain_ids), np.asarray(plan.item_severities)
    if np.all(ids == ids[0]) and np.all(sev == sev[0]):
        return None
    domains, r = tuple(spec.domains), _round(batch, spec)
    return [domain_key(domains[int(i)], int(s), multi, r) for i, s in zip(ids, sev)]


def _multi_severity(stream: Any, spec: Any) -> bool:
    """Whether the stream visits more than one severity (then domains are keyed "<corruption>@<s>")."""
    sev: set[int] = set()
    for p in stream.plan:
        if len(p.item_severities):
            sev.update(int(s) for s in np.unique(np.asarray(p.item_severities)))
        else:
            sev.add(int(p.severity))
    return len(sev or set(spec.severities)) > 1


def describe_stream(spec: Any) -> str:
    """A short human description of the stream spec for tables (the full spec is in config.yaml)."""
    sev = ",".join(map(str, spec.severities))
    return (
        f"{spec.source}, {len(spec.domains)} domains, severity {sev}, {spec.order}, reset {spec.reset}, "
        f"{spec.n_examples or 'all'} images/domain, batch {spec.batch_size}"
        + (f", {spec.rounds} rounds" if spec.rounds > 1 else "")
        + (f", arrival {spec.arrival.describe()}" if spec.arrival.timed else "")
    )


def load_summary(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `summary.json` of a finished run."""
    return RunFolder(out_dir).read_summary()


def finished_summary(folder: Path, cfg: Any) -> dict[str, Any] | None:
    """The summary of a finished run in `folder` made with exactly `cfg`, else None."""
    return RunFolder(folder).finished_with(cfg)
