"""Model zoo, weight registry and block maps.

Public API (see each function's docstring):

- `create_model(name, *, pretrained=True, data_root=None, allow_random=False, num_classes=None)
  -> (nn.Module, ModelInfo)`: build a registered architecture and load its weights.
- `MODELS`: the registry of model names -> `ModelEntry` (builder and metadata).
- `WEIGHTS`: the registry of weight names -> `WeightSpec` (file, url, sha256, loader).
- `load_checkpoint(model, path)`: load a local checkpoint strictly (tolerating missing `num_batches_tracked`).
- Block maps: `block_map`, `unit_map`, `block_names`, `unit_names`, `resolve_blocks`, `select_params`,
  `norm_layers`, `BlockSpec`, `register_block_spec`.

Every model takes float images in [0, 1], shape (B, 3, H, W), and normalises inside the model with
non-persistent buffers, so `state_dict()` keys are exactly the published checkpoint's.
"""

from __future__ import annotations

from .blocks import (
    BlockSpec,
    block_map,
    block_names,
    block_spec,
    norm_layers,
    register_block_spec,
    resolve_blocks,
    select_params,
    unit_map,
    unit_names,
)
from .weights import WEIGHTS, WeightSpec, load_checkpoint
from .zoo import MODELS, ModelEntry, ModelInfo, create_model

__all__ = [
    "MODELS",
    "WEIGHTS",
    "BlockSpec",
    "ModelEntry",
    "ModelInfo",
    "WeightSpec",
    "block_map",
    "block_names",
    "block_spec",
    "create_model",
    "load_checkpoint",
    "norm_layers",
    "register_block_spec",
    "resolve_blocks",
    "select_params",
    "unit_map",
    "unit_names",
]
