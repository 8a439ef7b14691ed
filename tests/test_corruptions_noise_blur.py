"""Noise and blur corruptions: contract, determinism, severity ordering and fidelity to the official generators.

Oracles: SciPy / scikit-image / OpenCV re-computations of the official `make_cifar_c.py` /
`make_imagenet_c.py` steps, the literal NumPy pixel-shuffle loop of glass blur, and `imagecorruptions`
(a NumPy port of the ImageNet-C generator) for motion blur and the noise statistics.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _extras import require

from tta_surgical.corruptions import blur, corrupt, make_generator
from tta_surgical.corruptions.params import PRESETS

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
BLUR = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur")
RANDOM = NOISE + ("glass_blur", "motion_blur")
SEVERITIES = (1, 2, 3, 4, 5)


def _hwc(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) tensor -> (B, H, W, 3) float64 array."""
    return x.permute(0, 2, 3, 1).double().numpy()


def _uint8_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth-plus-texture images on the uint8 grid (like real decoded images), as float32 in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, max(2, h // 6), max(2, w // 6), generator=g)
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    x = (0.8 * x + 0.2 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)
    return torch.round(x * 255) / 255


def _hf_energy(x: torch.Tensor) -> float:
    """Mean squared horizontal + vertical pixel differences: what a blur removes."""
    return float((x.diff(dim=-1) ** 2).mean() + (x.diff(dim=-2) ** 2).mean())


# --------------------------------------------------------------------------------------------------
# contract
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOISE + BLUR)
def test_contract_cifar(name: str, images32: torch.Tensor) -> None:
    x = images32
    for s in SEVERITIES:
        y = corrupt(x, name, s, seed=7, preset="cifar")
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
        assert not torch.equal(y, x), f"{name} s{s} left the images unchanged"
        assert torch.equal(y, corrupt(x, name, s, seed=7, preset="cifar")), "same seed must give the same bits"
        g = make_generator(7)
        assert torch.equal(y, corrupt(x, name, s, generator=g, preset="cifar"))
        if name in RANDOM:
            assert not torch.equal(y, corrupt(x, name, s, seed=8, preset="cifar")), "a new seed must change it"


@pytest.mark.parametrize("name", NOISE + BLUR)
def test_contract_imagenet_non_square(name: str) -> None:
    x = _uint8_images(2, 40, 52)
    for s in SEVERITIES:
        y = corrupt(x, name, s, seed=1, preset="imagenet")
        assert y.shape == x.shape and y.dtype == torch.float32
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
        assert not torch.equal(y, x)
    # float64 input comes back as float64 (corrupt casts back)
    assert corrupt(x.double(), name, 3, seed=1, preset="imagenet").dtype == torch.float64


@pytest.mark.parametrize("name", RANDOM)
def test_randomness_is_per_image(name: str) -> None:
    x = _uint8_images(1, 32, 32).expand(3, 3, 32, 32).contiguous()
    y = corrupt(x, name, 5, seed=0, preset="cifar")
    assert not torch.equal(y[0], y[1]) and not torch.equal(y[1], y[2])


@pytest.mark.parametrize("name", ("defocus_blur", "zoom_blur", "gaussian_blur"))
def test_deterministic_blurs_act_per_image(name: str, images32: torch.Tensor) -> None:
    y = corrupt(images32, name, 4, preset="cifar")
    for i in range(images32.shape[0]):
        assert torch.allclose(y[i : i + 1], corrupt(images32[i : i + 1], name, 4, preset="cifar"), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# severity ordering
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ("cifar", "imagenet"))
@pytest.mark.parametrize("name", NOISE)
def test_noise_grows_with_severity(name: str, preset: str) -> None:
    x = torch.full((4, 3, 32, 32), 0.4)
    err = [float((corrupt(x, name, s, seed=0, preset=preset) - x).abs().mean()) for s in SEVERITIES]
    assert all(a < b for a, b in zip(err, err[1:])), err


