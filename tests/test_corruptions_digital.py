"""Digital corruptions: contract (shape, range, seeding), severity trends, and fidelity to the official generators.

Oracles are the libraries the official generators (`make_cifar_c.py`, `make_imagenet_c.py`) call, applied
with the generators' own formulas to the same images: scikit-image (HSV), NumPy, OpenCV + SciPy (elastic,
on the same random draws), Pillow (BOX resize, JPEG), and the `imagecorruptions` package for the ImageNet
parameters. Each oracle is optional: `_extras.require` skips without it, and fails in CI.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from _extras import require

from tta_surgical.corruptions import corrupt
from tta_surgical.corruptions.digital import elastic_warp, pil_box_resize
from tta_surgical.corruptions.params import PRESETS

NAMES = ("brightness", "contrast", "saturate", "elastic_transform", "pixelate", "jpeg_compression")


@pytest.fixture
def images8(images32: torch.Tensor) -> torch.Tensor:
    """`images32` on the 1/255 grid, like images decoded from uint8 files (what Pillow / JPEG see)."""
    return torch.round(images32 * 255) / 255


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).double().numpy()


def _smooth224(n: int, seed: int) -> torch.Tensor:
    """n smooth-plus-texture 224x224 images on the 1/255 grid."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(n, 3, 14, 14, generator=g), size=224, mode="bilinear")
    x = (0.85 * base + 0.15 * torch.rand(n, 3, 224, 224, generator=g)).clamp(0, 1)
    return torch.round(x * 255) / 255


# ------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", NAMES)
def test_contract(name: str, preset: str, images8: torch.Tensor) -> None:
    x = images8[:3]
    for severity in range(1, 6):
        y = corrupt(x, name, severity, seed=7, preset=preset)
        assert y.shape == x.shape and y.dtype == torch.float32 and y.device == x.device
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
        assert torch.equal(y, corrupt(x, name, severity, seed=7, preset=preset)), "same seed must give same bits"
        assert (y - x).abs().mean() > 1e-3, f"{name} severity {severity} left the images unchanged"


def test_elastic_randomness_per_seed_and_per_image(images32: torch.Tensor) -> None:
    x = images32[:1].expand(3, -1, -1, -1).contiguous()  # three copies of one image
    for severity in (1, 3, 5):
        a = corrupt(x, "elastic_transform", severity, seed=0)
        b = corrupt(x, "elastic_transform", severity, seed=1)
        assert not torch.equal(a, b), "different seeds must give different warps"
        assert (a[0] - a[1]).abs().max() > 1e-3 and (a[1] - a[2]).abs().max() > 1e-3, "each image draws its own warp"


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturate", "pixelate", "jpeg_compression"])
def test_deterministic_ones_are_per_image(name: str, images8: torch.Tensor) -> None:
    """No randomness and no cross-image coupling: a batch equals its images done one at a time."""
    whole = corrupt(images8, name, 4, seed=0)
    alone = torch.cat([corrupt(images8[i : i + 1], name, 4, seed=123) for i in range(len(images8))])
    torch.testing.assert_close(whole, alone, atol=1e-6, rtol=0)


def test_jpeg_accepts_any_layout(images8: torch.Tensor) -> None:
    ref = corrupt(images8, "jpeg_compression", 2, seed=0)
    y = corrupt(images8.to(memory_format=torch.channels_last), "jpeg_compression", 2, seed=0)
    assert y.is_contiguous() and torch.equal(y, ref)
    assert corrupt(images8[:, :, 1:30, 2:], "jpeg_compression", 2, seed=0).shape[-2:] == (29, 30)


