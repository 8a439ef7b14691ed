"""Stream sources: where a stream's images come from, one registered class per kind of data.

A source knows the labels of its rows and loads the uint8 images of a planned batch; everything else about a
stream (the plan, corruption on the fly, the reset policy) is the same for every source. `stream.source` names
one of `SOURCES`:

- `cifar10`: the clean CIFAR-10 test set (official python batches), corrupted on the fly;
- `cifar10c`: CIFAR-10-C `.npy` files (Zenodo record 2535967, or `make-cifar10c` output), read as stored;
- `imagenet`: a clean ImageNet-style folder `<root>/<wnid>/*.JPEG`, resized, center-cropped, corrupted on the fly;
- `imagenetc`: ImageNet-C folders `<root>/<corruption>/<severity>/<wnid>/*.JPEG` (Zenodo record 2235448);
- `memory`: uint8 images handed over in Python (`MemorySource`): clean images corrupted on the fly, or images
  already corrupted, one array per (domain, severity).

Adding a source is one class here: subclass `Source`, set its class attributes, implement `open` (read the
labels, fail early on missing files) and `load` (the images of one planned batch), decorate it with
`@register_source`, and name it in a stream YAML (`stream.source: <name>`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..corruptions import corrupt, make_generator, to_uint8
from ..data import imagenet
from ..data.cifar import find_cifar10, load_cifar10, load_cifar10c
from ..data.context import DataContext, DataLike
from ..data.imagenet import ImageFolderIndex
from ..data.make_cifar10c import batch_seed
from .catalog import SOURCES, register_source, source_class
from .plan import BatchPlan
from .spec import CLEAN, StreamSpec, gradual_severities

# `n -> (images, labels)`: clean source-domain images for methods that need source statistics.
SourceSamples = Callable[[int], tuple[Tensor, Tensor]]

__all__ = ["SOURCES", "MemorySource", "Source", "SourceSamples", "open_source", "register_source", "source_class"]


class Source:
    """The data behind a stream: `labels` (int64, one per row) and `load(plan, rows)` -> the batch's uint8 images.

    Class attributes describe the kind of data, so a spec can be checked and resolved without opening it:
    corrupts_on_the_fly: the images are clean and the stream corrupts each batch (seeded per batch).
    image_size: the fixed side length of its images; None when `stream.image_size` chooses it (a crop size).
    default_image_size: the size when `stream.image_size` is null and `image_size` is None.
    shuffle_by_default: `stream.shuffle: null` shuffles (folders sorted by class) or keeps the stored order.
    default_subdir: where it lives under the data root ("" = the data root itself); None = nothing on disk.
    data_hint: what `stream.path` should point at, for the missing-data error.
    regime: the data regime whose published hyper-parameters fit it ("cifar" or "imagenet"): a method's default
        optimiser is its authors' choice for that regime (`methods.settings.MethodSettings.optimizers`).
    """

    name: ClassVar[str]
    corrupts_on_the_fly: ClassVar[bool] = False
    image_size: ClassVar[int | None] = None
    default_image_size: ClassVar[int] = 32
    shuffle_by_default: ClassVar[bool] = False
    default_subdir: ClassVar[str | None] = None
    data_hint: ClassVar[str] = ""
    regime: ClassVar[str] = "cifar"

    labels: np.ndarray
    spec: StreamSpec | None = None

    @classmethod
    def open(cls, spec: StreamSpec, data: DataContext) -> Source:
        """The source of `spec`, read from `spec.path` or the data root (labels now, images batch by batch)."""
        raise NotImplementedError(f"stream source {cls.name!r} cannot be opened from a spec")

    @classmethod
    def folder(cls, spec: StreamSpec, data: DataContext) -> Path | None:
        """`spec.path`, else the data root (`--data-root` / $TTA_SURGICAL_DATA) + `default_subdir`; None if neither."""
        if spec.path:
            return Path(spec.path).expanduser()
        if data.root is None or cls.default_subdir is None:
            return None
        return data.root / cls.default_subdir if cls.default_subdir else data.root

    @classmethod
    def require_folder(cls, spec: StreamSpec, data: DataContext) -> Path:
        """`folder(...)`, or a FileNotFoundError that says where the data goes and where to get it."""
        root = cls.folder(spec, data)
        if root is None:
            raise FileNotFoundError(
                f"stream source {cls.name!r} needs data: set stream.path to {cls.data_hint}, or pass --data-root / "
                f"set $TTA_SURGICAL_DATA to a folder holding {cls.default_subdir}/"
            )
        return root

    def attach(self, spec: StreamSpec) -> None:
        """Called by `Stream` before any batch: check this source can serve `spec` and keep it (domain names)."""
        if spec.source != self.name:
            raise ValueError(f"a {self.name!r} source was given for a stream whose stream.source is {spec.source!r}")
        self.spec = spec

    def to(self, device: torch.device) -> None:
        """Prepare device-side copies before the first batch (in-memory sources put their images there once)."""

    def load(self, plan: BatchPlan, rows: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) images of `plan.indices` on `rows.device`; `rows` = `plan.indices` already there
        (so a GPU gather needs no host-to-device copy, which would wait for the queued kernels)."""
        raise NotImplementedError

    def load_many(self, plans: Sequence[BatchPlan], rows: Iterable[Tensor], device: torch.device) -> Iterator[Tensor]:
        """`load` of each plan in order; sources that read files override it to prefetch in worker processes."""
        return (self.load(p, r) for p, r in zip(plans, rows))

    def stored_images(
        self,
        domain: str,
        severity: int,
        rows: np.ndarray,
        *,
        seed: int = 0,
        batch_size: int = 1000,
        device: str | torch.device = "cpu",
        limit: int | None = None,
    ) -> Tensor:
        """uint8 (n, 3, H, W) CPU images of source rows `rows` of `domain` at `severity`, as the dataset's files
        store them: what the supervised split (`finetune`) trains and tests on. Sources that generate the
        corrupted images (`cifar10`) do it as `make-cifar10c --seed SEED --device DEVICE --limit LIMIT` would, in
        batches of `batch_size` over the first `limit` rows (a generator's draws depend on its device and on its
        batch's size); sources that read files ignore the four. A source that cannot serve a split does not
        override this (`serves_split`)."""
        raise NotImplementedError(f"stream source {self.name!r} cannot serve a labeled split")

    @classmethod
    def serves_split(cls) -> bool:
        """Whether `stored_images` is implemented (the supervised path accepts this source)."""
        return cls.stored_images is not Source.stored_images

    # What `source_samples` really are, repeated as a warning by a method that uses them.
    samples_note: ClassVar[str] = ""

    @classmethod
    def source_samples(cls, data: DataContext) -> SourceSamples | None:
        """`n -> (images, labels)`: up to n clean images of the source domain (float (N, 3, H, W) in [0, 1], CPU) for
        methods that need source statistics (EATA's Fisher information), or None when this data has none."""
        return None

    def __len__(self) -> int:
        return len(self.labels)


