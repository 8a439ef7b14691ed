"""Corruptions: digital (brightness, contrast, saturate, elastic_transform, pixelate, jpeg_compression).

Each reproduces the official CIFAR-10-C / ImageNet-C generator (Hendrycks & Dietterich, `make_cifar_c.py`,
`make_imagenet_c.py`) in batched torch, with the same boundary handling as the libraries those call:

- brightness / saturate: `skimage.color` HSV round trip, value (saturation) shifted and clipped
  (computed in closed form in RGB);
- contrast: deviation from the per-image, per-channel spatial mean scaled by ``c``;
- elastic_transform: random affine (`cv2.warpAffine`, bilinear, BORDER_REFLECT_101), then a smoothed random
  displacement field (`scipy.ndimage.gaussian_filter`, mode 'reflect', truncate 3) applied with
  `scipy.ndimage.map_coordinates` (order 1, mode 'reflect');
- pixelate: Pillow's BOX resampling down by ``c`` and back up, in Pillow's 8-bit fixed-point arithmetic;
- jpeg_compression: a JPEG encode / decode round trip with libjpeg (through torchvision), as Pillow does.

The elastic and pixelate maths is factored into functions taking explicit random draws / sizes
(`elastic_warp`, `pil_box_resize`), so tests can compare them with OpenCV / SciPy / Pillow on the same draws.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import gaussian_kernel1d, pad_index, uniform
from .base import CorruptionOptions, register

# ----------------------------------------------------------------------------------------- colour


# skimage's HSV round trip with only V (or only S) changed has a closed form: every RGB channel is
# v * (1 - a * s) with a in [0, 1] fixed by the hue. So a new value scales all channels by v' / v, and a
# new saturation scales each channel's distance below v by s' / s. Working in RGB this way is exact
# (tests compare with skimage) and several times faster than converting to HSV and back.


@register("brightness")
def brightness(x: Tensor, c: float, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """HSV value -> clip(v + c, 0, 1), back to RGB (skimage conventions; no randomness)."""
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp_(0.0, 1.0)
    # black pixels (v = 0) have s = h = 0 in skimage, so they become gray at the new value
    return torch.where(v > 0, x * (v_new / torch.where(v > 0, v, 1.0)), v_new)


@register("contrast")
def contrast(x: Tensor, c: float, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Scale each pixel's deviation from its image's per-channel mean by `c`.

    The generators take ``np.mean(x, axis=(0, 1))`` of an HWC image: a spatial mean per channel.
    """
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * c + mean


