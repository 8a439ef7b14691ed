"""End-to-end wall time of a whole continual corruption stream, per method (issue 5, "end-to-end stream timing").

    python benchmarks/stream_timing.py --scenario cifar --data-root ../shared/data          # 15 x 10,000, batch 200
    python benchmarks/stream_timing.py --scenario cifar --n-per-corruption 200 --threads 1  # CPU-sized
    python benchmarks/stream_timing.py --scenario imagenet --n-per-corruption 16 --batch-size 8 \\
        --corruptions gaussian_noise,fog,jpeg_compression                                   # CPU-sized, 224x224
    python benchmarks/stream_timing.py --scenario imagenet --image-folder /data/imagenet/val  # real images

Every method runs through the engine on the identical stream; per method the JSON and the table give the
stream time split into adaptation steps, data, checkpoints and the rest, the total with setup, images/s, the
error and the ratios to `source` (always run, first: the baseline). What the scenarios are and how each figure
is measured: `benchmarks/studies/stream_timing.py`. Writes `<out>/<scenario>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

import torch  # noqa: E402

from benchmarks.studies.stream_timing import (  # noqa: E402
    SCENARIOS,
    STREAM_METHODS,
    StreamTimingOptions,
    plan_stream_timing,
    run_stream_timing,
)
from tta_surgical.bench.labels import split_args  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "out" / "stream_timing"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stream_options(p)
    add_run_options(p)
    return p


def add_stream_options(p: argparse.ArgumentParser) -> None:
    """What is timed: scenario, methods, corruptions, images, model, data."""
    p.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="cifar",
        help="cifar: CIFAR-10 test set, resnet20; imagenet: 224x224 images, resnet50 (default cifar)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(STREAM_METHODS),
        metavar="METHOD",
        help="bench labels the engine runs (a registered method, <method>:<block>[+<block>], autorgn) "
        "or run config YAML paths; comma or space separated; source is always run first as the "
        f"baseline (default: {' '.join(STREAM_METHODS)})",
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


def add_run_options(p: argparse.ArgumentParser) -> None:
    """How it runs: the fast path, overrides, warm-up, repeats, threads, output."""
    flag = argparse.BooleanOptionalAction
    p.add_argument(
        "--channels-last",
        action=flag,
        default=None,
        help="runtime.channels_last for every method (default: the config's value)",
    )
    p.add_argument(
        "--compile",
        action=flag,
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
        action=flag,
        default=True,
        help="untimed warm-up: one batch per corruption through the data path, two batches per method (default on)",
    )
    p.add_argument(
        "--data-pass", action=flag, default=True, help="also time the stream alone, with no model (default on)"
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
        help="keep each engine run's checkpoint state.pt (deleted after the clock by default: ~100-300 MB "
        "each for resnet50; results.jsonl, summary.json and config.yaml always stay)",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corruptions = None if args.corruptions in ("benchmark", "") else split_args([args.corruptions])
    try:  # bad options (an unknown method or corruption, a wrong override, missing data) end with their message
        opts = StreamTimingOptions(
            scenario=args.scenario, methods=split_args(args.methods), corruptions=corruptions,
            n_per_corruption=args.n_per_corruption, batch_size=args.batch_size, device=args.device, model=args.model,
            pretrained=args.pretrained, image_size=args.image_size, image_folder=args.image_folder,
            data_root=args.data_root, frost_dir=args.frost_dir, seed=args.seed, channels_last=args.channels_last,
            compile=args.compile, overrides=tuple(args.set or ()), warmup=args.warmup, data_pass=args.data_pass,
            repeats=args.repeats, keep_state=args.keep_state, out=args.out,
            command="python benchmarks/stream_timing.py " + " ".join(sys.argv[1:] if argv is None else argv),
        )  # fmt: skip
        plan = plan_stream_timing(opts)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    run_stream_timing(plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
