"""End-to-end wall time of a whole continual corruption stream, per method (issue 5, "end-to-end stream timing").

    python benchmarks/stream_timing.py --scenario cifar --data-root ../shared/data          # 15 x 10,000, batch 200
    python benchmarks/stream_timing.py --scenario cifar --n-per-corruption 200 --threads 1  # CPU-sized
    python benchmarks/stream_timing.py --scenario imagenet --n-per-corruption 16 --batch-size 8 \\
        --corruptions gaussian_noise,fog,jpeg_compression                                   # CPU-sized, 224x224
    python benchmarks/stream_timing.py --scenario imagenet --image-folder /data/imagenet/val  # real images

Scenarios (continual: the corruptions follow each other at severity 5 and the model is never reset):
- `cifar`: the clean CIFAR-10 test set (from --data-root) corrupted on the fly on the device by the package's
  engine (stream source `cifar10`), the 15 benchmark corruptions x 10,000 images, batch 200, the pretrained
  resnet20 (`streams/cifar10c_continual.yaml`). Target on an H100: under 10 s for the whole stream.
- `imagenet`: 224x224 images corrupted on the fly (stream source `imagenet`: a folder `<root>/<class>/*.jpg`
  read by DataLoader workers, JPEGs decoded on the GPU when nvjpeg works, resized to 256 and center-cropped
  to 224, then corrupted on the device with the ImageNet severity table). Images: --image-folder, else
  `<data-root>/imagenet/val` when present, else the CIFAR-10 test images upsampled (bicubic) to 256x256 and
  written once as JPEGs under `<out>/images/` (staging time reported apart, not in the stream). resnet50,
  ImageNet weights when available, else random init (`model.allow_random`); Tent's ImageNet optimiser (SGD,
  lr 0.00025, momentum 0.9). With the staged CIFAR images the labels are CIFAR classes 0..9, so the error of a
  1000-class model is not meaningful there (the JSON says so): those runs are for timing only.

Every method (a config of `configs/`: source, norm, tent, surgical_block1, ...; or `surgical:<block>[+<block>]`;
or a YAML path) runs through `tta_surgical.engine.run` on the identical stream (same seed, same plan
fingerprint). Per method:
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
Untimed warm-up first (--warmup, default on): one batch of every corruption through the data path (caches such
as the frost textures), then every method on two batches (lazy CUDA / cuDNN initialisation, compilation).
Writes `<out>/<scenario>.json` and `.md`; each engine run's folder is `<out>/<scenario>/runs/<method>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("tta_surgical") is None:  # a checkout that is not installed: use the package here
    sys.path.insert(0, str(REPO))

from tta_surgical import engine  # noqa: E402
from tta_surgical.bench import git_revision  # noqa: E402
from tta_surgical.config import Config, load_config  # noqa: E402
from tta_surgical.corruptions import BENCHMARK_CORRUPTIONS  # noqa: E402
from tta_surgical.corruptions.textures import default_frost_dir  # noqa: E402
from tta_surgical.fileio import atomic_write_text  # noqa: E402
from tta_surgical.metrics import json_safe  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "out" / "stream_timing"
CONFIGS = REPO / "configs"
DEFAULT_METHODS = ("source", "norm", "tent", "surgical:block1")
TARGET_S = 10.0  # issue 5: the full continual CIFAR-10-C stream with resnet20 on an H100
STAGE_QUALITY = 90  # JPEG quality of the staged CIFAR images (ImageNet val files are ~quality 90-96)


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
    "cifar": Scenario(REPO / "streams" / "cifar10c_continual.yaml", "resnet20", 200, 10000, allow_random=False),
    "imagenet": Scenario(
        REPO / "streams" / "imagenetc_continual.yaml",
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


# ----------------------------------------------------------------------------------------------------- helpers


def _split(text: str | list[str] | None) -> list[str]:
    """Items of a comma- and/or space-separated option (`a,b c`)."""
    if text is None:
        return []
    parts = [text] if isinstance(text, str) else text
    return [item for part in parts for item in part.split(",") if item.strip()]


def safe_label(label: str) -> str:
    """A folder name for a method label (`surgical:block1` -> `surgical-block1`)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", label)


