"""Seeded, batched, on-device test-time augmentations shared by the methods that use them.

Every function takes a batch `x` (float (B, 3, H, W) in [0, 1], on any device) and an explicit
`torch.Generator` (the method's registered `rng`, so reset and resume replay the same draws), draws all its
random parameters for the whole batch at once and transforms the batch with tensor operations: no Python loop
over images. Views of a batch are produced as one tensor (views x batch) so a method runs them in one forward
where memory allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import Registry

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
#
# `cotta_views` (CoTTA's teacher) and `augmix_views` (MEMO) return every view of a batch as one tensor, laid out
# view-major: row v * B + b is view v of image b, so `.view(V, B, ...)` is one batch per view and
# `.view(V, B, ...).transpose(0, 1)` the views of each image. Each draws all random parameters of all views in one
# call on the generator (`draw_jitter` / `draw_augmix`, so tests can inspect them) and applies them with tensor
# operations (`apply_jitter` / `apply_augmix`). An operation that only some views take at a step (the random order of
# CoTTA's colour jitter, AugMix's random chains) runs once on exactly those views (gathered by index): no Python loop
# over images or views, no work on views that skip it; finding the indices is one host sync per (step, operation).
# Everything runs in float32 on the input's device; inputs are clamped to [0, 1] first and outputs lie in [0, 1].

__all__ += [
    "AUGMIX_OPS",
    "AugMixSpec",
    "COTTA_CIFAR",
    "ROID_CIFAR",
    "JitterSpec",
    "MEMO_CIFAR",
    "apply_augmix",
    "apply_jitter",
    "augmix_views",
    "cotta_views",
    "draw_augmix",
    "draw_jitter",
    "units_per_forward",
]

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
COLOUR_OPS = ("brightness", "contrast", "saturation", "hue", "gamma")  # CoTTA's jitter; `order` indexes this


@dataclass(frozen=True)
class JitterSpec:
    """CoTTA's test-time augmentation, the authors' `get_tta_transforms` (qinenergy/cotta `cifar/cotta.py` with
    `my_transforms.py`, from KATANA), CIFAR ranges with soft=False: clip; colour jitter in a random order (brightness,
    contrast, saturation, hue, gamma factors drawn uniformly from these ranges); edge padding by half the image size,
    a random affine (rotation in +-degrees, translation by whole pixels up to `translate` x the padded size, scale),
    a 5x5 Gaussian blur (sigma uniform in `blur_sigma`) and the centre crop back to the original size; horizontal
    flip with probability `hflip`; Gaussian noise (std `noise_std`); clip.

    Computed without the padding: sampling the crop (plus the blur's margin) straight from the image with border
    replication is the same as edge padding, and the flip is folded into the sampling grid. Points past the padded
    image, which only the corners of the blur margin reach under the most extreme draws, get the edge value rather
    than torchvision's 0 fill.
    """

    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.7, 1.3)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.06, 0.06)
    gamma: tuple[float, float] = (0.7, 1.3)
    degrees: float = 15.0
    translate: float = 1.0 / 16.0
    scale: tuple[float, float] = (0.9, 1.1)
    blur_sigma: tuple[float, float] = (0.001, 0.5)
    blur_kernel: int = 5
    hflip: float = 0.5
    noise_std: float = 0.005
    # How the affine map fills what it brings in from outside the image: `edge` (the authors' edge padding) or
    # `reflect` (ROID's consistency view).
    padding: str = "edge"

    def __post_init__(self) -> None:
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"JitterSpec.blur_kernel must be odd and >= 1, got {self.blur_kernel}")
        if self.padding not in ("edge", "reflect"):
            raise ValueError(f"JitterSpec.padding must be 'edge' or 'reflect', got {self.padding!r}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"JitterSpec.hflip is a probability in [0, 1], got {self.hflip}")

    def scaled(self, magnitude: float) -> JitterSpec:
        """Every range moved toward the identity by `magnitude`: 1 keeps it, 0 gives the identity transform
        (the authors' soft=True ranges are about 0.5)."""

        def factor(r: tuple[float, float]) -> tuple[float, float]:
            return (1.0 + magnitude * (r[0] - 1.0), 1.0 + magnitude * (r[1] - 1.0))

        def shift(r: tuple[float, float]) -> tuple[float, float]:
            return (magnitude * r[0], magnitude * r[1])

        return replace(
            self,
            brightness=factor(self.brightness),
            contrast=factor(self.contrast),
            saturation=factor(self.saturation),
            hue=shift(self.hue),
            gamma=factor(self.gamma),
            degrees=magnitude * self.degrees,
            translate=magnitude * self.translate,
            scale=factor(self.scale),
            blur_sigma=shift(self.blur_sigma),
            hflip=magnitude * self.hflip,
            noise_std=magnitude * self.noise_std,
        )


COTTA_CIFAR = JitterSpec()
# ROID's consistency view (the collection's `cotta_augs=False`): the same jitter and affine map with reflect padding,
# no blur and no noise. RoTTA's strong augmentation is COTTA_CIFAR itself (the authors use `get_tta_transforms`).
ROID_CIFAR = JitterSpec(padding="reflect", blur_kernel=1, blur_sigma=(0.0, 0.0), noise_std=0.0)


def _uniform(u: Tensor, bounds: tuple[float, float]) -> Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def draw_jitter(
    n_views: int,
    batch: int,
    image_shape: tuple[int, int, int],
    generator: torch.Generator,
    spec: JitterSpec = COTTA_CIFAR,
    per: str = "view",
) -> dict[str, Tensor]:
    """All random parameters of `n_views` jittered views of a batch of `batch` images, one value per view row.

    per="view": one draw per view shared by the batch's images, as the authors' torchvision transform applied to a
    batch tensor does (the noise is per pixel either way); per="image": an independent draw per image and view.
    Two calls on `generator` (the parameters, then the noise), on the generator's device.
    """
    if per not in ("view", "image"):
        raise ValueError(f"per must be 'view' or 'image', got {per!r}")
    c, h, w = image_shape
    device = generator.device
    units = n_views if per == "view" else n_views * batch
    u = torch.rand(units, 16, generator=generator, device=device)
    max_dx = spec.translate * (w + 2 * (w // 2))  # torchvision: a fraction of the padded image, whole pixels
    max_dy = spec.translate * (h + 2 * (h // 2))
    params = {
        "brightness": _uniform(u[:, 0], spec.brightness),
        "contrast": _uniform(u[:, 1], spec.contrast),
        "saturation": _uniform(u[:, 2], spec.saturation),
        "hue": _uniform(u[:, 3], spec.hue),
        "gamma": _uniform(u[:, 4], spec.gamma),
        "angle": _uniform(u[:, 5], (-spec.degrees, spec.degrees)),
        "tx": torch.round(_uniform(u[:, 6], (-max_dx, max_dx))),
        "ty": torch.round(_uniform(u[:, 7], (-max_dy, max_dy))),
        "scale": _uniform(u[:, 8], spec.scale),
        "sigma": _uniform(u[:, 9], spec.blur_sigma),
        "flip": u[:, 10] < spec.hflip,
        "order": torch.argsort(u[:, 11:16], dim=1),  # a random permutation of COLOUR_OPS per unit
    }
    if per == "view":
        params = {k: v.repeat_interleave(batch, dim=0) for k, v in params.items()}
    noise = torch.randn(n_views * batch, c, h, w, generator=generator, device=device)
    params["noise"] = noise * spec.noise_std
    return params


def apply_jitter(
    x: Tensor, params: dict[str, Tensor], spec: JitterSpec = COTTA_CIFAR, block_rows: int | None = None
) -> Tensor:
    """The views `params` (from `draw_jitter`) describe, of the batch `x` (B, C, H, W): (V * B, C, H, W) in [0, 1].

    `block_rows` views at a time (default `default_block_rows`): on a CPU, blocks that stay in cache run ~3x faster
    than one pass over all views (measured: 32 x 200 CIFAR views in 0.7 s in blocks of 200-400, 2-2.6 s at once).
    """
    n = params["flip"].shape[0]
    _check_rows(n, x.shape[0])
    out = torch.empty((n, *x.shape[1:]), device=x.device, dtype=torch.float32)
    for start, stop in _blocks(n, block_rows, x.device):
        p = {k: v[start:stop] for k, v in params.items()}
        views = _rows(x, start, stop)
        for step in range(p["order"].shape[1]):  # 5 steps; each view takes the colour op its permutation puts there
            for op, name in enumerate(COLOUR_OPS):
                _apply_to(views, p["order"][:, step] == op, _COLOUR_FNS[name], p[name])
        views = _affine_blur_flip(views, p, spec.blur_kernel, spec.padding)
        out[start:stop] = (views + p["noise"]).clamp_(0.0, 1.0)
    return out


def cotta_views(
    x: Tensor,
    n_views: int,
    generator: torch.Generator,
    spec: JitterSpec = COTTA_CIFAR,
    per: str = "view",
    block_rows: int | None = None,
) -> Tensor:
    """`n_views` CoTTA-augmented views of the batch `x`: (n_views * B, C, H, W), view-major, in [0, 1]."""
    params = draw_jitter(n_views, x.shape[0], tuple(x.shape[1:]), generator, spec, per)
    return apply_jitter(x, params, spec, block_rows)


def default_block_rows(device: torch.device) -> int | None:
    """How many views the augmentations transform at a time: 256 on a CPU (cache-sized blocks measured fastest),
    all of them (None) on an accelerator."""
    return 256 if torch.device(device).type == "cpu" else None


def _blocks(n: int, block_rows: int | None, device: torch.device) -> list[tuple[int, int]]:
    size = block_rows if block_rows is not None else default_block_rows(device)
    size = n if size is None or size <= 0 else size
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _check_rows(n: int, batch: int) -> None:
    if batch < 1 or n % batch:
        raise ValueError(f"the parameters describe {n} views, not a multiple of the batch size {batch}")


def _rows(x: Tensor, start: int, stop: int) -> Tensor:
    """Rows start..stop of the view-major repetition of x (B, C, H, W): a fresh float32 tensor clamped to [0, 1]."""
    idx = torch.arange(start, stop, device=x.device) % x.shape[0]
    return x.detach().float().index_select(0, idx).clamp_(0.0, 1.0).contiguous()


def _apply_to(views: Tensor, mask: Tensor, fn: Callable[..., Tensor], *args: Tensor) -> None:
    """views[mask] = fn(views[mask], *(a[mask] for a in args)), in place, computed only for the selected rows."""
    idx = mask.nonzero().squeeze(1)  # a host sync: the number of selected views sizes the work
    if idx.numel():
        views.index_copy_(0, idx, fn(views.index_select(0, idx), *(a.index_select(0, idx) for a in args)))


def _per_image(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's adjust_brightness with one factor per image: blend with black, clamp."""
    return (x * _per_image(factor)).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's adjust_contrast per image: blend with the mean of the image's grayscale, clamp."""
    f = _per_image(factor)
    return (f * x + (1.0 - f) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's adjust_saturation per image: blend with the grayscale image, clamp."""
    f = _per_image(factor)
    return (f * x + (1.0 - f) * _gray(x)).clamp(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision's adjust_hue per image: rotate the HSV hue by `shift` turns, keeping value and saturation."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # torchvision's tie order: red, then green, then blue
    hue = torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    hue = torch.where(maxc == r, torch.remainder((g - b) / safe, 6.0), hue)
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue)) / 6.0
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    # HSV -> RGB: channel n (5, 3, 1 for R, G, B) = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * hue.unsqueeze(1), 6.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_gamma(x: Tensor, gamma: Tensor) -> Tensor:
    """CoTTA's gamma step per image: clamp to [1e-8, 1] (their fix for NaN gradients), then x ** gamma."""
    return x.clamp(1e-8, 1.0).pow(_per_image(gamma)).clamp(0.0, 1.0)


_COLOUR_FNS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "brightness": adjust_brightness,
    "contrast": adjust_contrast,
    "saturation": adjust_saturation,
    "hue": adjust_hue,
    "gamma": adjust_gamma,
}


def _centred_grid(h: int, w: int, margin: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(y, x) pixel-centre coordinates relative to the image centre, (h + 2m, w + 2m), for output pixels -m..h+m-1."""
    ys = torch.arange(-margin, h + margin, device=device, dtype=torch.float32) + 0.5 - h / 2.0
    xs = torch.arange(-margin, w + margin, device=device, dtype=torch.float32) + 0.5 - w / 2.0
    return torch.meshgrid(ys, xs, indexing="ij")


def _sample(
    x: Tensor, ix: Tensor, iy: Tensor, fill: float | None, mode: str = "bilinear", padding: str = "edge"
) -> Tensor:
    """x sampled at centred input coordinates (ix, iy) of shape (N, h, w); outside: `fill`, or (None) the edge /
    the reflection, as `padding` says."""
    h, w = x.shape[-2:]
    grid = torch.stack((ix / (w / 2.0), iy / (h / 2.0)), dim=-1)
    if fill is None:
        pad_mode = "border" if padding == "edge" else "reflection"
        return F.grid_sample(x, grid, mode=mode, padding_mode=pad_mode, align_corners=False)
    return F.grid_sample(x - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill


def _affine_blur_flip(x: Tensor, p: dict[str, Tensor], kernel: int, padding: str = "edge") -> Tensor:
    """Rotation/scale/translation about the centre (edge replication or reflection), the Gaussian blur, the flip."""
    n, _, h, w = x.shape
    r = kernel // 2
    gy, gx = _centred_grid(h, w, r, x.device)
    ox = gx.unsqueeze(0) * torch.where(p["flip"], -1.0, 1.0).view(-1, 1, 1)  # flip = mirrored output grid
    dx, dy = ox - p["tx"].view(-1, 1, 1), gy.unsqueeze(0) - p["ty"].view(-1, 1, 1)
    theta = torch.deg2rad(p["angle"]).view(-1, 1, 1)
    cos, sin, s = torch.cos(theta), torch.sin(theta), p["scale"].view(-1, 1, 1)
    sampled = _sample(x, (cos * dx + sin * dy) / s, (cos * dy - sin * dx) / s, fill=None, padding=padding)
    return _blur_valid(sampled, p["sigma"], kernel) if kernel > 1 else sampled


def _blur_valid(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Separable Gaussian blur with one sigma per image (torchvision's kernel), 'valid': the output is smaller by
    kernel - 1 in each dimension. One depthwise convolution per direction over all images and channels."""
    n, c, h, w = x.shape
    r = kernel // 2
    t = torch.arange(kernel, device=x.device, dtype=torch.float32) - r
    weights = torch.exp(-0.5 * (t / sigma.clamp_min(1e-6).view(-1, 1)) ** 2)  # sigma 0 -> the identity kernel
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n * c, kernel)
    rows = F.conv2d(x.reshape(1, n * c, h, w), weights.view(n * c, 1, 1, kernel), groups=n * c)
    return F.conv2d(rows, weights.view(n * c, 1, kernel, 1), groups=n * c).view(n, c, h - 2 * r, w - 2 * r)


# AugMix (Hendrycks et al. 2020) as MEMO uses it on CIFAR (zhangmarvin/memo `cifar-10-exps/utils/third_party.py`):
# each view is a random crop (zero padding 4) and flip of the image, then the mix m * x + (1 - m) * sum_i w_i chain_i(x)
# of `width` chains of 1..max_depth operations drawn uniformly from the list below, w ~ Dirichlet(1, 1, 1),
# m ~ Beta(1, 1). The operations follow the authors' PIL versions at their level (`rand_lvl` uniform in [0.1, 1] x
# severity, integer-truncated where they truncate). Approximations: the operations work on float images (PIL on
# 8-bit ones; equalize and posterize quantise to 8 bits as PIL does, autocontrast does not round), and the
# geometric ones interpolate bilinearly with the authors' grey fill (128/255) through `grid_sample`.

GREY_FILL = 128.0 / 255.0
AUGMIX_OPS: Registry[Callable[[Tensor, Tensor, Tensor], Tensor]] = Registry("augmix operation")


def _int_level(level: Tensor, maxval: float) -> Tensor:
    """The authors' `int_parameter`: int(level * maxval / 10), truncated toward zero."""
    return torch.trunc(level * maxval / 10.0)


def _quantise(x: Tensor) -> Tensor:
    return (x * 255.0).round().clamp(0.0, 255.0)


@AUGMIX_OPS.register("autocontrast")
def _autocontrast(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    """Stretch each channel to [0, 1] (PIL autocontrast, cutoff 0); a constant channel stays as it is."""
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), x)


@AUGMIX_OPS.register("equalize")
def _equalize(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    """PIL's ImageOps.equalize per channel on the 8-bit image: lut[i] = (step // 2 + #pixels below i) // step,
    step = (#pixels - #pixels in the last non-empty bin) // 255; no change when step is 0."""
    n, c, h, w = x.shape
    q = _quantise(x).long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, q, torch.ones_like(q))
    last = hist.gather(1, q.amax(dim=1, keepdim=True))  # the count of the last non-empty bin
    step = (h * w - last) // 255
    below = hist.cumsum(dim=1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return (out.float() / 255.0).view(n, c, h, w)


@AUGMIX_OPS.register("rotate")
def _rotate(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    """Rotate about the centre by int(level * 3) degrees (sign random), bilinear, grey fill."""
    theta = torch.deg2rad(_int_level(level, 30.0) * sign).view(-1, 1, 1)
    gy, gx = _centred_grid(x.shape[-2], x.shape[-1], 0, x.device)
    cos, sin = torch.cos(theta), torch.sin(theta)
    return _sample(x, cos * gx - sin * gy, sin * gx + cos * gy, fill=GREY_FILL)


def _shear_or_translate(x: Tensor, amount: Tensor, axis: int, shear: bool) -> Tensor:
    """PIL's affine transform (1, a, 0, 0, 1, 0)-style on the top-left-origin grid: input = output + shift."""
    h, w = x.shape[-2:]
    gy, gx = _centred_grid(h, w, 0, x.device)
    a = amount.view(-1, 1, 1)
    if shear:  # x_in = x + a * y (top-left origin, so y = centred y + h / 2), and the transpose for axis 0
        shift = a * ((gy + h / 2.0) if axis == 1 else (gx + w / 2.0))
    else:
        shift = a.expand(-1, h, w)
    ix, iy = (gx + shift, gy.expand_as(shift)) if axis == 1 else (gx.expand_as(shift), gy + shift)
    return _sample(x, ix, iy, fill=GREY_FILL)


@AUGMIX_OPS.register("shear_x")
def _shear_x(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _shear_or_translate(x, level * 0.3 / 10.0 * sign, axis=1, shear=True)


@AUGMIX_OPS.register("shear_y")
def _shear_y(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _shear_or_translate(x, level * 0.3 / 10.0 * sign, axis=0, shear=True)


@AUGMIX_OPS.register("translate_x")
def _translate_x(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _shear_or_translate(x, _int_level(level, x.shape[-1] / 3.0) * sign, axis=1, shear=False)


@AUGMIX_OPS.register("translate_y")
def _translate_y(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _shear_or_translate(x, _int_level(level, x.shape[-2] / 3.0) * sign, axis=0, shear=False)


@AUGMIX_OPS.register("solarize")
def _solarize(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    """Invert the 8-bit values >= 256 - int(level * 25.6) (PIL solarize)."""
    threshold = _per_image(256.0 - _int_level(level, 256.0))
    return torch.where(x * 255.0 >= threshold - 0.5, 1.0 - x, x)


@AUGMIX_OPS.register("posterize")
def _posterize(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    """Keep the top 4 - int(level * 0.4) bits of the 8-bit values (4 at the authors' level)."""
    bits = _per_image(4.0 - _int_level(level, 4.0)).clamp(1.0, 8.0)
    step = torch.pow(2.0, 8.0 - bits)
    return torch.floor(_quantise(x) / step) * step / 255.0


@dataclass(frozen=True)
class AugMixSpec:
    """MEMO's CIFAR augmentation: crop (zero padding `crop_padding`) and flip (`hflip`), then AugMix with `width`
    chains of 1..`max_depth` operations from `ops` at level uniform in [0.1, 1] x `severity` (the authors' 1)."""

    severity: float = 1.0
    width: int = 3
    max_depth: int = 3
    crop_padding: int = 4
    hflip: float = 0.5
    ops: tuple[str, ...] = (
        "autocontrast",
        "equalize",
        "rotate",
        "solarize",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
        "posterize",
    )

    def __post_init__(self) -> None:
        if self.width < 1 or self.max_depth < 1:
            raise ValueError(f"AugMixSpec needs width >= 1 and max_depth >= 1, got {self.width}, {self.max_depth}")
        if not self.ops:
            raise ValueError("AugMixSpec.ops must name at least one operation")
        for name in self.ops:
            AUGMIX_OPS.get(name)  # an unknown name lists the valid ones


MEMO_CIFAR = AugMixSpec()


def draw_augmix(
    n_views: int, batch: int, generator: torch.Generator, spec: AugMixSpec = MEMO_CIFAR
) -> dict[str, Tensor]:
    """All random parameters of `n_views` AugMix views of each of `batch` images (independent per view and image),
    from one call on `generator`. Dirichlet(1, ..., 1) and Beta(1, 1), the authors' values, are drawn exactly as
    normalised exponentials and a uniform (torch's gamma sampler takes no generator)."""
    n, wd, dp = n_views * batch, spec.width, spec.max_depth
    u = torch.rand(n, 4 + 2 * wd + 3 * wd * dp, generator=generator, device=generator.device)
    pad = spec.crop_padding
    cols = iter(range(u.shape[1]))

    def take(k: int) -> Tensor:
        idx = [next(cols) for _ in range(k)]
        return u[:, idx]

    shift = torch.floor(take(2) * (2 * pad + 1)).clamp(max=2 * pad) - pad  # RandomCrop: offset 0..2*pad
    flip = take(1)[:, 0] < spec.hflip
    mix = take(1)[:, 0]
    exps = -torch.log1p(-take(wd))  # Exp(1) from U[0, 1)
    depth = torch.floor(take(wd) * dp).clamp(max=dp - 1).long() + 1
    op = torch.floor(take(wd * dp) * len(spec.ops)).clamp(max=len(spec.ops) - 1).long().view(n, wd, dp)
    level = (0.1 + 0.9 * take(wd * dp)).view(n, wd, dp) * spec.severity
    sign = torch.where(take(wd * dp) < 0.5, -1.0, 1.0).view(n, wd, dp)
    return {
        "shift": shift,
        "flip": flip,
        "mix": mix,
        "weights": exps / exps.sum(dim=1, keepdim=True),
        "depth": depth,
        "op": op,
        "level": level,
        "sign": sign,
    }


def apply_augmix(
    x: Tensor, params: dict[str, Tensor], spec: AugMixSpec = MEMO_CIFAR, block_rows: int | None = None
) -> Tensor:
    """The views `params` (from `draw_augmix`) describe, of the batch `x`: (V * B, C, H, W), view-major, in [0, 1];
    `block_rows` views at a time (see `apply_jitter`)."""
    n = params["mix"].shape[0]
    _check_rows(n, x.shape[0])
    out = torch.empty((n, *x.shape[1:]), device=x.device, dtype=torch.float32)
    for start, stop in _blocks(n, block_rows, x.device):
        out[start:stop] = _augmix_block(_rows(x, start, stop), {k: v[start:stop] for k, v in params.items()}, spec)
    return out


def _augmix_block(views: Tensor, p: dict[str, Tensor], spec: AugMixSpec) -> Tensor:
    n, c, h, w = views.shape
    gy, gx = _centred_grid(h, w, 0, views.device)
    ox = gx.unsqueeze(0) * torch.where(p["flip"], -1.0, 1.0).view(-1, 1, 1)
    sx, sy = p["shift"][:, 0].view(-1, 1, 1), p["shift"][:, 1].view(-1, 1, 1)
    orig = _sample(views, ox + sx, gy.unsqueeze(0) + sy, fill=0.0, mode="nearest")  # crop offsets: whole pixels
    wd, dp = spec.width, spec.max_depth
    chains = orig.unsqueeze(1).expand(n, wd, c, h, w).reshape(n * wd, c, h, w).contiguous()
    op, level, sign = (p[k].reshape(n * wd, dp) for k in ("op", "level", "sign"))
    depth = p["depth"].reshape(n * wd)
    for step in range(dp):
        active = depth > step
        for k, name in enumerate(spec.ops):
            _apply_to(chains, active & (op[:, step] == k), AUGMIX_OPS.get(name), level[:, step], sign[:, step])
    mixed = (p["weights"].view(n, wd, 1, 1, 1) * chains.view(n, wd, c, h, w)).sum(dim=1)
    m = _per_image(p["mix"])
    return (m * orig + (1.0 - m) * mixed).clamp_(0.0, 1.0)


def augmix_views(
    x: Tensor,
    n_views: int,
    generator: torch.Generator,
    spec: AugMixSpec = MEMO_CIFAR,
    block_rows: int | None = None,
) -> Tensor:
    """`n_views` AugMix views of every image of `x`: (n_views * B, C, H, W), view-major, in [0, 1]."""
    params = draw_augmix(n_views, x.shape[0], generator, spec)
    return apply_augmix(x, params, spec, block_rows)


def units_per_forward(n_units: int, rows_per_unit: int, max_rows: int) -> int:
    """How many units of `rows_per_unit` images each (CoTTA: views of a batch; MEMO: images with all their views)
    one forward takes when it may take `max_rows` images: at least 1, at most `n_units`."""
    return max(1, min(n_units, max_rows // max(rows_per_unit, 1)))
