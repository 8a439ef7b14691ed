"""The batch plan: a pure, seeded function of a `StreamSpec` and the source labels -> `list[BatchPlan]`.

The plan is the exact (domain, severity, image index) of every image of every batch and where the model
resets. It never touches images or a device, so every method (and every device) sees the identical order for
the same seed, and the plan can be fingerprinted and logged (`plan_fingerprint`).

Orders: "sequential" (each domain at each listed severity, domain after domain in the listed order:
domain-major), "gradual" (per domain the severities rise and fall, 1,2,3,4,5,4,3,2,1 for all five, as in
the gradual continual-TTA protocol of CoTTA), "mixed" (every (domain, severity, image) draw shuffled
together). Label shift "dirichlet" reorders the images of each segment into a class-correlated temporal
order (the NOTE / RoTTA protocol; see `dirichlet_order`). A class-prior change (`class_imbalance`,
`class_prior`) keeps a subset of the images whose class frequencies follow the prior (`class_prior_counts`).

Two rules keep batches meaningful without changing any other plan: a segment's last batch that would hold a
single image is merged into the previous batch (`batch_bounds`), and `spec.rounds` repeats the whole sequence,
each round a copy of the first (same images, order and noise seeds) with its own `round`, batch and domain indices.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..data.imagenet import subset_per_class

if TYPE_CHECKING:
    from .spec import StreamSpec

__all__ = [
    "BatchPlan",
    "batch_bounds",
    "class_prior",
    "class_prior_counts",
    "derive_seed",
    "dirichlet_order",
    "plan_fingerprint",
    "plan_stream",
    "select_images",
]

# Tags that keep the random streams of the planner independent of each other.
_TAG_SUBSET, _TAG_SELECT, _TAG_ORDER, _TAG_MIXED, _TAG_DIRICHLET, _TAG_NOISE, _TAG_PRIOR = 1, 2, 3, 4, 5, 6, 7


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """One planned batch: which images, from which domain(s) and severity(ies), and the reset before it.

    indices: int64 (B,) rows of the source set (the CIFAR-10 test set, a CIFAR-10-C severity block, the
        scanned ImageNet file list); with `spec.indices`, positions in that explicit list. domain_ids /
        item_severities: per image, the position in `spec.domains` and the severity (constant unless the stream
        is mixed). domain / severity: the batch's domain name and severity, "mixed" / 0 when a mixed batch holds
        several.
    noise_seed: seed of the on-the-fly corruption noise, derived from (spec.seed, batch index within the round).
    round: which repetition of the domain sequence (0-based; `spec.rounds`); domain_index keeps counting across
        rounds, so a per_domain reset also happens where a round starts.
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
    round: int = 0

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


def class_prior(spec: StreamSpec, n_classes: int) -> np.ndarray | None:
    """The target class frequencies of `spec` (sum 1, one per class in label order), or None when unchanged.

    `class_prior` as given (normalised), else the seeded long tail of `class_imbalance`: the classes in a random
    order drawn from `spec.seed`, the class at rank r with weight class_imbalance ** (-r / (n_classes - 1)).
    """
    if spec.class_prior is not None:
        w = np.asarray(spec.class_prior, dtype=np.float64)
        if len(w) != n_classes:
            raise ValueError(
                f"stream.class_prior has {len(w)} weights but the stream's images have {n_classes} classes"
            )
        return w / w.sum()
    if spec.class_imbalance == 1.0 or n_classes < 2:
        return None
    rank_of_class = _rng(spec.seed, _TAG_PRIOR).permutation(n_classes)
    w = float(spec.class_imbalance) ** (-rank_of_class / (n_classes - 1))
    return w / w.sum()


def class_prior_counts(available: np.ndarray, prior: np.ndarray, total: int | None = None) -> np.ndarray:
    """Images to keep per class so that their shares follow `prior`: `total` images (None = as many as the
    available counts allow, i.e. the largest total whose every class fits), apportioned by largest remainder."""
    available = np.asarray(available, dtype=np.int64)
    prior = np.asarray(prior, dtype=np.float64)
    used = prior > 0
    most = int(np.floor(np.min(available[used] / prior[used]) + 1e-9)) if used.any() else 0
    if total is None:
        total = most
    elif total > most:
        raise ValueError(
            f"stream.n_examples = {total} images with this class prior needs more images of some class than the "
            f"source has (at most {most} fit); lower n_examples or set it to all (as many as fit)"
        )
    exact = prior * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:  # the largest remainders get one more (ties: lower class index), never past what is available
        room = np.flatnonzero(counts < available)
        order = room[np.argsort(-(exact - counts)[room], kind="stable")]
        counts[order[:short]] += 1
    return counts


