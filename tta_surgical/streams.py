"""Deployment-shift streams: a spec (data) -> an explicit, seeded batch plan -> batches on a device.

Three layers, each usable alone:

1. `StreamSpec`: the scenario as plain, validated data (the `stream:` section of a run config, or a
   file under `streams/`): which corruptions, severities, order, label shift, reset policy, data source.
2. `plan_stream(spec, labels)`: a pure function of the spec and the source labels -> `list[BatchPlan]`,
   the exact (domain, severity, image index) of every image of every batch and where the model resets.
   It never touches images or a device, so every method (and every device) sees the identical order
   for the same seed, and the plan can be fingerprinted and logged (`plan_fingerprint`).
3. `build_stream(spec, ...)` -> `Stream`: turns the plan into `Batch`es on a device, either reading the
   official files (CIFAR-10-C .npy, ImageNet-C folders) or corrupting clean images on the fly with the
   torch corruption engine, seeded per batch so `iter_from(k)` regenerates batch k bit for bit on resume.

Orders: "sequential" (each domain at each listed severity, domain after domain in the listed order:
domain-major), "gradual" (per domain the severities rise and fall, 1,2,3,4,5,4,3,2,1 for all five, as in
the gradual continual-TTA protocol of CoTTA), "mixed" (every (domain, severity, image) draw shuffled
together). Label shift "dirichlet" reorders the images of each segment into a class-correlated temporal
order (the NOTE / RoTTA protocol; see `dirichlet_order`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .corruptions.base import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS

__all__ = [
    "Batch",
    "BatchPlan",
    "Stream",
    "StreamSpec",
    "build_stream",
    "derive_seed",
    "dirichlet_order",
    "gradual_severities",
    "load_stream_spec",
    "plan_fingerprint",
    "plan_stream",
    "select_images",
]

SOURCES: tuple[str, ...] = ("cifar10", "cifar10c", "imagenetc", "imagenet")
ORDERS: tuple[str, ...] = ("sequential", "mixed", "gradual")
LABEL_SHIFTS: tuple[str, ...] = ("none", "dirichlet")
RESETS: tuple[str, ...] = ("per_domain", "never", "every_n", "episodic")
DOMAIN_SHORTHANDS: dict[str, tuple[str, ...]] = {"all": ALL_CORRUPTIONS, "benchmark": BENCHMARK_CORRUPTIONS}
ON_THE_FLY: frozenset[str] = frozenset({"cifar10", "imagenet"})
IMAGENET_SOURCES: frozenset[str] = frozenset({"imagenetc", "imagenet"})
# Default sub-folders of the data root when `path` is not given.
DEFAULT_SUBDIR: dict[str, str] = {
    "cifar10": "",
    "cifar10c": "CIFAR-10-C",
    "imagenetc": "ImageNet-C",
    "imagenet": "imagenet/val",
}

# Tags that keep the random streams of the planner independent of each other.
_TAG_SUBSET, _TAG_SELECT, _TAG_ORDER, _TAG_MIXED, _TAG_DIRICHLET, _TAG_NOISE = 1, 2, 3, 4, 5, 6


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class StreamSpec:
    """One deployment scenario. Every field has a default: the default is the Tent protocol on CIFAR-10-C.

    source: "cifar10" (clean CIFAR-10 test set corrupted on the fly), "cifar10c" (official CIFAR-10-C .npy
        files, Zenodo 2535967, or `make-cifar10c` output), "imagenetc" (official ImageNet-C folders, Zenodo
        2235448), "imagenet" (clean ImageNet-style val folder corrupted on the fly).
    path: dataset folder; None = the data root (`--data-root` / $TTA_SURGICAL_DATA) + the source's usual
        sub-folder (`DEFAULT_SUBDIR`); CIFAR-10 is downloaded into the cache when absent.
    domains: corruption names in stream order, or "all" (19) / "benchmark" (the 15); expanded here.
    severities: 1..5. sequential: each domain at each (domain-major); gradual: the ramp up then down
        over these (sorted); mixed: drawn together.
    order: "sequential" | "mixed" | "gradual".
    label_shift: "none" | "dirichlet"; dirichlet_delta: Dirichlet concentration (small = strongly
        class-correlated order; 0.1 as in RoTTA).
    n_examples: images per domain (per severity step for gradual); None or 0 = all available.
    per_class: > 0 first draws a fixed, seeded subset of that many images per class (e.g. 5 on ImageNet
        = the 5,000-image convention); n_examples then selects from it.
    shuffle: shuffle images within each segment (seeded); None = auto: False for CIFAR (test-set order,
        as the Tent / RobustBench protocol), True for ImageNet (folders are sorted by class).
    batch_size: images per batch (the last batch of a segment may be smaller).
    seed: drives every random choice of the plan and the on-the-fly corruption noise.
    reset: "per_domain" (restore the source model at each new segment: Tent's protocol), "never"
        (continual), "every_n" (every `reset_every` batches), "episodic" (before every batch).
    image_size: None = auto (32 for CIFAR, 224 for ImageNet); clean ImageNet may use another crop size.
    quantize: round on-the-fly corrupted images to the uint8 grid (`to_uint8`), as the official files are stored.
    """

    source: str = "cifar10"
    path: str | None = None
    domains: tuple[str, ...] = BENCHMARK_CORRUPTIONS
    severities: tuple[int, ...] = (5,)
    order: str = "sequential"
    label_shift: str = "none"
    dirichlet_delta: float = 0.1
    n_examples: int | None = None
    per_class: int = 0
    shuffle: bool | None = None
    batch_size: int = 200
    seed: int = 0
    reset: str = "per_domain"
    reset_every: int = 0
    image_size: int | None = None
    quantize: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        def choice(name: str, valid: tuple[str, ...]) -> None:
            v = getattr(self, name)
            if v not in valid:
                raise ValueError(f"stream.{name}: unknown value {v!r}; valid: {', '.join(valid)}")

        choice("source", SOURCES)
        choice("order", ORDERS)
        choice("label_shift", LABEL_SHIFTS)
        choice("reset", RESETS)
        if self.path is not None:
            if not isinstance(self.path, (str, os.PathLike)):
                raise TypeError(f"stream.path must be a folder path string or null, got {self.path!r}")
            put("path", os.fspath(self.path))

        # domains: a shorthand, one name, or a list of names
        doms = self.domains
        if isinstance(doms, str):
            doms = (doms,)
        if isinstance(doms, (list, tuple)) and len(doms) == 1 and doms[0] in DOMAIN_SHORTHANDS:
            doms = DOMAIN_SHORTHANDS[doms[0]]  # also ["benchmark"], as a CLI override of a tuple field gives
        if not isinstance(doms, (list, tuple)) or not doms:
            raise ValueError(
                f"stream.domains must be a non-empty list of corruption names or one of {', '.join(DOMAIN_SHORTHANDS)}"
            )
        doms = tuple(doms)
        bad = [d for d in doms if not isinstance(d, str) or d not in ALL_CORRUPTIONS]
        if bad:
            raise ValueError(
                f"stream.domains: unknown corruption(s) {', '.join(map(repr, bad))}; valid: "
                f"{', '.join(ALL_CORRUPTIONS)} (or the shorthands {', '.join(DOMAIN_SHORTHANDS)})"
            )
        put("domains", doms)

        sev = self.severities
        if _is_int(sev):
            sev = (sev,)
        if not isinstance(sev, (list, tuple)) or not sev:
            raise ValueError(f"stream.severities must be a non-empty list of integers in 1..5, got {sev!r}")
        if any(not _is_int(s) or not 1 <= s <= 5 for s in sev):
            raise ValueError(f"stream.severities must be integers in 1..5, got {list(sev)}")
        put("severities", tuple(int(s) for s in sev))

        if isinstance(self.dirichlet_delta, bool) or not isinstance(self.dirichlet_delta, (int, float)):
            raise TypeError(f"stream.dirichlet_delta must be a number, got {self.dirichlet_delta!r}")
        put("dirichlet_delta", float(self.dirichlet_delta))
        if not (self.dirichlet_delta > 0 and np.isfinite(self.dirichlet_delta)):
            raise ValueError(f"stream.dirichlet_delta must be a positive finite number, got {self.dirichlet_delta}")

        if self.n_examples is not None:
            if not _is_int(self.n_examples) or self.n_examples < 0:
                raise ValueError(
                    f"stream.n_examples must be a non-negative integer or null (all), got {self.n_examples!r}"
                )
            put("n_examples", int(self.n_examples) or None)
        for name, lo in (("per_class", 0), ("batch_size", 1), ("seed", 0), ("reset_every", 0)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise ValueError(f"stream.{name} must be an integer >= {lo}, got {v!r}")
            put(name, int(v))
        if self.reset == "every_n" and self.reset_every < 1:
            raise ValueError(
                "stream.reset 'every_n' needs stream.reset_every >= 1 (the number of batches between resets)"
            )
        if self.reset == "per_domain" and self.order == "mixed":
            raise ValueError(
                "stream.reset 'per_domain' has no domain boundary in a mixed stream; use never, every_n or episodic"
            )
        for name in ("shuffle",):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise TypeError(f"stream.{name} must be true, false or null (auto), got {v!r}")
        if not isinstance(self.quantize, bool):
            raise TypeError(f"stream.quantize must be true or false, got {self.quantize!r}")

        if self.image_size is not None:
            if not _is_int(self.image_size) or self.image_size < 1:
                raise ValueError(
                    f"stream.image_size must be a positive integer or null (auto), got {self.image_size!r}"
                )
            put("image_size", int(self.image_size))
            fixed = {"cifar10": 32, "cifar10c": 32, "imagenetc": 224}.get(self.source)
            if fixed is not None and self.image_size != fixed:
                raise ValueError(
                    f"stream.image_size {self.image_size} does not fit source {self.source!r}, whose images are "
                    f"{fixed}x{fixed}; leave it null (auto)"
                )

    # -- resolved views (kept lazy so `dataclasses.replace(spec, source=...)` stays consistent)

    @property
    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        return 224 if self.source in IMAGENET_SOURCES else 32

    @property
    def resolved_shuffle(self) -> bool:
        return self.source in IMAGENET_SOURCES if self.shuffle is None else self.shuffle

    def segments(self) -> list[tuple[int, int, int]]:
        """The (domain_index, domain position in `domains`, severity) blocks of a sequential/gradual stream.

        domain_index counts the blocks the `per_domain` reset restarts at: every (domain, severity) for
        sequential, every domain for gradual (its severity ramp is one continual episode). A mixed stream
        is one block whose per-image domains and severities are drawn together.
        """
        if self.order == "sequential":
            pairs = [(d, s) for d in range(len(self.domains)) for s in self.severities]
            return [(k, d, s) for k, (d, s) in enumerate(pairs)]
        if self.order == "gradual":
            ramp = gradual_severities(self.severities)
            return [(d, d, s) for d in range(len(self.domains)) for s in ramp]
        return []


def gradual_severities(severities: tuple[int, ...] = (1, 2, 3, 4, 5)) -> tuple[int, ...]:
    """Up then down over the sorted severities: (1, 2, 3, 4, 5) -> (1, 2, 3, 4, 5, 4, 3, 2, 1)."""
    up = sorted(set(severities))
    return tuple(up + up[-2::-1])


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """One planned batch: which images, from which domain(s) and severity(ies), and the reset before it.

    indices: int64 (B,) rows of the source set (the CIFAR-10 test set, a CIFAR-10-C severity block, the
        scanned ImageNet file list). domain_ids / item_severities: per image, the position in
        `spec.domains` and the severity (constant unless the stream is mixed). domain / severity: the
        batch's domain name and severity, "mixed" / 0 when a mixed batch holds several.
    noise_seed: seed of the on-the-fly corruption noise, derived from (spec.seed, batch_index) only.
    """

    batch_index: int
    domain_index: int
    domain: str
    severity: int
    indices: np.ndarray
    domain_ids: np.ndarray
    item_severities: np.ndarray
    reset_before: bool
    noise_seed: int

    def __len__(self) -> int:
        return len(self.indices)

    def groups(self) -> list[tuple[int, int, np.ndarray]]:
        """(domain position, severity, positions in the batch) per distinct pair, in order of first appearance."""
        if len(self.indices) == 0:
            return []
        key = self.domain_ids.astype(np.int64) * 8 + self.item_severities
        if (key == key[0]).all():
            return [(int(self.domain_ids[0]), int(self.item_severities[0]), np.arange(len(key)))]
        _, first = np.unique(key, return_index=True)
        return [
            (int(self.domain_ids[i]), int(self.item_severities[i]), np.flatnonzero(key == key[i]))
            for i in sorted(first)
        ]


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers: SplitMix64 chained over the parts (pure integer arithmetic, so the same
    on every platform and library version; cheap enough to call per batch)."""
    h = 0x5EED
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & ((1 << 63) - 1)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(p) for p in parts])))


