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
