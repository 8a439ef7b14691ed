"""The `finetune` config: sections `model`, `finetune`, `runtime`, read with the schema layer's typed loader.

Defaults are the supervised protocol of surgical fine-tuning (Lee et al., ICLR 2023; REFERENCE.md §1) on
CIFAR-10-C: severity 5, 1,000 labeled target images (100 per class) for training, 10 per class for validation,
90 per class for test; Adam with weight decay 1e-4, learning rates {1e-1, ..., 1e-5}, batch 64, 15 epochs,
BatchNorm in eval mode with the source statistics, three seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..corruptions.base import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS
from ..models.config import ModelConfig
from ..runtime import RuntimeConfig
from ..schema import ConfigError, apply_overrides, from_dict, load_yaml
from ..streams import SOURCES, source_class
from .tasks import CLEAN, TASKS

__all__ = [
    "AUTO_OPTIONS",
    "BN_MODES",
    "FinetuneConfig",
    "FinetuneSection",
    "load_finetune_config",
]

AUTO_OPTIONS = ("auto-rgn", "auto-snr")
BN_MODES = ("source", "batch")
KINDS = ("all", "norm", "conv")
_SHORTHANDS = {"all": ALL_CORRUPTIONS, "benchmark": BENCHMARK_CORRUPTIONS}


@dataclass(frozen=True)
class FinetuneSection:
    """What is fine-tuned, on which labeled target data, and how.

    task: the target task (`tta_surgical.finetune.tasks`): `corruption` (the source's labels) or `cifar_flip`
        (the paper's CIFAR-Flip relabelling y -> 9 - y); the images are still chosen by `corruptions`.
    options: one cell per option: a block spec `resolve_blocks` accepts (`input`, `block1`, `block1-2`,
        `block1.0`, `head`, `all`, or a comma list `input,block1`), or `auto-rgn` / `auto-snr`.
    kind: which tensors of the chosen blocks train (`all`, `norm`, `conv`); also the candidate set of the
        auto options.
    corruptions: corruption names, `none` (the clean images; source cifar10 only), or `benchmark` (the 15) /
        `all` (19).
    source: `cifar10` = the clean CIFAR-10 test set corrupted by our engine exactly as `make-cifar10c` does
        (batches of `generation_batch_size` images, seeds `batch_seed(generation_seed, c, s, start)`, uint8
        rounding), so the images equal `make-cifar10c --seed generation_seed` files on the same device;
        `cifar10c` = an official-layout CIFAR-10-C folder; `imagenetc` = an ImageNet-C folder.
    path: the dataset folder; None = the data root (`--data-root`), + `CIFAR-10-C/` or `ImageNet-C/`.
    limit: use only the first N source images (`make-cifar10c --limit N`); None = all. For quick runs.
    n_train: labeled training images, class-balanced (n_train / classes per class; must divide evenly).
    n_val_per_class, n_test_per_class: the disjoint validation and test splits.
    train_budget: train on only this many of the n_train labeled images (class-balanced, the first
        train_budget / classes of each class's training images, so smaller budgets are subsets of larger ones);
        the split (and so the validation and test images) stays that of n_train. None = all n_train (budget curves).
    bn_mode: `source` (BatchNorm in eval mode with the source running statistics: the paper's default) or
        `batch` (BatchNorm normalises with each batch's statistics, in training and evaluation, and never
        updates the running statistics).
    snr_threshold: auto-snr freezes tensors whose normalised SNR score is below it.
    rgn_batches: auto-rgn averages the relative gradient norms over the first N training batches of each epoch.
    eval_batch_size: batch size of the validation / test passes (changes nothing in `source` BN mode).
    """

    task: str = "corruption"
    options: tuple[str, ...] = ("input", "block1", "block2", "block3", "head", "all", "auto-rgn", "auto-snr")
    kind: str = "all"
    corruptions: tuple[str, ...] = BENCHMARK_CORRUPTIONS
    severity: int = 5
    source: str = "cifar10"
    path: str | None = None
    limit: int | None = None
    generation_seed: int = 0
    generation_batch_size: int = 1000
    lrs: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
    weight_decay: float = 1e-4
    epochs: int = 15
    batch_size: int = 64
    eval_batch_size: int = 256
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 1000
    n_val_per_class: int = 10
    n_test_per_class: int = 90
    train_budget: int | None = None
    bn_mode: str = "source"
    snr_threshold: float = 0.5
    rgn_batches: int = 5

    def __post_init__(self) -> None:
        self._check_options()
        self._check_data()
        self._check_protocol()

    def _check_options(self) -> None:
        """What is tuned: the options and the kind of tensors."""
        if not self.options:
            raise ConfigError("finetune.options must list at least one option (e.g. [block1, all, auto-rgn])")
        if len(set(self.options)) != len(self.options):
            raise ConfigError(f"finetune.options has duplicates: {list(self.options)}")
        for o in self.options:
            if not isinstance(o, str) or not o.strip():
                raise ConfigError(f"finetune.options: every option must be a non-empty string, got {o!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"finetune.kind={self.kind!r} is not valid; choose one of: {', '.join(KINDS)}")

    def _check_data(self) -> None:
        """The target task, its images (corruptions, severity, source) and the split sizes."""
        if self.task not in TASKS:
            raise ConfigError(f"finetune.task={self.task!r} is not valid; choose one of: {', '.join(TASKS.names())}")
        doms = self.corruptions
        if len(doms) == 1 and doms[0] in _SHORTHANDS:
            doms = _SHORTHANDS[doms[0]]
        bad = [d for d in doms if d not in ALL_CORRUPTIONS and d != CLEAN]
        if not doms or bad:
            raise ConfigError(
                f"finetune.corruptions: unknown {bad or 'empty list'}; valid: {CLEAN} (clean images), "
                f"{', '.join(ALL_CORRUPTIONS)} (or {', '.join(_SHORTHANDS)})"
            )
        if len(set(doms)) != len(doms):
            raise ConfigError(f"finetune.corruptions has duplicates: {list(doms)}")
        object.__setattr__(self, "corruptions", tuple(doms))
        if not 1 <= self.severity <= 5:
            raise ConfigError(f"finetune.severity must be in 1..5, got {self.severity}")
        # Any stream source that can serve a labeled split (`Source.stored_images`) can be fine-tuned on.
        serving = [name for name in SOURCES.names() if SOURCES.get(name).serves_split()]
        if self.source not in serving:
            raise ConfigError(f"finetune.source={self.source!r} is not valid; choose one of: {', '.join(serving)}")
        if CLEAN in doms and not source_class(self.source).corrupts_on_the_fly:
            clean = [name for name in serving if SOURCES.get(name).corrupts_on_the_fly]
            raise ConfigError(
                f"finetune.corruptions: {CLEAN!r} (the clean images) needs finetune.source={' or '.join(clean)} "
                "(a source that holds the clean images)"
            )
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"finetune.limit must be >= 1 or null (all images), got {self.limit}")
        if self.n_train < 1:
            raise ConfigError(f"finetune.n_train must be >= 1 (the labeled training set is empty), got {self.n_train}")
        for name in ("n_val_per_class", "n_test_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"finetune.{name} must be >= 1 (selection and evaluation need it), got {getattr(self, name)}"
                )
        if self.train_budget is not None and not 1 <= self.train_budget <= self.n_train:
            raise ConfigError(
                f"finetune.train_budget must lie in 1..n_train={self.n_train} (or null: all), got {self.train_budget}"
            )

    def _check_protocol(self) -> None:
        """The optimisation: BatchNorm mode, learning rates, seeds, sizes, auto-SNR threshold."""
        if self.bn_mode not in BN_MODES:
            raise ConfigError(f"finetune.bn_mode={self.bn_mode!r} is not valid; choose one of: {', '.join(BN_MODES)}")
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise ConfigError(f"finetune.lrs must be a non-empty list of positive numbers, got {list(self.lrs)}")
        if len(set(self.lrs)) != len(self.lrs):
            raise ConfigError(f"finetune.lrs has duplicates: {list(self.lrs)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError(f"finetune.seeds must be distinct integers >= 0, got {list(self.seeds)}")
        if self.weight_decay < 0:
            raise ConfigError(f"finetune.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("epochs", "batch_size", "eval_batch_size", "rgn_batches", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"finetune.{name} must be >= 1, got {getattr(self, name)}")
        if not (0.0 <= self.snr_threshold <= 1.0):
            raise ConfigError(
                f"finetune.snr_threshold must lie in [0, 1] (scores are normalised), got {self.snr_threshold}"
            )


@dataclass(frozen=True)
class FinetuneConfig:
    """One supervised few-shot experiment: model x finetune protocol x runtime."""

    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def load_finetune_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> FinetuneConfig:
    """Read a finetune YAML (sections model, finetune, runtime; unknown keys raise) and apply dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    return apply_overrides(from_dict(FinetuneConfig, data), overrides)
