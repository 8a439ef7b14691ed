"""`tta-surgical blocks MODEL`: print a model's block map (blocks, optional residual units, parameter counts)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

HELP = "show a model's blocks (input, block1..N, head) with parameter counts"
DESCRIPTION = (
    "Print the block map used to choose which parameters adapt: each block (or, with --units, each residual "
    "unit), its parameter-name prefixes, and its tensor and parameter counts. Needs no weights."
)


def configure(parser: argparse.ArgumentParser) -> None:
    from ..models import MODELS

    parser.add_argument("model", metavar="MODEL", help=f"model name ({', '.join(MODELS.names())})")
    parser.add_argument("--units", action="store_true", help="also list the residual units inside each block")
    parser.add_argument(
        "--data-root",
        default=None,
        help="data folder (default $TTA_SURGICAL_DATA); only used to report whether the weights are present",
    )


def _weights_status(name: str, data_root: str | None) -> str:
    from .. import hub
    from ..models import MODELS, WEIGHTS

    entry = MODELS.get(name)
    if entry.weights is None:
        return "none published"
    spec = WEIGHTS.get(entry.weights)
    root = hub.data_root(data_root)
    folders = ([root / "weights"] if root else []) + [hub.cache_dir("weights")]
    if spec.torch_hub:
        folders.append(Path(torch.hub.get_dir()) / "checkpoints")
    for folder in folders:
        if (folder / spec.filename).is_file():
            return f"{spec.filename} found in {folder}"
    where = spec.url or "local path only"
    return f"{spec.filename} not found locally ({where})"


def main(args: argparse.Namespace) -> int:
    from ..models import block_spec, create_model, unit_map
    from ..models.blocks import block_map

    # Shapes are all we need: build on the meta device (no memory, no init cost, even for ViT-B/16).
    with torch.device("meta"):
        model, info = create_model(args.model, pretrained=False)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(sizes.values())
    spec = dict(block_spec(model).blocks)
    units = unit_map(model) if args.units else {}
    unit_prefixes = dict(block_spec(model).units)

    print(
        f"{info.name} ({info.dataset}, {info.input_size}px input, {info.num_classes} classes): "
        f"{total:,} parameters in {len(sizes)} tensors"
    )
    print(f"pretrained weights: {_weights_status(args.model, args.data_root)}")
    rows = [("block", "tensors", "params", "%", "prefixes")]

    def row(label: str, names: list[str], prefixes: tuple[str, ...]) -> None:
        n = sum(sizes[k] for k in names)
        rows.append((label, str(len(names)), f"{n:,}", f"{100 * n / total:.2f}", ", ".join(prefixes)))

    for block, names in block_map(model).items():
        row(block, names, spec[block])
        if args.units:
            for unit, unames in units.items():
                if unit != block and unit.split(".")[0] == block:
                    row("  " + unit, unames, unit_prefixes[unit])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}")
    print(f"{'total':<{widths[0]}}  {len(sizes):>{widths[1]}}  {total:>{widths[2]},}  {100:>{widths[3]}.2f}")
    return 0
