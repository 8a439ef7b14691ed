"""CIFAR architectures: option-A ResNets (He et al. 2016), the TTT/Tent ResNet-26, and WideResNet-28-10.

Parameter names follow the published checkpoints exactly, so their state dicts load strictly:
- `CifarResNet` (resnet20/32/44/56): akamaster/pytorch_resnet_cifar10 (`conv1`, `bn1`, `layer1..3`, `linear`).
- `PreActResNet26`: Sun et al. 2020 (TTT) `ResNetCifar` names (`conv1`, `layer1..3`, final `bn`, `fc`).
- `WideResNet`: the RobustBench `Standard` checkpoint (`conv1`, `block1..3.layer.i`, final `bn1`, `fc`).
All take [0, 1] images and normalise inside (none for the WRN, which RobustBench feeds raw [0, 1] inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._common import IMAGENET_MEAN, IMAGENET_STD, normalize_input, register_input_norm
from .blocks import BlockSpec, stage_spec

NormFactory = Callable[[int], nn.Module]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


# ----------------------------------------------------------------------------------- option-A CIFAR ResNets


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride` and zero-pad channels symmetrically (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad_lo, self.pad_hi = stride, (cout - cin) // 2, cout - cin - (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlockA(nn.Module):
    """conv-bn-relu-conv-bn + shortcut, then relu (post-activation, as in He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = PadShortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs with option-A shortcuts; 16/32/64 channels; `linear` classifier."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        register_input_norm(self, IMAGENET_MEAN, IMAGENET_STD)
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for k, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2)), 1):
            units = [BasicBlockA(cin if i == 0 else width, width, stride if i == 0 else 1) for i in range(n)]
            self.add_module(f"layer{k}", nn.Sequential(*units))
            cin = width
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize_input(self, x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def block_spec(self) -> BlockSpec:
        return stage_spec(self, ("conv1", "bn1"), ("layer1", "layer2", "layer3"), ("linear",))


# ----------------------------------------------------------------------------------- TTT / Tent ResNet-26

TTT_MEAN = (0.5, 0.5, 0.5)  # Sun et al. 2020 normalise CIFAR with mean 0.5, std 0.5
TTT_STD = (0.5, 0.5, 0.5)


class AvgPadShortcut(nn.Module):
    """TTT's downsampling shortcut: average-pool by `stride`, then append zero channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cout % cin:
            raise ValueError(f"shortcut needs cout to be a multiple of cin, got {cin}->{cout}")
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class PreActBlock(nn.Module):
    """Pre-activation basic block: x + conv2(relu(bn2(conv1(relu(bn1(x)))))); the shortcut takes the raw x."""

    def __init__(self, cin: int, cout: int, norm: NormFactory, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = norm(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = norm(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.downsample: nn.Module = AvgPadShortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return self.downsample(x) + out


class PreActResNet26(nn.Module):
    """The CIFAR ResNet-26 of TTT (Sun et al. 2020) and Tent (Wang et al. 2021).

    Pre-activation, depth 6N+2 with N=4 basic blocks per stage (3 stages x 4 blocks x 2 convs + stem conv
    + fc = 26 layers), channels 16k/32k/64k for width k (TTT's default k=1), a final norm `bn` before
    pooling, and `fc`. `groups>0` swaps every BatchNorm for GroupNorm(groups, C) (TTT's GN variant uses 8).
    Note: the final `bn` belongs to the `head` block, not the stem.
    """

    def __init__(self, num_classes: int = 10, width: int = 1, groups: int = 0, depth: int = 26) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6N+2, got {depth}")
        n = (depth - 2) // 6
        norm: NormFactory = (lambda c: nn.GroupNorm(groups, c)) if groups else nn.BatchNorm2d
        register_input_norm(self, TTT_MEAN, TTT_STD)
        self.conv1 = _conv3x3(3, 16)
        cin = 16
        for k, (w, stride) in enumerate(((16 * width, 1), (32 * width, 2), (64 * width, 2)), 1):
            units = [PreActBlock(cin if i == 0 else w, w, norm, stride if i == 0 else 1) for i in range(n)]
            self.add_module(f"layer{k}", nn.Sequential(*units))
            cin = w
        self.bn = norm(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init with fan-out, as TTT
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize_input(self, x)
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def block_spec(self) -> BlockSpec:
        return stage_spec(self, ("conv1",), ("layer1", "layer2", "layer3"), ("bn", "fc"))


# ----------------------------------------------------------------------------------- WideResNet-28-10


class WideBlock(nn.Module):
    """Pre-activation wide block. When the shape changes, the activation relu(bn1(x)) also feeds the 1x1
    `convShortcut` (as in the RobustBench / TRADES code the checkpoints were trained with)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        same = cin == cout and stride == 1
        self.convShortcut = None if same else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return (x if self.convShortcut is None else self.convShortcut(act)) + out


class WideStage(nn.Module):
    """A stage holding its units in `.layer` (the checkpoint's `blockK.layer.i` names)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko & Komodakis 2016) with RobustBench `Standard` parameter names.

    Takes raw [0, 1] inputs (RobustBench's `Standard` model has no normalisation). Beware: `bn1` here is
    the FINAL norm before pooling and belongs to `head`; the stem is `conv1` alone.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 34, 40), got {depth}")
        n = (depth - 4) // 6
        ch = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        register_input_norm(self, None, None)
        self.conv1 = _conv3x3(3, ch[0])
        self.block1 = WideStage(n, ch[0], ch[1], 1)
        self.block2 = WideStage(n, ch[1], ch[2], 2)
        self.block3 = WideStage(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize_input(self, x)
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def block_spec(self) -> BlockSpec:
        return stage_spec(self, ("conv1",), ("block1.layer", "block2.layer", "block3.layer"), ("bn1", "fc"))
