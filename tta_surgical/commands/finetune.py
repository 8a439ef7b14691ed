"""`tta-surgical finetune`: supervised few-shot surgical fine-tuning over corruptions x options x seeds."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..hub import DATA_ENV
from .options import data_context
from .run import resolve_overrides

HELP = "supervised few-shot surgical fine-tuning (Lee et al. 2023): which blocks to tune, per corruption"
DESCRIPTION = (
    "For every corruption x option x seed: a seeded class-balanced split of the labeled target set into train / "
    "val / test, Adam over a learning-rate grid (the pretrained model restored for each lr), and the test accuracy "
    "at the (lr, epoch) with the best validation accuracy. Options are block specs (input, block1, block1-2, head, "
    "all, ...) or auto-rgn / auto-snr. Writes config.yaml, results.jsonl (one line per finished cell), summary.json "
    "and summary.md to --out; --resume skips finished cells. Trailing key=value arguments override config fields, "
    "e.g. finetune.corruptions=[fog,snow] finetune.seeds=[0] finetune.epochs=5."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="finetune config YAML (e.g. configs/finetune_cifar10c.yaml)"
    )
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        default=os.environ.get(DATA_ENV),
        help=f"folder holding cifar-10-batches-py/, CIFAR-10-C/, ImageNet-C/ and weights/ (default: ${DATA_ENV})",
    )
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/<config-stem>)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="sets runtime.device")
    parser.add_argument("--resume", action="store_true", help="skip the cells already in <out>/results.jsonl")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument(
        "--frost-dir",
        metavar="DIR",
        default=None,
        help="frost textures frost1..5 (default: <data-root>/frost when present, else the download cache)",
    )
    parser.add_argument("--plot", action="store_true", help="also save rgn_weights.png when auto-rgn ran")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. finetune.options=[block1,all]"
    )


def main(args: argparse.Namespace) -> int:
    from ..finetune import load_finetune_config, run_finetune, summary_markdown

    cfg = load_finetune_config(args.config, resolve_overrides(args))
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    summary = run_finetune(
        cfg,
        out,
        data=data_context(args),
        resume=args.resume,
        overwrite=args.overwrite,
        plot=args.plot,
    )
    print(summary_markdown(summary))
    print(f"results in {out}/ (summary.json, summary.md, results.jsonl)")
    return 0