def resolve_method(text: str) -> tuple[Path, list[str]]:
    """A method option -> (config YAML, overrides): `NAME` (configs/NAME.yaml), `surgical:<b>[+<b>]`, or a path."""
    if text.startswith("surgical:"):
        blocks = [b for b in text.split(":", 1)[1].split("+") if b]
        if not blocks:
            raise ValueError(f"method {text!r}: name the blocks, e.g. surgical:block1 or surgical:block1+block2")
        return CONFIGS / "surgical_block1.yaml", [f"method.blocks=[{','.join(blocks)}]"]
    path = Path(text)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"method config {path} does not exist")
        return path, []
    path = CONFIGS / f"{text}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("finetune"))
        raise ValueError(
            f"unknown method {text!r}: give a config name ({', '.join(valid)}), surgical:<block>[+<block>] "
            "or a path to a run config YAML"
        )
    return path, []


def method_labels(methods: list[str]) -> list[str]:
    """The methods to time, `source` first (every ratio divides by it), duplicates removed."""
    labels = [m for m in dict.fromkeys(methods) if m != "source"]
    return ["source", *labels]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_results(folder: Path) -> list[dict[str, Any]]:
    """The per-batch lines of an engine run's results.jsonl."""
    path = folder / engine.RESULTS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------- images


def stage_cifar_images(data_root: str | None, folder: Path, n: int, size: int) -> tuple[Path, float]:
    """Write the first `n` CIFAR-10 test images, upsampled (bicubic) to size x size, as JPEGs in class folders.

    Layout `<folder>/class<k>/<index>.jpg`, the layout the stream source `imagenet` reads (labels = sorted folder
    order = CIFAR labels). Reused when a complete staging with at least `n` images of this size exists (a
    `staged.json` written last marks it complete). Returns (folder, seconds spent staging; 0 when reused).
    """
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg, write_file

    from tta_surgical.data.cifar import find_cifar10, load_cifar10

    marker = folder / "staged.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("size") == size and meta.get("n", 0) >= n and meta.get("quality") == STAGE_QUALITY:
            return folder, 0.0
    t0 = time.perf_counter()
    images, labels = load_cifar10(find_cifar10(data_root))
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


def imagenet_images(args: argparse.Namespace, data_root: str | None, out: Path, n: int) -> dict[str, Any]:
    """Where the `imagenet` scenario's clean images come from: --image-folder, <data-root>/imagenet/val, or staged."""
    from tta_surgical.data.imagenet import resize_size

    if args.image_folder:
        return {
            "path": str(Path(args.image_folder).expanduser()),
            "kind": "image folder (--image-folder)",
            "labels_meaningful": True,
            "staging_s": 0.0,
        }
    if data_root and (Path(data_root) / "imagenet" / "val").is_dir():
        return {
            "path": str(Path(data_root) / "imagenet" / "val"),
            "kind": "<data-root>/imagenet/val",
            "labels_meaningful": True,
            "staging_s": 0.0,
        }
    size = resize_size(args.image_size)
    n_stage = n if n > 0 else 10000  # 0 = all: the whole CIFAR-10 test set
    folder, secs = stage_cifar_images(data_root, out / "images" / f"cifar10_test_{size}px", n_stage, size)
    return {
        "path": str(folder),
        "kind": f"CIFAR-10 test images upsampled (bicubic) to {size}x{size}, JPEG quality {STAGE_QUALITY}, "
        f"then resized to {size} and center-cropped to {args.image_size} by the stream",
        "labels_meaningful": False,
        "staging_s": secs,
    }


# ----------------------------------------------------------------------------------------------------- configs


