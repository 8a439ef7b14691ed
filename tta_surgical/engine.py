"""The online test-time adaptation loop: one method over one stream, measured, written as it goes, resumable.

`run(cfg, out_dir)` = lock the run folder (`runfolder`), `build(cfg)` -> (model, method, stream), then for every
batch of the stream, in order: apply the reset policy (the stream's `reset_before`, or a collapse reset), `logits =
method.step(x)` (predict, then adapt; the prediction comes from the same forward as the update), account the
batch and append one JSON line to `results.jsonl`. At every domain boundary (and at the end) the engine makes the
results lines durable and writes a checkpoint `state.pt` atomically, so a crash loses at most the current domain:
`run(..., resume=True)` restores method, optimiser, stream position and RNG states, drops the lines written after
the checkpoint, replays the kept ones into the meters and the collapse monitor, and continues; an interrupted and
resumed run ends with exactly the numbers of an uninterrupted one. `summarize` turns the meters into
`summary.json` / `summary.md`, written when the run ends (at the end of the stream, or where the collapse policy
`stop` stopped it); a run that has ended is left untouched by `resume` (unless `continue_after_stop`).

Files in `out_dir`: `config.yaml` (the resolved config), `results.jsonl`, `state.pt`, `summary.json`,
`summary.md`, `.lock` (the writer lock; see `runfolder`).
"""

from __future__ import annotations

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
from .collapse import CollapseMonitor, batch_prediction_stats
from .config import Config
from .data.context import DataContext, DataLike
from .methods import MethodContext, build_method
from .methods.bn import uses_batch_statistics
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
from .render import summary_markdown
from .runfolder import JsonlWriter, RunFolder, config_differences, plain_config, read_jsonl
from .runtime import describe_device, pick_device, rng_state, seed_everything, set_rng_state
from .streams import build_stream, source_class

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
    return Built(model, info, method, stream, device, _multi_severity(stream, cfg.stream))


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

    monitor: CollapseMonitor
    errors: ErrorMeter = field(default_factory=ErrorMeter)
    latency: LatencyMeter = field(default_factory=LatencyMeter)
    nonfinite: int = 0
    collapses: list[int] = field(default_factory=list)
    selections: dict[str, int] = field(default_factory=dict)  # `blocks: auto`: "adapted, bn_stats" -> batches
    n_lines: int = 0
    pending_reset: bool = False

    def account(self, rec: dict[str, Any], policy: str) -> bool:
        """Add one results line; True when it flags a collapse (then, with policy reset, the next batch resets)."""
        self.n_lines += 1
        self.nonfinite += not rec.get("finite", True)
        by = rec.get("by_domain")
        for k, (c, n) in (by or {rec["domain"]: (rec["correct"], rec["count"])}).items():
            self.errors.update(k, int(c), int(n))
        self.latency.update(float(rec["latency_ms"]), int(rec["count"]), warmup=bool(rec.get("warmup", False)))
        if rec.get("adapted") is not None:
            choice = f"{rec['adapted']}, {rec['bn_stats']}"
            self.selections[choice] = self.selections.get(choice, 0) + 1
        self.pending_reset = False
        if policy == "off" or not self.monitor.observe(rec):
            return False
        self.collapses.append(int(rec["batch_index"]))
        self.pending_reset = policy == "reset"
        return True


def _monitor(cfg: Config) -> CollapseMonitor:
    rt = cfg.runtime
    return CollapseMonitor(rt.collapse_window, rt.collapse_share, rt.collapse_entropy_ratio)


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


