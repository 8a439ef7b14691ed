"""Blur corruptions: defocus_blur, glass_blur, motion_blur, zoom_blur, gaussian_blur.

Batched torch versions of the official CIFAR-10-C / ImageNet-C generators (``make_cifar_c.py``,
``make_imagenet_c.py`` in hendrycks/robustness), written to reproduce their arithmetic, boundary
handling and grid sizes; see each function's docstring for the few places where they differ and why.
The severity parameter ``c`` comes from the preset table in `params.py`; both presets share the same
algorithm (the ImageNet generator differs only in its parameters and in using the real image size
where the CIFAR one hard-codes 32). Any image size works, square or not.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops
from .base import CorruptionOptions, register

# ---------------------------------------------------------------------------------------------------
# gaussian_blur
# ---------------------------------------------------------------------------------------------------


@register("gaussian_blur")
def gaussian_blur(x: Tensor, c: float, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """`skimage.filters.gaussian(x, sigma=c)` per channel: SciPy kernel (truncate 4), edge mode 'nearest'."""
    return _ops.gaussian_blur(x, float(c), mode="nearest")


# ---------------------------------------------------------------------------------------------------
# defocus_blur
# ---------------------------------------------------------------------------------------------------


def _cv2_gaussian_kernel1d(ksize: int, sigma: float) -> Tensor:
    """`cv2.getGaussianKernel(ksize, sigma)` for sigma > 0: exp(-x^2 / (2 sigma^2)) at x = i - (ksize-1)/2, sum 1."""
    t = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) * 0.5
    k = torch.exp(t * t * (-0.5 / (sigma * sigma)))
    return k / k.sum()


@lru_cache(maxsize=64)
def defocus_kernel(radius: float, alias_blur: float) -> Tensor:
    """The generators' `disk(radius, alias_blur)` kernel (float32, CPU, sums to 1).

    A binary disk ``X^2 + Y^2 <= radius^2`` on the integer grid ``-8..8`` (17x17) when radius <= 8, else
    ``-radius..radius``, normalised to sum 1, then anti-aliased by ``cv2.GaussianBlur`` with a 3x3 (grid
    17) or 5x5 (larger grid) kernel of sigma `alias_blur` and OpenCV's default border (reflect-101 =
    SciPy 'mirror'). Rows and columns that are exactly zero are cropped (symmetrically): they add
    nothing to the correlation, and the smaller kernel is much faster on small CIFAR radii.
    The returned tensor is cached; do not modify it.
    """
    if radius <= 8:
        half, ksize = 8, 3
    else:
        half, ksize = int(radius), 5  # np.arange(-radius, radius + 1): integer radii in the tables
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    disk = (xx**2 + yy**2 <= float(radius) ** 2).to(torch.float32)
    disk = (disk / disk.sum()).to(torch.float64)  # the generator normalises in float32
    k1 = _cv2_gaussian_kernel1d(ksize, float(alias_blur))
    kernel = _ops.separable_filter(disk.view(1, 1, *disk.shape), k1, k1, mode="mirror")[0, 0].float()
    size = 2 * half + 1
    used = torch.nonzero(kernel.abs().sum(0) > 0).flatten()
    lo = min(int(used.min()), size - 1 - int(used.max()))  # the kernel is symmetric: same margin each side
    return kernel[lo : size - lo, lo : size - lo].contiguous()


@register("defocus_blur")
def defocus_blur(x: Tensor, c: tuple[float, float], g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Correlate each channel with the anti-aliased disk kernel, `cv2.filter2D` border (reflect-101).

    c = (disk radius, anti-alias sigma). Matches the generator to float32 rounding (it filters in float64).
    """
    radius, alias_blur = c
    kernel = defocus_kernel(float(radius), float(alias_blur)).to(x.device)
    return _ops.filter2d(x, kernel, mode="mirror")


# ---------------------------------------------------------------------------------------------------
# motion_blur
# ---------------------------------------------------------------------------------------------------


