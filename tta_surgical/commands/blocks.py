"""`tta-surgical blocks MODEL`: print a model's block map (blocks, optional residual units, parameter counts)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .. import hub

if TYPE_CHECKING:
    from torch import nn

HELP = "show a model's blocks (input, block1..N, head) with parameter counts"
DESCRIPTION = (
    "Print the block map used to choose which parameters adapt: each block (or, with --units, each residual "
    "unit), its parameter-name prefixes, and its tensor and parameter counts. Needs no weights: the model is "
    "built with random weights (shapes only). MODEL is a zoo name, torchvision:<name>, timm:<name> or "
    "module:<python.path>:<factory>; models outside the zoo get a map inferred from their structure, or the "
    "one given with --block-map."
)


def configure(parser: argparse.ArgumentParser) -> None:
    from ..models import MODELS

    parser.add_argument(
        "model",
        metavar="MODEL",
        help=f"model name: {', '.join(MODELS.names())}, or torchvision:<name>, timm:<name>, "
        "module:<python.path>:<factory>",
    )
    parser.add_argument("--units", action="store_true", help="also list the residual units inside each block")
    parser.add_argument(
        "--block-map",
        metavar="FILE",
        default=None,
        help="YAML file mapping block names to module names (input: [conv1, bn1], block1: [layer1], ..., head: [fc]); "
        "validated and used instead of the model's own or inferred map",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, metavar="N", help="classifier size (default: the architecture's own)"
    )
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        default=None,
        help="data folder (default $TTA_SURGICAL_DATA); only used to report whether the weights are present",
    )


def _weights_status(name: str, data_root: str | None) -> str:
    import torch

    from ..models import MODELS, WEIGHTS
    from ..models.external import is_external, weights_status

    if is_external(name):
        return weights_status(name, data_root)
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


def _build(name: str, num_classes: int | None) -> tuple[nn.Module, object]:
    """The model with random weights: on the meta device (no memory, no init cost) when its constructor allows."""
    import torch

    from ..models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are the point here, and said below
        try:
            with torch.device("meta"):
                return create_model(name, pretrained=False, num_classes=num_classes)
        except (NotImplementedError, RuntimeError):
            # some constructors compute on tensors (torchvision RegNet's widths): build on the CPU instead
            return create_model(name, pretrained=False, num_classes=num_classes)


def main(args: argparse.Namespace) -> int:
    from ..models import BlockTable, set_block_map

    model, info = _build(args.model, args.num_classes)
    if args.block_map:
        set_block_map(model, args.block_map)
    table = BlockTable(model)
    # a module: model's input size is unknown (ModelInfo assumes 224 for timing), so it is not printed
    size = "" if info.dataset == "custom" else f", {info.input_size}px input"
    print(
        f"{info.name} ({info.dataset}{size}, {info.num_classes} classes): "
        f"{table.total:,} parameters in {table.tensors} tensors"
    )
    print("weights: none loaded, random init (the block map needs shapes only)")
    print(f"pretrained weights: {_weights_status(args.model, args.data_root)}")
    print(f"block map: {table.source}{f' from {args.block_map}' if args.block_map else ''}")
    print(table.format(units=args.units))
    return 0
