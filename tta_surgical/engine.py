"""The online test-time adaptation loop: one method over one stream, measured, written as it goes, resumable.

For every batch of the stream, in order: apply the reset policy (`batch.reset_before` -> `method.reset()`),
`logits = method.step(x)` (predict, then adapt; the prediction comes from the same forward as the update),
count the correct predictions, and append one JSON line to `results.jsonl`. At every domain boundary (and at
the end) the engine writes a checkpoint `state.pt` atomically, so a crash loses at most the current domain:
`run(..., resume=True)` restores method, optimiser, stream position and RNG states, drops the lines written
after the checkpoint, and continues; an interrupted and resumed run ends with exactly the numbers of an
uninterrupted one.

Files in `out_dir`: `config.yaml` (the resolved config), `results.jsonl`, `state.pt`, `summary.json`,
`summary.md`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import __version__
from .config import Config, dump_yaml, to_dict
from .corruptions.textures import default_frost_dir
from .fileio import atomic_write_bytes, atomic_write_text
from .metrics import (
    BatchTimer,
    ErrorMeter,
    LatencyMeter,
    count_correct,
    domain_key,
    group_correct,
    json_safe,
    peak_memory,
    reset_peak_memory,
)
from .report import summary_markdown

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.jsonl"
STATE_FILE = "state.pt"
SUMMARY_FILE = "summary.json"
SUMMARY_MD = "summary.md"
STATE_VERSION = 1
AUTO_CHECKPOINT_EVERY = 50  # batches, for streams without domain boundaries

# Config keys that may differ between a run and its resumption: they change how the run executes, not what it
# computes (memory layout, compilation and optimiser kernels move results by floating-point rounding only).
_RESUME_IGNORED = {
    "runtime.progress",
    "runtime.channels_last",
    "runtime.compile",
    "runtime.compile_mode",
    "runtime.num_workers",
    "optim.implementation",
}

BatchHook = Callable[[int, dict[str, Any]], None]


# ----------------------------------------------------------------------------------------------- helpers


def pick_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA device is available; use cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed every RNG a method might draw from (torch CPU and CUDA, NumPy, Python)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values, so the checkpoint loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, tuple):
        d = list(d)
    return {prefix[:-1]: d}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (ignoring keys that change no number)."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in _RESUME_IGNORED:
            continue
        if _normalise(a.get(k, "<missing>")) != _normalise(b.get(k, "<missing>")):
            diffs.append(f"{k}: saved {a.get(k, '<missing>')!r}, now {b.get(k, '<missing>')!r}")
    return diffs


def _normalise(v: Any) -> Any:
    """YAML round trips turn tuples into lists; compare them as such."""
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    return v


def plain_config(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML types (what config.yaml holds after a round trip), for comparisons."""
    return yaml.safe_load(yaml.safe_dump(_normalise_tree(to_dict(cfg)), sort_keys=False))