@register("saturate")
def saturate(x: Tensor, c: tuple[float, float], g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """HSV saturation -> clip(s * c[0] + c[1], 0, 1), back to RGB (skimage conventions; no randomness)."""
    v = x.amax(1, keepdim=True)
    delta = v - x.amin(1, keepdim=True)
    s = delta / torch.where(v > 0, v, 1.0)
    s_new = (s * c[0] + c[1]).clamp_(0.0, 1.0)
    colour = v - (v - x) * (s_new / torch.where(delta > 0, s, 1.0))
    # gray pixels have hue 0 (red) in skimage: a positive new saturation tints them (r, g, b) = v * (1, 1-s', 1-s')
    gray = torch.cat((v, v * (1 - s_new), v * (1 - s_new)), 1)
    return torch.where(delta > 0, colour, gray)


# ---------------------------------------------------------------------------------------- elastic


def _fold_coord(t: Tensor, n: int, mode: str) -> Tensor:
    """Fold continuous pixel coordinates (any range) back into the image under a boundary mode.

    'mirror' is OpenCV's BORDER_REFLECT_101 (d c b | a b c d): reflection about the centres of the edge
    pixels, giving [0, n - 1]. 'reflect' is SciPy's half-sample symmetric mode (d c b a | a b c d):
    reflection about the outer pixel edges, giving [-0.5, n - 0.5]; the half pixel beyond each edge centre
    reads the edge pixel, which the caller's clamp to [0, n - 1] provides. Because the fold lines fall on
    pixel centres or inside those flat edge halves, bilinear interpolation at the folded coordinate equals
    OpenCV's / SciPy's interpolation with each neighbour's index folded separately.
    """
    if mode == "mirror":
        period = 2.0 * max(n - 1, 1)
        t = t.remainder(period)
        return torch.minimum(t, period - t)
    if mode == "reflect":
        t = (t + 0.5).remainder(2.0 * n)
        return torch.minimum(t, 2.0 * n - t).sub_(0.5)
    raise ValueError(f"unknown boundary mode {mode!r}; expected 'reflect' or 'mirror'")


def _bilinear(x: Tensor, rows: Tensor, cols: Tensor, mode: str) -> Tensor:
    """Sample `x` (B, C, H, W) bilinearly at fractional (rows, cols) of shape (B, H', W') with a boundary mode.

    The coordinates are folded into the image first (`_fold_coord`), so `grid_sample` (align_corners=True:
    -1 and 1 are the centres of the edge pixels) only interpolates inside it; its 'border' padding is the
    clamp to [0, n - 1] that SciPy's 'reflect' needs beyond the edge centres (and absorbs float rounding).
    """
    h, w = x.shape[-2:]
    grid = torch.stack((_fold_coord(cols, w, mode), _fold_coord(rows, h, mode)), -1)
    # pixel -> normalised coordinates; a length-1 axis maps everything to its single pixel
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=grid.dtype, device=grid.device)
    grid = grid.mul_(scale).sub_(1.0).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _affine_anchor_points(h: int, w: int) -> Tensor:
    """The generators' three anchor points (as OpenCV (x, y) pairs), float64 (3, 2).

    They are built from ``center_square = shape[:2] // 2`` (row first) yet passed to OpenCV as (x, y);
    on square images the two readings agree, and we keep the generators' order for non-square ones.
    """
    c0, c1 = float(h // 2), float(w // 2)
    s = float(min(h, w) // 3)
    return torch.tensor([[c0 + s, c1 + s], [c0 + s, c1 - s], [c0 - s, c1 - s]], dtype=torch.float64)


@lru_cache(maxsize=32)
def _smoothing_matrix(n: int, sigma: float, device: torch.device) -> Tensor:
    """(n, n) matrix of `scipy.ndimage.gaussian_filter1d(., sigma, mode='reflect', truncate=3)` on a length-n axis.

    Folding the boundary into a matrix makes any sigma cost one small matmul per axis: cheaper on CPU than
    a 15-tap convolution at 224 pixels, and the ImageNet severity-1 sigma (170.8) is a 1025-tap kernel.
    """
    k = gaussian_kernel1d(sigma, truncate=3.0).double()
    r = (k.numel() - 1) // 2
    src = pad_index(n, r, r, "reflect")  # source index of each padded position
    out = torch.arange(n).view(n, 1)
    taps = torch.arange(k.numel()).view(1, -1)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((out.expand(n, k.numel()), src[out + taps]), k.expand(n, -1), accumulate=True)
    return m.float().to(device)


def elastic_warp(x: Tensor, jitter: Tensor, noise: Tensor | None, alpha: float, sigma: float) -> Tensor:
    """The elastic transform given its random draws; `elastic_transform` draws them from the generator.

    x: (B, 3, H, W) float. jitter: (B, 3, 2) offsets added to the three anchor points (OpenCV (x, y)
    order, the generator's ``U(-aff, aff, size=(3, 2))``). noise: (B, 2, H, W) the generator's two
    ``U(-1, 1)`` fields, first dx (added to columns) then dy (added to rows); None means no displacement.

    Step 1 is ``cv2.warpAffine(x, getAffineTransform(pts, pts + jitter), BORDER_REFLECT_101)``: each output
    pixel reads the input at the inverse affine image of its position, bilinearly. (Older OpenCV releases,
    such as the one that made the published datasets, rounded those positions to 1/32 pixel; the OpenCV 5
    used as test oracle, and this, use them unrounded: at most 1/64 pixel apart.)
    Step 2 is ``map_coordinates(x, (row + dy, col + dx), order=1, mode='reflect')`` with
    ``d = gaussian_filter(noise, sigma, mode='reflect', truncate=3) * alpha``.
    """
    b, _, h, w = x.shape
    dev = x.device
    pts1 = _affine_anchor_points(h, w).to(dev)
    # The generator adds float32 jitter to float32 points before OpenCV solves in double.
    pts2 = (pts1.float() + jitter.to(dev, torch.float32)).double()
    # Inverse map (output -> input) = the affine taking pts2 to pts1: [pts2 | 1] @ A^T = pts1.
    p2h = torch.cat((pts2, torch.ones(b, 3, 1, dtype=torch.float64, device=dev)), 2)
    a = torch.linalg.solve(p2h, pts1.expand(b, 3, 2)).transpose(1, 2).float()  # (B, 2, 3)
    yy = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1)
    xx = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w)
    coef = a.view(b, 6, 1, 1)
    src_x = coef[:, 0] * xx + coef[:, 1] * yy + coef[:, 2]
    src_y = coef[:, 3] * xx + coef[:, 4] * yy + coef[:, 5]
    x = _bilinear(x, src_y, src_x, "mirror")

    if noise is None or alpha == 0:
        return x
    noise = noise.to(dev, torch.float32)
    if sigma > 0:  # gaussian_filter with sigma 0 is the identity
        mh, mw = _smoothing_matrix(h, float(sigma), dev), _smoothing_matrix(w, float(sigma), dev)
        noise = mh @ noise @ mw.T
    d = noise * alpha
    rows = yy + d[:, 1]
    cols = xx + d[:, 0]
    return _bilinear(x, rows, cols, "reflect")


