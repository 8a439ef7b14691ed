"""The frost textures of the ImageNet-C / CIFAR-10-C generators: verified files, decoded once per device.

The official generators read ``frost1.png`` ... ``frost5.jpg`` from their own folder (``frost6.jpg``
ships with them but is never drawn: the generators call ``randint(5)`` on a list of six). The files
are fetched through `hub.fetch`, so they are either a folder the user names (verified, never written
to) or the download cache (downloaded from the official repository on first use), and every file is
checked against the SHA-256 of the official release.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .. import hub

FROST_URL = "https://raw.githubusercontent.com/hendrycks/robustness/master/ImageNet-C/create_c/{name}"
FROST_FILES: dict[str, str] = {
    "frost1.png": "ff9f907860bd7a835d459e32f9d588062b7f61ee267343cc7222b56753a14755",
    "frost2.png": "fe211a89b336999c207a852ce05818d4545d0b57c5beadd824b4cc9d9a9b6137",
    "frost3.png": "2d0d50b4a9bb213f38b024ef7768731bb83cc08d2f26b5766bbc167cdfa0e504",
    "frost4.jpg": "3f8b91ca1a9fa7167b09e773da53f5ae60d0a1fd88f02a783f6e328a72887f6e",
    "frost5.jpg": "5fc6a19df4a429ba68abdcc8f8a4278d4c9f81c9ccafd2c92ab0c8cf8992ebd2",
    "frost6.jpg": "1f92b2f48408748085b68dd81d816ef239f42cef3029c25d041fcb6760fb4f25",
}
# The textures the generators actually draw from (uniformly): frost6 is listed there but unreachable.
FROST_USED: tuple[str, ...] = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
CACHE_SUB = "frost"


def _hint(name: str) -> str:
    url = FROST_URL.format(name=name)
    return (
        f"get it from {url} (the official ImageNet-C repository) and put it in <--data-root>/frost/, pass its "
        f"folder with --frost-dir, or put it in the cache folder {hub.cache_dir(CACHE_SUB)}"
    )


def default_frost_dir(
    frost_dir: str | os.PathLike | None, data_root: str | os.PathLike | None = None
) -> Path | None:
    """The frost folder to use: `frost_dir` when given, else `<data root>/frost` when it exists (the data root
    explicit or `$TTA_SURGICAL_DATA`: an offline data folder carries the textures beside the datasets), else None
    (the verified download cache)."""
    if frost_dir is not None:
        return Path(frost_dir)
    local = hub.data_root(data_root)
    if local is not None and (local / "frost").is_dir():
        return local / "frost"
    return None


def frost_paths(frost_dir: str | os.PathLike | None = None, names: tuple[str, ...] = FROST_USED) -> list[Path]:
    """Verified local paths of the frost textures `names` (default: the five the generators use).

    With `frost_dir`, the files must already be there (it is checked, never downloaded into);
    without it, the cache folder is used and missing files are downloaded from the official
    repository. A missing file or a SHA-256 mismatch raises, naming the file and how to get it.
    """
    unknown = [n for n in names if n not in FROST_FILES]
    if unknown:
        raise ValueError(f"unknown frost texture(s) {unknown}; valid: {', '.join(FROST_FILES)}")
    if frost_dir is not None:
        folder = Path(frost_dir)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"frost texture folder {folder} does not exist; it must hold {', '.join(names)}. "
                f"{_hint(names[0])} (and likewise the other files)"
            )
    paths = []
    for name in names:
        url = FROST_URL.format(name=name)
        paths.append(
            hub.fetch(name, url, FROST_FILES[name], folder=frost_dir, cache_sub=CACHE_SUB, offline_hint=_hint(name))
        )
    return paths


def decode_rgb(path: str | os.PathLike) -> Tensor:
    """Decode a PNG/JPEG to a uint8 RGB tensor (3, H, W); an alpha channel is dropped, not composited.

    This equals `cv2.imread` (which the generators use, dropping alpha too) followed by the
    generators' BGR -> RGB reorder, bit for bit on the six official textures.
    """
    # torchvision on first use: it would nearly double `import tta_surgical.corruptions` (data/imagenet.py says more)
    from torchvision.io import ImageReadMode, decode_image, read_file

    with warnings.catch_warnings():  # torchvision >= 0.29 announces a move of its decoders to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


# (device, preset, folder) -> (bank uint8 (5, 3, Hmax, Wmax), sizes long (5, 2)), on that device.
_BANKS: dict[tuple[str, str, str | None], tuple[Tensor, Tensor]] = {}


def _cifar_downscale(tex: Tensor) -> Tensor:
    """`cv2.resize(tex, (0, 0), fx=0.2, fy=0.2)` (bilinear, the default) as exact integer sampling.

    cv2 maps output pixel d to source (d + 0.5) / 0.2 - 0.5 = 5 d + 2, an integer, so the bilinear
    weights are all 0/1 and the result is the pixels at 2, 7, 12, ...; the output size is
    round(0.2 * n) like cv2's. (`F.interpolate(scale_factor=0.2, mode="bilinear", align_corners=False)`
    samples the same points but floors the size.) Checked equal to cv2 on all six textures.
    """
    _, h, w = tex.shape
    rows = (2 + 5 * torch.arange(round(h * 0.2))).clamp_(max=h - 1)
    cols = (2 + 5 * torch.arange(round(w * 0.2))).clamp_(max=w - 1)
    return tex[:, rows][:, :, cols]


def frost_bank(preset: str, device: torch.device, frost_dir: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """The five frost textures as one padded uint8 tensor (5, 3, Hmax, Wmax) on `device`, with their sizes (5, 2).

    The "cifar" preset holds the textures downscaled by 0.2 as `make_cifar_c.py` does; "imagenet"
    holds them at full size as `make_imagenet_c.py` does. Decoded once per (device, preset, folder).
    """
    folder = str(Path(frost_dir).resolve()) if frost_dir is not None else None
    key = (str(torch.device(device)), preset, folder)
    if key not in _BANKS:
        texs = [decode_rgb(p) for p in frost_paths(frost_dir)]
        if preset == "cifar":
            texs = [_cifar_downscale(t) for t in texs]
        sizes = torch.tensor([t.shape[-2:] for t in texs], dtype=torch.long)
        hm, wm = sizes.max(0).values.tolist()
        bank = torch.zeros(len(texs), 3, hm, wm, dtype=torch.uint8)
        for i, t in enumerate(texs):
            bank[i, :, : t.shape[1], : t.shape[2]] = t
        _BANKS[key] = (bank.to(device), sizes.to(device))
    return _BANKS[key]
