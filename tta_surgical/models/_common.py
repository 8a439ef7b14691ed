"""Pieces shared by the architectures: input normalisation inside the model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# ImageNet statistics; the pretrained CIFAR ResNets (akamaster) were trained with them too.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_input_norm(module: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """Attach `mean`/`std` as non-persistent buffers (they follow `.to(device)` but stay out of `state_dict`,
    so checkpoint keys are exactly the published ones). `None` means the model takes raw [0, 1] inputs."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is None:
        module.register_buffer("mean", None, persistent=False)
        module.register_buffer("std", None, persistent=False)
        return
    module.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    module.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)


def normalize_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with the module's buffers, in x's dtype (AMP-friendly); identity when they are None."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], got {tuple(x.shape)}")
    if module.mean is None:
        return x
    return (x - module.mean.to(x.dtype)) / module.std.to(x.dtype)


# Names of the buffers `attach_input_norm` adds to a model we do not own (unlikely to clash with the user's).
HOOK_MEAN, HOOK_STD = "tta_input_mean", "tta_input_std"


def _normalize_pre_hook(module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
    """Forward pre-hook: replace the first input x by (x - mean) / std (module-level, so deepcopy keeps it valid)."""
    x = args[0]
    mean, std = getattr(module, HOOK_MEAN), getattr(module, HOOK_STD)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != mean.shape[1]:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected images of shape (B, {mean.shape[1]}, H, W) in [0, 1], got {shape}")
    return ((x - mean.to(x.dtype)) / std.to(x.dtype), *args[1:])


def attach_input_norm(model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """Make a model we did not write (torchvision, timm, a user's) take [0, 1] images: a forward pre-hook
    applies (x - mean) / std with non-persistent buffers, so parameter names, block maps and `state_dict` keys
    stay exactly the model's own. `None` (both) attaches nothing: the model takes raw [0, 1] input."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is None:
        return
    if hasattr(model, HOOK_MEAN):
        raise ValueError(f"{type(model).__qualname__} already has an input normalisation attached")
    model.register_buffer(HOOK_MEAN, torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    model.register_buffer(HOOK_STD, torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    model.register_forward_pre_hook(_normalize_pre_hook)


def describe_norm(mean: Sequence[float] | None, std: Sequence[float] | None) -> str:
    """A short human description of an input normalisation, for `ModelInfo` and the `blocks` command."""
    if mean is None or std is None:
        return "none (the model takes raw [0, 1] images)"
    if (
        tuple(round(float(v), 3) for v in mean) == IMAGENET_MEAN
        and tuple(round(float(v), 3) for v in std) == IMAGENET_STD
    ):
        return "ImageNet mean/std"
    fmt = lambda vs: "(" + ", ".join(f"{float(v):g}" for v in vs) + ")"  # noqa: E731
    return f"mean {fmt(mean)}, std {fmt(std)}"