def build_config(
    args: argparse.Namespace, scenario: Scenario, method: str, *, domains: list[str], n: int, image_path: str | None
) -> Config:
    """The run config of `method` on the scenario's stream, with this invocation's options."""
    path, method_overrides = resolve_method(method)
    overrides = [
        *scenario.overrides,
        *method_overrides,
        f"stream.domains=[{','.join(domains)}]",
        "stream.severities=[5]",
        "stream.reset=never",
        f"stream.n_examples={n}",
        f"stream.batch_size={args.batch_size or scenario.batch_size}",
        f"stream.seed={args.seed}",
        f"model.name={args.model or scenario.model}",
        f"model.pretrained={'true' if args.pretrained else 'false'}",
        f"model.allow_random={'true' if scenario.allow_random else 'false'}",
        f"runtime.device={args.device}",
        f"runtime.seed={args.seed}",
        "runtime.progress=false",
    ]
    if args.scenario == "imagenet":
        overrides.append(f"stream.image_size={args.image_size}")
    if args.channels_last is not None:
        overrides.append(f"runtime.channels_last={'true' if args.channels_last else 'false'}")
    if args.compile is not None:
        overrides.append(f"runtime.compile={'true' if args.compile else 'false'}")
    overrides += list(args.set or [])
    cfg = load_config(path, stream=scenario.stream_yaml, overrides=overrides)
    if image_path is not None:  # set here, not as an override: a path is not always valid YAML
        cfg = dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, path=image_path))
    return cfg


def shorten(cfg: Config, n_batches: int, domains: int) -> Config:
    """The same config on a short stream (the first `domains` corruptions, `n_batches` batches each): warm-up."""
    spec = cfg.stream
    n = min(spec.n_examples or spec.batch_size * n_batches, spec.batch_size * n_batches)
    return dataclasses.replace(cfg, stream=dataclasses.replace(spec, domains=spec.domains[:domains], n_examples=n))


# ----------------------------------------------------------------------------------------------------- timing


