"""`tta-surgical corruptions`: list the corruptions and their severity parameters, or preview them as an image grid."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import add_data_root, add_frost_dir, data_context

if TYPE_CHECKING:
    from torch import Tensor

HELP = "list the 19 corruptions with their parameters, or save a preview grid"
DESCRIPTION = (
    "Print the parameter table of the 19 corruptions (the 15 benchmark ones and the 4 extra) at severities 1..5. "
    "With --preview, also corrupt one CIFAR-10 test image with every corruption at every severity and save a "
    "labelled PNG grid: one row per corruption (named on the left), columns the clean image and severities 1..5 "
    "(named on top). The image and the frost textures come from --data-root / $TTA_SURGICAL_DATA when present."
)


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
        help="write a labelled PNG grid: one row per corruption, columns clean and severities 1..5 (CIFAR preset)",
    )
    add_data_root(parser, holds="cifar-10-batches-py/ and frost/ for --preview")
    parser.add_argument(
        "--index", type=int, default=0, metavar="N", help="CIFAR-10 test image shown by --preview (default 0)"
    )
    add_frost_dir(parser)
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="random seed of the preview's corruption noise (default 0)"
    )


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

    from ..corruptions import ALL_CORRUPTIONS, corrupt, to_uint8
    from ..data.cifar import find_cifar10, load_cifar10

    data = data_context(args)  # the data root's textures: no download
    images, _ = load_cifar10(find_cifar10(data.root))
    if not 0 <= args.index < len(images):
        raise ValueError(f"--index {args.index} is not a CIFAR-10 test image; choose 0..{len(images) - 1}")
    x = torch.from_numpy(images[args.index : args.index + 1]).permute(0, 3, 1, 2).float() / 255
    clean = to_uint8(x[0])
    frost_dir = data.frost_dir
    rows = [
        [clean]
        + [to_uint8(corrupt(x, name, s, seed=args.seed, preset="cifar", frost_dir=frost_dir)[0]) for s in range(1, 6)]
        for name in ALL_CORRUPTIONS
    ]
    columns = [f"clean #{args.index}", *(f"severity {s}" for s in range(1, 6))]
    labelled_grid(rows, list(ALL_CORRUPTIONS), columns, args.preview)
    print(f"wrote {args.preview}: rows {', '.join(ALL_CORRUPTIONS)}; columns {', '.join(columns)}")


def _text_size() -> tuple[Any, Any]:
    """(text -> (width, height) in pixels, the font): Pillow's built-in font, so no plotting library is needed."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    return size, font


def grid_origin(row_labels: Sequence[str], col_labels: Sequence[str], pad: int = 4) -> tuple[int, int]:
    """(x, y) of the first tile of a `labelled_grid`: the row labels' width and the column labels' height, padded.
    Tile (i, j) of a grid with tiles of w x h pixels (after scaling) starts at (x + j (w + pad), y + i (h + pad))."""
    size, _ = _text_size()
    return max(size(t)[0] for t in row_labels) + 2 * pad, max(size(t)[1] for t in col_labels) + 2 * pad


def labelled_grid(
    tiles: Sequence[Sequence[Tensor]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | os.PathLike,
    scale: int = 3,
    pad: int = 4,
) -> Path:
    """Save uint8 (3, H, W) tiles as a PNG grid with each row's label on the left and each column's on top.

    Drawn with Pillow (a torchvision dependency) and its built-in font, so no plotting library is needed.
    """
    from PIL import Image, ImageDraw

    size, font = _text_size()
    h, w = (int(v) * scale for v in tiles[0][0].shape[1:])
    left, top = grid_origin(row_labels, col_labels, pad)
    grid = Image.new("RGB", (left + len(col_labels) * (w + pad), top + len(row_labels) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(col_labels):
        tw, _ = size(text)
        draw.text((left + j * (w + pad) + (w - tw) // 2, pad), text, fill="black", font=font)
    for i, (label, row) in enumerate(zip(row_labels, tiles, strict=True)):
        y = top + i * (h + pad)
        draw.text((pad, y + (h - size(label)[1]) // 2), label, fill="black", font=font)
        for j, tile in enumerate(row):
            img = Image.fromarray(tile.permute(1, 2, 0).cpu().numpy())
            grid.paste(img.resize((w, h), Image.NEAREST), (left + j * (w + pad), y))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    return out