def open_source(spec: StreamSpec, data: DataLike = None) -> Source:
    """Open the source `spec.source` names, from `spec.path` or the data root of `data` (a `DataContext`, a data
    root folder, or None for $TTA_SURGICAL_DATA)."""
    return source_class(spec.source).open(spec, DataContext.of(data))


def _nchw_on(images: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """uint8 (N, H, W, 3) host images -> a contiguous (N, 3, H, W) copy on `device`."""
    x = images if isinstance(images, Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return x.to(device).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------ CIFAR


_CIFAR_SAMPLES_NOTE = (
    "source samples are the clean CIFAR-10 *test* images (no source training split was given): the same images "
    "the stream corrupts, so the source statistics are not independent of the test data; set method.source_data "
    "to a CIFAR-10 folder with data_batch_* files for a proper source split"
)



@register_source
class Cifar10Source(Source):
    """The clean CIFAR-10 test set, kept on the device once ((N, 3, 32, 32) uint8, 30 MB): every batch is
    gathered and corrupted there, with no host round trip. Downloaded into the cache when no folder holds it."""

    name = "cifar10"
    corrupts_on_the_fly = True
    image_size = 32
    default_subdir = ""
    data_hint = "a folder holding cifar-10-batches-py/"

    def __init__(self, images: np.ndarray, labels: np.ndarray, frost_dir: Path | None = None) -> None:
        self.images = images  # uint8 (N, 32, 32, 3)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.on_device: Tensor | None = None
        self.frost_dir = frost_dir
        self._generated: tuple[tuple[str, int, int, int, str, int], dict[int, Tensor]] | None = None

    @classmethod
    def open(cls, spec: StreamSpec, data: DataContext) -> Source:
        root = cls.folder(spec, data)
        return cls(*load_cifar10(root if root is not None else find_cifar10(None)), frost_dir=data.frost_dir)

    def to(self, device: torch.device) -> None:
        if self.on_device is None or self.on_device.device != device:
            self.on_device = _nchw_on(self.images, device)

    def load(self, plan: BatchPlan, rows: Tensor) -> Tensor:
        self.to(rows.device)
        return self.on_device[rows]

    def stored_images(
        self,
        domain: str,
        severity: int,
        rows: np.ndarray,
        *,
        seed: int = 0,
        batch_size: int = 1000,
        device: str | torch.device = "cpu",
        limit: int | None = None,
    ) -> Tensor:
        """The images `make-cifar10c --seed SEED` writes (same batches, generator seeds, preset, uint8 rounding):
        generated here, one corruption's batches cached (30 MB for all of CIFAR-10)."""
        if domain == CLEAN:
            return _nchw_on(self.images[rows], torch.device("cpu"))
        device = torch.device(device)
        pool = self.images if limit is None else self.images[:limit]
        key = (domain, int(severity), int(seed), int(batch_size), str(device), len(pool))
        if self._generated is None or self._generated[0] != key:
            self._generated = (key, {})
        done = self._generated[1]
        out = torch.empty((len(rows), 3, 32, 32), dtype=torch.uint8)
        for start in np.unique(rows // batch_size * batch_size).tolist():
            if start not in done:
                clean = _nchw_on(pool[start : start + batch_size], device).float().div_(255)
                g = make_generator(batch_seed(seed, domain, severity, start), device)
                x = corrupt(clean, domain, severity, g, preset="cifar", frost_dir=self.frost_dir)
                done[start] = to_uint8(x).cpu()
            where = np.flatnonzero((rows >= start) & (rows < start + batch_size))
            out[torch.from_numpy(where)] = done[start][torch.from_numpy(rows[where] - start)]
        return out

    samples_note = _CIFAR_SAMPLES_NOTE

    @classmethod
    def source_samples(cls, data: DataContext) -> SourceSamples:
        return _cifar10_test_images(data)


def _cifar10_test_images(data: DataContext) -> SourceSamples:
    """`n -> (images, labels)`: the first n clean CIFAR-10 test images (read when a method first asks)."""

    def load(n: int) -> tuple[Tensor, Tensor]:
        images, labels = load_cifar10(find_cifar10(data.root))
        x = _nchw_on(images[:n], torch.device("cpu")).float().div_(255.0)
        return x, torch.from_numpy(np.asarray(labels[:n], dtype=np.int64))

    return load


@register_source
class Cifar10CSource(Source):
    """CIFAR-10-C files: `<corruption>.npy` uint8 (5N, 32, 32, 3), severities stacked, memory-mapped.

    A sequential or gradual stream keeps one (domain, severity) block on the device (30 MB) and gathers from it;
    a mixed one gathers each batch's rows from the memory-mapped files on the host.
    """

    name = "cifar10c"
    image_size = 32
    default_subdir = "CIFAR-10-C"
    data_hint = "the folder of CIFAR-10-C .npy files (Zenodo record 2535967, or `tta-surgical make-cifar10c`)"

    def __init__(self, root: Path, labels: np.ndarray) -> None:
        self.root = root
        self.labels = np.asarray(labels, dtype=np.int64)
        self._host: dict[tuple[int, int], np.ndarray] = {}
        self._block: tuple[tuple[int, int], Tensor] | None = None

    @classmethod
    def open(cls, spec: StreamSpec, data: DataContext) -> Source:
        root = cls.require_folder(spec, data)
        first_sev = spec.segments()[0][2] if spec.order != "mixed" else spec.severities[0]
        _, labels = load_cifar10c(root, spec.domains[0], first_sev)
        return cls(root, labels)

    def _array(self, d: int, s: int) -> np.ndarray:
        if (d, s) not in self._host:
            self._host[(d, s)] = self._file(self.spec.domains[d], s)
        return self._host[(d, s)]

    def _file(self, name: str, severity: int) -> np.ndarray:
        """The memory-mapped images of `name` at `severity`, checked to hold the rows of the first file's labels."""
        imgs, labs = load_cifar10c(self.root, name, severity)
        if len(labs) != len(self.labels) or not np.array_equal(labs, self.labels):
            raise ValueError(
                f"CIFAR-10-C labels for {name} severity {severity} differ from those of the first file "
                f"({len(labs)} vs {len(self.labels)} rows); the folder {self.root} mixes incompatible files"
            )
        return imgs

    def stored_images(
        self,
        domain: str,
        severity: int,
        rows: np.ndarray,
        *,
        seed: int = 0,
        batch_size: int = 1000,
        device: str | torch.device = "cpu",
        limit: int | None = None,
    ) -> Tensor:
        return _nchw_on(self._file(domain, severity)[rows], torch.device("cpu"))

    samples_note = _CIFAR_SAMPLES_NOTE

    @classmethod
    def source_samples(cls, data: DataContext) -> SourceSamples:
        return _cifar10_test_images(data)

    def load(self, plan: BatchPlan, rows: Tensor) -> Tensor:
        groups = plan.groups()
        device = rows.device
        if len(groups) == 1 and self.spec.order != "mixed":
            key = (groups[0][0], groups[0][1])
            if self._block is None or self._block[0] != key:
                self._block = None  # free the previous block first
                self._block = (key, _nchw_on(torch.from_numpy(np.array(self._array(*key))), device))
            return self._block[1][rows]
        x = np.empty((len(plan), 32, 32, 3), np.uint8)
        for d, s, pos in groups:
            x[pos] = self._array(d, s)[plan.indices[pos]]
        xt = torch.from_numpy(x)
        if device.type == "cuda":
            xt = xt.pin_memory()
        return xt.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------ ImageNet


class _ImageFolderSource(Source):
    """Class-folder JPEG trees, read batch by batch by DataLoader workers into pinned memory (never all at once)."""

    default_image_size = 224
    shuffle_by_default = True  # folders are sorted by class
    regime = "imagenet"

    def __init__(self, root: Path, index: ImageFolderIndex, num_workers: int | None) -> None:
        self.root = root
        self.index = index
        self.labels = index.labels
        self.num_workers = num_workers

    def crop(self) -> int | None:
        """The center-crop size of the decoded images (None: used as stored)."""
        return None

    def base(self, d: int, s: int) -> Path:
        """The folder that holds the class folders of domain position `d` at severity `s`."""
        raise NotImplementedError

    def load_many(self, plans: Sequence[BatchPlan], rows: Iterable[Tensor], device: torch.device) -> Iterator[Tensor]:
        if not plans:
            return iter(())
        batches = _PathBatches(self, plans)
        loader = imagenet.load_batches(batches, device=device, crop=self.crop(), num_workers=self.num_workers)
        return (x for x, _ in loader)

    def load(self, plan: BatchPlan, rows: Tensor) -> Tensor:
        return next(iter(self.load_many([plan], [rows], rows.device)))


class _PathBatches:
    """The (path, label) lists of planned batches, built lazily (a full ImageNet-C plan has 750k paths)."""

    def __init__(self, source: _ImageFolderSource, plans: Sequence[BatchPlan]) -> None:
        self.source, self.plans = source, plans

    def __len__(self) -> int:
        return len(self.plans)

    def __iter__(self) -> Iterator[list[tuple[str, int]]]:
        src = self.source
        bases: dict[tuple[int, int], Path] = {}
        for p in self.plans:
            items = []
            for i, d, s in zip(p.indices.tolist(), p.domain_ids.tolist(), p.item_severities.tolist()):
                if (d, s) not in bases:
                    bases[(d, s)] = src.base(d, s)
                items.append((str(bases[(d, s)] / src.index.relpaths[i]), int(src.labels[i])))
            yield items


@register_source
class ImageNetCSource(_ImageFolderSource):
    """ImageNet-C folders: 224x224 JPEGs per corruption and severity, with the same file list in each."""

    name = "imagenetc"
    image_size = 224
    default_subdir = "ImageNet-C"
    data_hint = "the ImageNet-C folder <root>/<corruption>/<severity>/<wnid>/*.JPEG (Zenodo record 2235448)"

    @classmethod
    def open(cls, spec: StreamSpec, data: DataContext) -> Source:
        root = cls.require_folder(spec, data)
        sevs = gradual_severities(spec.severities) if spec.order == "gradual" else spec.severities
        for d in dict.fromkeys(spec.domains):  # fail now, not after an hour, when a folder is missing
            for s in sevs:
                imagenet.imagenetc_folder(root, d, s)
        return cls(root, imagenet.scan_imagenetc(root, spec.domains[0], sevs[0]), data.num_workers)

    def base(self, d: int, s: int) -> Path:
        return self.root / self.spec.domains[d] / str(s)

    def stored_images(
        self,
        domain: str,
        severity: int,
        rows: np.ndarray,
        *,
        seed: int = 0,
        batch_size: int = 1000,
        device: str | torch.device = "cpu",
        limit: int | None = None,
    ) -> Tensor:
        index = imagenet.scan_imagenetc(self.root, domain, severity)
        if index.relpaths != self.index.relpaths:
            raise ValueError(
                f"ImageNet-C folder {self.root}/{domain}/{severity} lists other files than the first domain's; "
                "every corruption folder must hold the same images"
            )
        parts = [x.cpu() for x, _ in imagenet.iter_image_folder(index, batch_size=256, indices=rows, device="cpu")]
        return torch.cat(parts) if parts else torch.zeros(0, 3, 224, 224, dtype=torch.uint8)


@register_source
class ImageNetSource(_ImageFolderSource):
    """A clean ImageNet-style val folder: any image size, resized and center-cropped to `stream.image_size`."""

    name = "imagenet"
    corrupts_on_the_fly = True
    default_subdir = "imagenet/val"
    data_hint = "a clean ImageNet val folder <root>/<wnid>/*.JPEG"

    @classmethod
    def open(cls, spec: StreamSpec, data: DataContext) -> Source:
        root = cls.require_folder(spec, data)
        return cls(root, imagenet.scan_image_folder(root), data.num_workers)

    def crop(self) -> int | None:
        return self.spec.resolved_image_size

    def base(self, d: int, s: int) -> Path:
        return self.index.root


# ------------------------------------------------------------------------------------------------ in memory


@register_source
class MemorySource(Source):
    """uint8 images handed over in Python, kept on the device once.

    images: uint8 (N, 3, H, W) (numpy or torch): clean images, corrupted on the fly like `cifar10`; or a mapping
        (domain name, severity) -> uint8 (N, 3, H, W): images already corrupted (as CIFAR-10-C files hold them),
        one array for every (domain, severity) the stream visits, rows aligned with `labels`.
    labels: int (N,), the class of each row.

    It has no file to be opened from: build the stream with `build_stream(spec, source=MemorySource(...))` (or
    `engine.run(cfg, ..., source=...)`) and `stream.source: memory`. The config records that the images came from
    memory, not which they were.
    """

    name = "memory"

    def __init__(
        self, images: np.ndarray | Tensor | Mapping[tuple[str, int], np.ndarray | Tensor], labels: np.ndarray
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.corrupts_on_the_fly = not isinstance(images, Mapping)  # type: ignore[misc]
        blocks = {None: images} if self.corrupts_on_the_fly else dict(images)
        self._host: dict[tuple[str, int] | None, Tensor] = {}
        for key, arr in blocks.items():
            x = torch.as_tensor(np.asarray(arr) if not isinstance(arr, Tensor) else arr)
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or len(x) != len(self.labels):
                raise ValueError(
                    f"memory source images{'' if key is None else f' for {key}'} must be uint8 (N, 3, H, W) with N = "
                    f"{len(self.labels)} labels, got {x.dtype} {tuple(x.shape)}"
                )
            self._host[key] = x.cpu().contiguous()
        sizes = {tuple(x.shape[2:]) for x in self._host.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 2 or len(set(next(iter(sizes)))) != 1:
            raise ValueError(f"memory source images must all be square and of one size, got sizes {sorted(sizes)}")
        self.size = int(next(iter(sizes))[0])
        self._on: dict[tuple[str, int] | None, Tensor] = {}
        self._device: torch.device | None = None

    @classmethod
    def open(cls, spec: StreamSpec, data: DataContext) -> Source:
        raise ValueError(
            "stream.source 'memory' streams images given in Python: build the stream with "
            "build_stream(spec, source=MemorySource(images, labels)) (or engine.run(..., source=...)); a file or "
            "the command line cannot provide them"
        )

    def attach(self, spec: StreamSpec) -> None:
        super().attach(spec)
        if spec.image_size is not None and spec.image_size != self.size:
            raise ValueError(f"stream.image_size {spec.image_size} differs from the memory images' {self.size}")
        if not self.corrupts_on_the_fly:
            sevs = spec.severities if spec.order != "gradual" else tuple(sorted(set(spec.severities)))
            missing = [(d, s) for d in spec.domains for s in sevs if (d, s) not in self._host]
            if missing:
                raise ValueError(
                    f"the memory source has no images for (domain, severity) {', '.join(map(str, missing))}; "
                    f"it holds {', '.join(map(str, self._host))}"
                )

    def to(self, device: torch.device) -> None:
        if self._device != device:
            self._on = {k: x.to(device) for k, x in self._host.items()}
            self._device = device

    def load(self, plan: BatchPlan, rows: Tensor) -> Tensor:
        self.to(rows.device)
        if self.corrupts_on_the_fly:
            return self._on[None][rows]
        groups = plan.groups()
        if len(groups) == 1:
            return self._on[(self.spec.domains[groups[0][0]], groups[0][1])][rows]
        out = torch.empty((len(plan), 3, self.size, self.size), dtype=torch.uint8, device=rows.device)
        for d, s, pos in groups:
            where = torch.from_numpy(pos).to(rows.device)
            out[where] = self._on[(self.spec.domains[d], s)][rows[where]]
        return out
