"""Contract tests over the whole corruption registry: every corruption, every severity, both presets."""

from __future__ import annotations

import pytest
import torch

from tta_surgical.corruptions import (
    ALL_CORRUPTIONS,
    BENCHMARK_CORRUPTIONS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    corrupt,
    make_generator,
    to_uint8,
)
from tta_surgical.registry import UnknownNameError

# Corruptions whose output does not depend on the generator at all.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast", "saturate", "pixelate",
                 "jpeg_compression"}


def _frost(name: str, folder):
    if name == "frost" and folder is None:
        pytest.skip("frost textures not found: set TTA_SURGICAL_DATA to the shared data folder")
    return folder


def test_registry_holds_exactly_the_19() -> None:
    assert len(BENCHMARK_CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4
    assert sorted(CORRUPTIONS.names()) == sorted(ALL_CORRUPTIONS)


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_contract_cifar(name: str, images32: torch.Tensor, frost_or_none) -> None:
    frost_dir = _frost(name, frost_or_none)
    x = images32
    x_before = x.clone()
    for s in range(1, 6):
        y = corrupt(x, name, s, make_generator(7), frost_dir=frost_dir)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert torch.isfinite(y).all()
        assert y.min() >= 0 and y.max() <= 1
        # Same seed, same device: the same bits.
        y2 = corrupt(x, name, s, make_generator(7), frost_dir=frost_dir)
        assert torch.equal(y, y2), f"{name} s{s} is not reproducible under a seed"
        # The official files are uint8: the corruption must survive quantisation.
        assert not torch.equal(to_uint8(y), to_uint8(x)), f"{name} s{s} leaves the images unchanged"
    assert torch.equal(x, x_before), f"{name} modified its input in place"
    if name not in DETERMINISTIC:
        a = corrupt(x, name, 5, make_generator(1), frost_dir=frost_dir)
        b = corrupt(x, name, 5, make_generator(2), frost_dir=frost_dir)
        assert not torch.equal(a, b), f"{name} ignores its generator"


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_contract_imagenet_preset(name: str, frost_or_none) -> None:
    frost_dir = _frost(name, frost_or_none)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 16, 16, generator=g), size=224, mode="bilinear")
    y = corrupt(x.clamp(0, 1), name, 3, seed=3, frost_dir=frost_dir)
    assert y.shape == x.shape and torch.isfinite(y).all() and 0 <= y.min() and y.max() <= 1
    assert (y - x).abs().mean() > 1e-3


def test_float64_and_half_inputs_keep_their_dtype(images32: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.bfloat16):
        y = corrupt(images32.to(dtype), "gaussian_noise", 3, seed=0)
        assert y.dtype == dtype


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating-point"),
        (torch.zeros(3, 32, 32), "shape"),
        (torch.zeros(2, 1, 32, 32), "shape"),
        (torch.full((2, 3, 32, 32), 2.0), r"\[0, 1\]"),
        (torch.full((2, 3, 32, 32), -0.5), r"\[0, 1\]"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
    ],
)
def test_bad_images_are_rejected_clearly(x: torch.Tensor, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        corrupt(x, "gaussian_noise", 1)


@pytest.mark.parametrize("severity", [0, 6, 2.5, "3", True])
def test_bad_severity(severity, images32: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="severity"):
        corrupt(images32, "fog", severity)


def test_unknown_name_lists_valid_ones(images32: torch.Tensor) -> None:
    with pytest.raises(UnknownNameError, match="gaussian_noise"):
        corrupt(images32, "gausian_noise", 1)


def test_unknown_preset(images32: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="preset"):
        corrupt(images32, "fog", 1, preset="tinyimagenet")


def test_batch_members_get_their_own_randomness(images32: torch.Tensor) -> None:
    x = images32[:1].repeat(4, 1, 1, 1)
    y = corrupt(x, "gaussian_noise", 5, seed=0)
    assert not torch.equal(y[0], y[1])


def test_frost_missing_folder_is_clear(images32: torch.Tensor, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="frost1"):
        corrupt(images32, "frost", 1, frost_dir=tmp_path / "nowhere")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_cuda_parity(name: str, images32: torch.Tensor, frost_or_none) -> None:
    """On CUDA: same shape, reproducible, and close to the CPU output (exact for deterministic ones up to fp noise;
    for random ones the generators differ across devices, so compare the size of the distortion)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    frost_dir = _frost(name, frost_or_none)
    x = images32
    for s in (1, 5):
        yc = corrupt(x, name, s, seed=0, frost_dir=frost_dir)
        yg = corrupt(x.cuda(), name, s, make_generator(0, "cuda"), frost_dir=frost_dir)
        yg2 = corrupt(x.cuda(), name, s, make_generator(0, "cuda"), frost_dir=frost_dir)
        assert yg.device.type == "cuda" and torch.equal(yg, yg2)
        if name in DETERMINISTIC:
            tol = 3 / 255 if name == "jpeg_compression" else 1e-4
            assert (yg.cpu() - yc).abs().mean() < tol
        else:
            dc, dg = (yc - x).abs().mean(), (yg.cpu() - x).abs().mean()
            assert abs(dc - dg) < 0.25 * dc + 1e-3


def test_default_frost_dir(tmp_path, monkeypatch) -> None:
    """Explicit folder wins; else <data root>/frost when it exists (explicit root or $TTA_SURGICAL_DATA); else None."""
    from tta_surgical.corruptions.textures import default_frost_dir

    monkeypatch.delenv("TTA_SURGICAL_DATA", raising=False)
    assert default_frost_dir(None, tmp_path) is None
    (tmp_path / "frost").mkdir()
    assert default_frost_dir(None, tmp_path) == tmp_path / "frost"
    assert default_frost_dir(tmp_path / "mine", tmp_path) == tmp_path / "mine"
    assert default_frost_dir(None, None) is None
    monkeypatch.setenv("TTA_SURGICAL_DATA", str(tmp_path))
    assert default_frost_dir(None, None) == tmp_path / "frost"
