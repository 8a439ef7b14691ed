"""Online test-time adaptation methods: one small class per method, chosen by name from `METHODS`.

- `source`: the unadapted model (baseline).
- `norm`: test-batch BatchNorm statistics, optionally mixed with the source ones (prior strength N).
- `tent`: entropy minimisation on the affine parameters of every norm layer, test-batch statistics.
- `surgical`: the same objective on the parameters of chosen blocks (`method.blocks`, `method.kind`),
  with test-batch or source BatchNorm statistics (`method.bn_stats`).

Use `build_method(model, cfg.method, cfg.optim, autocast_dtype=...)` after placing the model on its device.
"""

from __future__ import annotations

from . import entropy_min, norm, source  # noqa: F401  (registers the methods)
from .base import METHODS, Method, build_method, build_optimizer, resolve_autocast_dtype
from .bn import batchnorm_layers, mixed_batch_norm, set_bn_stats
from .entropy_min import EntropyMinimization
from .losses import entropy
from .norm import Norm
from .source import Source

__all__ = [
    "METHODS",
    "EntropyMinimization",
    "Method",
    "Norm",
    "Source",
    "batchnorm_layers",
    "build_method",
    "build_optimizer",
    "entropy",
    "mixed_batch_norm",
    "resolve_autocast_dtype",
    "set_bn_stats",
]
