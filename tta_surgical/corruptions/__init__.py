"""The 15 + 4 CIFAR-10-C / ImageNet-C corruptions as batched, seeded torch functions.

    from tta_surgical.corruptions import corrupt
    y = corrupt(x, "fog", severity=5, seed=0)      # x: float (B, 3, H, W) in [0, 1], any device
"""

from . import blur, digital, noise, weather  # noqa: F401  (importing registers the corruptions)
from .base import (
    ALL_CORRUPTIONS,
    BENCHMARK_CORRUPTIONS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    CorruptionOptions,
    check_images,
    check_severity,
    corrupt,
    make_generator,
    resolve_preset,
    to_uint8,
)

__all__ = [
    "ALL_CORRUPTIONS",
    "BENCHMARK_CORRUPTIONS",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "CorruptionOptions",
    "check_images",
    "check_severity",
    "corrupt",
    "make_generator",
    "resolve_preset",
    "to_uint8",
]
