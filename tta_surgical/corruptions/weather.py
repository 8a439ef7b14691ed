"""Weather corruptions: snow, frost, fog (benchmark) and spatter (extra), batched and seeded.

Each follows the official generators (`make_cifar_c.py` for preset "cifar", `make_imagenet_c.py` for
"imagenet"; the algorithms are the same, only the parameter tables in `params.py` and a few sizes
differ). Every image of a batch gets its own random draws, all taken from the generator ``g`` in a
fixed order, so a seed reproduces a batch bit for bit on a given device. The OpenCV / ImageMagick
steps of the originals are re-expressed in torch; where a step is not bit-exact the docstring says so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import gaussian_blur, motion_blur, pad2d, uniform
from .base import CorruptionOptions, register
from .textures import frost_bank

# cv2.COLOR_RGB2GRAY weights (ITU-R BT.601), used by snow's brightening of the base image.
_GRAY = (0.299, 0.587, 0.114)


def _gray(x: Tensor) -> Tensor:
    return _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]


def clipped_zoom(x: Tensor, zoom: float) -> Tensor:
    """The generators' `clipped_zoom`: zoom a central crop back to the input size, batched.

    Crop ceil(n / zoom) pixels per axis from offset (n - crop) // 2, zoom it with
    `scipy.ndimage.zoom(order=1)` (output size round(crop * zoom); SciPy maps the corners onto the
    corners, i.e. bilinear with align_corners=True) and trim (out - n) // 2 from the start. The
    originals crop a square with the height's numbers; for non-square inputs each axis uses its own.
    """
    h, w = x.shape[-2:]
    if zoom == 1:
        return x
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    oh, ow = round(ch * zoom), round(cw * zoom)  # Python round, as SciPy's output shape
    y = F.interpolate(x[..., top : top + ch, left : left + cw], size=(oh, ow), mode="bilinear", align_corners=True)
    th, tw = (oh - h) // 2, (ow - w) // 2
    return y[..., th : th + h, tw : tw + w]


# ----------------------------------------------------------------------------------------------- snow


@register("snow")
def snow(x: Tensor, c: tuple, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Snow: a thresholded, zoomed Gaussian flake field, motion-blurred, added twice (once rotated 180°).

    c = (flake mean, flake std, field zoom, threshold, blur radius, blur sigma, image blend).
    As the generators: the field N(mean, std) is drawn at image size, `clipped_zoom`-ed, values
    below the threshold set to 0, stored as an 8-bit grey PNG (clip to [0, 1], x255, truncate),
    motion-blurred by ImageMagick at an angle U(-135°, -45°) and read back as 8-bit (truncated) / 255;
    the image is brightened to blend*x + (1-blend)*max(x, 1.5*gray(x) + 0.5).
    Draws per image: the field (B, 1, H, W) normals, then the angles (B,).
    """
    mean, std, zoom, threshold, radius, sigma, blend = c
    b, _, h, w = x.shape
    flakes = torch.randn((b, 1, h, w), generator=g, device=x.device) * std + mean
    flakes = clipped_zoom(flakes, zoom)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes)
    flakes = torch.floor(flakes.clamp(0, 1) * 255)  # the uint8 grey PNG handed to ImageMagick
    angle = uniform((b,), -135.0, -45.0, g, x.device)
    # ImageMagick 6.9 Q16 writes the 8-bit result truncated (measured through wand), not rounded.
    flakes = motion_blur(flakes, radius, sigma, angle).add_(1e-3).floor_().clamp_(0, 255) / 255
    base = blend * x + (1 - blend) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return base + flakes + flakes.flip(-2, -1)


# ---------------------------------------------------------------------------------------------- frost


