"""The model zoo: `create_model(name)` builds a registered architecture (or, for `torchvision:`, `timm:` and
`module:` names, an external one: `external.py`) and loads its weights.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..data.context import DataContext, DataLike
from ..registry import Registry
from . import cifar, imagenet
from ._common import describe_norm, register_input_norm
from .external import create_external, is_external
from .overrides import set_block_map
from .weights import WEIGHTS, load_checkpoint, weight_file

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = ["MODELS", "ModelEntry", "ModelInfo", "create_model", "create_model_from_config"]

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
    normalization: str = ""  # the input normalisation inside the model (e.g. "ImageNet mean/std")

    def summary(self) -> str:
        norm = f", input normalisation: {self.normalization}" if self.normalization else ""
        return (
            f"{self.name}: {self.params:,} parameters, {self.num_classes} classes, {self.input_size}px input, "
            f"weights: {self.weights}{norm}"
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
    data: DataLike = None,
    allow_random: bool = False,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    mean: Sequence[float] | str | None = "auto",
    std: Sequence[float] | str | None = "auto",
) -> tuple[nn.Module, ModelInfo]:
    """Build model `name` and load its weights; return `(model in eval mode, ModelInfo)`.

    name: a zoo name (`MODELS`), or `torchvision:<name>`, `timm:<name>`, `module:<python.path>:<factory>`
    (see `external.py`).
    data: where the data lives (a `DataContext`, a data root folder, or None for $TTA_SURGICAL_DATA).
    pretrained: True = the registry's weights (from `<data root>/weights/<file>`, else
    the cache, downloading with SHA-256 verification); False = random init; a path = that local checkpoint
    (the same as `checkpoint=`).
    checkpoint: a local checkpoint loaded strictly with weights_only=True (a bare state dict, or one nested
    under `state_dict`/`model`/...; `module.` prefixes stripped); it replaces the pretrained weights.
    allow_random: with pretrained=True, fall back to random init (with a warning) when the weights cannot be
    obtained (offline, local-only file absent, none published). A corrupt file is always an error.
    num_classes: override the classifier size (random init or a matching checkpoint only).
    mean, std: the input normalisation applied inside the model, which always takes [0, 1] images: `auto` =
    the model's own (zoo: as trained; torchvision/timm: their weights' statistics; module: none), None = raw
    [0, 1] input, or three numbers each.
    Unknown names raise `KeyError` listing the valid ones.
    """
    data_root = DataContext.of(data).root
    if isinstance(pretrained, (str, os.PathLike)):
        if checkpoint is not None:
            raise ValueError("give the checkpoint once: as checkpoint=<path> (pretrained=<path> is the older form)")
        checkpoint, pretrained = pretrained, True
    elif not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True, False or a checkpoint path, got {pretrained!r}")
    if num_classes is not None and int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if is_external(name):
        model, fields = create_external(
            name,
            pretrained=pretrained,
            checkpoint=checkpoint,
            allow_random=allow_random,
            num_classes=num_classes,
            data_root=data_root,
            mean=mean,
            std=std,
        )
        nc = num_classes if num_classes is not None else _num_outputs(model)
        info = ModelInfo(name=name, num_classes=nc, params=_count(model), **fields)  # type: ignore[arg-type]
        return model, info
    model, info = _create_zoo(name, pretrained, checkpoint, data_root, allow_random, num_classes)
    if (mean == "auto") != (std == "auto"):
        raise ValueError(f"{name}: give mean and std together (both auto, both null, or both numbers)")
    if mean != "auto":
        register_input_norm(model, mean, std)  # type: ignore[arg-type]
    return model, replace(info, normalization=_zoo_norm(model))


def _zoo_norm(model: nn.Module) -> str:
    """The description of a zoo model's internal normalisation (its `mean`/`std` buffers)."""
    if model.mean is None:
        return describe_norm(None, None)
    if model.mean.is_meta:  # built on the meta device for shapes only: no values to read
        return "inside the model"
    return describe_norm(model.mean.flatten().tolist(), model.std.flatten().tolist())


def create_model_from_config(
    model_cfg: ModelConfig, data: DataLike = None
) -> tuple[nn.Module, ModelInfo]:
    """`create_model` driven by a config's `model:` section, plus its `block_map` file attached to the model."""
    model, info = create_model(
        model_cfg.name,
        pretrained=model_cfg.pretrained,
        data=data,
        allow_random=model_cfg.allow_random,
        num_classes=model_cfg.num_classes,
        checkpoint=model_cfg.checkpoint,
        mean=model_cfg.mean,
        std=model_cfg.std,
    )
    if model_cfg.block_map is not None:
        set_block_map(model, model_cfg.block_map)
    return model, info


def _num_outputs(model: nn.Module) -> int:
    """The classifier size of an external model: its last Linear layer's outputs (0 when there is none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else 0


def _create_zoo(
    name: str,
    pretrained: bool,
    checkpoint: str | os.PathLike | None,
    data_root: str | os.PathLike | None,
    allow_random: bool,
    num_classes: int | None,
) -> tuple[nn.Module, ModelInfo]:
    entry = MODELS.get(name)
    nc = entry.num_classes if num_classes is None else int(num_classes)
    model = entry.builder(nc)
    notes: list[str] = []
    source = RANDOM_INIT

    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} for model {name!r} does not exist")
        load_checkpoint(model, path)
        source = str(path)
    elif pretrained:
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
            warnings.warn(msg, UserWarning, stacklevel=3)

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
