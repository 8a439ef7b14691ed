"""Where a run's data lives, decided once at the edge (command-line options, an API call) and passed down whole.

Every part that reads files (stream sources, the supervised split, model weights, frost textures, EATA's source
samples) takes one `DataContext` instead of loose `data_root` / `frost_dir` / `num_workers` arguments, so adding a
kind of data location is one field here rather than a new parameter threaded through every layer.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .. import hub
from ..corruptions.textures import default_frost_dir

__all__ = ["DataContext", "DataLike"]


@dataclass(frozen=True)
class DataContext:
    """root: the data folder (`cifar-10-batches-py/`, `weights/`, `frost/`, `CIFAR-10-C/`, ...): `--data-root`, else
    `$TTA_SURGICAL_DATA`, else None (files are then downloaded into the verified cache).
    frost_dir: the frost textures: given, else `<root>/frost` when it exists, else None (the verified cache).
    num_workers: DataLoader worker processes for sources that read image files (None = min(8, CPUs); 0 = in this
    process); in-memory sources ignore it.
    """

    root: Path | None = None
    frost_dir: Path | None = None
    num_workers: int | None = None

    @classmethod
    def resolve(
        cls,
        root: str | os.PathLike | None = None,
        frost_dir: str | os.PathLike | None = None,
        num_workers: int | None = None,
    ) -> DataContext:
        """The context of explicit settings, with the environment's defaults filled in (see the class doc)."""
        base = hub.data_root(root)
        frost = default_frost_dir(frost_dir, base)
        return cls(base, Path(frost) if frost is not None else None, num_workers)

    @classmethod
    def of(cls, data: DataLike) -> DataContext:
        """`data` as a context: a context as it is; a folder (or None) as the data root, resolved."""
        return data if isinstance(data, DataContext) else cls.resolve(data)

    def with_workers(self, num_workers: int | None) -> DataContext:
        """The same context reading files with `num_workers` workers (a run's `runtime.num_workers`)."""
        return self if num_workers == self.num_workers else dataclasses.replace(self, num_workers=num_workers)


DataLike = DataContext | str | os.PathLike | None
