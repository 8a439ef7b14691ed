"""tta-surgical: online and supervised surgical adaptation of pretrained vision models to distribution shift.

The top-level functions work on your own model and tensors; `import tta_surgical` stays light (torch and the
subpackages are imported when a function is first called):

    adapted = tta_surgical.adapt(model, method="tent", blocks=["block1"])   # online adaptation, any method
    logits = adapted(x)                                 # per batch: predict, then adapt the chosen blocks
    table = tta_surgical.blocks(model)                  # the block map: input, block1..N, head (+ units)
    x_c = tta_surgical.corrupt(x, "fog", severity=3, seed=0)   # CIFAR-10-C / ImageNet-C corruption of a batch
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn

    from .api import Adapted
    from .models import BlockSpec, BlockTable

from ._version import __version__ as __version__  # re-exported: tta_surgical.__version__

__all__ = ["adapt", "blocks", "corrupt"]


def adapt(model: nn.Module, method: str = "tent", **kwargs: object) -> Adapted:
    """Prepare `model` for online adaptation with `method` (any registered method) and return a callable wrapper:
    `adapted(x)` gives the logits of batch `x` and adapts the chosen blocks. See `tta_surgical.api.adapt` for every
    argument (`blocks`, `kind`, `optim`, `block_map`, `precision`, `seed`, the method's own settings)."""
    from .api import adapt as _adapt

    return _adapt(model, method, **kwargs)  # type: ignore[arg-type]


def blocks(
    model: nn.Module, block_map: Mapping[str, object] | str | os.PathLike | BlockSpec | None = None
) -> BlockTable:
    """The block table of `model`: iterate it for the block names in order (`input`, `block1`, ..., `head`);
    `table["block1"]` (or `table.params("block1")`) is that block's `(name, Parameter)` list, `table.numel(...)`
    its size, `table.units("block1")` its residual units, `print(table)` the whole table.

    The map is the model's own (zoo models), inferred from its structure (torchvision / timm ResNet, RegNet,
    MobileNet, EfficientNet, ConvNeXt, ViT, Swin, and look-alikes), or `block_map`: a mapping such as
    `{"input": ["conv1", "bn1"], "block1": ["layer1"], ..., "head": ["fc"]}` (optionally with units
    `"block1.0": [...]`) or the path of a YAML file holding one. A given map is validated (every parameter in
    exactly one block) and attached to `model`, so later selections on this model use it.
    """
    from .models import BlockTable, set_block_map

    set_block_map(model, block_map)
    return BlockTable(model)


def corrupt(
    x: torch.Tensor,
    name: str,
    severity: int,
    seed: int | None = 0,
    *,
    generator: torch.Generator | None = None,
    preset: str = "auto",
    frost_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Corrupt a batch of your own images with a CIFAR-10-C / ImageNet-C corruption (`tta_surgical.corruptions`).

    x: float tensor (B, 3, H, W) with values in [0, 1], on the CPU or a GPU (the result stays there).
    name: one of the 15 benchmark corruptions (`gaussian_noise`, ..., `fog`, ..., `jpeg_compression`) or the
    4 extra ones; severity: 1..5. The same seed gives the same output (pass `generator` instead to continue
    one random stream across calls; then leave `seed` None). preset `auto` picks the CIFAR parameter table
    for images up to 64 px a side, else ImageNet's. `frost` reads its textures from `frost_dir`, else
    `$TTA_SURGICAL_DATA/frost`, else the verified download cache. Wrong shapes, dtypes, value ranges and
    unknown names raise errors that say what is expected.
    """
    from .corruptions import corrupt as _corrupt
    from .corruptions.textures import default_frost_dir

    if generator is not None and seed == 0:
        seed = None  # the default seed yields to an explicit generator
    return _corrupt(x, name, severity, generator, seed=seed, preset=preset, frost_dir=default_frost_dir(frost_dir))