@register("motion_blur")
def motion_blur(x: Tensor, c: tuple[float, float], g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """ImageMagick `MotionBlurImage(radius, sigma, angle)` with angle ~ U(-45, 45) degrees per image.

    c = (radius, sigma). The generators pass the uint8 image through a PNG into ImageMagick and decode
    the result with OpenCV: the PNG input is lossless, and the BGR order of `cv2.imdecode` is undone by
    the generator (and a grey result is stacked back to three channels), so neither changes the values.
    What does change them is that ImageMagick writes an 8-bit PNG: with ImageMagick 6.9 (Q16), measured with
    its MagickMotionBlurImage through wand on CIFAR images, the 8-bit values are the blurred values *truncated*
    (mean |difference| 0.003 levels against truncation, 0.5 against rounding). We reproduce that, so
    `to_uint8` of our output gives the official uint8 values and float consumers see the same quantised
    images as the released datasets. (The 1e-3-level guard keeps float32 sums of whole levels on their level.)
    """
    radius, sigma = c
    angles = _ops.uniform((x.shape[0],), -45.0, 45.0, g, x.device)
    y = _ops.motion_blur(x, float(radius), float(sigma), angles)
    return torch.floor(y.clamp(0.0, 1.0) * 255.0 + 1e-3) / 255.0


# ---------------------------------------------------------------------------------------------------
# zoom_blur
# ---------------------------------------------------------------------------------------------------


def _zoom_geometry(n: int, z: float) -> tuple[int, int, int, int]:
    """One axis of the generators' `clipped_zoom(img, z)`: (top, ch, out, trim).

    `clipped_zoom` takes the central ``ch = ceil(n / z)`` pixels (from ``top = (n - ch) // 2``), scales
    them with `scipy.ndimage.zoom(order=1)` to ``out = round(ch * z)`` pixels (Python rounding, as
    SciPy), then keeps the central n (from ``trim = (out - n) // 2``).
    """
    ch = math.ceil(n / z)
    out = int(round(ch * z))
    return (n - ch) // 2, ch, out, (out - n) // 2


def _zoom_matrix(n: int, z: float) -> Tensor:
    """(n, n) float64 matrix of one axis of `clipped_zoom`: row j holds the linear-interpolation weights.

    SciPy's zoom (grid_mode False) maps output index k to input coordinate ``k * (ch - 1) / (out - 1)``.
    """
    top, ch, out, trim = _zoom_geometry(n, z)
    scale = (ch - 1) / (out - 1) if out > 1 else 1.0
    cc = torch.arange(trim, trim + n, dtype=torch.float64) * scale
    i0 = torch.floor(cc).clamp(0, ch - 1)
    t = cc - i0
    i1 = (i0 + 1).clamp(max=ch - 1)
    m = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n)
    m.index_put_((rows, i0.long() + top), 1 - t, accumulate=True)
    m.index_put_((rows, i1.long() + top), t, accumulate=True)
    return m


@lru_cache(maxsize=16)
def _zoom_blur_operator(h: int, w: int, factors: tuple[float, ...]) -> Tensor:
    """The whole zoom blur of an (h, w) channel as one (h*w, h*w) float32 matrix (cached; do not modify).

    Zoom blur is linear and identical for every image and channel: out = (x + sum_z A_z x B_z^T) / (n + 1),
    i.e. vec(out) = vec(x) @ M with M = (I + sum_z kron(A_z, B_z))^T / (n + 1). For small images one BLAS
    matmul is far faster on CPU than n separate resamplings, and the weights are exact (built in float64).
    """
    n = len(factors)
    a = torch.stack([_zoom_matrix(h, z) for z in factors]).reshape(n, h * h)  # [z, (i, k)]
    b = torch.stack([_zoom_matrix(w, z) for z in factors]).reshape(n, w * w)  # [z, (j, l)]
    # sum_z kron(A_z, B_z)[(i, j), (k, l)] = sum_z A_z[i, k] B_z[j, l]: one small matmul over z
    m = (a.T @ b).reshape(h, h, w, w).permute(0, 2, 1, 3).reshape(h * w, h * w)
    m = m + torch.eye(h * w, dtype=torch.float64)
    return (m.T / (n + 1)).float().contiguous()


def _clipped_zoom(x: Tensor, z: float) -> Tensor:
    """`clipped_zoom` of every image and channel, with `F.interpolate` (bilinear, align_corners=True).

    align_corners=True is exactly SciPy's coordinate map ``k * (ch - 1) / (out - 1)``; torch evaluates it
    in float32, which moves sample points by up to ~1e-5 pixel on 224-pixel images (values differ from
    SciPy by <= 2e-5, i.e. < 0.01 grey levels).
    """
    h, w = x.shape[-2:]
    th, chh, oh, ah = _zoom_geometry(h, z)
    tw, chw, ow, aw = _zoom_geometry(w, z)
    y = F.interpolate(x[..., th : th + chh, tw : tw + chw], size=(oh, ow), mode="bilinear", align_corners=True)
    return y[..., ah : ah + h, aw : aw + w]


# Images up to this many pixels use the dense zoom-blur operator on CPU (1024 x 1024 for CIFAR).
_DENSE_ZOOM_MAX_PIXELS = 32 * 32


