"""End-to-end wall time of a whole continual corruption stream, per method (`benchmarks/stream_timing.py`).

Scenarios (continual: the corruptions follow each other at severity 5 and the model is never reset):
- `cifar`: the clean CIFAR-10 test set corrupted on the fly on the device by the package's engine (stream source
  `cifar10`), the 15 benchmark corruptions x 10,000 images, batch 200, the pretrained resnet20
  (`streams/cifar10c_continual.yaml`). Target on an H100: under 10 s for the whole stream.
- `imagenet`: 224x224 images corrupted on the fly (stream source `imagenet`: a folder `<root>/<class>/*.jpg` read
  by DataLoader workers, JPEGs decoded on the GPU when nvjpeg works, resized to 256 and center-cropped to 224,
  then corrupted on the device with the ImageNet severity table). Images: `image_folder`, else
  `<data-root>/imagenet/val` when present, else the CIFAR-10 test images upsampled (bicubic) to 256x256 and
  written once as JPEGs under `<out>/images/` (staging time reported apart, not in the stream). resnet50,
  ImageNet weights when available, else random init (`model.allow_random`); Tent's ImageNet optimiser (SGD,
  lr 0.00025, momentum 0.9). With the staged CIFAR images the labels are CIFAR classes 0..9, so the error of a
  1000-class model is not meaningful there (the JSON says so): those runs are for timing only.

Every method (a bench label, `tta_surgical.bench.labels`, that the engine runs; or a run config YAML path) runs
through `tta_surgical.engine.run` on the identical stream (same seed, same plan fingerprint). Per method:
- stream_s: the engine's own wall time of its batch loop and final checkpoint (`summary.wall_s_this_session`),
  split by the engine (`summary.timing_this_session`) into
  - step_s: the adaptation steps (sum of the device-synchronised per-batch `BatchTimer` latencies),
  - data_s: waiting for the next batch (reading / decoding / corruption generation, including the DataLoader
    workers' start-up before the first batch; on a GPU only the host side of queued kernels),
  - checkpoint_s: the checkpoints written at domain boundaries and at the end (with fsync),
  - other_s: the rest (copies to the device, prediction counting with one `.item()` per batch, which also
    synchronises the device, result lines, progress bar);
  the separate `data only` pass (the same stream iterated with no model) shows the data cost alone;
- total_s: the whole `run()` call between two device synchronisations (adds model and weights loading, the
  clean set to the device, the final checkpoint and summary files);
- images/s (images / stream_s), the error, and ratios of stream_s (and step_s) to the `source` run of the same
  invocation (`source` is always run, first, because it is the baseline).
Untimed warm-up first (`warmup`, default on): one batch of every corruption through the data path (caches such
as the frost textures), then every method on two batches (lazy CUDA / cuDNN initialisation, compilation).
Writes `<out>/<scenario>.json` and `.md`; each engine run's folder is `<out>/<scenario>/runs/<method>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tta_surgical import engine
from tta_surgical.bench.labels import (
    SURGICAL_BLOCK1,
    baseline_first,
    parse_method,
    registered_labels,
    safe_label,
    valid_labels,
)
from tta_surgical.config import Config, apply_overrides, load_config
from tta_surgical.data.context import DataContext
from tta_surgical.fileio import atomic_write_text
from tta_surgical.metrics import json_safe
from tta_surgical.provenance import provenance
from tta_surgical.streams import StreamSpec, build_stream, open_source
from tta_surgical.tables import fmt, markdown_table

__all__ = [
    "SCENARIOS",
    "STREAM_METHODS",
    "Scenario",
    "StreamPlan",
    "StreamTimingOptions",
    "add_ratios",
    "build_config",
    "plan_stream_timing",
    "run_stream_timing",
    "shorten",
    "stream_markdown",
    "stage_cifar_images",
    "resolve_method",
]

# The stream timing divides by the unadapted `source` model's times; it times the methods the engine runs.
STREAM_BASELINE = "source"
STREAM_METHODS = baseline_first((*registered_labels(), SURGICAL_BLOCK1), STREAM_BASELINE)
STREAMS_DIR = Path(__file__).resolve().parents[2] / "streams"  # the checkout's stream scenarios
TARGET_S = 10.0  # issue 5: the full continual CIFAR-10-C stream with resnet20 on an H100
STAGE_QUALITY = 90  # JPEG quality of the staged CIFAR images (ImageNet val files are ~quality 90-96)
FULL_CIFAR = ("resnet20", 15, (0, 10000))  # model, corruptions, images per corruption of the target's stream


@dataclasses.dataclass(frozen=True)
class Scenario:
    """The defaults of one scenario: which stream file, model, batch size, images per corruption, optimiser."""

    stream_yaml: Path
    model: str
    batch_size: int
    n_per_corruption: int
    allow_random: bool
    overrides: tuple[str, ...] = ()


SCENARIOS: dict[str, Scenario] = {
    "cifar": Scenario(STREAMS_DIR / "cifar10c_continual.yaml", "resnet20", 200, 10000, allow_random=False),
    "imagenet": Scenario(
        STREAMS_DIR / "imagenetc_continual.yaml",
        "resnet50",
        64,
        5000,  # the common 5,000-image ImageNet-C evaluation size
        allow_random=True,
        # Source `imagenet`: clean images corrupted on the fly; Tent's ImageNet optimiser (SGD 0.00025, momentum 0.9).
        overrides=(
            "stream.source=imagenet",
            "stream.per_class=0",
            "optim.name=sgd",
            "optim.lr=0.00025",
            "optim.momentum=0.9",
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class StreamTimingOptions:
    """One stream-timing invocation (the options of `benchmarks/stream_timing.py`; None = the scenario's default).

    `corruptions` None = the 15 benchmark corruptions; `n_per_corruption` 0 = all available; `overrides` are
    extra dotted config overrides applied to every method; `channels_last` / `compile` None keep the config's.
    """

    scenario: str = "cifar"
    methods: tuple[str, ...] = STREAM_METHODS
    corruptions: tuple[str, ...] | None = None
    n_per_corruption: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    model: str | None = None
    pretrained: bool = True
    image_size: int = 224
    image_folder: str | None = None
    data_root: str | None = None
    frost_dir: str | None = None
    seed: int = 0
    channels_last: bool | None = None
    compile: bool | None = None
    overrides: tuple[str, ...] = ()
    warmup: bool = True
    data_pass: bool = True
    repeats: int = 1
    keep_state: bool = False
    out: str | os.PathLike = Path("runs") / "stream_timing"
    command: str = ""  # how it was invoked, recorded in the JSON (default: this process's argv)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; valid: {', '.join(SCENARIOS)}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        for label in self.labels():
            resolve_method(label)  # unknown methods fail before anything runs

    def labels(self) -> tuple[str, ...]:
        """The methods to time, `source` first (every ratio divides by it), duplicates removed."""
        return baseline_first(self.methods, STREAM_BASELINE)


def resolve_method(label: str) -> tuple[Path | None, Any]:
    """A method of the stream timing -> (run config YAML, None) for a path, else (None, the label's method config)."""
    path = Path(label)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"method config {path} does not exist")
        return path, None
    try:
        ms = parse_method(label)
    except ValueError as err:
        raise ValueError(f"{err}; or a path to a run config YAML") from None
    if ms.kind != "method":
        raise ValueError(
            f"method {label!r} is a bench-only baseline that the engine does not run; valid: {valid_labels()}"
        )
    return None, ms.cfg


def build_config(
    opts: StreamTimingOptions, label: str, *, domains: list[str], n: int, image_path: str | None
) -> Config:
    """The run config of the method `label` on the scenario's stream, with this invocation's options."""
    scenario = SCENARIOS[opts.scenario]
    on = {True: "true", False: "false"}
    overrides = [
        *scenario.overrides,
        f"stream.domains=[{','.join(domains)}]",
        "stream.severities=[5]",
        "stream.reset=never",
        f"stream.n_examples={n}",
        f"stream.batch_size={opts.batch_size or scenario.batch_size}",
        f"stream.seed={opts.seed}",
        f"model.name={opts.model or scenario.model}",
        f"model.pretrained={on[opts.pretrained]}",
        f"model.allow_random={on[scenario.allow_random]}",
        f"runtime.device={opts.device}",
        f"runtime.seed={opts.seed}",
        "runtime.progress=false",
    ]
    if opts.scenario == "imagenet":
        overrides.append(f"stream.image_size={opts.image_size}")
    if opts.channels_last is not None:
        overrides.append(f"runtime.channels_last={on[opts.channels_last]}")
    if opts.compile is not None:
        overrides.append(f"runtime.compile={on[opts.compile]}")
    path, method = resolve_method(label)
    cfg = load_config(path, stream=scenario.stream_yaml, overrides=overrides)
    if method is not None:
        cfg = dataclasses.replace(cfg, method=method)
    cfg = apply_overrides(cfg, opts.overrides)
    if image_path is not None:  # set here, not as an override: a path is not always valid YAML
        cfg = dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, path=image_path))
    return cfg


