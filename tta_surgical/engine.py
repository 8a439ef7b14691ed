"""The online test-time adaptation loop: one method over one stream, measured, written as it goes, resumable.

`run(cfg, out_dir)` = lock the run folder (`runfolder`), `build(cfg)` -> (model, method, stream), then for every
batch of the stream, in order: apply the reset policy (the stream's `reset_before`, or a collapse reset), `logits =
method.step(x)` (predict, then adapt; the prediction comes from the same forward as the update), account the
batch and append one JSON line to `results.jsonl`. At every domain boundary (and at the end) the engine makes the
results lines durable and writes a checkpoint `state.pt` atomically, so a crash loses at most the current domain:
`run(..., resume=True)` restores method, optimiser, stream position and RNG states, drops the lines written after
the checkpoint, replays the kept ones into the meters and the collapse monitor, and continues; an interrupted and
resumed run ends with exactly the numbers of an uninterrupted one. `summarize` turns the meters into
`summary.json` / `summary.md`.

Files in `out_dir`: `config.yaml` (the resolved config), `results.jsonl`, `state.pt`, `summary.json`,
`summary.md`, `.lock` (the writer lock; see `runfolder`).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .collapse import CollapseMonitor, batch_prediction_stats
from .config import Config
from .corruptions.textures import default_frost_dir
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
from .runfolder import JsonlWriter, RunFolder, config_differences, plain_config
from .runtime import describe_device, pick_device, rng_state, seed_everything, set_rng_state

__all__ = [
    "CONFIG_FILE",
    "RESULTS_FILE",
    "STATE_FILE",
    "SUMMARY_FILE",
    "SUMMARY_MD",
    "Built",
    "build",
    "config_differences",
    "finished_summary",
    "load_summary",
    "pick_device",
    "plain_config",
    "run",
    "seed_everything",
]

CONFIG_FILE, RESULTS_FILE, STATE_FILE = RunFolder.CONFIG, RunFolder.RESULTS, RunFolder.STATE
SUMMARY_FILE, SUMMARY_MD = RunFolder.SUMMARY, RunFolder.SUMMARY_MD
# 2: the method interface v2 (registered state, counters inside the method's state_dict).
STATE_VERSION = 2
AUTO_CHECKPOINT_EVERY = 50  # batches, for streams without domain boundaries

BatchHook = Callable[[int, dict[str, Any]], None]

_SOURCE_NOTE = (
    "source samples are the clean CIFAR-10 *test* images (no source training split was given): the same images "
    "the stream corrupts, so the source statistics are not independent of the test data; set method.source_data "
    "to a CIFAR-10 folder with data_batch_* files for a proper source split"
)


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


def build(
    cfg: Config,
    *,
    data_root: str | os.PathLike | None = None,
    frost_dir: str | os.PathLike | None = None,
    source: Any = None,
) -> Built:
    """Model (on the device, channels_last if set), method (configured, compiled if set) and stream of `cfg`.

    source: an open stream source of kind `cfg.stream.source` (e.g. a `streams.MemorySource` for images held in
        memory); None = open it from `cfg.stream.path` / `data_root`.
    """
    from .methods import MethodContext, build_method
    from .models import create_model_from_config
    from .streams import build_stream

    rt = cfg.runtime
    device = pick_device(rt.device)
    model, info = create_model_from_config(cfg.model, data_root=data_root)
    model = model.to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    context = MethodContext(
        seed=int(rt.seed), source_images=_clean_source_images(cfg, data_root), source_note=_SOURCE_NOTE
    )
    # The method autocasts its own forwards (bf16) and keeps its loss and BN statistics in fp32.
    autocast = torch.bfloat16 if rt.precision == "bf16" else None
    method = build_method(model, cfg.method, cfg.optim, autocast_dtype=autocast, context=context)
    if rt.compile:
        # In-place compile keeps parameter names (block maps match on them) and the state_dict keys.
        model.compile(mode=rt.compile_mode)
    frost_dir = default_frost_dir(frost_dir, data_root)
    stream = build_stream(
        cfg.stream, data_root=data_root, device=device, frost_dir=frost_dir, num_workers=rt.num_workers, source=source
    )
    return Built(model, info, method, stream, device, _multi_severity(stream, cfg.stream))


def _clean_source_images(cfg: Config, data_root: str | os.PathLike | None) -> Callable[[int], tuple[Any, Any]] | None:
    """`n -> (images, labels)`: the first n clean CIFAR-10 test images, for methods that need source samples when
    the user names no source split (read lazily, only if a method asks). None for ImageNet-style streams."""
    if cfg.stream.source not in ("cifar10", "cifar10c"):
        return None

    def load(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from .data.cifar import find_cifar10, load_cifar10

        images, labels = load_cifar10(find_cifar10(data_root))
        x = torch.from_numpy(np.ascontiguousarray(images[:n])).permute(0, 3, 1, 2).float().div_(255.0)
        return x, torch.from_numpy(np.asarray(labels[:n], dtype=np.int64))

    return load


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
    data_root: str | os.PathLike | None = None,
    resume: bool = False,
    frost_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    on_batch: BatchHook | None = None,
    checkpoint_every: int | None = None,
    record_predictions: bool = False,
    source: Any = None,
) -> dict[str, Any]:
    """Run `cfg.method` on `cfg.model` over `cfg.stream`, write results to `out_dir`, return the summary.

    resume: continue from `out_dir/state.pt` (the config must equal the saved `config.yaml`; a folder with no
        checkpoint starts afresh). Without it, a folder that already holds a run is an error unless `overwrite`.
    on_batch: called as `on_batch(batch_index, record)` after each batch's line is written (progress, tests).
    checkpoint_every: also checkpoint every N batches; None = only at domain boundaries, or every
        `AUTO_CHECKPOINT_EVERY` batches for a stream with none (mixed).
    record_predictions: also store each batch's predicted labels (`"pred"`) in results.jsonl.
    source: an open stream source (e.g. a `streams.MemorySource`), passed to `build`.
    Raises `runfolder.FolderInUseError` at once when another process is writing `out_dir`.
    """
    folder = RunFolder(out_dir)
    with folder.lock():
        checkpoint = _open_folder(folder, cfg, resume, overwrite)
        seed_everything(int(cfg.runtime.seed))
        built = build(cfg, data_root=data_root, frost_dir=frost_dir, source=source)
        if not built.stream.plan:
            raise ValueError("the stream is empty: check stream.domains, stream.n_examples and the data")
        loop = _Loop(cfg, folder, built, checkpoint_every, record_predictions, on_batch)
        if checkpoint is not None:
            loop.restore(checkpoint)
        else:
            folder.write_config(cfg)
            folder.results.write_bytes(b"")
            folder.clear((STATE_FILE, SUMMARY_FILE))
        wall_s = loop.run()
        summary = summarize(cfg, built, loop, wall_s)
        from .report import summary_markdown

        folder.write_summary(summary, summary_markdown(summary))
    return summary


def _open_folder(folder: RunFolder, cfg: Config, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (config and version checked), or None for a fresh run."""
    folder.refuse_existing(resume, overwrite)
    if not resume:
        return None
    checkpoint = folder.load_checkpoint()
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
        # Where this session's loop time goes: waiting for the next batch (reading or generating it; on a GPU only
        # the host side of generation), the adaptation steps (device-synchronised), and checkpoint writes.
        self.timing = {"data_s": 0.0, "step_s": 0.0, "checkpoint_s": 0.0}
        self.stopped_at: int | None = None

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Resume: the method, RNGs and position from the checkpoint; meters and monitor from the kept lines."""
        from .runfolder import read_jsonl

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
        rec["warmup"] = first
        if self.record_predictions:
            rec["pred"] = logits.argmax(dim=1).tolist()
        return rec

    def _on_collapse(self, rec: dict[str, Any], bar: Any) -> None:
        rec_index = int(rec["batch_index"])
        action = {"warn": "", "reset": "; resetting the method", "stop": "; stopping the run"}[self.policy]
        msg = (
            f"warning: collapse suspected at batch {rec_index} ({rec['domain']}): {rec['top_class_share']:.0%} of "
            f"the batch predicted as class {rec['top_class']}, prediction entropy {rec['pred_entropy']:.3f}"
            f"{action} (runtime.on_collapse={self.policy})"
        )
        (bar.write if bar is not None else print)(msg)
        if self.policy == "stop":
            self.stopped_at = rec_index


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but progress must never break a run
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
        "stream": _describe_stream(cfg.stream),
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
        "n_images": tally.errors.n_images,
        "n_batches": len(built.stream),
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


def _describe_stream(spec: Any) -> str:
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