def _normalise_tree(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _normalise_tree(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_normalise_tree(v) for v in d]
    return d


def _truncate_lines(path: Path, n_lines: int) -> list[dict[str, Any]]:
    """Keep the first `n_lines` lines of a JSONL file (drop what came after the checkpoint); return them."""
    if not path.is_file():
        if n_lines:
            raise OSError(f"{path} is missing but the checkpoint expects {n_lines} result lines; start a fresh run")
        path.touch()
        return []
    with open(path, "rb") as f:
        *raw, _torn = f.read().split(b"\n")  # after the last newline: half a line from a killed writer, or nothing
    kept = [line for line in raw if line.strip()][:n_lines]
    if len(kept) < n_lines:
        raise OSError(f"{path} holds {len(kept)} complete lines but the checkpoint expects {n_lines}; start afresh")
    atomic_write_bytes(path, lambda f: f.write(b"".join(line + b"\n" for line in kept)))
    return [json.loads(line) for line in kept]


def _item_keys(batch: Any, spec: Any, multi: bool) -> list[str] | None:
    """Per-sample domain names when a batch mixes domains (mixed streams), else None (one domain per batch)."""
    plan = getattr(batch, "plan", None)
    ids = getattr(plan, "domain_ids", None)
    sev = getattr(plan, "item_severities", None)
    if plan is None or ids is None or len(ids) == 0:
        return None
    ids = np.asarray(ids)
    sev = np.asarray(sev) if sev is not None else np.full(len(ids), batch.severity)
    if np.all(ids == ids[0]) and np.all(sev == sev[0]):
        return None
    domains = tuple(spec.domains)
    return [domain_key(domains[int(i)], int(s), multi) for i, s in zip(ids, sev)]


def _multi_severity(stream: Any, spec: Any) -> bool:
    """Whether the stream visits more than one severity (then domains are keyed "<corruption>@<s>")."""
    sev: set[int] = set()
    for p in getattr(stream, "plan", []) or []:
        items = getattr(p, "item_severities", None)
        if items is not None and len(items):
            sev.update(int(s) for s in np.unique(np.asarray(items)))
        else:
            sev.add(int(p.severity))
    if not sev:
        sev = {int(s) for s in getattr(spec, "severities", (0,))}
    return len(sev) > 1


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
) -> dict[str, Any]:
    """Run `cfg.method` on `cfg.model` over `cfg.stream`, write results to `out_dir`, return the summary.

    resume: continue from `out_dir/state.pt` (the config must equal the saved `config.yaml`; a folder with no
        checkpoint starts afresh). Without it, a folder that already holds a run is an error unless `overwrite`.
    on_batch: called as `on_batch(batch_index, record)` after each batch's line is written (progress, tests).
    checkpoint_every: also checkpoint every N batches; None = only at domain boundaries, or every
        `AUTO_CHECKPOINT_EVERY` batches for a stream with none (mixed).
    record_predictions: also store each batch's predicted labels (`"pred"`) in results.jsonl.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path, results_path, config_path = out / STATE_FILE, out / RESULTS_FILE, out / CONFIG_FILE
    cfg_plain = plain_config(cfg)

    checkpoint: dict[str, Any] | None = None
    if resume and state_path.is_file():
        if not config_path.is_file():
            raise FileNotFoundError(f"cannot resume: {config_path} is missing next to {state_path}")
        with open(config_path) as f:
            saved = yaml.safe_load(f)
        diffs = config_differences(saved, cfg_plain)
        if diffs:
            raise ValueError(
                f"cannot resume {out}: the config differs from the saved {config_path}:\n  "
                + "\n  ".join(diffs)
                + "\nrun with the saved config, or choose another --out to start a new run"
            )
        checkpoint = torch.load(state_path, map_location="cpu", weights_only=True)
        if checkpoint.get("version") != STATE_VERSION:
            raise ValueError(
                f"{state_path} has checkpoint version {checkpoint.get('version')}, expected {STATE_VERSION}"
            )
    elif resume:
        print(f"note: no checkpoint in {out}; starting a fresh run")
    elif not overwrite and any((out / n).exists() for n in (RESULTS_FILE, STATE_FILE, SUMMARY_FILE)):
        raise FileExistsError(
            f"{out} already holds a run; pass resume=True (--resume) to continue it, overwrite=True to replace it, "
            "or choose another output folder"
        )

    rt = cfg.runtime
    device = pick_device(rt.device)
    seed_everything(int(rt.seed))
    if rt.precision not in ("fp32", "bf16"):
        raise ValueError(f"runtime.precision must be fp32 or bf16, got {rt.precision!r}")
    autocast_dtype = torch.bfloat16 if rt.precision == "bf16" else None

    # Imported here so that `import tta_surgical.engine` stays light for the CLI's --help.
    from .methods import build_method
    from .models import create_model
    from .streams import build_stream

    model, info = create_model(
        cfg.model.name, pretrained=cfg.model.pretrained, data_root=data_root, allow_random=cfg.model.allow_random
    )
    model = model.to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The method autocasts its own forwards (bf16) and keeps its loss and BN statistics in fp32.
    method = build_method(model, cfg.method, cfg.optim, autocast_dtype=autocast_dtype)
    if rt.compile:
        # In-place compile keeps parameter names (block maps match on them) and the state_dict keys.
        model.compile(mode=rt.compile_mode)
    frost_dir = default_frost_dir(frost_dir, data_root)
    stream = build_stream(
        cfg.stream, data_root=data_root, device=device, frost_dir=frost_dir, num_workers=rt.num_workers
    )
    n_batches = len(stream)
    multi = _multi_severity(stream, cfg.stream)
    if checkpoint_every is None and len({p.domain_index for p in stream.plan}) <= 1 < n_batches:
        # One segment (a mixed stream) has no domain boundary: checkpoint periodically instead.
        checkpoint_every = AUTO_CHECKPOINT_EVERY

    fingerprint = stream.fingerprint() if hasattr(stream, "fingerprint") else None
    errors, latency = ErrorMeter(), LatencyMeter()
    totals = {"nonfinite": 0}
    start = 0
    peak_before = 0.0
    if checkpoint is not None:
        if checkpoint.get("stream_fingerprint") != fingerprint:
            raise ValueError(
                f"cannot resume {out}: the stream's batch plan differs from the checkpoint's (same config, other "
                "data? check --data-root / stream.path); start a new run in another folder"
            )
        method.load_state_dict(checkpoint["method"])
        if hasattr(method, "n_skipped") and "n_skipped" in checkpoint:
            try:
                method.n_skipped = int(checkpoint["n_skipped"])
            except AttributeError:  # a read-only property restored by load_state_dict
                pass
        _set_rng_state(checkpoint["rng"])
        start = int(checkpoint["next_batch"])
        peak_before = float(checkpoint.get("peak_memory_mb", 0.0))
        for rec in _truncate_lines(results_path, int(checkpoint["n_lines"])):
            _account(rec, errors, latency, totals)
        n_lines = int(checkpoint["n_lines"])
    else:
        dump_yaml(cfg, config_path)
        results_path.write_bytes(b"")
        state_path.unlink(missing_ok=True)
        (out / SUMMARY_FILE).unlink(missing_ok=True)
        n_lines = 0

    # Where this session's loop time goes (summary["timing_this_session"]): waiting for the next batch (reading
    # or generating it; on a GPU only the host side of generation, the queued kernels finish inside the next
    # synchronised timer), the adaptation steps (BatchTimer), and checkpoint writes. The rest is bookkeeping.
    timing = {"data_s": 0.0, "step_s": 0.0, "checkpoint_s": 0.0}

    def save_checkpoint(next_batch: int) -> None:
        t_ckpt = time.perf_counter()
        peak, _ = peak_memory(device)
        state = {
            "version": STATE_VERSION,
            "method": method.state_dict(),
            "n_skipped": int(getattr(method, "n_skipped", 0)),
            "next_batch": next_batch,
            "n_lines": n_lines,
            "rng": _rng_state(),
            "peak_memory_mb": max(peak, peak_before),
            "stream_fingerprint": fingerprint,
        }
        atomic_write_bytes(state_path, lambda f: torch.save(state, f))
        timing["checkpoint_s"] += time.perf_counter() - t_ckpt

    reset_peak_memory(device)
    t_wall = time.perf_counter()
    prev_segment: tuple[int, str] | None = None
    first_in_process = True
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but progress must never break a run
        tqdm = None
    bar = (
        tqdm(total=n_batches, initial=start, desc=f"{cfg.method.name}", unit="batch", disable=not rt.progress)
        if tqdm is not None
        else None
    )
    batches: Iterator[Any] = stream.iter_from(start) if start else iter(stream)
    with open(results_path, "a", encoding="utf-8") as results, _closing(bar):
        t_ready = time.perf_counter()
        for batch in batches:
            timing["data_s"] += time.perf_counter() - t_ready
            segment = (int(getattr(batch, "domain_index", 0)), domain_key(batch.domain, batch.severity, multi))
            # A domain boundary: the state now is the end of the previous domain; checkpoint it before going on.
            boundary = prev_segment is not None and segment != prev_segment
            done = batch.batch_index - start
            periodic = bool(checkpoint_every) and done > 0 and done % checkpoint_every == 0
            if boundary or periodic:
                save_checkpoint(batch.batch_index)
            prev_segment = segment

            if batch.reset_before:
                method.reset()
            x = batch.x.to(device, non_blocking=True)
            if rt.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with BatchTimer(device) as timer:
                logits = method.step(x)
            timing["step_s"] += float(timer.ms) / 1000.0
            ok = count_correct(logits.float(), batch.y)
            item_keys = _item_keys(batch, cfg.stream, multi)
            key = domain_key(batch.domain, batch.severity, multi)
            loss = getattr(method, "last_loss", None)
            rec: dict[str, Any] = {
                "batch_index": int(batch.batch_index),
                "domain": key,
                "severity": int(batch.severity),
                "correct": int(ok.sum().item()),
                "count": int(ok.numel()),
                "loss": None if loss is None or not math.isfinite(float(loss)) else float(loss),
                "latency_ms": round(float(timer.ms), 4),
                "n_skipped": int(getattr(method, "n_skipped", 0)),
                "reset": bool(batch.reset_before),
                "warmup": first_in_process,
                "finite": bool(torch.isfinite(logits).all()),
            }
            if record_predictions:
                rec["pred"] = logits.argmax(dim=1).tolist()
            if item_keys is not None:
                rec["by_domain"] = {k: list(v) for k, v in group_correct(ok.tolist(), item_keys).items()}
            results.write(json.dumps(rec) + "\n")
            results.flush()
            n_lines += 1
            _account(rec, errors, latency, totals)
            first_in_process = False
            if bar is not None:
                bar.update(1)
                bar.set_postfix(err=f"{errors.online_error():.1f}%", refresh=False)
            if on_batch is not None:
                on_batch(int(batch.batch_index), rec)
            t_ready = time.perf_counter()
    save_checkpoint(n_batches)
    wall_s = time.perf_counter() - t_wall

    peak, peak_kind = peak_memory(device)
    lat = latency.summary()
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "model_pretrained": bool(getattr(info, "pretrained", True)),
        "model_warnings": list(getattr(info, "warnings", ())),
        "adapted_tensors": len(method.params()) if hasattr(method, "params") else None,
        "adapted_numel": sum(p.numel() for _, p in method.params()) if hasattr(method, "params") else None,
        "stream": _describe_stream(cfg.stream),
        "stream_fingerprint": fingerprint,
        "errors": errors.errors(),
        "mean_error": errors.mean_error(),
        "online_error": errors.online_error(),
        "images_per_s": latency.images_per_s(),
        "latency_ms": {k: lat[k] for k in ("p50", "p95", "p99", "mean")},
        "latency_batches": lat["n_batches"],
        "latency_warmup_batches_excluded": lat["n_warmup_batches"],
        "peak_memory_mb": max(peak, peak_before),
        "peak_memory_kind": peak_kind,
        "n_skipped_updates": int(getattr(method, "n_skipped", 0)),
        "n_nonfinite_batches": totals["nonfinite"],
        "n_images": errors.n_images,
        "n_batches": n_batches,
        "batch_size": int(getattr(cfg.stream, "batch_size", 0)),
        "device": _device_name(device),
        "precision": rt.precision,
        "wall_s_this_session": wall_s,
        "timing_this_session": {
            **{k: round(v, 6) for k, v in timing.items()},
            "other_s": round(max(wall_s - sum(timing.values()), 0.0), 6),
        },
        "resumed_from_batch": start if checkpoint is not None else None,
        "versions": {"tta_surgical": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    summary = json_safe(summary)
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / SUMMARY_MD, summary_markdown(summary))
    return summary


@contextmanager
def _closing(bar: Any) -> Iterator[None]:
    try:
        yield
    finally:
        if bar is not None:
            bar.close()


def _account(rec: dict[str, Any], errors: ErrorMeter, latency: LatencyMeter, totals: dict[str, int]) -> None:
    """Add one result line to the accumulators (used live and when replaying lines on resume)."""
    totals["nonfinite"] += not rec.get("finite", True)
    by = rec.get("by_domain")
    if by:
        for k, (c, n) in by.items():
            errors.update(k, int(c), int(n))
    else:
        errors.update(rec["domain"], int(rec["correct"]), int(rec["count"]))
    latency.update(float(rec["latency_ms"]), int(rec["count"]), warmup=bool(rec.get("warmup", False)))


def _describe_stream(spec: Any) -> str:
    """A short human description of the stream spec for tables (the full spec is in config.yaml)."""
    sev = ",".join(map(str, getattr(spec, "severities", ())))
    n = getattr(spec, "n_examples", None)
    return (
        f"{spec.source}, {len(spec.domains)} domains, severity {sev}, {spec.order}, reset {spec.reset}, "
        f"{n or 'all'} images/domain, batch {spec.batch_size}"
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_summary(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `summary.json` of a finished run."""
    path = Path(out_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SUMMARY_FILE} in {out_dir}: the run has not finished (resume it with --resume)")
    with open(path) as f:
        return json.load(f)


def finished_summary(folder: Path, cfg: Any) -> dict[str, Any] | None:
    """The summary of a finished run in `folder` made with exactly `cfg`, else None."""
    if not ((folder / SUMMARY_FILE).is_file() and (folder / CONFIG_FILE).is_file()):
        return None
    with open(folder / CONFIG_FILE) as f:
        saved = yaml.safe_load(f)
    if config_differences(saved, plain_config(cfg)):
        return None
    with open(folder / SUMMARY_FILE) as f:
        return json.load(f)