def test_uint8_grid_outputs(images32: torch.Tensor) -> None:
    """Pixelate and JPEG quantise like the uint8 pipelines they reproduce."""
    for name in ("pixelate", "jpeg_compression"):
        y = corrupt(images32, name, 3, seed=0) * 255
        torch.testing.assert_close(y, torch.round(y), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- severity trends


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_severity_trends(preset: str, images8: torch.Tensor) -> None:
    x = images8

    def series(name: str, stat) -> list[float]:
        return [float(stat(corrupt(x, name, s, seed=0, preset=preset))) for s in range(1, 6)]

    def strictly(values: list[float], sign: int) -> bool:
        return all(sign * (b - a) > 0 for a, b in zip(values, values[1:]))

    def err(y: torch.Tensor) -> torch.Tensor:
        return (y - x).abs().mean()

    assert strictly(series("brightness", torch.mean), +1)
    assert strictly(series("contrast", lambda y: y.std(dim=(2, 3)).mean()), -1)
    assert strictly(series("jpeg_compression", err), +1)
    if preset == "cifar":
        # On 32x32 images the ImageNet factors 0.3 and 0.25 give 9- and 8-pixel grids whose alignment,
        # not the factor, decides the error; the CIFAR factors are monotone here.
        assert strictly(series("pixelate", err), +1)
        # saturation multipliers 0.3, 0.1 desaturate, then 1.5+ saturate
        sat = series("saturate", lambda y: (y.amax(1) - y.amin(1)).mean())
        assert sat[1] < sat[0] < float((x.amax(1) - x.amin(1)).mean()) < sat[2] < sat[3] < sat[4]


# --------------------------------------------------------------------------- fidelity: colour


@pytest.mark.parametrize("severity", range(1, 6))
def test_colour_match_skimage(severity: int, images32: torch.Tensor) -> None:
    color = require("skimage.color")
    cb, cc, cs = (PRESETS["cifar"][n][severity - 1] for n in ("brightness", "contrast", "saturate"))
    # plus hard pixels: black, white, grays, primaries, ties between the largest channels, hue sector edges
    special = torch.tensor(
        [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1],
         [1, 0, 1], [0.6, 0.6, 0.2], [0.2, 0.6, 0.6], [0.6, 0.2, 0.6], [0.9, 0.3, 0.3], [1e-3, 0, 0]]
    )  # fmt: skip
    images = images32.clone()
    images[0, :, 0, : len(special)] = special.T
    for i, img in enumerate(images):
        a = _hwc(img)
        hsv = color.rgb2hsv(a)
        hsv[..., 2] = np.clip(hsv[..., 2] + cb, 0, 1)
        ref_b = np.clip(color.hsv2rgb(hsv), 0, 1)
        hsv = color.rgb2hsv(a)
        hsv[..., 1] = np.clip(hsv[..., 1] * cs[0] + cs[1], 0, 1)
        ref_s = np.clip(color.hsv2rgb(hsv), 0, 1)
        means = a.mean(axis=(0, 1), keepdims=True)
        ref_c = np.clip((a - means) * cc + means, 0, 1)
        for name, ref in (("brightness", ref_b), ("saturate", ref_s), ("contrast", ref_c)):
            ours = _hwc(corrupt(images, name, severity, seed=0, preset="cifar")[i])
            np.testing.assert_allclose(ours, ref, atol=2e-6, err_msg=f"{name} severity {severity}")


# --------------------------------------------------------------------------- fidelity: pixelate


@pytest.mark.parametrize("preset,size", [("cifar", 32), ("imagenet", 224)])
def test_pixelate_matches_pillow_exactly(preset: str, size: int, images8: torch.Tensor) -> None:
    image = require("PIL.Image")
    x = images8 if size == 32 else _smooth224(1, 0)
    for severity, c in enumerate(PRESETS[preset]["pixelate"], start=1):
        ours = torch.round(corrupt(x, "pixelate", severity, seed=0, preset=preset) * 255).to(torch.uint8)
        for i, img in enumerate((x * 255).round().to(torch.uint8)):
            pil = image.fromarray(img.permute(1, 2, 0).numpy())
            small = pil.resize((int(size * c), int(size * c)), image.BOX)
            ref = np.asarray(small.resize((size, size), image.BOX))
            np.testing.assert_array_equal(ours[i].permute(1, 2, 0).numpy(), ref, err_msg=f"severity {severity}")


