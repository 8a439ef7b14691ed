"""Online test-time adaptation methods: one module per method, each registered in `METHODS` by name.

- `source`: the unadapted model (baseline).
- `norm`: test-batch BatchNorm statistics, optionally mixed with the source ones (prior strength N).
- `tent`: entropy minimisation on the affine parameters of every norm layer, test-batch statistics.
- `surgical`: the same objective on the parameters of chosen blocks (`method.blocks`, `method.kind`),
  with test-batch or source BatchNorm statistics (`method.bn_stats`).

Every module in this package is imported here, so each method registers itself (`@register_method`); adding a
method is adding a module (and a YAML under `configs/`). `tta-surgical methods` lists them with their settings.
Use `build_method(model, cfg.method, cfg.optim, autocast_dtype=...)` after placing the model on its device.
"""

from __future__ import annotations

import importlib
import pkgutil

from . import base
from .base import *  # noqa: F403 - the Method interface, re-exported as base.__all__ lists it
from .bn import batchnorm_layers, mixed_batch_norm, set_bn_stats
from .losses import entropy, entropy_per_sample

# Modules that hold shared machinery rather than a method.
_NOT_METHODS = {"base", "bn", "losses", "augment", "selection", "signals"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):  # noqa: F405 - the package path
    if _info.name not in _NOT_METHODS and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    *base.__all__,
    "batchnorm_layers",
    "entropy",
    "entropy_per_sample",
    "mixed_batch_norm",
    "set_bn_stats",
]
