"""The corruption registry, input checks and the public `corrupt` entry point.

A corruption is a pure function ``fn(x, c, g, opts) -> Tensor``:

- ``x``: float32 batch ``(B, 3, H, W)`` in [0, 1] on any device (already checked);
- ``c``: this severity's entry of the preset's parameter table (`params.py`);
- ``g``: a `torch.Generator` on ``x.device``; every random draw goes through it, so the same seed
  on the same device reproduces the output bit for bit;
- ``opts``: `CorruptionOptions` (preset name, frost texture folder).

It returns a float32 batch of the same shape on the same device, clipped to [0, 1]. Randomness is
drawn per image (each image of a batch gets its own angle, crop, noise), vectorised over the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..registry import Registry
from .params import PRESETS

BENCHMARK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS


@dataclass(frozen=True)
class CorruptionOptions:
    """Settings shared by all corruptions of one call.

    preset: which parameter table drives the severities ("cifar" for 32x32, "imagenet" for 224x224).
    frost_dir: folder holding frost1.png ... frost5.jpg; None means the verified download cache.
    """

    preset: str = "cifar"
    frost_dir: Path | None = None


CorruptionFn = Callable[[Tensor, object, torch.Generator, CorruptionOptions], Tensor]
CORRUPTIONS: Registry[CorruptionFn] = Registry("corruption")


def register(name: str) -> Callable[[CorruptionFn], CorruptionFn]:
    """Decorator: register a corruption function under `name` (one of ALL_CORRUPTIONS)."""
    if name not in ALL_CORRUPTIONS:
        raise ValueError(f"{name!r} is not a CIFAR-10-C / ImageNet-C corruption; valid: {', '.join(ALL_CORRUPTIONS)}")
    return CORRUPTIONS.register(name)


def check_images(x: Tensor, what: str = "images") -> None:
    """Raise a clear error unless `x` is a float batch (B, 3, H, W) with values in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{what} must be a floating-point tensor in [0, 1], got dtype {x.dtype}; "
            "convert uint8 images with x.float() / 255"
        )
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{what} must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty: shape {tuple(x.shape)}")
    lo, hi = torch.aminmax(x.detach())
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise ValueError(f"{what} contain NaN or infinite values")
    if lo.item() < -1e-6 or hi.item() > 1 + 1e-6:
        raise ValueError(
            f"{what} must lie in [0, 1], got values in [{lo.item():.4g}, {hi.item():.4g}]; "
            "divide 0-255 images by 255 and undo any mean/std normalisation first"
        )


def check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    return severity


def resolve_preset(preset: str, height: int, width: int) -> str:
    """`auto` picks the CIFAR table for images up to 64 pixels a side and the ImageNet table above."""
    if preset == "auto":
        return "cifar" if max(height, width) <= 64 else "imagenet"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: auto, {', '.join(PRESETS)}")
    return preset


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with `seed` (CUDA tensors need a CUDA generator)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def corrupt(
    x: Tensor,
    name: str,
    severity: int,
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    preset: str = "auto",
    frost_dir: str | os.PathLike | None = None,
) -> Tensor:
    """Apply corruption `name` at `severity` (1..5) to a float batch (B, 3, H, W) in [0, 1].

    Randomness comes from `generator` (on x's device), else from a new generator seeded with
    `seed` (default 0), so a call is always reproducible. The result has x's shape, dtype and
    device, clipped to [0, 1] (not quantised: see `to_uint8` for the official uint8 rounding).
    """
    fn = CORRUPTIONS.get(name)
    check_severity(severity)
    check_images(x)
    opts = CorruptionOptions(
        preset=resolve_preset(preset, x.shape[-2], x.shape[-1]),
        frost_dir=Path(frost_dir) if frost_dir is not None else None,
    )
    if generator is None:
        generator = make_generator(0 if seed is None else seed, x.device)
    elif seed is not None:
        raise ValueError("pass either a generator or a seed, not both")
    elif generator.device != x.device and not (generator.device.type == x.device.type == "cuda"):
        raise ValueError(f"generator is on {generator.device} but the images are on {x.device}")
    c = PRESETS[opts.preset][name][severity - 1]
    out = fn(x.float(), c, generator, opts)
    return out.clamp_(0.0, 1.0).to(x.dtype)


def to_uint8(x: Tensor) -> Tensor:
    """Float [0, 1] -> uint8 the way the official generators store images: clip to [0, 255], then truncate."""
    return (x.clamp(0, 1) * 255).to(torch.uint8)