def time_data_only(cfg: Config, data_root: str | None, frost_dir: Any, device: torch.device) -> dict[str, Any]:
    """Iterate the stream with no model (corruption generation, reading, copies only), device-synchronised."""
    from tta_surgical.streams import build_stream

    _sync(device)
    t0 = time.perf_counter()
    stream = build_stream(cfg.stream, data_root=data_root, device=device, frost_dir=frost_dir)
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
    cfg: Config,
    out_dir: Path,
    data_root: str | None,
    frost_dir: Any,
    device: torch.device,
    *,
    keep_state: bool = False,
) -> dict[str, Any]:
    """One engine run of `cfg` into `out_dir`, timed and broken down (see the module docstring)."""
    _sync(device)
    t0 = time.perf_counter()
    summary = engine.run(cfg, out_dir, data_root=data_root, frost_dir=frost_dir, overwrite=True)
    _sync(device)
    total_s = time.perf_counter() - t0
    if not keep_state:  # after the clock: a resnet50 checkpoint is ~100-300 MB per run, results stay
        (out_dir / engine.STATE_FILE).unlink(missing_ok=True)
    lines = read_results(out_dir)
    step_ms = [float(r["latency_ms"]) for r in lines]
    stream_s = float(summary["wall_s_this_session"])
    timing = summary["timing_this_session"]  # the engine's own breakdown of stream_s
    step_s, checkpoint_s, data_s = float(timing["step_s"]), float(timing["checkpoint_s"]), float(timing["data_s"])
    images = sum(int(r["count"]) for r in lines)
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
        "first_batch_step_ms": step_ms[0] if step_ms else None,
        "images": images,
        "n_batches": len(lines),
        "images_per_s": images / stream_s if stream_s > 0 else None,
        "step_images_per_s": images / step_s if step_s > 0 else None,
        "online_error": summary["online_error"],
        "mean_error": summary["mean_error"],
        "errors": summary["errors"],
        "latency_ms": summary["latency_ms"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "peak_memory_kind": summary["peak_memory_kind"],
        "adapted_tensors": summary["adapted_tensors"],
        "adapted_numel": summary["adapted_numel"],
        "model_pretrained": summary["model_pretrained"],
        "stream_fingerprint": summary["stream_fingerprint"],
        "device": summary["device"],
        "out_dir": str(out_dir),
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the (lower) median stream time, with every repeat's stream time attached."""
    order = sorted(runs, key=lambda r: r["stream_s"])
    pick = dict(order[(len(order) - 1) // 2])
    pick["stream_s_repeats"] = [r["stream_s"] for r in runs]
    pick["total_s_repeats"] = [r["total_s"] for r in runs]
    return pick


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios of every row's stream, step and total time to the `source` row's (source = 1.0)."""
    base = next(r for r in rows if r["label"] == "source")
    for r in rows:
        for key in ("stream_s", "step_s", "total_s"):
            r[f"{key[:-2]}_ratio_to_source"] = r[key] / base[key] if base[key] > 0 else None


# ----------------------------------------------------------------------------------------------------- report


def _f(v: Any, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table (one row per method, plus the data-only pass)."""
    s = result["stream"]
    lines = [
        f"### Stream timing: {result['scenario']} ({s['n_corruptions']} corruptions x {s['n_per_corruption']} "
        f"images, severity 5, continual, batch {s['batch_size']}, {s['image_size']}x{s['image_size']})",
        "",
        f"Model {result['model']} ({'pretrained' if result['model_pretrained'] else 'RANDOM INIT'}); device "
        f"{result['device']}; images: {s['images']}. Times in seconds; x source = stream time / source's.",
        "",
        "| method | stream s | images/s | adapt steps s | data s | checkpoints s | other s | x source | "
        "steps x source | total s (with setup) | online error % | mean error % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["methods"]:
        lines.append(
            f"| {r['label']} | {_f(r['stream_s'])} | {_f(r['images_per_s'], '.0f')} | {_f(r['step_s'])} | "
            f"{_f(r['data_s'])} | {_f(r['checkpoint_s'])} | {_f(r['other_s'])} | {_f(r['stream_ratio_to_source'])} | "
            f"{_f(r['step_ratio_to_source'])} | {_f(r['total_s'])} | {_f(r['online_error'])} | {_f(r['mean_error'])} |"
        )
    d = result.get("data_only")
    if d:
        lines.append(
            f"| (data only: generation, no model) | {_f(d['stream_s'])} | {_f(d['images_per_s'], '.0f')} | - | "
            f"{_f(d['stream_s'])} | - | - | - | - | {_f(d['build_s'] + d['stream_s'])} | - | - |"
        )
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


# ----------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="cifar",
        help="cifar: CIFAR-10 test set, resnet20; imagenet: 224x224 images, resnet50 (default cifar)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        metavar="METHOD",
        help="config names of configs/ (source, norm, tent, surgical_block1, surgical_all, ...), "
        "surgical:<block>[+<block>], or YAML paths; comma or space separated; source is always run "
        f"first as the baseline (default: {' '.join(DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--corruptions",
        default="benchmark",
        help="comma-separated corruption names in stream order, or 'benchmark' (the 15; default)",
    )
    p.add_argument(
        "--n-per-corruption",
        type=int,
        default=None,
        metavar="N",
        help="images per corruption (default 10000 for cifar, 5000 for imagenet; 0 = all available)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="stream batch size (default 200 for cifar, 64 for imagenet)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="runtime.device: auto = CUDA when present, else CPU (default auto)",
    )
    p.add_argument("--model", default=None, help="model name (default resnet20 for cifar, resnet50 for imagenet)")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load the model's registered weights (default; imagenet falls back to random init when "
        "they cannot be had); --no-pretrained times a randomly initialised model",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="imagenet scenario: the center-crop size of the stream (default 224)",
    )
    p.add_argument(
        "--image-folder",
        default=None,
        metavar="DIR",
        help="imagenet scenario: clean images in class folders <DIR>/<class>/*.jpg (default "
        "<data-root>/imagenet/val when present, else CIFAR-10 test images upsampled and staged as JPEGs)",
    )
    p.add_argument(
        "--data-root",
        default=os.environ.get("TTA_SURGICAL_DATA") or str(REPO.parent / "shared" / "data"),
        help="folder holding cifar-10-batches-py/, weights/ and frost/ (default $TTA_SURGICAL_DATA, "
        "else ../shared/data)",
    )
    p.add_argument("--frost-dir", default=None, help="frost textures folder (default <data-root>/frost or the cache)")
    p.add_argument("--seed", type=int, default=0, help="stream and runtime seed (default 0)")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="runtime.channels_last for every method (default: the config's value)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="runtime.compile (torch.compile in place) for every method (default: the config's, off)",
    )
    p.add_argument(
        "--set",
        nargs="+",
        metavar="KEY=VALUE",
        default=None,
        help="extra config overrides for every method, e.g. runtime.precision=bf16",
    )
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="untimed warm-up: one batch per corruption through the data path, two batches per method (default on)",
    )
    p.add_argument(
        "--data-pass",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the stream alone, with no model (default on)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs per method, interleaved; the run with the median stream time is reported (default 1)",
    )
    p.add_argument(
        "--keep-state",
        action="store_true",
        help="keep each engine run's checkpoint state.pt (deleted after the clock by default: ~100-300 MB each "
        "for resnet50; results.jsonl, summary.json and config.yaml always stay)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's; 1 is fastest on a small shared CPU)",
    )
    p.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        metavar="DIR",
        help=f"output folder: <scenario>.json/.md and the engine runs (default {DEFAULT_OUT})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    data_root = args.data_root if args.data_root and Path(args.data_root).is_dir() else None
    frost_dir = default_frost_dir(args.frost_dir, data_root)
    device = engine.pick_device(args.device)
    out = Path(args.out)
    work = out / args.scenario
    domains = list(BENCHMARK_CORRUPTIONS) if args.corruptions in ("benchmark", "") else _split(args.corruptions)
    n = scenario.n_per_corruption if args.n_per_corruption is None else args.n_per_corruption
    try:
        labels = method_labels(_split(args.methods))
        for m in labels:
            resolve_method(m)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None

    images: dict[str, Any] | None = None
    try:  # bad options (an unknown corruption, a wrong override, missing data) end with their message
        if args.scenario == "imagenet":
            images = imagenet_images(args, data_root, out, n)
        image_path = images["path"] if images else None
        configs = {m: build_config(args, scenario, m, domains=domains, n=n, image_path=image_path) for m in labels}
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    first = configs["source"]
    print(
        f"stream timing, scenario {args.scenario}: {len(domains)} corruptions x {n or 'all'} images, batch "
        f"{first.stream.batch_size}, model {first.model.name}, methods {', '.join(labels)}, device {device}"
        + (f"; images: {images['kind']}" if images else "")
    )

    if args.warmup:
        # Data first (one batch of every corruption: texture banks, kernels), then each method on two batches.
        time_data_only(shorten(first, 1, len(domains)), data_root, frost_dir, device)
        for m, cfg in configs.items():
            warm = work / "warmup" / safe_label(m)
            engine.run(shorten(cfg, 2, 1), warm, data_root=data_root, frost_dir=frost_dir, overwrite=True)
            if not args.keep_state:
                (warm / engine.STATE_FILE).unlink(missing_ok=True)
    data_only = time_data_only(first, data_root, frost_dir, device) if args.data_pass else None

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in labels}
    for r in range(args.repeats):
        for m, cfg in configs.items():
            name = safe_label(m) + (f"_r{r}" if args.repeats > 1 else "")
            row = time_method(cfg, work / "runs" / name, data_root, frost_dir, device, keep_state=args.keep_state)
            print(
                f"  {m}: stream {row['stream_s']:.2f} s, steps {row['step_s']:.2f} s, error {row['online_error']:.2f}%"
            )
            runs[m].append(row)
    rows = [{"label": m, **_median_run(runs[m])} for m in labels]
    add_ratios(rows)
    fingerprints = {r["stream_fingerprint"] for r in rows} | ({data_only["fingerprint"]} if data_only else set())
    if len(fingerprints) != 1:
        raise RuntimeError(f"the methods did not see the identical stream (plan fingerprints {sorted(fingerprints)})")

    spec = first.stream
    pretrained = all(r["model_pretrained"] for r in rows)
    full_cifar = args.scenario == "cifar" and len(domains) == 15 and n in (0, 10000) and first.model.name == "resnet20"
    result = {
        "benchmark": "stream_timing",
        "scenario": args.scenario,
        "command": "python benchmarks/stream_timing.py " + " ".join(sys.argv[1:] if argv is None else argv),
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
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "data_only": data_only,
        "methods": rows,
        "target": {
            "what": "full continual CIFAR-10-C (15 x 10,000, severity 5) with resnet20 on an H100, under 10 s",
            "limit_s": TARGET_S,
            "applies": full_cifar and device.type == "cuda",
            "met": {r["label"]: r["stream_s"] < TARGET_S for r in rows},
            "met_including_setup": {r["label"]: r["total_s"] < TARGET_S for r in rows},
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git": git_revision(),
    }
    result = json_safe(result)
    table = markdown(result)
    print(table)
    atomic_write_text(out / f"{args.scenario}.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / f"{args.scenario}.md", table)
    print(f"wrote {out / f'{args.scenario}.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