@register("elastic_transform")
def elastic_transform(x: Tensor, c: tuple[float, float, float], g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Official elastic transform; `c` = (alpha, sigma, affine jitter) in pixels.

    Per image: the affine jitter U(-c[2], c[2]) for the three anchor coordinates, then the two U(-1, 1)
    displacement fields (not drawn when alpha is 0, as for CIFAR severity 1, where they have no effect).
    """
    alpha, sigma, aff = c
    b, _, h, w = x.shape
    jitter = uniform((b, 3, 2), -aff, aff, g, x.device)
    noise = uniform((b, 2, h, w), -1.0, 1.0, g, x.device) if alpha != 0 else None
    return elastic_warp(x, jitter, noise, alpha, sigma)


# --------------------------------------------------------------------------------------- pixelate

_PIL_PRECISION_BITS = 22  # Pillow's 8-bit resampling: 32 - 8 - 2 fractional bits in its fixed-point coefficients


@lru_cache(maxsize=64)
def _pil_box_windows(in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Pillow's BOX coefficients for resizing one axis: each output pixel's input window [lo, hi) and weight.

    Pillow (`Resample.c`, `precompute_coeffs`) centres output pixel i at ``(i + 0.5) * scale`` in input
    coordinates, with support ``0.5 * max(scale, 1)``, and weighs input pixel j by the box filter
    evaluated at its centre: 1 if ``-0.5 < (j + 0.5 - center) / max(scale, 1) <= 0.5`` else 0 (no
    fractional coverage). That selects a run of input pixels with equal normalised weights, which
    Pillow rounds to integers with 22 fractional bits: ``int(0.5 + 2**22 / count)``. The flag says every
    window is one pixel (any upscale): the pass is then a plain gather.
    """
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    lo, hi, wt = [], [], []
    for i in range(out_size):
        center = (i + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        inside = [j for j in range(first, last) if -0.5 < (j - center + 0.5) / fscale <= 0.5]
        lo.append(inside[0])
        hi.append(inside[-1] + 1)
        wt.append(int(0.5 + (1 << _PIL_PRECISION_BITS) / len(inside)))
    single = all(b - a == 1 for a, b in zip(lo, hi))
    as_long = {"dtype": torch.long, "device": device}
    wts = torch.tensor(wt, dtype=torch.int32, device=device)
    return torch.tensor(lo, **as_long), torch.tensor(hi, **as_long), wts, single


def _pil_resample_axis(x: Tensor, out_size: int, dim: int) -> Tensor:
    """One Pillow BOX pass along `dim` (-1 or -2) of an int32 image: fixed-point sum, round half up, clip to 0..255.

    With equal weights per window, Pillow's sum is weight * (window sum), the window sum a difference of
    cumulative sums. int32 is exact: weight * window sum <= 255 * (2**22 + window) < 2**31.
    """
    lo, hi, wt, single = _pil_box_windows(x.shape[dim], out_size, x.device)

    def take(t: Tensor, idx: Tensor) -> Tensor:  # advanced indexing: index_select on dim -2 is ~20x slower on CPU
        return t[..., idx] if dim == -1 else t[..., idx, :]

    if single:  # weight 2**22: (v * 2**22 + 2**21) >> 22 == v
        return take(x, lo)
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    cs = torch.cat((zero, x.cumsum(dim, dtype=torch.int32)), dim)
    window = take(cs, hi) - take(cs, lo)
    wt = wt if dim == -1 else wt.view(-1, 1)
    return ((window * wt + (1 << (_PIL_PRECISION_BITS - 1))) >> _PIL_PRECISION_BITS).clamp_(0, 255)


def pil_box_resize(x8: Tensor, height: int, width: int) -> Tensor:
    """``PIL.Image.resize((width, height), Image.BOX)`` on an integer-valued batch (B, C, H, W) in 0..255.

    Horizontal pass first, then vertical, each rounded to 8 bits as Pillow stores its intermediate image;
    an axis whose size is unchanged is skipped, as Pillow does. Returns int32 values 0..255.
    (Pillow 13 may run the vertical pass first when the height shrinks much more than the width, which
    can move values by 1 on such non-square resizes; square images resized by one factor, as in
    pixelate, take the horizontal-first order in every Pillow release.)
    """
    x = x8.to(torch.int32)
    if width != x.shape[-1]:
        x = _pil_resample_axis(x, width, -1)
    if height != x.shape[-2]:
        x = _pil_resample_axis(x, height, -2)
    return x


@register("pixelate")
def pixelate(x: Tensor, c: float, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """BOX-downscale to ``(int(W * c), int(H * c))`` and BOX-upscale back, exactly as Pillow does on uint8.

    The generators hand Pillow uint8 images, so the input is quantised with ``round(x * 255)`` first
    (exact for images that came from uint8) and the output lies on the 1/255 grid.
    """
    h, w = x.shape[-2:]
    x8 = torch.round(x * 255.0).clamp_(0, 255).to(torch.int32)
    # max(1, .): images under 4 pixels a side would shrink to nothing (Pillow refuses a 0-pixel size)
    small = pil_box_resize(x8, max(1, int(h * c)), max(1, int(w * c)))
    return pil_box_resize(small, h, w).float() / 255.0


# ------------------------------------------------------------------------------------------- jpeg


def _jpeg_roundtrip(x8: Tensor, quality: int) -> Tensor:
    """Encode each uint8 image (B, 3, H, W) as JPEG at `quality` with libjpeg and decode it; uint8 on x8's device.

    The codec runs on the CPU even for CUDA batches: torchvision's nvJPEG encoder is fixed to 4:4:4
    chroma sampling, while the generators' Pillow uses libjpeg's default 4:2:0, which alone changes
    CIFAR images by ~3.5 levels (0-255) on average. torchvision's libjpeg path reproduces Pillow bit for
    bit. Images are handed over as HWC-contiguous views so the codec does no per-image copies.
    """
    # torchvision on first use: it would nearly double `import tta_surgical.corruptions` (data/imagenet.py says more)
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    hwc = x8.detach().permute(0, 2, 3, 1).contiguous().cpu()
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work.
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities", category=DeprecationWarning)
        enc = encode_jpeg([im.permute(2, 0, 1) for im in hwc.unbind(0)], quality=quality)
        dec = decode_jpeg(enc, mode=ImageReadMode.RGB)
    out = torch.stack([im.permute(1, 2, 0) for im in dec])  # decoded tensors are CHW views of HWC buffers
    return out.to(x8.device).permute(0, 3, 1, 2).contiguous()


@register("jpeg_compression")
def jpeg_compression(x: Tensor, c: int, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """JPEG round trip at quality `c` (the generators' ``PIL.Image.save(format='JPEG', quality=c)``).

    JPEG codes uint8, so x is quantised with ``round(x * 255)`` (exact for images that came from uint8).
    """
    x8 = torch.round(x * 255.0).clamp_(0, 255).to(torch.uint8)
    return _jpeg_roundtrip(x8, int(c)).float() / 255.0
