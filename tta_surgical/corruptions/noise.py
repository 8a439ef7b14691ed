"""Noise corruptions: gaussian_noise, shot_noise, impulse_noise, speckle_noise.

Each follows the official CIFAR-10-C / ImageNet-C generator (``make_cifar_c.py``, ``make_imagenet_c.py``)
draw for draw in distribution: one independent draw per pixel and channel, per image of the batch,
all from the caller's generator so a seed reproduces the batch bit for bit. The severity parameter
``c`` comes from the preset table in `params.py`; the final clip to [0, 1] is done by `corrupt()`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CorruptionOptions, register


@register("gaussian_noise")
def gaussian_noise(x: Tensor, c: float, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Additive white noise: ``x + N(0, c^2)`` independently per pixel and channel."""
    return x + float(c) * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


@register("shot_noise")
def shot_noise(x: Tensor, c: float, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Photon (Poisson) noise: ``Poisson(x * c) / c``, so a pixel's variance is ``x / c``."""
    rate = (x * float(c)).clamp_(min=0.0)  # Poisson rates must be >= 0; x is already in [0, 1]
    return torch.poisson(rate, generator=g) / float(c)


@register("impulse_noise")
def impulse_noise(x: Tensor, c: float, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Salt-and-pepper noise, `skimage.util.random_noise(mode="s&p", amount=c, salt_vs_pepper=0.5)`.

    skimage flips each value (pixel *and channel* independently) with probability ``c`` and sets a
    flipped value to 1 (salt) or 0 (pepper) with probability 1/2 each. One uniform draw ``u`` per value
    gives the same joint distribution: ``u < c/2`` -> salt, ``c/2 <= u < c`` -> pepper, else unchanged.
    (skimage's pepper value is 0 because our images have no negative values.)
    """
    u = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)
    amount = float(c)
    out = torch.where(u < amount, torch.zeros_like(x), x)
    return torch.where(u < 0.5 * amount, torch.ones_like(x), out)


@register("speckle_noise")
def speckle_noise(x: Tensor, c: float, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Multiplicative noise: ``x + x * N(0, c^2)`` (noise scales with brightness; black stays black)."""
    return x + x * (float(c) * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype))
