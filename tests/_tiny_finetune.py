"""The tiny supervised fine-tuning run the finetune and claim tests share: 200 CIFAR-10-C images per domain,
20 training images, one epoch, one learning rate, one seed, on the CPU (seconds per cell)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tta_surgical.finetune import FinetuneConfig, load_finetune_config

REPO = Path(__file__).resolve().parents[1]
CIFAR10C_CONFIG = REPO / "configs" / "finetune_cifar10c.yaml"
TINY = [
    "finetune.limit=200",
    "finetune.generation_batch_size=100",
    "finetune.n_train=20",
    "finetune.n_val_per_class=1",
    "finetune.n_test_per_class=2",
    "finetune.epochs=1",
    "finetune.lrs=[1e-3]",
    "finetune.batch_size=10",
    "finetune.seeds=[0]",
    "runtime.device=cpu",
    "runtime.progress=false",
]


def tiny_cfg(*extra: str, base: Sequence[str] = TINY) -> FinetuneConfig:
    """`configs/finetune_cifar10c.yaml` with the `base` overrides (default: `TINY`), then `extra`."""
    return load_finetune_config(CIFAR10C_CONFIG, [*base, *extra])