def test_pil_box_resize_odd_sizes() -> None:
    image = require("PIL.Image")
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (2, 3, 19, 26), generator=g)
    for h, w in ((7, 11), (19, 13), (30, 40), (5, 26)):
        ours = pil_box_resize(x, h, w)
        for i in range(2):
            ref = np.asarray(image.fromarray(x[i].permute(1, 2, 0).numpy().astype(np.uint8)).resize((w, h), image.BOX))
            np.testing.assert_array_equal(ours[i].permute(1, 2, 0).numpy(), ref, err_msg=f"{h}x{w}")


# ---------------------------------------------------------------------------- fidelity: elastic


def _official_elastic(img: np.ndarray, jitter: np.ndarray, noise: np.ndarray | None, alpha: float, sigma: float):
    """The generators' elastic transform with its random draws supplied (OpenCV + SciPy)."""
    cv2 = require("cv2")
    ndimage = require("scipy.ndimage")
    shape = img.shape
    center = np.float32(shape[:2]) // 2
    side = min(shape[:2]) // 3
    pts1 = np.float32([center + side, [center[0] + side, center[1] - side], center - side])
    pts2 = pts1 + jitter.astype(np.float32)
    warped = cv2.warpAffine(img, cv2.getAffineTransform(pts1, pts2), shape[:2][::-1], borderMode=cv2.BORDER_REFLECT_101)
    if noise is None:
        return warped
    dx, dy = (
        (ndimage.gaussian_filter(f.astype(np.float64), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
        for f in noise
    )
    cols, rows, chans = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    coords = (rows + dy[..., None]).reshape(-1), (cols + dx[..., None]).reshape(-1), chans.reshape(-1)
    return ndimage.map_coordinates(warped, coords, order=1, mode="reflect").reshape(shape)


@pytest.mark.parametrize(
    "preset,severity,shape",
    [("cifar", s, (32, 32)) for s in range(1, 6)]
    + [("cifar", 4, (20, 27)), ("imagenet", 1, (224, 224)), ("imagenet", 2, (224, 224)), ("imagenet", 5, (224, 224))],
)
def test_elastic_matches_opencv_scipy(preset: str, severity: int, shape: tuple[int, int]) -> None:
    alpha, sigma, aff = PRESETS[preset]["elastic_transform"][severity - 1]
    g = torch.Generator().manual_seed(severity)
    n = 2 if shape[0] < 100 else 1
    x = torch.rand(n, 3, *shape, generator=g)
    jitter = (torch.rand(n, 3, 2, generator=g) * 2 - 1) * aff
    noise = torch.rand(n, 2, *shape, generator=g) * 2 - 1 if alpha else None
    ours = elastic_warp(x, jitter, noise, alpha, sigma)
    for i in range(n):
        img = x[i].permute(1, 2, 0).numpy().copy()
        ref = _official_elastic(img, jitter[i].numpy(), None if noise is None else noise[i].numpy(), alpha, sigma)
        np.testing.assert_allclose(ours[i].permute(1, 2, 0).numpy(), ref, atol=1e-4, rtol=0)


def test_elastic_displacement_axes(images32: torch.Tensor) -> None:
    """dx (first field) moves along columns, dy (second) along rows; zero jitter is the identity affine."""
    x = images32[:1]
    jitter = torch.zeros(1, 3, 2)
    torch.testing.assert_close(elastic_warp(x, jitter, None, 0.0, 0.0), x, atol=1e-5, rtol=0)
    noise = torch.zeros(1, 2, 32, 32)
    noise[:, 0] = 1.0  # dx = alpha = 2: output(r, c) = x(r, c + 2)
    y = elastic_warp(x, jitter, noise, 2.0, 0.0)
    torch.testing.assert_close(y[..., :-2], x[..., 2:], atol=1e-5, rtol=0)
    noise = noise.flip(1)  # dy = 2: output(r, c) = x(r + 2, c)
    y = elastic_warp(x, jitter, noise, 2.0, 0.0)
    torch.testing.assert_close(y[..., :-2, :], x[..., 2:, :], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- fidelity: jpeg


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_jpeg_matches_pillow(preset: str, images8: torch.Tensor) -> None:
    image = require("PIL.Image")
    features = require("PIL.features")
    for severity, quality in enumerate(PRESETS[preset]["jpeg_compression"], start=1):
        ours = torch.round(corrupt(images8, "jpeg_compression", severity, seed=0, preset=preset) * 255)
        refs = []
        for img in (images8 * 255).round().to(torch.uint8):
            buf = io.BytesIO()
            image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
            refs.append(torch.from_numpy(np.array(image.open(buf).convert("RGB"))).permute(2, 0, 1))
        diff = (ours - torch.stack(refs).float()).abs()
        # Both are libjpeg-turbo (4:2:0, islow DCT, the same quantisation tables): bit-identical. A build that
        # rounds differently changes the corruption itself, which is worth a look rather than a tolerance.
        libjpeg = features.version("libjpeg_turbo") or features.version("jpg")
        where = f"quality {quality}, Pillow's libjpeg {libjpeg}"
        assert diff.max() == 0, f"{where}: max |diff| {diff.max():.0f}, mean {diff.mean():.3f} (0-255)"


# ------------------------------------------------------------------------ imagecorruptions oracle


def _imagecorruptions():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it imports the deprecated pkg_resources
        return require("imagecorruptions.corruptions")


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturate", "jpeg_compression"])
def test_imagenet_preset_matches_imagecorruptions(name: str) -> None:
    """imagecorruptions reproduces ImageNet-C's deterministic corruptions (its pixelate upsamples with
    NEAREST and its elastic transform is a different recipe, so those two are checked against Pillow /
    OpenCV + SciPy above instead)."""
    ic = _imagecorruptions()
    image = require("PIL.Image")
    x = _smooth224(1, 1)
    for severity in range(1, 6):
        ours = corrupt(x, name, severity, seed=0, preset="imagenet") * 255
        for i, img in enumerate((x * 255).round().to(torch.uint8)):
            arr = img.permute(1, 2, 0).numpy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = getattr(ic, name)(image.fromarray(arr) if name == "jpeg_compression" else arr, severity)
            ref = np.asarray(ref, dtype=np.float64)
            np.testing.assert_allclose(
                ours[i].permute(1, 2, 0).double().numpy(), ref, atol=2e-3 if name != "jpeg_compression" else 0.5
            )


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cuda_matches_cpu(images8: torch.Tensor) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = images8
    xc = x.cuda()
    for name in NAMES:
        for severity in (1, 5):
            yc = corrupt(xc, name, severity, seed=3)
            assert yc.device.type == "cuda" and torch.equal(yc, corrupt(xc, name, severity, seed=3))
            if name == "elastic_transform":
                continue  # CUDA and CPU generators draw different numbers
            y = corrupt(x, name, severity, seed=3)
            # JPEG runs in libjpeg on the CPU for both (nvJPEG would encode 4:4:4), so it is bit-identical.
            tol = 0.0 if name == "jpeg_compression" else 1e-5
            assert (yc.cpu() - y).abs().max() <= tol, name
    g = torch.Generator().manual_seed(0)
    jitter, noise = torch.rand(4, 3, 2, generator=g) * 4 - 2, torch.rand(4, 2, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(
        elastic_warp(xc, jitter.cuda(), noise.cuda(), 3.2, 1.28).cpu(),
        elastic_warp(x, jitter, noise, 3.2, 1.28),
        atol=1e-4,
        rtol=0,
    )
