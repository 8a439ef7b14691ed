"""Seeded, batched, on-device test-time augmentations shared by the methods that use them.

Every function takes a batch `x` (float (B, 3, H, W) in [0, 1], on any device) and an explicit
`torch.Generator` (the method's registered `rng`, so reset and resume replay the same draws), draws all its
random parameters for the whole batch at once and transforms the batch with tensor operations: no Python loop
over images. Views of a batch are produced as one tensor (views x batch) so a method runs them in one forward
where memory allows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__: list[str] = []

# ------------------------------------------------------------------------------------------ DeYO: patch shuffle


def patch_shuffle(x: Tensor, generator: torch.Generator, patch_len: int = 4) -> Tensor:
    """Each image cut into a `patch_len` x `patch_len` grid of patches, put back in its own random order.

    DeYO's default view (Lee et al. 2024, Sec. 3.2): it destroys the object's shape while keeping its local
    texture. The permutations of all images are drawn at once (argsort of uniform noise, one row per image) and
    applied with one gather. A side not divisible by `patch_len` is resized down to the nearest multiple first and
    the result resized back (bilinear, antialiased, as the authors' torchvision `Resize`); 32 or 224 pixels with
    4 patches need no resize.
    """
    if x.dim() != 4:
        raise ValueError(f"patch_shuffle expects images (B, C, H, W), got shape {tuple(x.shape)}")
    if patch_len < 1:
        raise ValueError(f"patch_len must be >= 1, got {patch_len}")
    b, c, height, width = x.shape
    h, w = height // patch_len, width // patch_len
    if h == 0 or w == 0:
        raise ValueError(f"images of {height}x{width} pixels cannot be cut into {patch_len}x{patch_len} patches")
    resized = (h * patch_len, w * patch_len) != (height, width)
    y = _resize(x, (h * patch_len, w * patch_len)) if resized else x
    n = patch_len * patch_len
    # (B, C, p*h, p*w) -> (B, p*p, C, h, w): patch (i, j) of the grid is row i*p + j.
    patches = y.reshape(b, c, patch_len, h, patch_len, w).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, h, w)
    order = torch.argsort(torch.rand(b, n, generator=generator, device=x.device), dim=1)
    patches = torch.gather(patches, 1, order.view(b, n, 1, 1, 1).expand_as(patches))
    y = patches.reshape(b, patch_len, patch_len, c, h, w).permute(0, 3, 1, 4, 2, 5)
    y = y.reshape(b, c, h * patch_len, w * patch_len)
    return _resize(y, (height, width)) if resized else y


def pixel_shuffle(x: Tensor, generator: torch.Generator) -> Tensor:
    """Every pixel moved by one random permutation of the positions, the same for all images and channels (DeYO's
    `pixel` view, as in the authors' code)."""
    if x.dim() != 4:
        raise ValueError(f"pixel_shuffle expects images (B, C, H, W), got shape {tuple(x.shape)}")
    order = torch.randperm(x.shape[2] * x.shape[3], generator=generator, device=x.device)
    return x.flatten(2)[:, :, order].reshape(x.shape)


def occlude(x: Tensor, size: int, row: int, column: int) -> Tensor:
    """A `size` x `size` window at (`row`, `column`) filled with each image's per-channel mean (DeYO's `occ` view);
    deterministic. The window must lie inside the image."""
    if x.dim() != 4:
        raise ValueError(f"occlude expects images (B, C, H, W), got shape {tuple(x.shape)}")
    if size < 1 or row < 0 or column < 0 or row + size > x.shape[2] or column + size > x.shape[3]:
        raise ValueError(
            f"occlusion window {size}x{size} at ({row}, {column}) does not fit {x.shape[2]}x{x.shape[3]} images"
        )
    mask = torch.zeros(x.shape[2:], dtype=torch.bool, device=x.device)
    mask[row : row + size, column : column + size] = True
    return torch.where(mask, x.mean((2, 3), keepdim=True), x)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


# ---------------------------------------------------------------- CoTTA / MEMO: augmented views of a batch