@pytest.mark.parametrize("preset", ("cifar", "imagenet"))
@pytest.mark.parametrize("name", ("defocus_blur", "zoom_blur", "gaussian_blur", "motion_blur"))
def test_blur_removes_more_detail_with_severity(name: str, preset: str) -> None:
    x = _uint8_images(4, 48, 48)
    hf = [_hf_energy(corrupt(x, name, s, seed=0, preset=preset)) for s in SEVERITIES]
    assert hf[0] < _hf_energy(x)
    if name == "motion_blur":  # the random angle changes the per-pixel result; compare the extremes
        assert hf[4] < hf[0], hf
    else:
        assert all(a > b for a, b in zip(hf, hf[1:])), hf


def test_glass_blur_distortion_follows_its_recipe() -> None:
    # CIFAR: sigma grows over s1..s3 (one pass): smoother; s4, s5 repeat s2, s3 with two passes: more displaced
    x = _uint8_images(4, 32, 32)
    ys = [corrupt(x, "glass_blur", s, seed=0, preset="cifar") for s in SEVERITIES]
    hf = [_hf_energy(y) for y in ys]
    d = [float((y - x).abs().mean()) for y in ys]
    assert hf[0] > hf[1] > hf[2], hf
    assert d[3] > d[1] and d[4] > d[2], d


# --------------------------------------------------------------------------------------------------
# fidelity: deterministic blurs against SciPy / skimage / OpenCV re-computations
# --------------------------------------------------------------------------------------------------


def _official_disk(radius: float, alias_blur: float) -> np.ndarray:
    cv2 = require("cv2")
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), (3, 3)
    else:
        grid, ksize = np.arange(-radius, radius + 1), (5, 5)
    xx, yy = np.meshgrid(grid, grid)
    d = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    d /= np.sum(d)
    return cv2.GaussianBlur(d, ksize=ksize, sigmaX=alias_blur)


@pytest.mark.parametrize(("preset", "size"), (("cifar", 32), ("imagenet", 64)))
def test_defocus_matches_opencv(preset: str, size: int) -> None:
    cv2 = require("cv2")
    x = _uint8_images(2, size, size)
    imgs = _hwc(x)
    for s in SEVERITIES:
        radius, alias = PRESETS[preset]["defocus_blur"][s - 1]
        k = _official_disk(radius, alias)
        ref = np.stack([np.stack([cv2.filter2D(im[:, :, d], -1, k) for d in range(3)], -1) for im in imgs])
        ours = _hwc(corrupt(x, "defocus_blur", s, preset=preset))
        np.testing.assert_allclose(ours, np.clip(ref, 0, 1), atol=2e-6, err_msg=f"{preset} s{s}")


def test_defocus_kernel_grids() -> None:
    # radius <= 8: 17x17 grid with a 3x3 alias blur; larger: (2r+1) grid with 5x5 (edges reflect-101)
    for radius, alias in ((0.3, 0.4), (1.5, 0.1), (3, 0.1), (8, 0.5), (10, 0.5)):
        ref = _official_disk(radius, alias)
        ours = blur.defocus_kernel(float(radius), float(alias)).numpy()
        m = (ref.shape[0] - ours.shape[0]) // 2
        assert not ref[:m].any() and not ref[:, :m].any(), "only all-zero borders may be cropped"
        np.testing.assert_allclose(ours, ref[m : ref.shape[0] - m, m : ref.shape[1] - m], atol=1e-7)
    assert blur.defocus_kernel(10.0, 0.5).shape == (21, 21)
    assert blur.defocus_kernel(8.0, 0.5).shape == (17, 17)


@pytest.mark.parametrize(("preset", "size"), (("cifar", 32), ("imagenet", 64)))
def test_gaussian_blur_matches_skimage(preset: str, size: int) -> None:
    filters = require("skimage.filters")
    x = _uint8_images(2, size, size)
    for s in SEVERITIES:
        sigma = PRESETS[preset]["gaussian_blur"][s - 1]
        ref = np.stack([filters.gaussian(im, sigma=sigma, channel_axis=-1) for im in _hwc(x)])
        np.testing.assert_allclose(_hwc(corrupt(x, "gaussian_blur", s, preset=preset)), ref, atol=2e-6)


