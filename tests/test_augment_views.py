"""The CoTTA / MEMO augmentations (`methods/augment.py`): layout, range, seeding, parameter ranges, identity, and
fidelity of each operation to torchvision / PIL, which implement the authors' pipelines."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from tta_surgical.methods import augment as A

B, V = 6, 5


def images(seed: int = 0, n: int = B, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("make", [A.cotta_views, A.augmix_views], ids=["cotta", "augmix"])
def test_views_shape_range_and_seeding(make):
    x = images() * 1.4 - 0.2  # out of [0, 1]: clamped first
    a = make(x, V, gen(1))
    assert a.shape == (V * B, 3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert torch.equal(a, make(x, V, gen(1)))  # same generator state: the same views
    assert not torch.allclose(a, make(x, V, gen(2)))  # another state: other views
    g = gen(1)
    make(x, V, g)
    assert not torch.allclose(a, make(x, V, g))  # the generator advanced


@pytest.mark.parametrize("make", [A.cotta_views, A.augmix_views], ids=["cotta", "augmix"])
def test_blocks_of_views_change_nothing(make):
    x = images(3)
    whole = make(x, V, gen(4), block_rows=V * B)
    for rows in (1, 7, B):
        assert torch.allclose(make(x, V, gen(4), block_rows=rows), whole, atol=1e-6)


def test_jitter_parameters_lie_in_their_ranges_and_view_draws_are_shared():
    spec = A.COTTA_CIFAR
    p = A.draw_jitter(40, B, (3, 32, 32), gen(0), spec, per="view")
    for key in ("brightness", "contrast", "saturation", "hue", "gamma", "scale", "sigma"):
        lo, hi = getattr(spec, "blur_sigma" if key == "sigma" else key)
        assert p[key].shape == (40 * B,) and p[key].min() >= lo and p[key].max() <= hi, key
    assert p["angle"].abs().max() <= spec.degrees
    for key in ("tx", "ty"):  # whole pixels up to 1/16 of the 64-pixel padded image
        assert torch.equal(p[key], p[key].round()) and p[key].abs().max() <= 4 and p[key].abs().max() >= 3
    assert torch.equal(p["order"].sort(dim=1).values, torch.arange(5).expand(40 * B, 5))
    assert 0 < p["flip"].float().mean() < 1
    assert p["noise"].shape == (40 * B, 3, 32, 32) and abs(p["noise"].std().item() - spec.noise_std) < 1e-3
    for key in ("brightness", "angle", "flip", "order"):  # one draw per view, shared by its B images
        per_view = p[key].view(40, B, *p[key].shape[1:])
        assert torch.equal(per_view, per_view[:, :1].expand_as(per_view)), key
    q = A.draw_jitter(40, B, (3, 32, 32), gen(0), spec, per="image")
    assert q["brightness"].view(40, B).std(dim=1).min() > 0  # independent per image


def test_augmix_parameters_lie_in_their_ranges():
    spec = A.MEMO_CIFAR
    p = A.draw_augmix(50, B, gen(0), spec)
    n = 50 * B
    assert torch.equal(p["shift"], p["shift"].round()) and p["shift"].abs().max() == spec.crop_padding
    assert p["mix"].min() >= 0 and p["mix"].max() <= 1
    assert p["weights"].shape == (n, spec.width) and p["weights"].min() > 0
    assert torch.allclose(p["weights"].sum(dim=1), torch.ones(n))
    assert set(p["depth"].unique().tolist()) == set(range(1, spec.max_depth + 1))
    assert set(p["op"].unique().tolist()) == set(range(len(spec.ops)))
    assert p["level"].min() >= 0.1 and p["level"].max() <= 1.0
    assert set(p["sign"].unique().tolist()) == {-1.0, 1.0}


def test_zero_magnitude_is_the_identity():
    x = images(5)
    jitter = A.cotta_views(x, V, gen(0), A.COTTA_CIFAR.scaled(0.0), per="image")
    assert torch.allclose(jitter, x.repeat(V, 1, 1, 1), atol=1e-5)  # view-major: row v * B + b is image b
    spec = A.AugMixSpec(
        severity=0.0,
        crop_padding=0,
        hflip=0.0,
        ops=("rotate", "shear_x", "shear_y", "translate_x", "translate_y", "solarize"),
    )
    assert torch.allclose(A.augmix_views(x, V, gen(0), spec), x.repeat(V, 1, 1, 1), atol=1e-5)
    soft = A.COTTA_CIFAR.scaled(0.5)  # the authors' soft ranges are about half
    assert soft.brightness == pytest.approx((0.8, 1.2)) and soft.degrees == pytest.approx(7.5)


@pytest.mark.parametrize(
    "name, reference, factor",
    [
        ("brightness", TF.adjust_brightness, 1.35),
        ("contrast", TF.adjust_contrast, 0.72),
        ("saturation", TF.adjust_saturation, 1.45),
        ("hue", TF.adjust_hue, 0.055),
        ("hue", TF.adjust_hue, -0.06),
        ("gamma", TF.adjust_gamma, 0.75),
    ],
)
def test_colour_operations_match_torchvision(name, reference, factor):
    x = images(7)
    ours = A._COLOUR_FNS[name](x, torch.full((B,), factor))
    expected = torch.stack([reference(img, factor) for img in x])
    assert torch.allclose(ours, expected, atol=5e-6)


def test_geometry_blur_and_flip_match_the_authors_torchvision_pipeline():
    """pad (edge, half the size) -> affine -> 5x5 blur -> centre crop -> flip, computed without the padding."""
    x = images(8, size=32)
    angles = [12.0, -7.0, 0.0, 3.0, -15.0, 9.0]
    shifts = [(3, -2), (0, 4), (-4, -4), (1, 0), (2, 3), (-1, 1)]
    scales = [1.05, 0.91, 1.0, 1.1, 0.95, 1.02]
    sigmas = [0.3, 0.001, 0.5, 0.45, 0.2, 0.0]
    flips = [False, True, True, False, False, True]
    p = {
        "angle": torch.tensor(angles),
        "tx": torch.tensor([float(s[0]) for s in shifts]),
        "ty": torch.tensor([float(s[1]) for s in shifts]),
        "scale": torch.tensor(scales),
        "sigma": torch.tensor(sigmas),
        "flip": torch.tensor(flips),
    }
    ours = A._affine_blur_flip(x.clone(), p, 5)
    expected = []
    for i, img in enumerate(x):
        padded = TF.pad(img, [16], padding_mode="edge")
        bilinear = TF.InterpolationMode.BILINEAR
        y = TF.affine(
            padded, angle=angles[i], translate=list(shifts[i]), scale=scales[i], shear=[0.0], interpolation=bilinear
        )
        if sigmas[i] > 0:
            y = TF.gaussian_blur(y, [5, 5], [sigmas[i], sigmas[i]])
        y = TF.center_crop(y, [32, 32])
        expected.append(TF.hflip(y) if flips[i] else y)
    assert torch.allclose(ours, torch.stack(expected), atol=1e-5)


def _pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0


@pytest.mark.parametrize(
    "name, reference, tolerance",
    [
        ("equalize", ImageOps.equalize, 0.0),
        ("solarize", lambda im: ImageOps.solarize(im, 256 - 25), 0.0),  # level 0.99 -> int(25.3) = 25
        ("posterize", lambda im: ImageOps.posterize(im, 4), 0.0),
        ("autocontrast", ImageOps.autocontrast, 1.0),  # PIL truncates to 8 bits, we do not
        # level 0.99 on 32 pixels: int(0.99 * 32 / 3 / 10) = 1 pixel
        ("translate_x", lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 1, 0, 1, 0), fillcolor=(128,) * 3), 0.0),
    ],
)
def test_augmix_operations_match_pil(name, reference, tolerance):
    g = torch.Generator().manual_seed(9)
    x = ((torch.rand(4, 3, 32, 32, generator=g) ** 2) * 200 + 20).round() / 255  # 8-bit values, a skewed histogram
    level = torch.full((4,), 0.99)
    ours = A.AUGMIX_OPS.get(name)(x, level, torch.ones(4))
    expected = torch.stack([_tensor(reference(_pil(img))) for img in x])
    assert (ours - expected).abs().max().item() * 255 <= tolerance + 1e-3


def test_augmix_geometry_is_close_to_pil_away_from_the_border():
    x = images(11, n=4, size=32)
    rotate = A.AUGMIX_OPS.get("rotate")(x, torch.full((4,), 0.999), torch.ones(4))  # int(2.997) = 2 degrees
    expected = torch.stack([_tensor(_pil(img).rotate(2, resample=Image.BILINEAR, fillcolor=(128,) * 3)) for img in x])
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    assert (rotate - expected)[inner].abs().max() < 3 / 255 + 1e-6
    with pytest.raises(KeyError, match="valid"):
        A.AugMixSpec(ops=("rotate", "sharpen"))


def test_units_per_forward():
    assert A.units_per_forward(32, 200, 256) == 1
    assert A.units_per_forward(32, 16, 256) == 16
    assert A.units_per_forward(32, 200, 10**6) == 32  # at most all of them
    assert A.units_per_forward(32, 200, 1) == 1  # at least one


def test_roid_view_reflects_and_adds_no_blur_or_noise():
    """ROID's consistency view: reflect padding instead of edge replication, no blur, no noise (a flat image stays
    flat, and the draw differs from CoTTA's view only where the affine map reaches past the border)."""
    from tta_surgical.methods.augment import COTTA_CIFAR, ROID_CIFAR, cotta_views

    flat = torch.full((2, 3, 8, 8), 0.4)
    out = cotta_views(flat, 1, torch.Generator().manual_seed(3), ROID_CIFAR)
    assert torch.allclose(out, out[0, 0, 0, 0].expand_as(out), atol=1e-6)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="padding"):
        ROID_CIFAR.__class__(padding="zeros")
    edge = cotta_views(x, 4, torch.Generator().manual_seed(5), replace(ROID_CIFAR, padding="edge"))
    reflect = cotta_views(x, 4, torch.Generator().manual_seed(5), ROID_CIFAR)
    assert edge.shape == reflect.shape == (8, 3, 16, 16) and not torch.equal(edge, reflect)
    assert COTTA_CIFAR.padding == "edge" and ROID_CIFAR.noise_std == 0.0 and ROID_CIFAR.blur_kernel == 1
