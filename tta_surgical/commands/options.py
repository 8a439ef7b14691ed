"""Command-line options several commands share, defined once (same flag, same default, same help)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from ..hub import DATA_ENV

if TYPE_CHECKING:
    from ..data.context import DataContext

__all__ = ["add_data_root", "add_frost_dir", "data_context"]


def add_data_root(
    parser: argparse.ArgumentParser,
    holds: str = "cifar-10-batches-py/, CIFAR-10-C/, weights/ and frost/",
    note: str = "",
) -> None:
    """`--data-root DIR` (default $TTA_SURGICAL_DATA): the folder holding the datasets, weights and textures."""
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        default=os.environ.get(DATA_ENV),
        help=f"folder holding {holds} (default: ${DATA_ENV}; unset means download into the cache){note}",
    )


def add_frost_dir(parser: argparse.ArgumentParser) -> None:
    """`--frost-dir DIR`: the frost textures of the `frost` corruption."""
    parser.add_argument(
        "--frost-dir",
        metavar="DIR",
        default=None,
        help="folder with the frost texture images frost1..5 (default: <data-root>/frost when present, else the "
        "verified download cache)",
    )


def data_context(args: argparse.Namespace) -> DataContext:
    """The run's `DataContext`, made once here at the edge from `--data-root` / `--frost-dir` (where the command
    has them) and passed down whole."""
    from ..data.context import DataContext  # lazy: `tta-surgical --help` must not import torch

    return DataContext.resolve(getattr(args, "data_root", None), getattr(args, "frost_dir", None))