def _official_zoom_blur(img: np.ndarray, factors, mode: str = "constant") -> np.ndarray:
    """make_*_c.py zoom_blur on one (H, W, 3) image, with `clipped_zoom`'s crop/trim applied per axis."""
    ndimage = require("scipy.ndimage")
    x = img.astype(np.float32)
    out = np.zeros_like(x)
    for z in factors:
        h, w = x.shape[:2]
        ch, cw = int(np.ceil(h / z)), int(np.ceil(w / z))
        th, tw = (h - ch) // 2, (w - cw) // 2
        zz = ndimage.zoom(x[th : th + ch, tw : tw + cw], (z, z, 1), order=1, mode=mode)
        ah, aw = (zz.shape[0] - h) // 2, (zz.shape[1] - w) // 2
        out += zz[ah : ah + h, aw : aw + w]
    return (x + out) / (len(factors) + 1)


@pytest.mark.parametrize(("preset", "shape", "atol"), (("cifar", (32, 32), 2e-6), ("imagenet", (64, 64), 2e-5)))
def test_zoom_blur_matches_scipy(preset: str, shape: tuple[int, int], atol: float) -> None:
    x = _uint8_images(2, *shape)
    for s in SEVERITIES:
        factors = PRESETS[preset]["zoom_blur"][s - 1]
        ref = np.stack([_official_zoom_blur(im, factors) for im in _hwc(x)])
        np.testing.assert_allclose(_hwc(corrupt(x, "zoom_blur", s, preset=preset)), ref, atol=atol)


def test_zoom_blur_factor_counts_and_paths() -> None:
    # NumPy's arange decides the endpoints: 7, 12, 16, 21, 26 factors for CIFAR
    assert [len(c) for c in PRESETS["cifar"]["zoom_blur"]] == [7, 12, 16, 21, 26]
    x = _uint8_images(2, 32, 32)
    c = PRESETS["cifar"]["zoom_blur"][4]
    dense = blur.zoom_blur(x, c, make_generator(0), None)  # dense operator (CPU, <= 32x32)
    resampled = (x + sum(blur._clipped_zoom(x, z) for z in c)) / (len(c) + 1)  # the large-image path
    assert torch.allclose(dense, resampled, atol=2e-6)
    # non-square: the per-axis crop/trim rule. At 36 pixels and zoom 1.2000000000000002 SciPy's float
    # coordinate of the last sample lands a hair past the last pixel and its default mode='constant'
    # returns 0 there (a black edge row); we clamp instead, so compare with mode='nearest' (which equals
    # the default whenever no sample is out of range, as at the official sizes 32 and 224)
    xn = _uint8_images(1, 36, 60)
    ref = _official_zoom_blur(_hwc(xn)[0], PRESETS["imagenet"]["zoom_blur"][2], mode="nearest")
    np.testing.assert_allclose(_hwc(corrupt(xn, "zoom_blur", 3, preset="imagenet"))[0], ref, atol=2e-5)


# --------------------------------------------------------------------------------------------------
# fidelity: glass blur against the literal NumPy loop
# --------------------------------------------------------------------------------------------------


def _numpy_shuffle(img: np.ndarray, dy: np.ndarray, dx: np.ndarray, delta: int) -> np.ndarray:
    """The generator's loop verbatim (its tuple "swap" on NumPy views), with given offsets."""
    x = img.copy()
    h_, w_ = x.shape[:2]
    for h in range(h_ - delta, delta, -1):
        for w in range(w_ - delta, delta, -1):
            oy, ox = int(dy[h - delta - 1, w - delta - 1]), int(dx[h - delta - 1, w - delta - 1])
            h_prime, w_prime = h + oy, w + ox
            x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
    return x


