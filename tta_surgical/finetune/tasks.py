"""Target tasks: what the labels of the labeled target set mean (`finetune.task`), one registered entry each.

The images of a target set come from `finetune.corruptions` (a corruption, or `none` for the clean images); the
task says which label each image carries. Together they make the three kinds of shift of the paper's Table 1:

- `corruption` + a corruption: the source's labels on corrupted images, an *input-level* shift (CIFAR-10-C);
- `cifar_flip` + `none`: the clean images with every class renamed, a *label-level* shift (CIFAR-Flip);
- `cifar_flip` + a corruption: both at once, an *input- and label-level* shift.

CIFAR-Flip (Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR 2023, appendix)
keeps the CIFAR-10 images and reverses the class order: label y becomes 9 - y (airplane <-> truck, automobile <->
ship, bird <-> horse, cat <-> frog, deer <-> dog). Every class changes name and none keeps its own, so a source
model scores about 0% and only a model that re-learns the mapping from features to classes recovers.

Adding a task is one `register_task(TargetTask(...))` here: a name, the shift level its relabelling adds, and the
relabelling as a pure function of the source labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..registry import Registry
from ..streams.spec import CLEAN

__all__ = [
    "CLEAN",
    "TASKS",
    "TargetTask",
    "flip_labels",
    "get_task",
    "register_task",
    "shift_level",
]

# CLEAN ("none"): the corruption name of the clean images, `finetune.corruptions: [none]`, `stream.domains: [none]`.


@dataclass(frozen=True)
class TargetTask:
    """A target task: `relabel(labels, n_classes)` maps source labels (int64) to the task's labels.

    relabels: whether the task changes labels (a label-level shift); False for the identity.
    needs_classes: the number of classes the relabelling is defined for (None = any).
    """

    name: str
    relabels: bool
    description: str
    relabel_fn: Callable[[np.ndarray, int], np.ndarray]
    needs_classes: int | None = None

    def relabel(self, labels: np.ndarray, n_classes: int) -> np.ndarray:
        """The task's labels of source labels `labels` (a new int64 array; checks the class count)."""
        labels = np.asarray(labels, dtype=np.int64)
        if self.needs_classes is not None and n_classes != self.needs_classes:
            raise ValueError(
                f"finetune.task={self.name} is defined for {self.needs_classes} classes (CIFAR-10); the target set "
                f"has {n_classes}; use finetune.task=corruption"
            )
        out = np.asarray(self.relabel_fn(labels, n_classes), dtype=np.int64)
        if out.shape != labels.shape:
            raise AssertionError(f"task {self.name} changed the number of labels ({labels.shape} -> {out.shape})")
        return out


TASKS: Registry[TargetTask] = Registry("target task")


def register_task(task: TargetTask) -> TargetTask:
    """Register a target task under its name (a duplicate name raises)."""
    TASKS.register(task.name, task)
    return task


def get_task(name: str) -> TargetTask:
    """The registered task `name` (an unknown name raises, listing the valid ones)."""
    return TASKS.get(name)


def flip_labels(labels: np.ndarray, n_classes: int = 10) -> np.ndarray:
    """CIFAR-Flip's relabelling: y -> (n_classes - 1) - y (for CIFAR-10: 9 - y)."""
    return (n_classes - 1) - np.asarray(labels, dtype=np.int64)


def shift_level(task: str, corruption: str) -> str:
    """The kind of shift of (task, corruption): `input`, `label`, `input+label`, or `none` (clean, same labels)."""
    label = get_task(task).relabels
    inputs = corruption != CLEAN
    if label and inputs:
        return "input+label"
    return "label" if label else ("input" if inputs else "none")


register_task(
    TargetTask(
        "corruption",
        relabels=False,
        description="the source's labels; the shift is the corruption of the images (input-level)",
        relabel_fn=lambda labels, n_classes: labels.copy(),
    )
)
register_task(
    TargetTask(
        "cifar_flip",
        relabels=True,
        description="CIFAR-Flip (Lee et al. 2023): every label y becomes 9 - y (label-level)",
        relabel_fn=flip_labels,
        needs_classes=10,
    )
)
