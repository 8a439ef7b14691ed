"""Model zoo, weight registry and block maps.

Public API (see each function's docstring):

- `create_model(name, *, pretrained=True, data=None, allow_random=False, num_classes=None, checkpoint=None,
  mean="auto", std="auto") -> (nn.Module, ModelInfo)`: build a registered architecture, or a `torchvision:<name>`,
  `timm:<name>` or `module:<python.path>:<factory>` one (`external.py`), and load its weights;
  `create_model_from_config(model_cfg, data)` does the same from a config's `model:` section.
- `MODELS`: the registry of model names -> `ModelEntry` (builder and metadata).
- `WEIGHTS`: the registry of weight names -> `WeightSpec` (file, url, sha256, loader).
- `load_checkpoint(model, path)`: load a local checkpoint strictly (tolerating missing `num_batches_tracked`).
- Block maps: `block_map`, `unit_map`, `block_names`, `unit_names`, `resolve_blocks`, `select_params`,
  `norm_layers`, `BlockSpec`, `register_block_spec`; inferred for other models (`infer_block_spec`) or given as
  data (`set_block_map`, `load_block_map`); `BlockTable` is the printable per-block view.

Every model takes float images in [0, 1], shape (B, 3, H, W), and normalises inside the model with
non-persistent buffers, so `state_dict()` keys are exactly the published checkpoint's.
"""

from __future__ import annotations

from .blocks import (
    BlockSpec,
    block_map,
    block_names,
    block_spec,
    block_spec_source,
    norm_layers,
    register_block_spec,
    resolve_blocks,
    select_params,
    unit_map,
    unit_names,
)
from .infer import BlockInferenceError, infer_block_spec
from .overrides import BlockMapError, load_block_map, set_block_map, spec_from_mapping
from .table import BlockTable
from .weights import WEIGHTS, WeightSpec, load_checkpoint
from .zoo import MODELS, ModelEntry, ModelInfo, create_model, create_model_from_config

__all__ = [
    "MODELS",
    "WEIGHTS",
    "BlockInferenceError",
    "BlockMapError",
    "BlockSpec",
    "BlockTable",
    "ModelEntry",
    "ModelInfo",
    "WeightSpec",
    "block_map",
    "block_names",
    "block_spec",
    "block_spec_source",
    "create_model",
    "create_model_from_config",
    "infer_block_spec",
    "load_block_map",
    "load_checkpoint",
    "norm_layers",
    "register_block_spec",
    "resolve_blocks",
    "select_params",
    "set_block_map",
    "spec_from_mapping",
    "unit_map",
    "unit_names",
]
