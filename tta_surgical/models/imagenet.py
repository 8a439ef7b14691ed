"""ImageNet-scale torchvision architectures with normalisation inside the model.

Subclasses of torchvision's `ResNet` and `VisionTransformer` (so `isinstance` checks, parameter names and
the torchvision checkpoints all stay the same) whose `forward` takes [0, 1] images and applies the
ImageNet mean/std from non-persistent buffers first.
"""

from __future__ import annotations

import torch
from torchvision.models import ResNet, VisionTransformer
from torchvision.models.resnet import BasicBlock, Bottleneck

from ._common import IMAGENET_MEAN, IMAGENET_STD, normalize_input, register_input_norm


class ImageNetResNet(ResNet):
    """torchvision ResNet taking [0, 1] inputs (ImageNet normalisation inside)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000) -> None:
        super().__init__(block, layers, num_classes=num_classes)
        register_input_norm(self, IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(normalize_input(self, x))


class ImageNetViT(VisionTransformer):
    """torchvision VisionTransformer taking [0, 1] inputs (ImageNet normalisation inside)."""

    def __init__(self, num_classes: int = 1000, **kwargs: int) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        register_input_norm(self, IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(normalize_input(self, x))


def resnet18(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def vit_b_16(num_classes: int = 1000) -> ImageNetViT:
    return ImageNetViT(
        num_classes, image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072
    )