@pytest.mark.parametrize("delta", (1, 2, 3, 4))
def test_glass_shuffle_equals_sequential_loop(delta: int) -> None:
    g = torch.Generator().manual_seed(delta)
    b, h, w = 3, 15, 13
    img = torch.randint(0, 256, (b, 3, h, w), generator=g).float()
    dy = torch.randint(-delta, delta, (b, h - 2 * delta, w - 2 * delta), generator=g)
    dx = torch.randint(-delta, delta, (b, h - 2 * delta, w - 2 * delta), generator=g)
    ours = blur.glass_shuffle(img, dy, dx, delta)
    for i in range(b):
        ref = _numpy_shuffle(img[i].permute(1, 2, 0).numpy().astype(np.uint8), dy[i].numpy(), dx[i].numpy(), delta)
        np.testing.assert_array_equal(ours[i].permute(1, 2, 0).numpy(), ref)
    # "one parallel copy from the pre-pass image" is exact for delta = 1 (every source is read before it
    # is written) but not for delta >= 2, where values travel along chains of already-moved pixels
    rows = torch.arange(delta + 1, h - delta + 1).view(1, -1, 1)
    cols = torch.arange(delta + 1, w - delta + 1).view(1, 1, -1)
    bi = torch.arange(b).view(-1, 1, 1)
    parallel = img.clone()
    parallel.permute(0, 2, 3, 1)[bi, rows, cols] = img.permute(0, 2, 3, 1)[bi, rows + dy, cols + dx]
    assert torch.equal(ours, parallel) == (delta == 1)


def test_skimage_gaussian64_is_bit_exact() -> None:
    filters = require("skimage.filters")
    rng = np.random.default_rng(0)
    flat = np.repeat(np.repeat((np.arange(256) / 255.0).reshape(16, 16), 6, 0), 6, 1)[..., None].repeat(3, 2)
    for im in (flat, rng.integers(0, 256, (20, 17, 3)) / 255.0):
        t = torch.from_numpy(im).permute(2, 0, 1)[None]
        for sigma in (0.25, 0.4, 0.9, 1.1, 1.5):
            ref = filters.gaussian(im, sigma=sigma, channel_axis=-1)
            np.testing.assert_array_equal(blur._skimage_gaussian64(t, sigma)[0].permute(1, 2, 0).numpy(), ref)


@pytest.mark.parametrize(("preset", "size"), (("cifar", 32), ("imagenet", 24)))
def test_glass_blur_matches_official_pipeline(preset: str, size: int) -> None:
    filters = require("skimage.filters")
    x = _uint8_images(2, size, size, seed=3)
    b = x.shape[0]
    for s in SEVERITIES:
        sigma, delta, passes = PRESETS[preset]["glass_blur"][s - 1]
        ours = _hwc(corrupt(x, "glass_blur", s, seed=5, preset=preset))
        # glass_blur draws exactly these offsets from the generator
        off = torch.randint(
            -delta, delta, (passes, 2, b, size - 2 * delta, size - 2 * delta), generator=make_generator(5)
        )
        for i, im in enumerate(np.round(_hwc(x) * 255).astype(np.uint8)):
            q = np.uint8(filters.gaussian(im / 255.0, sigma=sigma, channel_axis=-1) * 255)
            for p in range(passes):
                q = _numpy_shuffle(q, off[p, 0, i].numpy(), off[p, 1, i].numpy(), delta)
            ref = np.clip(filters.gaussian(q / 255.0, sigma=sigma, channel_axis=-1), 0, 1)
            np.testing.assert_allclose(ours[i], ref, atol=1e-6, err_msg=f"{preset} s{s} image {i}")


# --------------------------------------------------------------------------------------------------
# fidelity: imagecorruptions (NumPy ImageNet-C) for motion blur and the noise statistics
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ic():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation inside imagecorruptions
        return require("imagecorruptions.corruptions")


