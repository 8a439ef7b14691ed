"""`tta-surgical corruptions`: list the corruptions and their severity parameters, or preview them as an image grid."""

from __future__ import annotations

import argparse
import os

HELP = "list the 19 corruptions with their parameters, or save a preview grid"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=["cifar", "imagenet"],
        default="cifar",
        help="parameter table to show: cifar (32x32) or imagenet (224x224); default cifar",
    )
    parser.add_argument(
        "--preview",
        metavar="PNG",
        default=None,
        help="write a PNG grid: one row per corruption, columns clean and severities 1..5",
    )
    parser.add_argument(
        "--data-root",
        default=os.environ.get("TTA_SURGICAL_DATA"),
        help="folder holding cifar-10-batches-py/ for --preview (default $TTA_SURGICAL_DATA)",
    )
    parser.add_argument("--index", type=int, default=0, help="CIFAR-10 test image shown by --preview (default 0)")
    parser.add_argument("--frost-dir", default=None, help="folder with the frost textures (default: the cache)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the preview (default 0)")


def main(args: argparse.Namespace) -> int:
    from ..corruptions import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS
    from ..corruptions.params import PRESETS

    table = PRESETS[args.preset]
    print(f"| corruption | set | s=1 | s=2 | s=3 | s=4 | s=5 |   (preset {args.preset})")
    print("|---|---|---|---|---|---|---|")
    for name in ALL_CORRUPTIONS:
        kind = "benchmark" if name in BENCHMARK_CORRUPTIONS else "extra"
        cells = []
        for c in table[name]:
            if name == "zoom_blur":
                cells.append(f"{len(c)} factors to {c[-1]:.2f}")
            else:
                cells.append(str(tuple(round(v, 4) for v in c)) if isinstance(c, tuple) else f"{c:g}")
        print(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    if args.preview:
        _preview(args)
    return 0


def _preview(args: argparse.Namespace) -> None:
    import torch
    from torchvision.io import write_png
    from torchvision.utils import make_grid

    from ..corruptions import ALL_CORRUPTIONS, corrupt, to_uint8
    from ..data.cifar import find_cifar10, load_cifar10

    images, _ = load_cifar10(find_cifar10(args.data_root))
    x = torch.from_numpy(images[args.index : args.index + 1]).permute(0, 3, 1, 2).float() / 255
    rows = []
    for name in ALL_CORRUPTIONS:
        rows.append(x[0])
        rows.extend(
            corrupt(x, name, s, seed=args.seed, preset="cifar", frost_dir=args.frost_dir)[0] for s in range(1, 6)
        )
    grid = make_grid(torch.stack(rows), nrow=6, padding=2, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=3, mode="nearest")[0]
    write_png(to_uint8(grid), args.preview)
    print(f"wrote {args.preview}: rows {', '.join(ALL_CORRUPTIONS)}; columns clean, severity 1..5")
