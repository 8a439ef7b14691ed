"""The model zoo: `create_model(name)` builds a registered architecture and loads its weights.

Every model takes float images in [0, 1] with shape (B, 3, H, W) and normalises inside, so callers never
need to know a checkpoint's preprocessing. Weight sources, in order: `pretrained=<path>` (a local
checkpoint, always accepted); `pretrained=True` (the registry's weights: `<data_root>/weights/<file>`,
else the cache, downloading with a SHA-256 check); `pretrained=False` (random init). When registry
weights cannot be obtained, `allow_random=True` continues with random init and says so loudly
(`ModelInfo.warnings` and a `UserWarning`); otherwise it is an error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..registry import Registry
from . import cifar, imagenet
from .weights import WEIGHTS, load_checkpoint, weight_file

__all__ = ["MODELS", "ModelEntry", "ModelInfo", "create_model"]

RANDOM_INIT = "random init"


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: `builder(num_classes) -> nn.Module`, its data regime and default weights."""

    name: str
    builder: Callable[[int], nn.Module]
    dataset: str  # "cifar10" or "imagenet": which images (size, classes) the default weights expect
    input_size: int
    num_classes: int
    weights: str | None  # a WEIGHTS name, or None when no public weights exist
    description: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What `create_model` built.

    `weights` is the checkpoint path the weights came from, or "random init"; `pretrained` is True when
    trained weights were loaded; `warnings` holds anything the user must know (e.g. a random-init fallback).
    """

    name: str
    dataset: str
    input_size: int
    num_classes: int
    weights: str
    pretrained: bool
    params: int
    warnings: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        return (
            f"{self.name}: {self.params:,} parameters, {self.num_classes} classes, {self.input_size}px input, "
            f"weights: {self.weights}"
        )


MODELS: Registry[ModelEntry] = Registry("model")


def _add(entry: ModelEntry) -> None:
    MODELS.register(entry.name, entry)


for _depth in (20, 32, 44, 56):
    _add(
        ModelEntry(
            f"resnet{_depth}",
            lambda nc, d=_depth: cifar.CifarResNet(d, nc),
            "cifar10",
            32,
            10,
            f"resnet{_depth}",
            f"CIFAR ResNet-{_depth}, option-A shortcuts (He et al. 2016; akamaster weights)",
        )
    )
_add(
    ModelEntry(
        "resnet26",
        lambda nc: cifar.PreActResNet26(nc),
        "cifar10",
        32,
        10,
        None,
        "CIFAR pre-activation ResNet-26 of TTT/Tent, BatchNorm (no public weights)",
    )
)
_add(
    ModelEntry(
        "resnet26_gn",
        lambda nc: cifar.PreActResNet26(nc, groups=8),
        "cifar10",
        32,
        10,
        None,
        "CIFAR pre-activation ResNet-26 of TTT, GroupNorm(8 groups) (no public weights)",
    )
)
_add(
    ModelEntry(
        "wrn28_10",
        lambda nc: cifar.WideResNet(28, 10, nc),
        "cifar10",
        32,
        10,
        "wrn28_10",
        "WideResNet-28-10, RobustBench 'Standard' names; raw [0, 1] input (local weights only)",
    )
)
_add(
    ModelEntry("resnet18", imagenet.resnet18, "imagenet", 224, 1000, "resnet18", "torchvision ResNet-18, IMAGENET1K_V1")
)
_add(
    ModelEntry("resnet50", imagenet.resnet50, "imagenet", 224, 1000, "resnet50", "torchvision ResNet-50, IMAGENET1K_V1")
)
_add(
    ModelEntry("vit_b_16", imagenet.vit_b_16, "imagenet", 224, 1000, "vit_b_16", "torchvision ViT-B/16, IMAGENET1K_V1")
)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def create_model(
    name: str,
    *,
    pretrained: bool | str | os.PathLike = True,
    data_root: str | os.PathLike | None = None,
    allow_random: bool = False,
    num_classes: int | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Build model `name` and load its weights; return `(model in eval mode, ModelInfo)`.

    pretrained: True = the registry's weights (from `<data_root or $TTA_SURGICAL_DATA>/weights/<file>`, else
    the cache, downloading with SHA-256 verification); False = random init; a path = that local checkpoint.
    allow_random: with pretrained=True, fall back to random init (with a warning) when the weights cannot be
    obtained (offline, local-only file absent, none published). A corrupt file is always an error.
    num_classes: override the classifier size (random init or a matching local checkpoint only).
    Unknown names raise `KeyError` listing the valid ones.
    """
    entry = MODELS.get(name)
    nc = entry.num_classes if num_classes is None else int(num_classes)
    if nc < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = entry.builder(nc)
    notes: list[str] = []
    source = RANDOM_INIT

    if isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} for model {name!r} does not exist")
        load_checkpoint(model, path)
        source = str(path)
    elif pretrained is True:
        problem = None
        if entry.weights is None:
            problem = (
                f"no public pretrained weights for {name!r}; pass pretrained=<checkpoint path> or pretrained=False"
            )
        elif nc != entry.num_classes:
            raise ValueError(
                f"{name!r} pretrained weights have {entry.num_classes} classes, not {nc}: pass "
                "pretrained=False or a checkpoint path with that many classes"
            )
        else:
            spec = WEIGHTS.get(entry.weights)
            try:
                path = weight_file(spec, data_root)
            except FileNotFoundError as err:
                problem = str(err)
            else:
                load_checkpoint(model, spec.loader(path))
                source = str(path)
        if problem is not None:
            if not allow_random:
                raise FileNotFoundError(
                    f"{problem}. (Or pass allow_random=True to continue with a randomly "
                    "initialised model, e.g. for timing.)"
                )
            msg = f"{name}: pretrained weights unavailable, model is RANDOMLY INITIALISED ({problem})"
            notes.append(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)
    elif pretrained is not False:
        raise TypeError(f"pretrained must be True, False or a checkpoint path, got {pretrained!r}")

    model.eval()
    info = ModelInfo(
        name=name,
        dataset=entry.dataset,
        input_size=entry.input_size,
        num_classes=nc,
        weights=source,
        pretrained=source != RANDOM_INIT,
        params=_count(model),
        warnings=tuple(notes),
    )
    return model, info
