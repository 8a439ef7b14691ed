"""Tiny seeded BatchNorm CNNs and inputs shared by the method tests (tests/test_method_*.py).

Each test file recomputes its method's update by hand on one of these networks, so they stay small and their
weights are fixed by a seed; the files differ only in the seed, the head's scale (how confident the predictions
are, which decides what entropy filters keep) and a few switches, all arguments here.

- `TwoConvNet`: conv-bn, conv-bn, global mean, linear, with flat module names (`conv1`, `bn1`, `conv2`, `bn2`,
  `fc`) so a hand-written forward can take its parameters by name (`reference_forward`).
- `TinyNet`: a conv-bn stem and `nn.Sequential` stages (`layer1`, optionally `layer2`), like the CIFAR ResNets'
  block map (input, block1[, block2], head), with random running statistics so `source` and `batch` BatchNorm
  differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tta_surgical.config import OptimConfig
from tta_surgical.models import BlockSpec

N_CLASSES = 5
EPS = 1e-5  # BatchNorm's default eps, for the hand-written forwards
# Plain SGD (no momentum): one step is theta - lr * g, easy to recompute.
PLAIN_SGD = OptimConfig(name="sgd", lr=0.5, momentum=0.0)
# TwoConvNet's tensors that kind=norm adapts on every block.
TWO_CONV_NORM = ("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias")
# TinyNet's tensors that blocks block1 + head (kind=all) adapt.
TINY_BLOCK1_HEAD = ("layer1.0.weight", "layer1.1.weight", "layer1.1.bias", "fc.weight", "fc.bias")


class TwoConvNet(nn.Module):
    """conv-bn-relu, conv-bn[-relu], global mean, linear: small enough to recompute by hand.

    seed: draws every parameter from N(0, std^2), in module order. head_scale: multiplies the linear weights
    (a larger scale, more confident predictions). conv_bias: biases on the convolutions (a BatchNorm after them
    cancels them, so their gradient is zero). relu2: a ReLU after the second BatchNorm. bn_weights: BatchNorm
    scales drawn from U(0.5, 1.5) after the rest.
    """

    def __init__(
        self,
        seed: int,
        head_scale: float,
        *,
        std: float = 0.5,
        conv_bias: bool = False,
        relu2: bool = True,
        bn_weights: bool = True,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.relu2 = relu2
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, N_CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
            self.fc.weight.mul_(head_scale)
            if bn_weights:
                for bn in (self.bn1, self.bn2):
                    bn.weight.uniform_(0.5, 1.5, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.fc((torch.relu(x) if self.relu2 else x).mean((2, 3)))

    def block_spec(self) -> BlockSpec:
        groups = (("input", ("conv1", "bn1")), ("block1", ("conv2", "bn2")), ("head", ("fc",)))
        return BlockSpec(groups, groups)


def reference_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`TwoConvNet` (relu2, no conv biases) written out, BatchNorm with the batch's own (biased) statistics."""
    h = F.conv2d(x, p["conv1.weight"], padding=1)
    h = torch.relu(F.batch_norm(h, None, None, p["bn1.weight"], p["bn1.bias"], training=True, eps=EPS))
    h = F.conv2d(h, p["conv2.weight"], padding=1)
    h = torch.relu(F.batch_norm(h, None, None, p["bn2.weight"], p["bn2.bias"], training=True, eps=EPS))
    return F.linear(h.mean((2, 3)), p["fc.weight"], p["fc.bias"])


class TinyNet(nn.Module):
    """conv-bn stem, a conv-bn-relu stage `layer1` (and a strided `layer2` when `deep`), global mean, linear.

    seed: draws every parameter from N(0, 0.25), then per BatchNorm (module order) its running mean from
    U(-0.3, 0.3), its running variance from U(0.5, 2) and, with `bn_weights`, its scale from U(0.5, 1.5).
    head_scale: multiplies the linear weights (a confident head keeps samples through entropy filters).
    """

    def __init__(self, seed: int = 0, head_scale: float = 1.0, *, deep: bool = False, bn_weights: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.layer2 = (
            nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()) if deep else None
        )
        self.fc = nn.Linear(8 if deep else 6, N_CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.fc.weight.mul_(head_scale)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.3, 0.3, generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
                    if bn_weights:
                        m.weight.uniform_(0.5, 1.5, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        if self.layer2 is not None:
            x = self.layer2(x)
        return self.fc(x.mean((2, 3)))

    def block_spec(self) -> BlockSpec:
        stages = (("block1", ("layer1",)), ("block2", ("layer2",)))[: 1 if self.layer2 is None else 2]
        groups = (("input", ("conv1", "bn1")), *stages, ("head", ("fc",)))
        return BlockSpec(groups, groups)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits), written out."""
    probs = logits.softmax(1)
    return -(probs * probs.log()).sum(1)


def uniform_images(seed: int, n: int, size: int = 8) -> torch.Tensor:
    """`n` images of `size` x `size` pixels, uniform in [0, 1) (fixed by `seed`)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def colour_images(seed: int, n: int, texture: float, colour: float) -> torch.Tensor:
    """`n` 6x6 images: a random colour per image (weight `colour`) plus random texture (weight `texture`)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=g) * texture + torch.rand(n, 3, 1, 1, generator=g) * colour
