"""The stream spec: one deployment scenario as typed, frozen data (a run config's `stream:` section, or a file
under `streams/`), checked by the config module's typed loader like every other section."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

from ..corruptions.base import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS
from ..schema import ConfigError, check_fields, from_dict, load_yaml
from .catalog import SOURCES, source_class

__all__ = [
    "CLEAN",
    "DOMAIN_SHORTHANDS",
    "StreamSpec",
    "gradual_severities",
    "load_stream_file",
    "load_stream_spec",
    "stream_section",
]

Order = Literal["sequential", "mixed", "gradual"]
LabelShift = Literal["none", "dirichlet"]
Reset = Literal["per_domain", "never", "every_n", "episodic"]
DOMAIN_SHORTHANDS: dict[str, tuple[str, ...]] = {"all": ALL_CORRUPTIONS, "benchmark": BENCHMARK_CORRUPTIONS}
# The domain of the clean images (no corruption): label-level shift alone (class prior, Dirichlet order).
CLEAN = "none"
# Integer fields and their smallest valid value.
_MINIMUM = {"per_class": 0, "batch_size": 1, "seed": 0, "reset_every": 0, "rounds": 1}


@dataclass(frozen=True)
class StreamSpec:
    """One deployment scenario. Every field has a default: the default is the Tent protocol on CIFAR-10-C.

    source: a registered stream source (`tta_surgical.streams.sources`): "cifar10" (clean CIFAR-10 test set
        corrupted on the fly), "cifar10c" (CIFAR-10-C .npy files), "imagenetc" (ImageNet-C folders), "imagenet"
        (clean ImageNet-style val folder corrupted on the fly), "memory" (images given in Python).
    path: dataset folder; None = the data root (`--data-root` / $TTA_SURGICAL_DATA) + the source's usual
        sub-folder; CIFAR-10 is downloaded into the cache when absent.
    domains: corruption names in stream order, or "all" (19) / "benchmark" (the 15); expanded here. "none" is the
        clean images (no corruption), for a stream whose only shift is label-level.
    severities: 1..5. sequential: each domain at each (domain-major); gradual: the ramp up then down
        over these (sorted); mixed: drawn together.
    order: "sequential" | "mixed" | "gradual".
    label_shift: "none" | "dirichlet"; dirichlet_delta: Dirichlet concentration (small = strongly
        class-correlated order; 0.1 as in RoTTA).
    class_imbalance: a class-prior change: the stream keeps a long-tailed subset of each segment's images in which
        the class at rank r (0 = most frequent; classes ranked in a seeded random order) has relative frequency
        class_imbalance ** (-r / (classes - 1)), so the most frequent class is class_imbalance times as frequent
        as the rarest (CIFAR-10-LT's profile); 1 = the source's frequencies. The subset is as large as the
        source's images allow (the most frequent class keeps all its images) unless n_examples asks for fewer.
    class_prior: explicit relative class frequencies instead (one non-negative weight per class, in label order);
        None = use class_imbalance. Either way the counts per class follow the prior exactly (largest remainder).
    n_examples: images per domain (per severity step for gradual); "all" (or None) = every image the source has.
        0 is an error (it used to mean all; write `all`).
    per_class: > 0 first draws a fixed, seeded subset of that many images per class (e.g. 5 on ImageNet
        = the 5,000-image convention); n_examples then selects from it.
    shuffle: shuffle images within each segment (seeded); None = the source's habit: False for CIFAR (test-set
        order, as the Tent / RobustBench protocol), True for ImageNet (folders are sorted by class).
    batch_size: images per batch. The last batch of a segment may be smaller; when it would hold a single image
        (and batch_size > 1), that image joins the previous batch instead, which then holds batch_size + 1:
        BatchNorm with the statistics of one image is meaningless. Plans without such a batch are unchanged.
    seed: drives every random choice of the plan and the on-the-fly corruption noise.
    reset: "per_domain" (restore the source model at each new segment: Tent's protocol), "never"
        (continual), "every_n" (every `reset_every` batches), "episodic" (before every batch).
    image_size: None = the source's size (32 for CIFAR, 224 for ImageNet); clean ImageNet may use another crop.
    quantize: round on-the-fly corrupted images to the uint8 grid (`to_uint8`), as the official files are stored.
    indices: an explicit set of source rows, in this order, streamed as if they were the whole source (n_examples,
        per_class and shuffle act within it; plan indices are positions in this list); None = every row.
    rounds: the whole domain sequence repeated this many times (1 = once), the same images in the same order with
        the same corruption noise in every round: the 10-round continual protocol (CoTTA, RMT) that exposes slow
        collapse. With rounds > 1, domains are keyed per round in results ("fog/r2") and the summary reports the
        error of each round (`errors_by_round`).
    """

    source: str = "cifar10"
    path: str | None = None
    domains: tuple[str, ...] = BENCHMARK_CORRUPTIONS
    severities: tuple[int, ...] = (5,)
    order: Order = "sequential"
    label_shift: LabelShift = "none"
    dirichlet_delta: float = 0.1
    class_imbalance: float = 1.0
    class_prior: tuple[float, ...] | None = None
    n_examples: int | Literal["all"] | None = None
    per_class: int = 0
    shuffle: bool | None = None
    batch_size: int = 200
    seed: int = 0
    reset: Reset = "per_domain"
    reset_every: int = 0
    image_size: int | None = None
    quantize: bool = True
    indices: tuple[int, ...] | None = None
    rounds: int = 1

    def __post_init__(self) -> None:
        # Imported here: the config module imports this one for its schema.
        self._accept_python_values()
        check_fields(self, "stream")  # the types, exactly as a YAML file or a CLI override is checked
        self._check_values()

    def _put(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _accept_python_values(self) -> None:
        """Conveniences of code and YAML the typed check does not know: path objects, numpy values, shorthands."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                self._put(f.name, value.tolist())
            elif isinstance(value, np.generic):
                self._put(f.name, value.item())
            elif isinstance(value, (list, tuple)) and any(isinstance(v, np.generic) for v in value):
                self._put(f.name, [v.item() if isinstance(v, np.generic) else v for v in value])
        if isinstance(self.path, os.PathLike):
            self._put("path", os.fspath(self.path))
        doms = self.domains
        if isinstance(doms, str):
            doms = (doms,)
        if isinstance(doms, (list, tuple)) and len(doms) == 1 and doms[0] in DOMAIN_SHORTHANDS:
            doms = DOMAIN_SHORTHANDS[doms[0]]  # also ["benchmark"], as a CLI override of a tuple field gives
        self._put("domains", doms)

    def _check_values(self) -> None:
        """Ranges, names and the cross-field rules (types are already checked)."""
        if self.source not in SOURCES:
            raise _error(f"stream.source={self.source!r} is not valid; choose one of: {', '.join(SOURCES.names())}")
        if not self.domains:
            raise _error(
                f"stream.domains must be a non-empty list of corruption names or one of {', '.join(DOMAIN_SHORTHANDS)}"
            )
        bad = [d for d in self.domains if d not in ALL_CORRUPTIONS and d != CLEAN]
        if bad:
            raise _error(
                f"stream.domains: unknown corruption(s) {', '.join(map(repr, bad))}; choose one of: "
                f"{', '.join(ALL_CORRUPTIONS)}, {CLEAN} (clean images); shorthands {', '.join(DOMAIN_SHORTHANDS)}"
            )
        if not self.severities or any(not 1 <= s <= 5 for s in self.severities):
            raise _error(f"stream.severities must be a non-empty list of integers in 1..5, got {list(self.severities)}")
        if not (self.dirichlet_delta > 0 and math.isfinite(self.dirichlet_delta)):
            raise _error(f"stream.dirichlet_delta must be a positive finite number, got {self.dirichlet_delta}")
        self._check_class_prior()
        self._check_n_examples()
        for name, lo in _MINIMUM.items():
            if getattr(self, name) < lo:
                raise _error(f"stream.{name} must be an integer >= {lo}, got {getattr(self, name)}")
        if self.reset == "every_n" and self.reset_every < 1:
            raise _error("stream.reset 'every_n' needs stream.reset_every >= 1 (the number of batches between resets)")
        if self.reset == "per_domain" and self.order == "mixed":
            raise _error(
                "stream.reset=per_domain with stream.order=mixed: a mixed stream has no domain boundary; set "
                "stream.reset to never, every_n or episodic"
            )
        self._check_image_size()
        if self.indices is not None:
            if not self.indices or min(self.indices) < 0 or len(set(self.indices)) != len(self.indices):
                raise _error("stream.indices must be a non-empty list of distinct row numbers >= 0, or null (all rows)")

    def _check_n_examples(self) -> None:
        """`all` (or null) = every image, stored as None (so configs that said null keep their meaning and hash)."""
        if self.n_examples == "all":
            self._put("n_examples", None)
        elif self.n_examples is not None and self.n_examples < 1:
            hint = " (0 no longer means all)" if self.n_examples == 0 else ""
            raise _error(
                f"stream.n_examples={self.n_examples} selects no images{hint}; write stream.n_examples=all for every "
                "image, or a positive number of images per domain"
            )

    def _check_class_prior(self) -> None:
        if not (self.class_imbalance >= 1.0 and math.isfinite(self.class_imbalance)):
            raise _error(
                f"stream.class_imbalance must be a finite number >= 1 (1 = unchanged), got {self.class_imbalance}"
            )
        if self.class_prior is not None:
            if self.class_imbalance != 1.0:
                raise _error("stream.class_prior and stream.class_imbalance both set a class prior; set only one")
            w = self.class_prior
            if not w or any(not (v >= 0 and math.isfinite(v)) for v in w) or sum(w) <= 0:
                raise _error(f"stream.class_prior must be weights >= 0 with a positive finite sum, got {list(w)}")

    def _check_image_size(self) -> None:
        if self.image_size is None:
            return
        if self.image_size < 1:
            raise _error(f"stream.image_size must be a positive integer or null (auto), got {self.image_size}")
        fixed = source_class(self.source).image_size
        if fixed is not None and self.image_size != fixed:
            raise _error(
                f"stream.image_size {self.image_size} does not fit source {self.source!r}, whose images are "
                f"{fixed}x{fixed}; leave it null (auto)"
            )

    # -- resolved views (kept lazy so `dataclasses.replace(spec, source=...)` stays consistent)

    @property
    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        cls = source_class(self.source)
        return cls.image_size if cls.image_size is not None else cls.default_image_size

    @property
    def resolved_shuffle(self) -> bool:
        return source_class(self.source).shuffle_by_default if self.shuffle is None else self.shuffle

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


def _error(message: str) -> ValueError:
    return ConfigError(message)


def gradual_severities(severities: tuple[int, ...] = (1, 2, 3, 4, 5)) -> tuple[int, ...]:
    """Up then down over the sorted severities: (1, 2, 3, 4, 5) -> (1, 2, 3, 4, 5, 4, 3, 2, 1)."""
    up = sorted(set(severities))
    return tuple(up + up[-2::-1])


def load_stream_spec(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> StreamSpec:
    """A `StreamSpec` from a stream YAML file (one top-level `stream:` section, read by `load_stream_file` exactly as
    `config.load_config(stream=...)` reads it) or a mapping (that section, with or without the `stream:` key).

    Unknown keys and wrong types fail with the dotted key and the valid choices, prefixed with the file name.
    """
    if isinstance(path_or_dict, Mapping):
        where = "stream spec"
        section = stream_section(path_or_dict, where) if "stream" in path_or_dict else path_or_dict
    else:
        where = str(path_or_dict)
        section = load_stream_file(path_or_dict)
    try:
        return from_dict(StreamSpec, section, "stream")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def stream_section(data: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The fields of a stream file's mapping, which holds exactly one top-level `stream:` section."""
    if set(data) != {"stream"}:
        extra = sorted(set(data) - {"stream"})
        hint = f"unexpected top-level keys {extra}" if extra else "no top-level 'stream:' key"
        raise ConfigError(f"{where}: a stream file holds exactly one top-level 'stream:' section ({hint})")
    section = data["stream"] or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: 'stream:' must be a mapping of stream fields, got {section!r}")
    return section


def load_stream_file(path: str | os.PathLike) -> Mapping[str, Any]:
    """The `stream:` section of a stream YAML (`streams/*.yaml`): the one reader of stream files."""
    return stream_section(load_yaml(path, "stream file"), str(path))