def _prior_subset(spec: StreamSpec, labels: np.ndarray, pool: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The rows of `pool` kept by the class prior (seeded choice within each class, or the first rows of each
    class when the stream keeps the stored order), sorted. n_examples sets the total."""
    classes = np.unique(labels)
    pool_labels = labels[pool]
    available = np.array([(pool_labels == c).sum() for c in classes])
    counts = class_prior_counts(available, prior, spec.n_examples)
    rng = _rng(spec.seed, _TAG_PRIOR, 1)
    kept = []
    for c, k in zip(classes, counts.tolist()):
        members = pool[pool_labels == c]
        kept.append(rng.choice(members, k, replace=False) if spec.resolved_shuffle else members[:k])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def select_images(spec: StreamSpec, labels: np.ndarray) -> np.ndarray:
    """The source rows every segment uses (the same images in every domain, so domains are comparable)."""
    n = len(labels)
    pool = np.arange(n, dtype=np.int64)
    if spec.per_class:
        pool = subset_per_class(labels, spec.per_class, derive_seed(spec.seed, _TAG_SUBSET))
    prior = class_prior(spec, len(np.unique(labels)))
    if prior is not None:
        return _prior_subset(spec, labels, pool, prior)
    if spec.n_examples is not None:
        if spec.n_examples > len(pool):
            what = f"{spec.per_class} per class = {len(pool)}" if spec.per_class else f"{len(pool)}"
            raise ValueError(
                f"stream.n_examples = {spec.n_examples} but the source offers only {what} images; "
                "lower n_examples or set it to all"
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


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of the batches of a segment of `n` images: `batch_size` each, the last one smaller, except that
    a last batch of a single image (with batch_size > 1) joins the previous one, which then holds batch_size + 1
    (BatchNorm with the statistics of one image is meaningless). A segment of one image stays one batch."""
    starts = list(range(0, n, batch_size))
    if batch_size > 1 and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(a, starts[i + 1] if i + 1 < len(starts) else n) for i, a in enumerate(starts)]


def plan_stream(spec: StreamSpec, labels: np.ndarray) -> list[BatchPlan]:
    """The explicit, seeded batch plan of `spec` over a source set with these `labels` (pure; no I/O, no device).

    Identical inputs give an identical plan (compare with `plan_fingerprint`). Batches never straddle
    segments (a sequential / gradual batch has one domain and one severity); a mixed stream is one segment.
    A segment's single-image last batch is merged into the previous batch (`batch_bounds`). With `spec.rounds`
    > 1 the round's batches repeat (same images, order and noise seeds), domain_index continuing across rounds.
    reset_before is False for batch 0 (every run starts from the source model) and otherwise follows
    `spec.reset`: per_domain = first batch of each new domain_index, every_n = batch_index % reset_every
    == 0, episodic = every batch, never = none.
    """
    labels = _check_labels(labels)
    rows = _one_round(spec, labels)
    n_blocks = 1 + max((block for block, *_ in rows), default=0)
    plans = []
    prev_block = 0
    for b in range(len(rows) * spec.rounds):
        r, b0 = divmod(b, len(rows))
        block, idx, dom, sev = rows[b0]
        block += r * n_blocks
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
                noise_seed=derive_seed(spec.seed, _TAG_NOISE, b0),  # = batch_index in the first round
                round=r,
            )
        )
    return plans


_Row = tuple[int, np.ndarray, np.ndarray, np.ndarray]  # (domain_index, indices, domain_ids, severities)


def _one_round(spec: StreamSpec, labels: np.ndarray) -> list[_Row]:
    """The batches of one pass over the domain sequence, as rows of `plan_stream`."""
    chosen = select_images(spec, labels)
    rows: list[_Row] = []

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
        for a, e in batch_bounds(len(img), spec.batch_size):
            rows.append((0, img[a:e], dom[a:e], sev[a:e]))
    else:
        for k, (block, d, s) in enumerate(spec.segments()):
            idx = chosen
            if spec.resolved_shuffle:
                idx = _rng(spec.seed, _TAG_ORDER, k).permutation(idx)
            idx = reorder(idx, k)
            for a, e in batch_bounds(len(idx), spec.batch_size):
                part = idx[a:e]
                rows.append((block, part, np.full(len(part), d, np.int64), np.full(len(part), s, np.int64)))
    return rows


def plan_fingerprint(plan: list[BatchPlan]) -> str:
    """SHA-256 over every field of the plan: equal fingerprints = identical streams (log it next to results)."""
    h = hashlib.sha256()
    for p in plan:
        h.update(f"{p.batch_index}|{p.domain_index}|{p.domain}|{p.severity}|{p.reset_before}|{p.noise_seed}|".encode())
        if p.round:  # later rounds only: the first round (every plan with rounds=1) hashes as it always did
            h.update(f"round {p.round}|".encode())
        for a in (p.indices, p.domain_ids, p.item_severities):
            h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
            h.update(b"/")
    return h.hexdigest()
