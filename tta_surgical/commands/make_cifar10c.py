"""`tta-surgical make-cifar10c`: write CIFAR-10-C in the official layout with our torch corruption engine."""

from __future__ import annotations

import argparse
import os

from .options import add_frost_dir, data_context

HELP = "generate CIFAR-10-C (official .npy layout) from the CIFAR-10 test set"
DESCRIPTION = (
    "Corrupt the CIFAR-10 test set with the 19 CIFAR-10-C corruptions and write <corruption>.npy "
    "(uint8, severities stacked 1..5), a sidecar <corruption>.json and labels.npy, as in the Zenodo release. "
    "Files are written atomically; a rerun skips complete files and redoes partial ones."
)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        default=os.environ.get("TTA_SURGICAL_DATA"),
        help="folder holding cifar-10-batches-py/ (default: $TTA_SURGICAL_DATA; without either, the cache, "
        "downloading CIFAR-10 there if needed)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder for <corruption>.npy, .json and labels.npy"
    )
    parser.add_argument(
        "--corruptions",
        metavar="NAMES",
        default="all",
        help="comma-separated corruption names, or 'all' (19) / 'benchmark' (the 15) / 'extra' (the 4); default all",
    )
    parser.add_argument(
        "--severities", default="1,2,3,4,5", metavar="S,...", help="comma-separated severities in 1..5 (default all)"
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N test images")
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="random seed (default 0); same seed, same device: same bytes"
    )
    parser.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="cpu, cuda, cuda:N or auto (CUDA when available; default auto)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1000, metavar="N", help="images corrupted per call (default 1000)"
    )
    add_frost_dir(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_corruptions(text: str) -> list[str]:
    """'all' | 'benchmark' | 'extra' | a comma-separated list of names."""
    from ..corruptions import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS

    groups = {"all": ALL_CORRUPTIONS, "benchmark": BENCHMARK_CORRUPTIONS, "extra": EXTRA_CORRUPTIONS}
    names: list[str] = []
    for item in _csv(text):
        names.extend(groups.get(item, [item]))
    if not names:
        raise ValueError("no corruptions given")
    return list(dict.fromkeys(names))


def main(args: argparse.Namespace) -> int:
    from ..data.cifar import find_cifar10
    from ..data.make_cifar10c import make_cifar10c
    from ..runtime import pick_device

    try:
        severities = [int(s) for s in _csv(args.severities)]
    except ValueError:
        raise ValueError(
            f"--severities must be integers in 1..5 separated by commas, got {args.severities!r}"
        ) from None
    data = data_context(args)
    status = make_cifar10c(
        find_cifar10(data.root),
        args.out,
        corruptions=parse_corruptions(args.corruptions),
        severities=severities,
        limit=args.limit,
        seed=args.seed,
        device=pick_device(args.device),
        batch_size=args.batch_size,
        frost_dir=data.frost_dir,
        progress=not args.no_progress,
    )
    written = [c for c, s in status.items() if s == "written"]
    skipped = [c for c, s in status.items() if s == "skipped"]
    print(
        f"wrote {len(written)} corruption file(s) to {args.out}"
        + (f"; skipped {len(skipped)} complete" if skipped else "")
    )
    return 0