@pytest.mark.parametrize(("preset", "size"), (("cifar", 32), ("imagenet", 48)))
def test_motion_blur_matches_imagecorruptions(ic, preset: str, size: int) -> None:
    x = _uint8_images(3, size, size)
    imgs = np.round(_hwc(x) * 255)
    for s in SEVERITIES:
        radius, sigma = PRESETS[preset]["motion_blur"][s - 1]
        ours = _hwc(corrupt(x, "motion_blur", s, seed=11, preset=preset)) * 255
        angles = torch.rand(3, generator=make_generator(11)) * 90 - 45  # motion_blur's only draw
        for i in range(3):
            ref = np.clip(ic._motion_blur(imgs[i], radius, sigma, float(angles[i])), 0, 255)
            # ImageMagick 6.9 (Q16) writes 8-bit output truncated: ours is the reference floored to its level,
            # except where the float sum lies within float32 noise of a whole level (truncation may flip there).
            d = np.abs(ours[i] - np.floor(ref + 1e-3))
            assert d.max() <= 1 + 1e-3 and (d > 1e-3).mean() < 0.01, f"{preset} s{s}"
            assert np.allclose(ours[i], np.round(ours[i]), atol=1e-3)


def _ic_apply(ic, fn, img: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    np.random.seed(seed)
    return np.asarray(fn(img, severity), dtype=np.float64) / 255


@pytest.mark.parametrize("name", NOISE)
def test_noise_statistics_match_imagecorruptions(ic, name: str) -> None:
    level = 0.4
    x = torch.full((8, 3, 64, 64), level)
    img = np.full((64, 64, 3), level * 255, dtype=np.uint8).astype(np.float64)
    for s in (1, 3, 5):
        ours = corrupt(x, name, s, seed=s, preset="imagenet").numpy()
        ref = np.stack([_ic_apply(ic, getattr(ic, name), img, s, seed=k) for k in range(8)])
        assert ours.mean() == pytest.approx(ref.mean(), abs=4e-3), f"{name} s{s} mean"
        assert ours.std() == pytest.approx(ref.std(), rel=0.03), f"{name} s{s} std"
        if name == "impulse_noise":
            c = PRESETS["imagenet"]["impulse_noise"][s - 1]
            for v in (0.0, 1.0):
                frac = float((ours == v).mean())
                assert frac == pytest.approx(float((ref == v).mean()), abs=0.01)
                assert frac == pytest.approx(c / 2, abs=0.01)
            # each channel is flipped independently (skimage flips values, not pixels)
            changed = ours != level
            assert 0 < float((changed.any(1) & ~changed.all(1)).mean())


def test_shot_noise_is_poisson() -> None:
    lam = PRESETS["cifar"]["shot_noise"][4]
    x = torch.full((16, 3, 32, 32), 0.3)
    y = corrupt(x, "shot_noise", 5, seed=0, preset="cifar") * lam
    assert torch.allclose(y, y.round(), atol=1e-3), "counts / lambda"
    assert float(y.mean()) == pytest.approx(0.3 * lam, rel=0.02)
    assert float(y.var()) == pytest.approx(0.3 * lam, rel=0.05)


def test_speckle_noise_scales_with_brightness() -> None:
    x = torch.zeros(2, 3, 16, 16)
    x[:, :, :8] = 0.5
    y = corrupt(x, "speckle_noise", 5, seed=0, preset="cifar")
    assert torch.equal(y[:, :, 8:], x[:, :, 8:]), "black stays black under multiplicative noise"
    c = PRESETS["cifar"]["speckle_noise"][4]
    assert float((y[:, :, :8] - 0.5).std()) == pytest.approx(0.5 * c, rel=0.1)


# --------------------------------------------------------------------------------------------------
# CUDA (run with -m gpu on a GPU machine)
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", NOISE + BLUR)
def test_cuda(name: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = _uint8_images(4, 40, 40)
    for preset in ("cifar", "imagenet"):
        for s in SEVERITIES:
            y = corrupt(x.cuda(), name, s, seed=3, preset=preset)
            assert y.is_cuda and y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
            assert torch.equal(y, corrupt(x.cuda(), name, s, seed=3, preset=preset))
            if name not in RANDOM:  # deterministic: CUDA agrees with CPU
                cpu = corrupt(x, name, s, preset=preset)
                assert torch.allclose(y.cpu(), cpu, atol=2e-5), f"{name} {preset} s{s}"
    assert math.isfinite(float(y.sum()))