def dirichlet_order(
    labels: np.ndarray, delta: float, rng: np.random.Generator, n_slots: int | None = None
) -> np.ndarray:
    """A permutation of `range(len(labels))` that makes the label sequence temporally correlated.

    The NOTE / RoTTA protocol: time is cut into `n_slots` slots (default: the number of classes, at most
    100, RoTTA's choice); each class spreads its (shuffled) samples over the slots with proportions drawn from
    Dirichlet(delta, ..., delta); the samples inside a slot are shuffled. Small delta puts each class into few
    slots (long runs dominated by one or two classes), large delta approaches an i.i.d. order. (RoTTA keeps
    each class's part of a slot contiguous, which stays correlated even for large delta; shuffling inside
    the slot makes delta the only knob.) Every position appears exactly once.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if n_slots is None:
        n_slots = min(len(classes), 100)
    n_slots = max(int(n_slots), 1)
    props = rng.dirichlet(np.full(n_slots, float(delta)), size=len(classes))
    slots: list[list[np.ndarray]] = [[] for _ in range(n_slots)]
    for c, p in zip(classes, props):
        members = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.floor(np.cumsum(p)[:-1] * len(members)).astype(np.int64)
        for t, chunk in enumerate(np.split(members, np.clip(cuts, 0, len(members)))):
            slots[t].append(chunk)
    out = [rng.permutation(np.concatenate(chunks)) for chunks in slots if chunks]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def select_images(spec: StreamSpec, labels: np.ndarray) -> np.ndarray:
    """The source rows every segment uses (the same images in every domain, so domains are comparable)."""
    n = len(labels)
    pool = np.arange(n, dtype=np.int64)
    if spec.per_class:
        from .data.imagenet import subset_per_class

        pool = subset_per_class(labels, spec.per_class, derive_seed(spec.seed, _TAG_SUBSET))
    if spec.n_examples is not None:
        if spec.n_examples > len(pool):
            what = f"{spec.per_class} per class = {len(pool)}" if spec.per_class else f"{len(pool)}"
            raise ValueError(
                f"stream.n_examples = {spec.n_examples} but the source offers only {what} images; "
                "lower n_examples or set it to 0 (all)"
            )
        if spec.resolved_shuffle:
            pool = np.sort(_rng(spec.seed, _TAG_SELECT).choice(pool, spec.n_examples, replace=False))
        else:
            pool = pool[: spec.n_examples]
    return pool


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def plan_stream(spec: StreamSpec, labels: np.ndarray) -> list[BatchPlan]:
    """The explicit, seeded batch plan of `spec` over a source set with these `labels` (pure; no I/O, no device).

    Identical inputs give an identical plan (compare with `plan_fingerprint`). Batches never straddle
    segments (a sequential / gradual batch has one domain and one severity); a mixed stream is one segment.
    reset_before is False for batch 0 (every run starts from the source model) and otherwise follows
    `spec.reset`: per_domain = first batch of each new domain_index, every_n = batch_index % reset_every
    == 0, episodic = every batch, never = none.
    """
    labels = _check_labels(labels)
    chosen = select_images(spec, labels)
    bs = spec.batch_size
    rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (domain_index, indices, domain_ids, sevs)

    def reorder(idx: np.ndarray, tag: int) -> np.ndarray:
        if spec.label_shift == "dirichlet":
            idx = idx[dirichlet_order(labels[idx], spec.dirichlet_delta, _rng(spec.seed, _TAG_DIRICHLET, tag))]
        return idx

    if spec.order == "mixed":
        n_d, n_s, n_i = len(spec.domains), len(spec.severities), len(chosen)
        dom = np.repeat(np.arange(n_d, dtype=np.int64), n_s * n_i)
        sev = np.tile(np.repeat(np.asarray(spec.severities, dtype=np.int64), n_i), n_d)
        img = np.tile(chosen, n_d * n_s)
        perm = _rng(spec.seed, _TAG_MIXED).permutation(len(img))
        if spec.label_shift == "dirichlet":
            perm = perm[dirichlet_order(labels[img[perm]], spec.dirichlet_delta, _rng(spec.seed, _TAG_DIRICHLET))]
        dom, sev, img = dom[perm], sev[perm], img[perm]
        for a in range(0, len(img), bs):
            rows.append((0, img[a : a + bs], dom[a : a + bs], sev[a : a + bs]))
    else:
        for k, (block, d, s) in enumerate(spec.segments()):
            idx = chosen
            if spec.resolved_shuffle:
                idx = _rng(spec.seed, _TAG_ORDER, k).permutation(idx)
            idx = reorder(idx, k)
            for a in range(0, len(idx), bs):
                part = idx[a : a + bs]
                rows.append((block, part, np.full(len(part), d, np.int64), np.full(len(part), s, np.int64)))

    plans = []
    prev_block = 0
    for b, (block, idx, dom, sev) in enumerate(rows):
        if b == 0 or spec.reset == "never":
            reset = False
        elif spec.reset == "per_domain":
            reset = block != prev_block
        elif spec.reset == "every_n":
            reset = b % spec.reset_every == 0
        else:  # episodic
            reset = True
        prev_block = block
        one_dom, one_sev = bool((dom == dom[0]).all()), bool((sev == sev[0]).all())
        plans.append(
            BatchPlan(
                batch_index=b,
                domain_index=block,
                domain=spec.domains[int(dom[0])] if one_dom else "mixed",
                severity=int(sev[0]) if one_sev else 0,
                indices=np.ascontiguousarray(idx, dtype=np.int64),
                domain_ids=np.ascontiguousarray(dom, dtype=np.int64),
                item_severities=np.ascontiguousarray(sev, dtype=np.int64),
                reset_before=reset,
                noise_seed=derive_seed(spec.seed, _TAG_NOISE, b),
            )
        )
    return plans


def plan_fingerprint(plan: list[BatchPlan]) -> str:
    """SHA-256 over every field of the plan: equal fingerprints = identical streams (log it next to results)."""
    h = hashlib.sha256()
    for p in plan:
        h.update(f"{p.batch_index}|{p.domain_index}|{p.domain}|{p.severity}|{p.reset_before}|{p.noise_seed}|".encode())
        for a in (p.indices, p.domain_ids, p.item_severities):
            h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
            h.update(b"/")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ batches


@dataclass(frozen=True, eq=False)
class Batch:
    """One batch on the device: x float (B, 3, H, W) in [0, 1], y long (B,), and where it sits in the stream."""

    x: Tensor
    y: Tensor
    domain: str
    severity: int
    batch_index: int
    reset_before: bool
    domain_index: int = 0
    plan: BatchPlan | None = field(default=None, repr=False)


def _resolve_root(spec: StreamSpec, data_root: str | os.PathLike | None) -> Path | None:
    from . import hub

    if spec.path:
        return Path(spec.path).expanduser()
    base = hub.data_root(data_root)
    if base is None:
        return None
    sub = DEFAULT_SUBDIR[spec.source]
    return base / sub if sub else base


class Stream:
    """The batches of a plan, produced on `device` in plan order. `iter_from(k)` resumes at batch k."""

    def __init__(
        self,
        spec: StreamSpec,
        labels: np.ndarray,
        *,
        device: torch.device,
        root: Path | None,
        frost_dir: str | os.PathLike | None = None,
        num_workers: int | None = None,
        _cifar_images: np.ndarray | None = None,
        _index: object | None = None,
    ) -> None:
        self.spec = spec
        self.labels = labels
        self.device = device
        self.root = root
        self.frost_dir = frost_dir
        self.num_workers = num_workers
        self.plan: list[BatchPlan] = plan_stream(spec, labels)
        self._index = _index  # ImageFolderIndex for ImageNet sources
        self._y = torch.as_tensor(labels, dtype=torch.long).to(device)
        self._images: Tensor | None = None
        if _cifar_images is not None:
            # The clean test set goes to the device once ((N, 3, 32, 32) uint8, 30 MB for CIFAR-10): every
            # batch is then gathered and corrupted there, with no host round trip.
            self._images = (
                torch.from_numpy(np.ascontiguousarray(_cifar_images)).to(device).permute(0, 3, 1, 2).contiguous()
            )
        self._c_cache: tuple[tuple[int, int], Tensor] | None = None
        self._c_host: dict[tuple[int, int], np.ndarray] = {}  # memory-mapped CIFAR-10-C blocks
        # Every batch's row indices, on the device once (a few MB at most), sliced per batch.
        self._offsets = np.cumsum([0] + [len(p) for p in self.plan])
        flat = np.concatenate([p.indices for p in self.plan]) if self.plan else np.zeros(0, np.int64)
        self._flat_idx = torch.from_numpy(flat).to(device)

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def n_images(self) -> int:
        return sum(len(p) for p in self.plan)

    def fingerprint(self) -> str:
        return plan_fingerprint(self.plan)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, batch_index: int) -> Iterator[Batch]:
        """Batches `batch_index`, `batch_index + 1`, ... identical to the same batches of a full iteration."""
        if not 0 <= batch_index <= len(self.plan):
            raise IndexError(
                f"batch_index {batch_index} outside 0..{len(self.plan)} (the stream has {len(self.plan)} batches)"
            )
        tail = self.plan[batch_index:]
        src = self.spec.source
        if src == "cifar10":
            return (self._cifar10_batch(p) for p in tail)
        if src == "cifar10c":
            return (self._cifar10c_batch(p) for p in tail)
        return self._imagenet_batches(tail) if tail else iter(())

    # -- helpers

    def _dev_idx(self, p: BatchPlan) -> Tensor:
        b = p.batch_index
        return self._flat_idx[int(self._offsets[b]) : int(self._offsets[b + 1])]

    def _cifar10_batch(self, p: BatchPlan) -> Batch:
        idx = self._dev_idx(p)
        return self._make(p, self._images[idx], self._y[idx])

    def _make(self, p: BatchPlan, x_uint8: Tensor, y: Tensor) -> Batch:
        x = x_uint8.float().div_(255.0)
        if self.spec.source in ON_THE_FLY:
            x = self._corrupt(p, x)
        return Batch(x, y, p.domain, p.severity, p.batch_index, p.reset_before, p.domain_index, p)

    def _corrupt(self, p: BatchPlan, x: Tensor) -> Tensor:
        from .corruptions import corrupt, make_generator, to_uint8

        groups = p.groups()
        out = x if len(groups) == 1 else torch.empty_like(x)
        for d, s, pos in groups:
            g = make_generator(derive_seed(p.noise_seed, d, s), x.device)
            kw = {"frost_dir": self.frost_dir, "preset": "auto"}
            if len(groups) == 1:
                out = corrupt(x, self.spec.domains[d], s, g, **kw)
            else:
                where = torch.from_numpy(pos).to(x.device)
                out[where] = corrupt(x[where], self.spec.domains[d], s, g, **kw)
        if self.spec.quantize:
            out = to_uint8(out).float().div_(255.0)
        return out

    def _cifar10c_array(self, d: int, s: int) -> np.ndarray:
        from .data.cifar import load_cifar10c

        if (d, s) in self._c_host:
            return self._c_host[(d, s)]
        imgs, labs = load_cifar10c(self.root, self.spec.domains[d], s)
        if len(labs) != len(self.labels) or not np.array_equal(labs, self.labels):
            raise ValueError(
                f"CIFAR-10-C labels for {self.spec.domains[d]} severity {s} differ from those of the first file "
                f"({len(labs)} vs {len(self.labels)} rows); the folder {self.root} mixes incompatible files"
            )
        self._c_host[(d, s)] = imgs
        return imgs

    def _cifar10c_batch(self, p: BatchPlan) -> Batch:
        groups = p.groups()
        y = self._y[self._dev_idx(p)]
        if len(groups) == 1 and self.spec.order != "mixed":
            # Sequential / gradual: one (domain, severity) block at a time lives on the device (30 MB).
            key = (groups[0][0], groups[0][1])
            if self._c_cache is None or self._c_cache[0] != key:
                self._c_cache = None  # free the previous block first
                block = torch.from_numpy(np.array(self._cifar10c_array(*key)))  # read the block into RAM
                self._c_cache = (key, block.to(self.device).permute(0, 3, 1, 2).contiguous())
            return self._make(p, self._c_cache[1][self._dev_idx(p)], y)
        # Mixed: gather each group's rows from the memory-mapped files on the host.
        x = np.empty((len(p), 32, 32, 3), np.uint8)
        for d, s, pos in groups:
            x[pos] = self._cifar10c_array(d, s)[p.indices[pos]]
        xt = torch.from_numpy(x)
        if self.device.type == "cuda":
            xt = xt.pin_memory()
        return self._make(p, xt.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous(), y)

    def _imagenet_batches(self, tail: list[BatchPlan]) -> Iterator[Batch]:
        from .data.imagenet import load_batches

        clean = self.spec.source == "imagenet"
        loader_batches = _PathBatches(self, tail)
        loader = load_batches(
            loader_batches,
            device=self.device,
            crop=self.spec.resolved_image_size if clean else None,
            num_workers=self.num_workers,
        )
        for p, (x, y) in zip(tail, loader):
            yield self._make(p, x, y)


class _PathBatches:
    """The (path, label) lists of planned ImageNet batches, built lazily (a full ImageNet-C plan has 750k paths)."""

    def __init__(self, stream: Stream, tail: list[BatchPlan]) -> None:
        self.stream, self.tail = stream, tail

    def __len__(self) -> int:
        return len(self.tail)

    def __iter__(self) -> Iterator[list[tuple[str, int]]]:
        st = self.stream
        index = st._index
        clean = st.spec.source == "imagenet"
        roots: dict[tuple[int, int], Path] = {}
        for p in self.tail:
            items = []
            for i, d, s in zip(p.indices.tolist(), p.domain_ids.tolist(), p.item_severities.tolist()):
                if clean:
                    base = index.root
                elif (d, s) in roots:
                    base = roots[(d, s)]
                else:
                    base = roots[(d, s)] = st.root / st.spec.domains[d] / str(s)
                items.append((str(base / index.relpaths[i]), int(st.labels[i])))
            yield items


def build_stream(
    spec: StreamSpec,
    *,
    data_root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    frost_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
) -> Stream:
    """The `Stream` of `spec` on `device`, reading its source from `spec.path` or `data_root`.

    data_root: the folder holding the datasets (`cifar-10-batches-py/`, `CIFAR-10-C/`, `ImageNet-C/`,
        `imagenet/val/`); default $TTA_SURGICAL_DATA. `spec.path` (the dataset folder itself) wins.
    frost_dir: frost textures for on-the-fly "frost" (default: the verified download cache).
    num_workers: DataLoader workers for ImageNet sources (default min(8, CPUs)).
    """
    device = torch.device(device)
    root = _resolve_root(spec, data_root)
    src = spec.source
    kw = {"device": device, "root": root, "frost_dir": frost_dir, "num_workers": num_workers}
    if src == "cifar10":
        from .data.cifar import find_cifar10, load_cifar10

        images, labels = load_cifar10(root if root is not None else find_cifar10(None))
        return Stream(spec, labels, _cifar_images=images, **kw)
    if root is None:
        hints = {
            "cifar10c": "the folder of CIFAR-10-C .npy files (Zenodo record 2535967, or `tta-surgical make-cifar10c`)",
            "imagenetc": "the ImageNet-C folder <root>/<corruption>/<severity>/<wnid>/*.JPEG (Zenodo record 2235448)",
            "imagenet": "a clean ImageNet val folder <root>/<wnid>/*.JPEG",
        }
        raise FileNotFoundError(
            f"stream source {src!r} needs data: set stream.path to {hints[src]}, or pass --data-root / set "
            f"$TTA_SURGICAL_DATA to a folder holding {DEFAULT_SUBDIR[src]}/"
        )
    if src == "cifar10c":
        from .data.cifar import load_cifar10c

        first_sev = spec.segments()[0][2] if spec.order != "mixed" else spec.severities[0]
        _, labels = load_cifar10c(root, spec.domains[0], first_sev)
        return Stream(spec, np.asarray(labels, dtype=np.int64), **kw)

    from .data import imagenet

    if src == "imagenetc":
        sevs = gradual_severities(spec.severities) if spec.order == "gradual" else spec.severities
        for d in dict.fromkeys(spec.domains):  # fail now, not after an hour, when a folder is missing
            for s in sevs:
                imagenet.imagenetc_folder(root, d, s)
        index = imagenet.scan_imagenetc(root, spec.domains[0], sevs[0])
    else:
        index = imagenet.scan_image_folder(root)
    return Stream(spec, index.labels, _index=index, **kw)


# ------------------------------------------------------------------------------------------------ YAML


def load_stream_spec(path_or_dict: str | os.PathLike | Mapping) -> StreamSpec:
    """A `StreamSpec` from a YAML file or a mapping: the `stream:` section if present, else the mapping itself.

    Unknown keys are an error that lists the valid ones (a typo must not silently fall back to a default).
    """
    import yaml

    where = "stream spec"
    if isinstance(path_or_dict, Mapping):
        data = path_or_dict
    else:
        where = str(path_or_dict)
        with open(path_or_dict, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping (stream: {{...}}), got {type(data).__name__}")
    if "stream" in data:
        data = data["stream"] or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: the 'stream' section must be a mapping, got {type(data).__name__}")
    valid = [f.name for f in fields(StreamSpec)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ValueError(f"{where}: unknown stream key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    try:
        return StreamSpec(**dict(data))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None