def shorten(cfg: Config, n_batches: int, domains: int) -> Config:
    """The same config on a short stream (the first `domains` corruptions, `n_batches` batches each): warm-up."""
    spec = cfg.stream
    n = min(spec.n_examples or spec.batch_size * n_batches, spec.batch_size * n_batches)
    return dataclasses.replace(cfg, stream=dataclasses.replace(spec, domains=spec.domains[:domains], n_examples=n))


# ----------------------------------------------------------------------------------------------------- images


def stage_cifar_images(data_root: str | None, folder: Path, n: int, size: int) -> tuple[Path, float]:
    """Write the first `n` CIFAR-10 test images, upsampled (bicubic) to size x size, as JPEGs in class folders.

    Layout `<folder>/class<k>/<index>.jpg`, the layout the stream source `imagenet` reads (labels = sorted folder
    order = CIFAR labels). Reused when a complete staging with at least `n` images of this size exists (a
    `staged.json` written last marks it complete). Returns (folder, seconds spent staging; 0 when reused).
    """
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg, write_file

    marker = folder / "staged.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("size") == size and meta.get("n", 0) >= n and meta.get("quality") == STAGE_QUALITY:
            return folder, 0.0
    t0 = time.perf_counter()
    source = open_source(StreamSpec(source="cifar10"), data_root)  # the CIFAR-10 test set, as a run reads it
    images, labels = source.images, source.labels
    if n > len(images):
        raise ValueError(
            f"the CIFAR-10 test set has {len(images)} images, fewer than --n-per-corruption {n}; lower it or give "
            "--image-folder with more images"
        )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for k in sorted(set(labels[:n].tolist())):
        (tmp / f"class{k:02d}").mkdir(parents=True)
    chunk = 256
    for a in range(0, n, chunk):
        x = torch.from_numpy(images[a : min(a + chunk, n)]).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).round_().clamp_(0, 255)
        for i, img in enumerate(x.to(torch.uint8)):
            write_file(
                str(tmp / f"class{int(labels[a + i]):02d}" / f"{a + i:05d}.jpg"), encode_jpeg(img, STAGE_QUALITY)
            )
    (tmp / "staged.json").write_text(json.dumps({"n": n, "size": size, "quality": STAGE_QUALITY, "from": "cifar10"}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder, time.perf_counter() - t0


def clean_images(opts: StreamTimingOptions, data_root: str | None, n: int) -> dict[str, Any]:
    """Where the `imagenet` scenario's clean images come from: `image_folder`, <data-root>/imagenet/val, or staged."""
    from tta_surgical.data.imagenet import resize_size

    if opts.image_folder:
        path, kind = Path(opts.image_folder).expanduser(), "image folder (--image-folder)"
    elif data_root and (Path(data_root) / "imagenet" / "val").is_dir():
        path, kind = Path(data_root) / "imagenet" / "val", "<data-root>/imagenet/val"
    else:
        size = resize_size(opts.image_size)
        n_stage = n if n > 0 else 10000  # 0 = all: the whole CIFAR-10 test set
        staged = Path(opts.out) / "images" / f"cifar10_test_{size}px"
        folder, secs = stage_cifar_images(data_root, staged, n_stage, size)
        return {
            "path": str(folder),
            "kind": f"CIFAR-10 test images upsampled (bicubic) to {size}x{size}, JPEG quality {STAGE_QUALITY}, "
            f"then resized to {size} and center-cropped to {opts.image_size} by the stream",
            "labels_meaningful": False,
            "staging_s": secs,
        }
    return {"path": str(path), "kind": kind, "labels_meaningful": True, "staging_s": 0.0}


# ----------------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_data_only(cfg: Config, data_root: str | None, frost_dir: Any, device: torch.device) -> dict[str, Any]:
    """Iterate the stream with no model (corruption generation, reading, copies only), device-synchronised."""
    _sync(device)
    t0 = time.perf_counter()
    stream = build_stream(cfg.stream, data=DataContext.resolve(data_root, frost_dir), device=device)
    _sync(device)
    t1 = time.perf_counter()
    n = 0
    for batch in stream:
        x = batch.x.to(device, non_blocking=True)
        n += int(x.shape[0])
    _sync(device)
    t2 = time.perf_counter()
    return {
        "build_s": t1 - t0,
        "stream_s": t2 - t1,
        "images": n,
        "n_batches": len(stream),
        "images_per_s": n / (t2 - t1) if t2 > t1 else None,
        "fingerprint": stream.fingerprint(),
    }


def time_method(
    cfg: Config, out_dir: Path, data_root: str | None, frost_dir: Any, device: torch.device, *, keep_state: bool
) -> dict[str, Any]:
    """One engine run of `cfg` into `out_dir`, timed and broken down (see the module docstring)."""
    _sync(device)
    t0 = time.perf_counter()
    summary = engine.run(cfg, out_dir, data=DataContext.resolve(data_root, frost_dir), overwrite=True)
    _sync(device)
    total_s = time.perf_counter() - t0
    if not keep_state:  # after the clock: a resnet50 checkpoint is ~100-300 MB per run, results stay
        (out_dir / engine.STATE_FILE).unlink(missing_ok=True)
    text = (out_dir / engine.RESULTS_FILE).read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    stream_s = float(summary["wall_s_this_session"])
    timing = summary["timing_this_session"]  # the engine's own breakdown of stream_s
    step_s, checkpoint_s, data_s = float(timing["step_s"]), float(timing["checkpoint_s"]), float(timing["data_s"])
    images = sum(int(r["count"]) for r in lines)
    copied = ("online_error", "mean_error", "errors", "latency_ms", "peak_memory_mb", "peak_memory_kind")
    copied += ("adapted_tensors", "adapted_numel", "model_pretrained", "stream_fingerprint", "device")
    return {
        "method": cfg.method.name,
        "blocks": list(getattr(cfg.method, "blocks", ())),
        "kind": getattr(cfg.method, "kind", None),
        "optim": f"{cfg.optim.name} lr {cfg.optim.lr:g}",
        "total_s": total_s,
        "setup_s": total_s - stream_s,
        "stream_s": stream_s,
        "step_s": step_s,
        "checkpoint_s": checkpoint_s,
        "data_s": data_s,
        "other_s": stream_s - step_s - checkpoint_s - data_s,
        "first_batch_step_ms": float(lines[0]["latency_ms"]) if lines else None,
        "images": images,
        "n_batches": len(lines),
        "images_per_s": images / stream_s if stream_s > 0 else None,
        "step_images_per_s": images / step_s if step_s > 0 else None,
        **{key: summary[key] for key in copied},
        "out_dir": str(out_dir),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the (lower) median stream time, with every repeat's stream and total time attached."""
    order = sorted(runs, key=lambda r: r["stream_s"])
    pick = dict(order[(len(order) - 1) // 2])
    pick["stream_s_repeats"] = [r["stream_s"] for r in runs]
    pick["total_s_repeats"] = [r["total_s"] for r in runs]
    return pick


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios of every row's stream, step and total time to the baseline (`source`) row's (the baseline = 1.0)."""
    base = next(r for r in rows if r["label"] == STREAM_BASELINE)
    for r in rows:
        for key in ("stream_s", "step_s", "total_s"):
            r[f"{key[:-2]}_ratio_to_source"] = r[key] / base[key] if base[key] > 0 else None


# ----------------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class StreamPlan:
    """What one invocation resolved (`plan_stream_timing`): data, device, corruptions, images per corruption, the
    staged images, every method's config."""

    opts: StreamTimingOptions
    data_root: str | None
    frost_dir: Any
    device: torch.device
    domains: list[str]
    n: int
    images: dict[str, Any] | None = None
    configs: dict[str, Config] = dataclasses.field(default_factory=dict)

    @property
    def work(self) -> Path:
        return Path(self.opts.out) / self.opts.scenario


def plan_stream_timing(opts: StreamTimingOptions) -> StreamPlan:
    """Data, device, corruptions, the imagenet scenario's images and every method's config: everything that can
    fail on bad options (ValueError, FileNotFoundError) before a clock starts."""
    from tta_surgical.corruptions import BENCHMARK_CORRUPTIONS
    from tta_surgical.corruptions.textures import default_frost_dir

    data_root = opts.data_root if opts.data_root and Path(opts.data_root).is_dir() else None
    scenario = SCENARIOS[opts.scenario]
    run = StreamPlan(
        opts,
        data_root,
        default_frost_dir(opts.frost_dir, data_root),
        engine.pick_device(opts.device),
        list(opts.corruptions or BENCHMARK_CORRUPTIONS),
        scenario.n_per_corruption if opts.n_per_corruption is None else opts.n_per_corruption,
    )
    if opts.scenario == "imagenet":
        run.images = clean_images(opts, data_root, run.n)
    path = run.images["path"] if run.images else None
    run.configs = {m: build_config(opts, m, domains=run.domains, n=run.n, image_path=path) for m in opts.labels()}
    return run


def _warm_up(run: StreamPlan) -> None:
    """Untimed: one batch of every corruption through the data path (texture banks, kernels), two batches per method."""
    first = run.configs[STREAM_BASELINE]
    time_data_only(shorten(first, 1, len(run.domains)), run.data_root, run.frost_dir, run.device)
    for m, cfg in run.configs.items():
        warm = run.work / "warmup" / safe_label(m)
        engine.run(shorten(cfg, 2, 1), warm, data=DataContext.resolve(run.data_root, run.frost_dir), overwrite=True)
        if not run.opts.keep_state:
            (warm / engine.STATE_FILE).unlink(missing_ok=True)


def _time_methods(run: StreamPlan, log: Callable[[str], None] | None) -> list[dict[str, Any]]:
    """Every method `repeats` times, interleaved; one row per method (its median repeat), with the ratios."""
    repeats = run.opts.repeats
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in run.configs}
    for r in range(repeats):
        for m, cfg in run.configs.items():
            name = safe_label(m) + (f"_r{r}" if repeats > 1 else "")
            row = time_method(cfg, run.work / "runs" / name, run.data_root, run.frost_dir, run.device,
                              keep_state=run.opts.keep_state)  # fmt: skip
            if log:
                log(f"  {m}: stream {row['stream_s']:.2f} s, steps {row['step_s']:.2f} s, "
                    f"error {row['online_error']:.2f}%")  # fmt: skip
            runs[m].append(row)
    rows = [{"label": m, **median_run(runs[m])} for m in run.configs]
    add_ratios(rows)
    return rows


def run_stream_timing(
    plan: StreamPlan | StreamTimingOptions, log: Callable[[str], None] | None = print
) -> dict[str, Any]:
    """Time every method of the plan (options are planned first) over the scenario's stream; write
    `<out>/<scenario>.json` and `.md`; return the result."""
    run = plan if isinstance(plan, StreamPlan) else plan_stream_timing(plan)
    opts = run.opts
    first = run.configs[STREAM_BASELINE]
    if log:
        log(
            f"stream timing, scenario {opts.scenario}: {len(run.domains)} corruptions x {run.n or 'all'} images, "
            f"batch {first.stream.batch_size}, model {first.model.name}, methods {', '.join(run.configs)}, "
            f"device {run.device}" + (f"; images: {run.images['kind']}" if run.images else "")
        )
    if opts.warmup:
        _warm_up(run)
    data_only = time_data_only(first, run.data_root, run.frost_dir, run.device) if opts.data_pass else None
    rows = _time_methods(run, log)
    fingerprints = {r["stream_fingerprint"] for r in rows} | ({data_only["fingerprint"]} if data_only else set())
    if len(fingerprints) != 1:
        raise RuntimeError(f"the methods did not see the identical stream (plan fingerprints {sorted(fingerprints)})")
    result = json_safe(_result(run, rows, data_only))
    table = stream_markdown(result)
    if log:
        log(table)
    out = Path(opts.out)
    atomic_write_text(out / f"{opts.scenario}.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / f"{opts.scenario}.md", table)
    if log:
        log(f"wrote {out / f'{opts.scenario}.json'} and .md")
    return result


def _result(run: StreamPlan, rows: list[dict[str, Any]], data_only: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON record of a stream timing: the stream, the model, every method's row, the target, provenance."""
    opts, images, first = run.opts, run.images, run.configs[STREAM_BASELINE]
    spec = first.stream
    pretrained = all(r["model_pretrained"] for r in rows)
    model, n_domains, full_n = FULL_CIFAR
    full_cifar = (
        opts.scenario == "cifar" and len(run.domains) == n_domains and run.n in full_n and first.model.name == model
    )
    return {
        "benchmark": "stream_timing",
        "scenario": opts.scenario,
        "command": opts.command or " ".join(sys.argv),
        "stream": {
            "source": spec.source,
            "path": spec.path,
            "images_from": images["kind"] if images else "CIFAR-10 test set (<data-root>), corrupted on the fly",
            "staging_s": images["staging_s"] if images else 0.0,
            "corruptions": list(spec.domains),
            "n_corruptions": len(spec.domains),
            "n_per_corruption": rows[0]["images"] // max(len(spec.domains), 1),
            "severity": 5,
            "order": spec.order,
            "reset": spec.reset,
            "batch_size": spec.batch_size,
            "image_size": spec.resolved_image_size,
            "images": rows[0]["images"],
            "n_batches": rows[0]["n_batches"],
            "fingerprint": rows[0]["stream_fingerprint"],
        },
        "model": first.model.name,
        "model_pretrained": pretrained,
        "error_meaningful": pretrained and (images is None or images["labels_meaningful"]),
        "device": rows[0]["device"],
        "runtime": {
            "channels_last": first.runtime.channels_last,
            "compile": first.runtime.compile,
            "precision": first.runtime.precision,
            "threads": torch.get_num_threads(),
            "warmup": opts.warmup,
            "repeats": opts.repeats,
        },
        "data_only": data_only,
        "methods": rows,
        "target": {
            "what": "full continual CIFAR-10-C (15 x 10,000, severity 5) with resnet20 on an H100, under 10 s",
            "limit_s": TARGET_S,
            "applies": full_cifar and run.device.type == "cuda",
            "met": {r["label"]: r["stream_s"] < TARGET_S for r in rows},
            "met_including_setup": {r["label"]: r["total_s"] < TARGET_S for r in rows},
        },
        **provenance(run.device),
    }


_STREAM_COLUMNS = (
    "method", "stream s", "images/s", "adapt steps s", "data s", "checkpoints s", "other s", "x source",
    "steps x source", "total s (with setup)", "online error %", "mean error %",
)  # fmt: skip


def stream_markdown(result: Mapping[str, Any]) -> str:
    """A stream-timing result as Markdown: one row per method, plus the data-only pass; the target when it applies."""
    s = result["stream"]
    rows = [
        [
            r["label"], fmt(r["stream_s"]), fmt(r["images_per_s"], 0), fmt(r["step_s"]), fmt(r["data_s"]),
            fmt(r["checkpoint_s"]), fmt(r["other_s"]), fmt(r["stream_ratio_to_source"]),
            fmt(r["step_ratio_to_source"]), fmt(r["total_s"]), fmt(r["online_error"]), fmt(r["mean_error"]),
        ]
        for r in result["methods"]
    ]  # fmt: skip
    d = result.get("data_only")
    if d:
        rows.append(
            ["(data only: generation, no model)", fmt(d["stream_s"]), fmt(d["images_per_s"], 0), fmt(None),
             fmt(d["stream_s"]), *[fmt(None)] * 4, fmt(d["build_s"] + d["stream_s"]), fmt(None), fmt(None)]
        )  # fmt: skip
    lines = [
        f"### Stream timing: {result['scenario']} ({s['n_corruptions']} corruptions x {s['n_per_corruption']} "
        f"images, severity 5, continual, batch {s['batch_size']}, {s['image_size']}x{s['image_size']})",
        "",
        f"Model {result['model']} ({'pretrained' if result['model_pretrained'] else 'RANDOM INIT'}); device "
        f"{result['device']}; images: {s['images']}. Times in seconds; x source = stream time / source's.",
        "",
        markdown_table(_STREAM_COLUMNS, rows),
    ]
    t = result.get("target")
    if t and t.get("applies"):
        met = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in t["met"].items())
        lines += ["", f"Target (whole stream under {t['limit_s']:g} s): {met}."]
    if not result["error_meaningful"]:
        lines += [
            "",
            "Errors are not meaningful here (random weights and/or labels that are not the model's "
            "classes): timing only.",
        ]
    return "\n".join(lines) + "\n"