def _record(batch: Any, logits: torch.Tensor, method: Any, ms: float, spec: Any, multi: bool) -> dict[str, Any]:
    """The results line of one batch: accuracy, the method's report, the collapse statistics, the latency."""
    correct, entropy, top, share = batch_prediction_stats(logits, batch.y)
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
        "finite": bool(torch.isfinite(logits).all()),
    }
    if last.adapted is not None:  # `blocks: auto`: what this batch adapted, with which BatchNorm statistics
        rec["adapted"], rec["bn_stats"] = last.adapted, last.bn_stats
    keys = _item_keys(batch, spec, multi)
    if keys is not None:
        ok = (logits.argmax(dim=1) == batch.y.to(logits.device)).tolist()
        rec["by_domain"] = {k: list(v) for k, v in group_correct(ok, keys).items()}
    return json_safe(rec)


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
        self.tally = _Tally(_monitor(cfg))
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
        # Where this session's loop time goes: waiting for the next batch (reading or generating it; on a GPU only
        # the host side of generation), the adaptation steps (device-synchronised), and checkpoint writes.
        self.timing = {"data_s": 0.0, "step_s": 0.0, "checkpoint_s": 0.0}
        self.stopped_at: int | None = None

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Resume: the method, RNGs and position from the checkpoint; meters and monitor from the kept lines."""
        if checkpoint.get("stream_fingerprint") != self.fingerprint:
            raise ValueError(
                f"cannot resume {self.folder.path}: the stream's batch plan differs from the checkpoint's (same "
                "config, other data? check --data-root / stream.path); start a new run in another folder"
            )
        self.built.method.load_state_dict(checkpoint["method"])
        set_rng_state(checkpoint["rng"])
        self.start = int(checkpoint["next_batch"])
        self.peak_before = float(checkpoint.get("peak_memory_mb", 0.0))
        for rec in read_jsonl(self.folder.results, keep=int(checkpoint["n_lines"])):
            self.tally.account(rec, self.policy)
        self.resumed = True

    def save_checkpoint(self, next_batch: int, writer: JsonlWriter) -> None:
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
        self.folder.save_checkpoint(state, writer)  # the lines it counts are synced first
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
        t_wall = time.perf_counter()
        prev: tuple[int, str] | None = None
        bar = _progress(len(stream), self.start, self.cfg.method.name, rt.progress)
        with JsonlWriter(self.folder.results) as writer:
            t_ready = time.perf_counter()
            for batch in stream.iter_from(self.start):
                self.timing["data_s"] += time.perf_counter() - t_ready
                key = domain_key(batch.domain, batch.severity, built.multi_severity, _round(batch, self.cfg.stream))
                segment = (int(batch.domain_index), key)
                if self._due(batch, prev, segment):
                    self.save_checkpoint(batch.batch_index, writer)
                prev = segment
                rec = self._step(batch, first=batch.batch_index == self.start)
                writer.write(rec)
                if self.tally.account(rec, self.policy):
                    self._on_collapse(rec, bar)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(err=f"{self.tally.errors.online_error():.1f}%", refresh=False)
                if self.on_batch is not None:
                    self.on_batch(int(batch.batch_index), rec)
                if self.stopped_at is not None:
                    break
                t_ready = time.perf_counter()
            end = len(stream) if self.stopped_at is None else self.stopped_at + 1
            self.save_checkpoint(end, writer)
        if bar is not None:
            bar.close()
        return time.perf_counter() - t_wall

    def _step(self, batch: Any, first: bool) -> dict[str, Any]:
        built, rt = self.built, self.cfg.runtime
        if batch.reset_before or self.tally.pending_reset:
            built.method.reset()
        x = batch.x.to(built.device, non_blocking=True)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with BatchTimer(built.device) as timer:
            logits = built.method.step(x)
        self.timing["step_s"] += float(timer.ms) / 1000.0
        rec = _record(batch, logits, built.method, timer.ms, self.cfg.stream, built.multi_severity)
        rec["reset"] = bool(batch.reset_before or self.tally.pending_reset)
        rec["segment_end"] = self.segment_ends[int(batch.batch_index)]
        rec["warmup"] = first
        if self.record_predictions:
            rec["pred"] = logits.argmax(dim=1).tolist()
        return rec

    def _on_collapse(self, rec: dict[str, Any], bar: Any) -> None:
        """Say it on stderr (a progress bar shares stderr: write through it), then act on the policy."""
        rec_index = int(rec["batch_index"])
        action = {"warn": "", "reset": "; resetting the method", "stop": "; stopping the run"}[self.policy]
        msg = f"warning: collapse suspected at batch {rec_index} ({rec['domain']}): {_evidence(self.tally.monitor)}"
        msg += f"{action} (runtime.on_collapse={self.policy})"
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)
        if self.policy == "stop":
            self.stopped_at = rec_index


def _evidence(monitor: CollapseMonitor) -> str:
    """What the monitor's last flag rested on, in words."""
    f = monitor.last_flag or {}
    scope = "the last" if f.get("over") == "window" else "this domain's"
    return (
        f"over {scope} {f.get('batches')} batches ({f.get('images')} images) class {f.get('top_class')} leads in "
        f"{f.get('batches_with_top_class')} of them and the leading class takes {f.get('mean_share', 0.0):.0%} of "
        f"the predictions, prediction entropy {f.get('mean_entropy', 0.0):.3f} (first batch after the start or "
        f"last reset: {f.get('reference_entropy', 0.0):.3f})"
    )


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
        "timing_this_session": {
            **{k: round(v, 6) for k, v in timing.items()},
            "other_s": round(max(wall_s - sum(timing.values()), 0.0), 6),
        },
        "resumed_from_batch": loop.start if loop.resumed else None,
        "versions": {"tta_surgical": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    return json_safe(summary)


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
    )


def load_summary(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `summary.json` of a finished run."""
    return RunFolder(out_dir).read_summary()


def finished_summary(folder: Path, cfg: Any) -> dict[str, Any] | None:
    """The summary of a finished run in `folder` made with exactly `cfg`, else None."""
    return RunFolder(folder).finished_with(cfg)
