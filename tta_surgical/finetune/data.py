"""Labeled target data for supervised few-shot fine-tuning: seeded class-balanced splits and corrupted images.

The split is a function of the *source* labels and the seed only (not of the corruption, nor of the target task's
relabelling), so for one seed every corruption and every task uses the same image indices: train, validation and
test hold the same source images under each corruption and under CIFAR-Flip, and the online comparison
(`tta-surgical report`) knows exactly which rows the supervised side used (`online_pool`: every other row).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data.context import DataLike
from ..streams import StreamSpec, open_source
from .config import FinetuneSection
from .tasks import get_task

__all__ = ["Split", "TargetData", "budget_subset", "online_pool", "split_indices", "write_cifar10c_subset"]

_TAG_SPLIT = 0x5F17
_TAG_BUDGET = 0xB0D6


@dataclass(frozen=True, eq=False)
class Split:
    """Disjoint, sorted index arrays (int64) into the target set's rows."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def split_indices(
    labels: np.ndarray,
    n_train_per_class: int,
    n_val_per_class: int,
    n_test_per_class: int,
    seed: int,
) -> Split:
    """A seeded class-balanced split of `labels` into disjoint train / val / test index sets.

    Every class present in `labels` gives exactly n_*_per_class images to each split (a random
    permutation of the class's rows, cut in three). Raises when a split is empty or larger than the data.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"the target set has no labeled images (labels shape {labels.shape})")
    for name, n in (("train", n_train_per_class), ("val", n_val_per_class), ("test", n_test_per_class)):
        if n < 1:
            raise ValueError(
                f"the {name} split would be empty ({n} images per class); every split needs >= 1 image per class"
            )
    need = n_train_per_class + n_val_per_class + n_test_per_class
    classes, counts = np.unique(labels, return_counts=True)
    short = [(int(c), int(k)) for c, k in zip(classes, counts) if k < need]
    if short:
        shown = ", ".join(f"class {c}: {k}" for c, k in short[:5]) + (" ..." if len(short) > 5 else "")
        raise ValueError(
            f"the split asks for {n_train_per_class} + {n_val_per_class} + {n_test_per_class} = {need} images per "
            f"class but the target set has fewer ({shown}; {len(labels)} images in all); lower finetune.n_train, "
            "n_val_per_class or n_test_per_class"
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TAG_SPLIT]))
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.cumsum([n_train_per_class, n_val_per_class, n_test_per_class])
        parts[0].append(members[: cuts[0]])
        parts[1].append(members[cuts[0] : cuts[1]])
        parts[2].append(members[cuts[1] : cuts[2]])
    train, val, test = (np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    # Disjointness is what makes the test accuracy honest: check it rather than trust the slicing.
    assert not (
        set(train.tolist()) & set(val.tolist())
        or set(train.tolist()) & set(test.tolist())
        or set(val.tolist()) & set(test.tolist())
    ), "train / val / test splits overlap"
    return Split(train, val, test, int(seed))


def budget_subset(train: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """The first `per_class` images of each class of the training rows `train`, in a seeded order (sorted rows).

    Nested: a smaller budget is a subset of a larger one for the same seed, so a budget curve adds labeled images
    rather than drawing new ones. Raises when a class has fewer training images than asked.
    """
    train = np.asarray(train, dtype=np.int64)
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TAG_BUDGET]))
    parts = []
    for c in np.unique(labels[train]):
        members = rng.permutation(train[labels[train] == c])
        if len(members) < per_class:
            raise ValueError(f"class {int(c)} has {len(members)} training images, fewer than the budget's {per_class}")
        parts.append(members[:per_class])
    return np.sort(np.concatenate(parts)).astype(np.int64)


def online_pool(n_rows: int, split: Split, include_test: bool = True) -> np.ndarray:
    """The rows the online (unlabeled) side may adapt on: every row outside the labeled train and validation
    splits (and outside the test split too with include_test=False), sorted.

    Why the test rows are in by default: an online method sees its test images unlabeled as they stream (the
    test-time adaptation protocol); the supervised side never trains on them either way.
    """
    taken = np.concatenate([split.train, split.val] + ([] if include_test else [split.test]))
    keep = np.ones(int(n_rows), dtype=bool)
    keep[taken] = False
    return np.flatnonzero(keep).astype(np.int64)


def per_class_train(n_train: int, n_classes: int) -> int:
    """n_train / n_classes, or a clear error when the labeled set cannot be class-balanced."""
    if n_train < n_classes:
        raise ValueError(
            f"finetune.n_train={n_train} is too small for a class-balanced training set over {n_classes} classes "
            f"(need at least one image per class: n_train >= {n_classes})"
        )
    if n_train % n_classes:
        raise ValueError(
            f"finetune.n_train={n_train} does not split evenly over {n_classes} classes; use a multiple of "
            f"{n_classes} (e.g. {n_train - n_train % n_classes})"
        )
    return n_train // n_classes


class TargetData:
    """The labeled target set of one finetune config: its labels and, per corruption, uint8 images on demand.

    `source_labels` are those of the source rows (the CIFAR-10 test set, a CIFAR-10-C severity block, or the sorted
    ImageNet-C file list); `labels` are the target task's (`finetune.task`: the same for `corruption`, 9 - y for
    `cifar_flip`). Splits are drawn on `source_labels` (`split`). `images(corruption, indices)` returns uint8
    (n, 3, H, W) on the CPU, reading or generating only what is needed (for source cifar10, the whole generation
    batches that hold `indices`, since each batch's noise comes from one generator; the batches of the last
    corruption asked for are kept, so the supervised side and the online scoring generate each image once).
    `none` is the clean images.
    """

    def __init__(self, section: FinetuneSection, *, data: DataLike = None, device: str | torch.device = "cpu") -> None:
        self.section = section
        self.device = torch.device(device)
        # The target set is the stream source of the same name, opened as a stream over the section's domains:
        # every source that implements `stored_images` can serve it (no dispatch on source names here).
        spec = StreamSpec(
            source=section.source, path=section.path, domains=section.corruptions, severities=(section.severity,)
        )
        self.source = open_source(spec, data)
        self.source.attach(spec)
        labels = np.asarray(self.source.labels, dtype=np.int64)
        self.source_labels = labels[: section.limit] if section.limit is not None else labels
        self.task = get_task(section.task)
        self.labels = self.task.relabel(self.source_labels, self.n_classes)

    @property
    def n_classes(self) -> int:
        return int(len(np.unique(self.source_labels)))

    def split(self, per_class_train: int, seed: int) -> Split:
        """The seeded class-balanced split of this target set (on the source labels; sizes from the section)."""
        sec = self.section
        return split_indices(self.source_labels, per_class_train, sec.n_val_per_class, sec.n_test_per_class, seed)

    def labeled(self, corruption: str, rows: Sequence[int] | np.ndarray) -> tuple[Tensor, Tensor]:
        """(uint8 images, task labels as int64) of `rows` under `corruption`: what a split part holds."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.images(corruption, rows), torch.as_tensor(self.labels[rows], dtype=torch.long)

    def images(self, corruption: str, indices: Sequence[int] | np.ndarray) -> Tensor:
        """uint8 (n, 3, H, W) CPU tensor of `corruption` at the configured severity, rows `indices` in order."""
        sec = self.section
        idx = np.asarray(indices, dtype=np.int64)
        return self.source.stored_images(
            corruption,
            sec.severity,
            idx,
            seed=sec.generation_seed,
            batch_size=sec.generation_batch_size,
            device=self.device,
            limit=sec.limit,
        )


def write_cifar10c_subset(
    folder: str | os.PathLike, corruption: str, severity: int, images: Tensor, labels: np.ndarray, meta: dict
) -> Path:
    """Write `images` (uint8 (n, 3, 32, 32)) as `<folder>/<corruption>.npy` in the CIFAR-10-C layout with a sidecar
    saying that rows [0, n) hold `severity`, plus `labels.npy`; a stream with source cifar10c reads it as-is.

    Files are written under temporary names and renamed, so a reader never sees half a file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = int(images.shape[0])
    arr = images.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8)
    labels = np.asarray(labels)
    # uint8 as in the official labels.npy when the classes fit (CIFAR), else int64.
    labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 and labels.min(initial=0) >= 0 else np.int64)
    for name, data in ((f"{corruption}.npy", arr), ("labels.npy", labels)):
        tmp = folder / f"{name}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, data)
        os.replace(tmp, folder / name)
    side = dict(
        meta, corruption=corruption, severities=[int(severity)], rows={str(severity): [0, n]}, n_images=n, complete=True
    )
    tmp = folder / f"{corruption}.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(side, indent=1))
    os.replace(tmp, folder / f"{corruption}.json")
    return folder / f"{corruption}.npy"
