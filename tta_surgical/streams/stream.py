"""A planned stream on a device: the plan's batches, loaded by the source and corrupted on the fly when it is clean."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..corruptions import corrupt, make_generator, to_uint8
from ..data.context import DataContext, DataLike
from .plan import BatchPlan, derive_seed, plan_fingerprint, plan_stream
from .sources import Source, open_source
from .spec import CLEAN, StreamSpec

__all__ = ["Batch", "Stream", "build_stream"]


@dataclass(frozen=True, eq=False)
class Batch:
    """One batch on the device: x float (B, 3, H, W) in [0, 1], y long (B,), and where it sits in the stream."""

    x: Tensor
    y: Tensor
    domain: str
    severity: int
    batch_index: int
    reset_before: bool
    domain_index: int = 0
    plan: BatchPlan | None = field(default=None, repr=False)


class Stream:
    """The batches of `spec`'s plan over `source`, produced on `device` in plan order. `iter_from(k)` resumes at k.

    With `spec.indices` the plan runs over positions in that list and the source is asked for the rows they name.
    Clean sources are corrupted here, seeded per batch, so batch k is the same bits however the stream is entered.
    """

    def __init__(
        self,
        spec: StreamSpec,
        source: Source,
        *,
        device: str | torch.device = "cpu",
        frost_dir: str | os.PathLike | None = None,
    ) -> None:
        source.attach(spec)
        self.spec = spec
        self.source = source
        self.frost_dir = frost_dir
        self._rows = None if spec.indices is None else np.asarray(spec.indices, dtype=np.int64)
        if self._rows is not None and self._rows.max() >= len(source.labels):
            raise ValueError(
                f"stream.indices names row {int(self._rows.max())} but the {spec.source!r} source has "
                f"{len(source.labels)} rows (0..{len(source.labels) - 1})"
            )
        self.labels: np.ndarray = source.labels if self._rows is None else source.labels[self._rows]
        self.plan: list[BatchPlan] = plan_stream(spec, self.labels)
        # Every batch's positions (and source rows), on the device once (a few MB at most), sliced per batch.
        self._offsets = np.cumsum([0] + [len(p) for p in self.plan])
        flat = np.concatenate([p.indices for p in self.plan]) if self.plan else np.zeros(0, np.int64)
        self._flat_idx = torch.from_numpy(flat).to(device)
        self._flat_rows = self._flat_idx if self._rows is None else torch.from_numpy(self._rows[flat]).to(device)
        self.device = self._flat_idx.device  # as tensors report it (cuda:0 for "cuda")
        self._y = torch.as_tensor(self.labels, dtype=torch.long).to(self.device)
        source.to(self.device)

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def n_images(self) -> int:
        return sum(len(p) for p in self.plan)

    def fingerprint(self) -> str:
        return plan_fingerprint(self.plan)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, batch_index: int) -> Iterator[Batch]:
        """Batches `batch_index`, `batch_index + 1`, ... identical to the same batches of a full iteration."""
        if not 0 <= batch_index <= len(self.plan):
            raise IndexError(
                f"batch_index {batch_index} outside 0..{len(self.plan)} (the stream has {len(self.plan)} batches)"
            )
        tail = self.plan[batch_index:]
        # The source sees rows of its own data: the plan's positions mapped through spec.indices.
        asked = tail if self._rows is None else [dataclasses.replace(p, indices=self._rows[p.indices]) for p in tail]
        images = self.source.load_many(asked, (self._slice(self._flat_rows, p) for p in tail), self.device)
        return (self._make(p, x) for p, x in zip(tail, images))

    def _slice(self, flat: Tensor, p: BatchPlan) -> Tensor:
        b = p.batch_index
        return flat[int(self._offsets[b]) : int(self._offsets[b + 1])]

    def _make(self, p: BatchPlan, x_uint8: Tensor) -> Batch:
        y = self._y[self._slice(self._flat_idx, p)]
        x = x_uint8.float().div_(255.0)
        if self.source.corrupts_on_the_fly:
            x = self._corrupt(p, x)
        return Batch(x, y, p.domain, p.severity, p.batch_index, p.reset_before, p.domain_index, p)

    def _corrupt(self, p: BatchPlan, x: Tensor) -> Tensor:
        groups = p.groups()
        out = x if len(groups) == 1 else torch.empty_like(x)
        for d, s, pos in groups:
            if self.spec.domains[d] == CLEAN:  # the clean images: nothing to corrupt
                if len(groups) > 1:
                    out[torch.from_numpy(pos).to(x.device)] = x[torch.from_numpy(pos).to(x.device)]
                continue
            g = make_generator(derive_seed(p.noise_seed, d, s), x.device)
            kw = {"frost_dir": self.frost_dir, "preset": "auto"}
            if len(groups) == 1:
                out = corrupt(x, self.spec.domains[d], s, g, **kw)
            else:
                where = torch.from_numpy(pos).to(x.device)
                out[where] = corrupt(x[where], self.spec.domains[d], s, g, **kw)
        if self.spec.quantize:
            out = to_uint8(out).float().div_(255.0)
        return out


def build_stream(
    spec: StreamSpec,
    *,
    data: DataLike = None,
    device: str | torch.device = "cpu",
    source: Source | None = None,
) -> Stream:
    """The `Stream` of `spec` on `device`, its source opened once from `spec.path` or the data root.

    data: where the data lives (`DataContext`; a folder is taken as the data root holding `cifar-10-batches-py/`,
        `CIFAR-10-C/`, `ImageNet-C/`, `imagenet/val/`; None = $TTA_SURGICAL_DATA): `spec.path` (the dataset folder
        itself) wins; its frost textures serve on-the-fly "frost", its `num_workers` the file-reading sources.
    source: an already open source of kind `spec.source` (e.g. a `MemorySource`), used instead of opening one.
    """
    data = DataContext.of(data)
    if source is None:
        source = open_source(spec, data)
    return Stream(spec, source, device=device, frost_dir=data.frost_dir)