@register("zoom_blur")
def zoom_blur(x: Tensor, c: tuple[float, ...], g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Mean of the image and its `clipped_zoom` copies for each factor in c (NumPy's `arange` values).

    The generator's crop and trim use the image height for both axes (it only sees square images); we
    apply the same rule per axis, which is identical for square images and centred for others.
    (`imagecorruptions` instead keeps the top-left corner of the zoomed copy, which shifts the image
    towards the bottom right; we follow the official generator.) One deliberate difference: for a few
    odd sizes (e.g. 36 pixels at zoom 1.2000000000000002) SciPy's float64 coordinate of the last sample
    lands a hair past the last pixel, and its default mode='constant' then returns 0 there (a black edge
    row in the generator's output); we clamp to the last pixel. This never happens at the official sizes
    32 and 224 with their factor lists, where we match SciPy to float32 rounding.

    On CPU, images up to 32x32 use one cached dense operator (exact weights); otherwise each factor is
    one `F.interpolate` call (also on CUDA, where a float32 matmul may run in TF32 if the user enabled it).
    """
    b, ch, h, w = x.shape
    factors = tuple(float(z) for z in c)
    if x.device.type == "cpu" and h * w <= _DENSE_ZOOM_MAX_PIXELS:
        return (x.reshape(b * ch, h * w) @ _zoom_blur_operator(h, w, factors)).reshape(b, ch, h, w)
    out = x.clone()
    for z in factors:
        out += _clipped_zoom(x, z)
    return out / (len(factors) + 1)


# ---------------------------------------------------------------------------------------------------
# glass_blur
# ---------------------------------------------------------------------------------------------------


def _numpy_pairwise_sum(values: list[float]) -> float:
    """`numpy.sum` of a short float64 vector, same association order (so the same rounding)."""
    n = len(values)
    if n < 8:
        res = 0.0
        for v in values:
            res += v
        return res
    r = list(values[:8])
    i = 8
    while i < n - n % 8:
        for j in range(8):
            r[j] += values[i + j]
        i += 8
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for v in values[i:]:
        res += v
    return res


@lru_cache(maxsize=64)
def _scipy_gaussian_weights(sigma: float) -> tuple[float, ...]:
    """SciPy's `_gaussian_kernel1d(sigma, 0, int(4 sigma + 0.5))` bit for bit (float64)."""
    radius = int(4.0 * sigma + 0.5)
    phi = [math.exp(-0.5 / (sigma * sigma) * (k * k)) for k in range(-radius, radius + 1)]
    total = _numpy_pairwise_sum(phi)
    return tuple(p / total for p in phi)


def _scipy_correlate1d(x: Tensor, w: tuple[float, ...], dim: int) -> Tensor:
    """`scipy.ndimage.correlate1d(mode='nearest')` with a symmetric kernel, in SciPy's operation order.

    SciPy computes ``out = x[i] * w0 + sum_{j = r..1} (x[i - j] + x[i + j]) * w_j`` left to right; doing
    the same element-wise in float64 gives bit-identical results.
    """
    r = (len(w) - 1) // 2
    n = x.shape[dim]
    if r == 0:
        return x * w[0]
    # 'nearest' = edge replication; F.pad is much faster than index-based padding on CPU
    xp = F.pad(x, (0, 0, r, r) if dim == -2 else (r, r, 0, 0), mode="replicate")
    out = xp.narrow(dim, r, n) * w[r]
    tmp = torch.empty_like(out)
    for j in range(r, 0, -1):
        torch.add(xp.narrow(dim, r - j, n), xp.narrow(dim, r + j, n), out=tmp)
        out.add_(tmp.mul_(w[r - j]))  # separate IEEE ops in SciPy's order (no fused multiply-add)
    return out


def _skimage_gaussian64(x: Tensor, sigma: float) -> Tensor:
    """`skimage.filters.gaussian(img, sigma, channel_axis=-1)`, bit-identical on float64 input (rows, then columns)."""
    w = _scipy_gaussian_weights(float(sigma))
    return _scipy_correlate1d(_scipy_correlate1d(x, w, -2), w, -1)


def glass_shuffle(x: Tensor, dy: Tensor, dx: Tensor, delta: int) -> Tensor:
    """One pass of the generators' "locally shuffle pixels" loop, vectorised and exact.

    The generator scans destinations ``h = H-delta .. delta+1`` (descending), and within a row
    ``w = W-delta .. delta+1`` (descending), draws (dx, dy) uniformly from ``[-delta, delta-1]`` and runs
    ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with ``(h', w') = (h + dy, w + dx)``. On NumPy arrays
    this is *not* a swap: ``x[h', w']`` on the right is a view, so the first assignment copies the
    neighbour into ``x[h, w]`` and the second writes that same value back into ``x[h', w']``. The pass
    is therefore a sequence of copies ``x[p] <- x[s(p)]`` in scan order: each destination is written
    exactly once and reads its source *as it is at that moment*, i.e. the already-written value when
    the source is a destination scanned earlier (``dy > 0``, or ``dy == 0`` and ``dx > 0``, possible
    only for ``delta >= 2``), else the value from before the pass. Following those "already written"
    links gives a chain back through strictly earlier scan positions that ends at a pixel whose
    pre-pass value is read; we resolve all chains at once by pointer doubling (log2 of the chain length
    rounds of `gather`). Given the same offsets the result equals the sequential loop bit for bit
    (checked in the tests against the literal NumPy statement); the offsets themselves are drawn from
    torch instead of NumPy's global RNG, with the same distribution (independent, uniform).

    x: (B, C, H, W); dy, dx: integer (B, H - 2 delta, W - 2 delta), entry [i, j] for destination
    (delta + 1 + i, delta + 1 + j).
    """
    b, c, h, w = x.shape
    nh, nw = h - 2 * delta, w - 2 * delta
    if nh <= 0 or nw <= 0:
        return x
    dev = x.device
    rows = torch.arange(delta + 1, delta + 1 + nh, device=dev).view(1, nh, 1)
    cols = torch.arange(delta + 1, delta + 1 + nw, device=dev).view(1, 1, nw)
    dy, dx = dy.to(dev).long(), dx.to(dev).long()
    sr, sc = rows + dy, cols + dx  # source coordinates, always inside the image
    src = sr * w + sc  # (B, nh, nw)
    src_is_dest = (sr >= delta + 1) & (sr <= h - delta) & (sc >= delta + 1) & (sc <= w - delta)
    follow = src_is_dest & ((dy > 0) | ((dy == 0) & (dx > 0)))
    dest = (rows * w + cols).expand(b, nh, nw).reshape(b, -1)
    ident = torch.arange(h * w, device=dev).repeat(b, 1)
    # T: where each pixel's value is read from; P: the next link of its chain (itself at a chain end).
    T = ident.scatter(1, dest, src.reshape(b, -1))
    P = ident.scatter(1, dest, torch.where(follow, src, rows * w + cols).reshape(b, -1))
    for _ in range(max(1, math.ceil(math.log2(nh * nw))) + 1):
        nxt = P.gather(1, P)
        if torch.equal(nxt, P):
            break
        P = nxt
    idx = T.gather(1, P)
    return x.reshape(b, c, h * w).gather(2, idx.unsqueeze(1).expand(b, c, h * w)).reshape(b, c, h, w)


@register("glass_blur")
def glass_blur(x: Tensor, c: tuple[float, int, int], g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Gaussian blur, quantise to uint8, `passes` local pixel-shuffle passes, Gaussian blur again.

    c = (sigma, max displacement delta, passes). Follows the generator step by step:

    1. ``np.uint8(gaussian(x, sigma) * 255)`` — done in float64 with SciPy's exact operation order, so the
       truncation gives the generator's uint8 values bit for bit (in flat regions the float64 rounding
       decides between k and k - 1, so a float32 blur would differ there). Inputs that are uint8 levels
       stored as float32 are first snapped to the float64 value k / 255 the generator divides out.
    2. the shuffle passes, exact given the offsets (see `glass_shuffle`). The generator's "swap" is in
       fact a copy on NumPy arrays, so pixels get duplicated rather than permuted: each destination copies a
       neighbour at offset (dy, dx) in [-delta, delta-1]^2, reading already-moved values when the scan
       has passed them — with delta = 1 (all CIFAR severities) every read is a pre-pass value. The
       scanned range is the generator's (rows and columns delta+1 .. size-delta, with the real image size
       where the CIFAR script hard-codes 32). Offsets are drawn per image from `g`.
    3. ``gaussian(x_uint8 / 255, sigma)``, in float32 (nothing is quantised after it).
    """
    sigma, delta, passes = float(c[0]), int(c[1]), int(c[2])
    b, ch, h, w = x.shape
    x64 = x.double()
    k = torch.round(x64 * 255.0)
    x64 = torch.where((x64 * 255.0 - k).abs() < 1e-4, k / 255.0, x64)
    # the uint8 levels, held exactly in x's float dtype (cheaper to shuffle than float64)
    q = torch.floor(_skimage_gaussian64(x64, sigma) * 255.0).clamp_(0.0, 255.0).to(x.dtype)
    nh, nw = h - 2 * delta, w - 2 * delta
    if passes > 0 and nh > 0 and nw > 0:
        offsets = torch.randint(-delta, delta, (passes, 2, b, nh, nw), generator=g, device=x.device)
        for i in range(passes):
            q = glass_shuffle(q, offsets[i, 0], offsets[i, 1], delta)
    # no quantisation follows, so the second blur can run in float32 (same kernel and operation order)
    return _skimage_gaussian64(q / 255.0, sigma)