def _fit_bank(bank: Tensor, sizes: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Upscale the textures too small for an (h, w) crop (never needed at 32x32 / 224x224).

    The generators would fail there (`randint(0, 0)`); like the `imagecorruptions` package we scale
    such a texture up to 1.1x the size that covers the image (bilinear here, bicubic there).
    """
    small = (sizes[:, 0] <= h) | (sizes[:, 1] <= w)
    if not bool(small.any()):
        return bank, sizes
    texs = []
    for i, (th, tw) in enumerate(sizes.tolist()):
        t = bank[i : i + 1, :, :th, :tw].float()
        if th <= h or tw <= w:
            s = 1.1 * max(h / th, w / tw, 1.0)
            t = F.interpolate(t, size=(math.ceil(th * s), math.ceil(tw * s)), mode="bilinear", align_corners=False)
            t = t.round_().clamp_(0, 255)
        texs.append(t[0].to(torch.uint8))
    new_sizes = torch.tensor([t.shape[-2:] for t in texs], dtype=torch.long, device=bank.device)
    hm, wm = new_sizes.max(0).values.tolist()
    out = torch.zeros(len(texs), 3, hm, wm, dtype=torch.uint8, device=bank.device)
    for i, t in enumerate(texs):
        out[i, :, : t.shape[1], : t.shape[2]] = t
    return out, new_sizes


@register("frost")
def frost(x: Tensor, c: tuple, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Frost: c0 * image + c1 * a random crop of a frost texture, on the [0, 1] scale.

    As the generators: the texture is one of frost1..frost5 chosen uniformly (frost6 is never drawn),
    read as RGB, downscaled by 0.2 with cv2's bilinear resize for preset "cifar" (exactly pixels
    2, 7, 12, ... of the original, see `textures`), used at full size for "imagenet"; the crop's
    top-left corner is uniform in [0, size - crop) per axis (NumPy's `randint(0, size - crop)`).
    Draws per image: texture index (B,), then row and column starts (2 x (B,) uniforms).
    """
    w_img, w_frost = c
    b, _, h, w = x.shape
    bank, sizes = frost_bank(opts.preset, x.device, opts.frost_dir)
    bank, sizes = _fit_bank(bank, sizes, h, w)
    idx = torch.randint(0, bank.shape[0], (b,), generator=g, device=x.device)
    # floor(U * n) in float64 is uniform on 0..n-1 like randint; clamp guards U * n rounding up to n.
    span = (sizes[idx] - torch.tensor([h, w], device=x.device)).double()  # (B, 2) = randint's exclusive high
    start = torch.floor(torch.rand((b, 2), generator=g, device=x.device, dtype=torch.float64) * span)
    start = torch.minimum(start, span - 1).long()
    rows = (start[:, 0:1] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (start[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    chan = torch.arange(3, device=x.device).view(1, 3, 1, 1)
    crop = bank[idx.view(b, 1, 1, 1), chan, rows, cols].float()
    return w_img * x + w_frost * (crop / 255)


# ------------------------------------------------------------------------------------------------ fog


def plasma_fractal(batch: int, mapsize: int, decay: float, g: torch.Generator, device: torch.device) -> Tensor:
    """Diamond-square plasma fractals (batch, mapsize, mapsize) in [0, 1], one per image.

    The generators' `plasma_fractal` (a modification of FLHerne/mapgen): start from 0 at the corner
    of a periodic map; at each level set square centres, then diamond points, to the mean of their
    four neighbours plus wibble * U(-wibble, wibble) (so the noise amplitude is wibble**2), wibble
    starting at 100 and divided by `decay` per level; finally subtract the minimum and divide by the
    maximum. Draws per level: squares, then the diamonds on the corner rows, then those on the centre rows.
    """
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two >= 2, got {mapsize}")
    m = torch.zeros((batch, mapsize, mapsize), device=device)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: Tensor) -> Tensor:
        return total / 4 + wibble * uniform(tuple(total.shape), -wibble, wibble, g, device)

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        square = corners + corners.roll(-1, 1)
        square = square + square.roll(-1, 2)
        m[:, half::step, half::step] = wibbled_mean(square)
        centres = m[:, half::step, half::step]
        corners = m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        m[:, half::step, 0::step] = wibbled_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step //= 2
        wibble /= decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


@register("fog")
def fog(x: Tensor, c: tuple, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Fog: add strength * plasma fractal, then rescale by max/(max + strength) (max of the clean image).

    c = (strength, decay). The fractal map is 32 for "cifar" and 256 for "imagenet" as in the
    generators (normalised over the whole map, then its top-left H x W used), or the next power
    of two when the image is larger. Draws: the fractal's uniforms, level by level.
    """
    strength, decay = c
    b, _, h, w = x.shape
    mapsize = 32 if opts.preset == "cifar" else 256
    while mapsize < max(h, w):
        mapsize *= 2
    fractal = plasma_fractal(b, mapsize, decay, g, x.device)[:, None, :h, :w]
    max_val = x.amax((1, 2, 3), keepdim=True)
    return (x + strength * fractal) * (max_val / (max_val + strength))


# -------------------------------------------------------------------------------------------- spatter

_CANNY_TG22 = 13573  # round(tan(22.5°) * 2**15), OpenCV's fixed-point direction test
# cv2.distanceTransform(DIST_L2, maskSize=5) is a chamfer metric: steps of 1 (axial), 1.4 (diagonal) and
# 2.1969 (knight move). OpenCV's pip wheels run it through IPP, which adds these float32 weights along the
# path; OpenCV's own code uses 16-bit fixed point instead (1.3999939..., off by < 1e-4 after 20 steps).
_CHAMFER5 = (
    [((0, 1), 1.0), ((0, -1), 1.0), ((1, 0), 1.0), ((-1, 0), 1.0)]
    + [((dy, dx), 1.4) for dy in (-1, 1) for dx in (-1, 1)]
    + [((dy, dx), 2.1969) for dy, dx in ((1, 2), (2, 1), (-1, 2), (-2, 1), (1, -2), (2, -1), (-1, -2), (-2, -1))]
)


def _taps(p: Tensor, h: int, w: int, r: int, q: int, pad: int) -> Tensor:
    """The (H, W) window of padded `p` shifted by row offset r, column offset q (pad = the padding width)."""
    return p[..., pad + r : pad + r + h, pad + q : pad + q + w]


def _correlate3(x: Tensor, kernel: tuple[tuple[float, ...], ...], mode: str) -> Tensor:
    """3x3 correlation as a sum of shifted slices (exact for integer data; no conv kernels, fast on CPU)."""
    h, w = x.shape[-2:]
    p = pad2d(x, 1, 1, mode)
    out = torch.zeros_like(x)
    for r in range(3):
        for q in range(3):
            if kernel[r][q]:
                out += kernel[r][q] * _taps(p, h, w, r - 1, q - 1, 1)
    return out


def _box_sum3(x: Tensor) -> Tensor:
    """Sum over 3x3 windows with OpenCV's default border (reflect-101, SciPy's "mirror"), separably."""
    h, w = x.shape[-2:]
    p = pad2d(x, 1, 1, "mirror")
    rows = p[..., 0:h, :] + p[..., 1 : h + 1, :] + p[..., 2 : h + 2, :]
    return rows[..., 0:w] + rows[..., 1 : w + 1] + rows[..., 2 : w + 2]


def canny(img: Tensor, low: int, high: int) -> Tensor:
    """`cv2.Canny(img, low, high)` (aperture 3, L1 gradient) on uint8-valued (B, 1, H, W) images -> bool edges.

    OpenCV's algorithm: 3x3 Sobel with replicated borders; magnitude |dx| + |dy|; non-maximum
    suppression along the gradient direction binned at 22.5° / 67.5° with OpenCV's fixed-point test
    and its tie rule (strictly greater than the neighbour behind, >= the one ahead, both strict on
    diagonals; magnitude 0 outside the image); pixels above `high` are edges and grow through
    8-connected pixels above `low` that survived suppression (hysteresis, run to convergence).
    Bit-exact to cv2 in the tests.
    """
    h, w = img.shape[-2:]
    sx = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
    sy = ((-1.0, -2.0, -1.0), (0.0, 0.0, 0.0), (1.0, 2.0, 1.0))
    dx = _correlate3(img.float(), sx, "nearest").int()[:, 0]  # exact: small integers in float32
    dy = _correlate3(img.float(), sy, "nearest").int()[:, 0]
    ax, ay = dx.abs(), dy.abs()
    mag = ax + ay
    mp = F.pad(mag, (1, 1, 1, 1))

    def nb(r: int, q: int) -> Tensor:  # the neighbour magnitude at row offset r, column offset q
        return _taps(mp, h, w, r, q, 1)

    tg22 = ax * _CANNY_TG22
    yy = ay << 15
    horiz = yy < tg22
    vert = ~horiz & (yy > tg22 + (ax << 16))
    anti = (dx < 0) ^ (dy < 0)  # OpenCV's (dx ^ dy) < 0: the gradient runs along the anti-diagonal
    keep_h = (mag > nb(0, -1)) & (mag >= nb(0, 1))
    keep_v = (mag > nb(-1, 0)) & (mag >= nb(1, 0))
    keep_d = torch.where(anti, (mag > nb(-1, 1)) & (mag > nb(1, -1)), (mag > nb(-1, -1)) & (mag > nb(1, 1)))
    cand = torch.where(horiz, keep_h, torch.where(vert, keep_v, keep_d)) & (mag > low)
    edge = cand & (mag > high)
    while True:  # hysteresis: grow strong edges into 8-connected candidates; check convergence every 4 steps
        prev = edge
        for _ in range(4):
            e = F.pad(edge, (1, 1, 1, 1))
            rows = e[:, 0:h] | e[:, 1 : h + 1] | e[:, 2 : h + 2]
            edge = (rows[:, :, 0:w] | rows[:, :, 1 : w + 1] | rows[:, :, 2 : w + 2]) & cand
        if torch.equal(edge, prev):
            return edge.unsqueeze(1)


def chamfer_distance5(sources: Tensor, cap: float = 20.0, fixed_point: bool = False) -> Tensor:
    """min(`cv2.distanceTransform(src, DIST_L2, 5)`, cap) where `sources` (B, 1, H, W) marks src == 0.

    OpenCV's 5x5 mask is a chamfer metric (steps 1, 1.4, 2.1969), not the exact Euclidean distance;
    its two raster passes find the cheapest step path to a source. Here the same shortest paths are
    found by min-plus relaxation with all 16 steps at once, batched; a path costing at most `cap` has
    at most `cap` steps, so `cap` rounds suffice (stopping early when nothing changes). Step costs
    are added in float32 like the IPP code of OpenCV's wheels (equal to cv2 on all but ~0.4% of
    pixels at 224x224, by < 1e-5, where paths of equal cost sum in another order), or in OpenCV's
    16-bit fixed point with `fixed_point=True` (bit-exact to cv2 with IPP disabled). No source: `cap`.
    """
    h, w = sources.shape[-2:]
    (_, a), (_, b), (_, c) = _CHAMFER5[0], _CHAMFER5[4], _CHAMFER5[8]
    if fixed_point:
        big = int(round(cap * 65536))
        a, b, c = (int(round(v * 65536)) for v in (a, b, c))
        d = torch.where(sources[:, 0], 0, big).to(torch.int32)
    else:
        big = float(cap) + 8.0  # above every capped value, so the cap never blocks a cheaper path
        d = torch.where(sources[:, 0], 0.0, big).float()
    for _ in range(math.ceil(cap)):
        # min(p + w) over the 16 steps, grouped by weight and factored into row/column pair minima
        # (min commutes with adding a constant, so this equals the 16 separate candidates exactly).
        p = F.pad(d, (2, 2, 2, 2), value=big)
        h1 = torch.minimum(p[:, :, 1 : w + 1], p[:, :, 3 : w + 3])  # columns j -+ 1, all padded rows
        h2 = torch.minimum(p[:, :, 0:w], p[:, :, 4 : w + 4])  # columns j -+ 2
        axial = torch.minimum(torch.minimum(p[:, 1 : h + 1, 2 : w + 2], p[:, 3 : h + 3, 2 : w + 2]), h1[:, 2 : h + 2])
        diag = torch.minimum(h1[:, 1 : h + 1], h1[:, 3 : h + 3])
        knight = torch.minimum(h2[:, 1 : h + 1], h2[:, 3 : h + 3])
        knight = torch.minimum(knight, torch.minimum(h1[:, 0:h], h1[:, 4 : h + 4]))
        new = torch.minimum(torch.minimum(d, axial + a), torch.minimum(diag + b, knight + c))
        if torch.equal(new, d):
            break
        d = new
    d = d.double() / 65536 if fixed_point else d.double()
    return d.clamp(max=cap).unsqueeze(1)


def equalize_hist(img: Tensor) -> Tensor:
    """`cv2.equalizeHist` per image on uint8-valued (B, 1, H, W) long tensors.

    The lowest occupied level maps to 0 and level j to round(255 * (#pixels in (lowest, j]) /
    (#pixels above the lowest)), in float32 with ties to even like OpenCV; a constant image is unchanged.
    """
    b = img.shape[0]
    flat = img.reshape(b, -1)
    n = flat.shape[1]
    hist = torch.zeros((b, 256), dtype=torch.long, device=img.device).scatter_add_(1, flat, torch.ones_like(flat))
    lowest = (hist > 0).long().argmax(1, keepdim=True)
    h_low = hist.gather(1, lowest)
    cum = hist.cumsum(1)
    scale = 255.0 / (n - h_low).clamp(min=1).float()
    lut = ((cum - cum.gather(1, lowest)).float() * scale).round().clamp(0, 255).long()
    lut = torch.where(h_low == n, torch.arange(256, device=img.device).expand(b, 256), lut)
    return lut.gather(1, flat).reshape(img.shape)


_EMBOSS = ((-2.0, -1.0, 0.0), (-1.0, 1.0, 1.0), (0.0, 1.0, 2.0))
_WATER = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise, RGB
_MUD = (63 / 255, 42 / 255, 20 / 255)  # mud brown, RGB


def water_mask(liquid: Tensor) -> Tensor:
    """The water-mode chain of the generators on uint8-valued liquid layers (B, 1, H, W) -> float (B, 1, H, W).

    Canny(50, 150) edges -> distance to the nearest edge (5x5 chamfer) truncated at 20 -> 3x3 mean
    -> truncate to uint8 -> histogram equalisation -> emboss kernel [[-2,-1,0],[-1,1,1],[0,1,2]]
    (correlation, saturated to uint8) -> 3x3 mean rounded to uint8. Borders: OpenCV's reflect-101.
    The first mean is taken in float64 like cv2's float box filter; the others are integer-exact.
    """
    edges = canny(liquid, 50, 150)
    dist = chamfer_distance5(edges, cap=20.0)
    # sum * (1/9) in float64 -> float32 -> truncate, as cv2.blur(float32).astype(uint8)
    dist = (_box_sum3(dist) * (1.0 / 9.0)).float().floor().clamp_(0, 255).long()
    dist = equalize_hist(dist).float()
    dist = _correlate3(dist, _EMBOSS, "mirror").clamp_(0, 255)  # integers: exact in float32
    return (_box_sum3(dist) / 9).round()  # the exact mean is never a tie (k/9), so float32 rounding is safe


@register("spatter")
def spatter(x: Tensor, c: tuple, g: torch.Generator, opts: CorruptionOptions) -> Tensor:
    """Spatter: water drops (mode 0) or mud (mode 1) from a blurred, thresholded Gaussian liquid layer.

    c = (mean, std, blur sigma, threshold, intensity, mode). The layer N(mean, std) (B, 1, H, W) is
    blurred like `skimage.filters.gaussian` (mode nearest) and values below the threshold zeroed.
    Water: the layer as uint8 (x255, truncated; the rare values above 1 wrap modulo 256 as NumPy's
    out-of-range cast does on x86) goes through `water_mask`; m = layer * mask / max(layer * mask)
    * intensity (0 where the max is 0, where the original would divide by zero) and the result is
    x + m * pale turquoise. Mud: m = gaussian(layer > threshold, sigma=intensity), values below 0.8
    zeroed, and the result is x * (1 - m) + m * mud brown.
    Differences from OpenCV: Canny, equalizeHist, the emboss filter and the 3x3 means are bit-exact;
    the distance transform adds float32 step costs like cv2's IPP code but may sum equal-cost paths
    in another order (< 1e-5 apart on ~0.1% of pixels), which in rare cases flips a truncated
    level and, through the equalisation, a few mask values. In the tests the whole water chain
    matched cv2 on all of 663k pixels, and driven with the same draws, the corruption matched the
    generator's to float rounding on 100 CIFAR images at each severity.
    Draws per image: the layer's normals (B, 1, H, W).
    """
    mean, std, sigma, threshold, intensity, mode = c
    b, _, h, w = x.shape
    liquid = torch.randn((b, 1, h, w), generator=g, device=x.device) * std + mean
    liquid = gaussian_blur(liquid, sigma, mode="nearest")
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if mode == 0:
        layer = torch.floor(liquid * 255).remainder(256)
        m = layer * water_mask(layer)
        peak = m.amax((2, 3), keepdim=True)
        m = torch.where(peak > 0, m / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(m))
        color = torch.tensor(_WATER, device=x.device).view(1, 3, 1, 1)
        return x + (m * intensity) * color
    m = gaussian_blur((liquid > threshold).float(), intensity, mode="nearest")
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    color = torch.tensor(_MUD, device=x.device).view(1, 3, 1, 1)
    return x * (1 - m) + m * color
