"""Streaming readers for ImageNet-C folders and clean ImageNet-style (val layout) folders.

Layouts:
- ImageNet-C (Zenodo record 2235448): `<root>/<corruption>/<severity 1..5>/<wnid>/<val file name>.JPEG`,
  224x224 JPEGs (already resized to 256 and center-cropped to 224 by the generator).
- clean ImageNet val in class folders: `<root>/<wnid>/*.JPEG`, any size; read with resize 256 / center-crop 224.

Class index = position of the wnid in sorted order, which for the full 1000 classes is the standard
ImageNet class order every torchvision / timm classifier uses. File lists come from scanning the folders
(names only); images are read lazily, batch by batch, by a torch DataLoader whose workers read (and on CPU
decode) the files, so a 50,000-image folder never sits in memory.

torchvision's codecs and transforms are imported inside the functions that use them: importing torchvision
loads ~1,100 more modules and takes about as long as torch itself (measured: `import tta_surgical.streams` 6.1 s,
with torchvision.io and transforms.v2 10.7 s, best of 5 on the 2-core dev machine), and the CIFAR streams, the
corruptions and `make-cifar10c` that import this package never need it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGENETC_RECORD = "https://zenodo.org/records/2235448"
IMAGE_EXTENSIONS = (".jpeg", ".jpg")
N_IMAGENET_CLASSES = 1000

_IMAGENETC_LAYOUT = (
    "ImageNet-C is expected as <root>/<corruption>/<severity 1..5>/<wnid>/<image>.JPEG "
    f"(download the tarballs of Zenodo record 2235448, {IMAGENETC_RECORD}, and unpack them into <root>)"
)
_CLEAN_LAYOUT = (
    "a clean ImageNet-style folder is expected as <root>/<wnid>/<image>.JPEG (the validation set sorted "
    "into one folder per class, e.g. n01440764/ILSVRC2012_val_00000293.JPEG)"
)


@dataclass(frozen=True, eq=False)
class ImageFolderIndex:
    """The scanned file list of one class-folder tree: file i is `root / relpaths[i]` with label `labels[i]`."""

    root: Path
    relpaths: tuple[str, ...]
    labels: np.ndarray  # int64 (N,)
    wnids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.relpaths)

    def paths(self, indices: Iterable[int] | None = None, root: Path | None = None) -> list[str]:
        """Absolute paths of `indices` (all files by default), optionally under another root with the same tree."""
        base = self.root if root is None else Path(root)
        idx = range(len(self.relpaths)) if indices is None else indices
        return [str(base / self.relpaths[int(i)]) for i in idx]


def scan_image_folder(root: str | os.PathLike, *, layout_hint: str = _CLEAN_LAYOUT) -> ImageFolderIndex:
    """List `<root>/<wnid>/*.JPEG` (names only, sorted): labels are the sorted-wnid positions."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}; {layout_hint}")
    wnids = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not wnids:
        raise FileNotFoundError(f"no class folders in {root}; {layout_hint}")
    relpaths: list[str] = []
    labels: list[int] = []
    for k, wnid in enumerate(wnids):
        names = sorted(
            e.name for e in os.scandir(root / wnid) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        relpaths += [f"{wnid}/{n}" for n in names]
        labels += [k] * len(names)
    if not relpaths:
        raise FileNotFoundError(f"no .JPEG files in the {len(wnids)} class folders of {root}; {layout_hint}")
    return ImageFolderIndex(root, tuple(relpaths), np.asarray(labels, dtype=np.int64), tuple(wnids))


def imagenetc_folder(root: str | os.PathLike, corruption: str, severity: int) -> Path:
    """`<root>/<corruption>/<severity>`, or a clear error saying what is missing and where to get it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet-C folder not found: {root}; {_IMAGENETC_LAYOUT}")
    folder = root / corruption / str(int(severity))
    if not folder.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"ImageNet-C folder {folder} not found (corruption folders present in {root}: "
            f"{', '.join(have) or 'none'}); {_IMAGENETC_LAYOUT}"
        )
    return folder


def scan_imagenetc(root: str | os.PathLike, corruption: str, severity: int) -> ImageFolderIndex:
    """File list of one ImageNet-C corruption and severity."""
    return scan_image_folder(imagenetc_folder(root, corruption, severity), layout_hint=_IMAGENETC_LAYOUT)


def subset_per_class(labels: np.ndarray, n_per_class: int, seed: int = 0) -> np.ndarray:
    """A fixed, seeded subset: `n_per_class` indices of every class (e.g. 5 x 1000 = the 5,000-image convention).

    Returned sorted, so the subset is a set (its order is the stream's business).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B5E7]))
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < n_per_class:
            raise ValueError(f"class {int(c)} has {len(members)} images, fewer than the {n_per_class} per class asked")
        picks.append(rng.choice(members, n_per_class, replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.zeros(0, np.int64)


# ------------------------------------------------------------------------------------------------ decoding


def resize_size(crop: int) -> int:
    """The resize before the center crop: 256 for 224 (the standard 0.875 crop ratio)."""
    return int(round(crop / 0.875))


def resize_center_crop(img: Tensor, crop: int) -> Tensor:
    """uint8 (3, H, W) -> uint8 (3, crop, crop): shorter side to resize_size(crop), antialiased; center crop."""
    # torchvision is imported on first use (see the module docstring)
    from torchvision.transforms.v2 import functional as F

    img = F.resize(img, [resize_size(crop)], antialias=True)
    return F.center_crop(img, [crop, crop])


def _decode_cpu(data: Tensor) -> Tensor:
    # torchvision is imported on first use (see the module docstring)
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError:  # a few "JPEG" files in the wild are PNG or CMYK; decode_image handles those
        return decode_image(data, mode=ImageReadMode.RGB)


class JpegFiles(torch.utils.data.Dataset):
    """Map-style dataset keyed by `(path, label)`: returns `(image, label)`.

    With `decode=True` the worker decodes on the CPU (and resizes/crops when `crop` is set), returning uint8
    (3, H, W); with `decode=False` it returns the raw file bytes, for batched GPU decoding in the main process.
    """

    def __init__(self, *, decode: bool = True, crop: int | None = None) -> None:
        self.decode = decode
        self.crop = crop

    def __getitem__(self, key: tuple[str, int]) -> tuple[Tensor, int]:
        # torchvision is imported on first use (see the module docstring)
        from torchvision.io import read_file

        path, label = key
        data = read_file(path)
        if not self.decode:
            return data, label
        img = _decode_cpu(data)
        if self.crop is not None:
            img = resize_center_crop(img, self.crop)
        return img, label


class _Collate:
    """Stack decoded images inside the worker (so the batch itself is pinned); keep raw bytes as a list."""

    def __init__(self, stack: bool) -> None:
        self.stack = stack

    def __call__(self, items: list[tuple[Tensor, int]]) -> tuple[Tensor | list[Tensor], Tensor]:
        images = [t for t, _ in items]
        labels = torch.tensor([lab for _, lab in items], dtype=torch.long)
        return (_stack(images) if self.stack else images), labels


_GPU_DECODE_OK: dict[str, bool] = {}  # cache: does decode_jpeg(device=cuda) work on this device?


def gpu_decode_supported(device: torch.device) -> bool:
    """True when torchvision can decode JPEGs on `device` (a CUDA device with nvjpeg); probed once."""
    if device.type != "cuda":
        return False
    key = str(device)
    if key not in _GPU_DECODE_OK:
        # torchvision is imported on first use (see the module docstring)
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        try:
            probe = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
            decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
            _GPU_DECODE_OK[key] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _GPU_DECODE_OK[key] = False
    return _GPU_DECODE_OK[key]


def _stack(images: Sequence[Tensor]) -> Tensor:
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise ValueError(
            f"images of one batch have different sizes {sorted(shapes)}; ImageNet-C images are all 224x224: "
            "for a clean ImageNet folder use source 'imagenet' (resize and center-crop)"
        )
    return torch.stack(list(images))


def load_batches(
    batches: Iterable[Sequence[tuple[str, int]]],
    *,
    device: str | torch.device = "cpu",
    crop: int | None = None,
    num_workers: int | None = None,
    gpu_decode: bool | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Read `batches` (an iterable of lists of `(path, label)`, consumed lazily) in order.

    Yields `(uint8 (B, 3, S, S), long (B,))` on `device`.

    crop: None for ImageNet-C (images are used as stored, 224x224); an int for clean images, which are
    resized to `resize_size(crop)` (256 for 224) and center-cropped.
    Files are read by `num_workers` DataLoader workers (default min(8, CPUs); 0 reads in this process) into
    pinned memory; JPEGs are decoded on the GPU when `device` is CUDA and nvjpeg works (`gpu_decode=None`
    probes it), else on the CPU inside the workers.
    """
    device = torch.device(device)
    if gpu_decode is None:
        gpu_decode = gpu_decode_supported(device)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        JpegFiles(decode=not gpu_decode, crop=crop),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_Collate(stack=not gpu_decode),
        pin_memory=device.type == "cuda" and not gpu_decode,
        persistent_workers=False,
    )
    for x, labels in loader:
        if gpu_decode:
            # torchvision is imported on first use (see the module docstring)
            from torchvision.io import ImageReadMode, decode_jpeg

            images = decode_jpeg(x, mode=ImageReadMode.RGB, device=device)
            if crop is not None:
                images = [resize_center_crop(t, crop) for t in images]
            x = _stack(images)
        yield x.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def iter_image_folder(
    index: ImageFolderIndex,
    *,
    batch_size: int,
    indices: Sequence[int] | None = None,
    crop: int | None = None,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Convenience: read `index` (or its `indices`, in that order) in batches of `batch_size`; see `load_batches`."""
    idx = np.arange(len(index)) if indices is None else np.asarray(indices, dtype=np.int64)
    paths = index.paths(idx)
    labels = index.labels[idx].tolist()
    items = list(zip(paths, labels))
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return load_batches(batches, device=device, crop=crop, num_workers=num_workers)
