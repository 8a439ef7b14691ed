"""Block maps: named, ordered groups of parameters (`input`, `block1..N`, `head`) and finer residual units.

Surgical adaptation chooses *which* parameters adapt by block name, so every architecture declares
its blocks explicitly as dotted name prefixes, matched on whole components (`layer1` matches
`layer1.0.conv1.weight` but never `layer10.conv.weight`). Every parameter must fall in exactly one
block: a parameter that matches none or several is an error naming it, never a silent catch-all.

Two granularities share one vocabulary:

- blocks: `input`, `block1`, ..., `blockN`, `head` (the stages of the network);
- units: `input`, `block1.0`, `block1.1`, ..., `head` (single residual units; `blockK.i` is unit i of
  block K), for finer surgery.

Architectures provide a spec either with a `block_spec()` method (the models in this package) or
through `register_block_spec(cls, fn)` (e.g. torchvision's `ResNet` and `VisionTransformer`). Any other
model gets a map inferred from its structure (`infer.py`), and a user can attach a map given as data to
one model instance (`overrides.py`). `torch.compile` and `DataParallel` wrappers are looked through.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn
from torchvision.models import ResNet, VisionTransformer

from .infer import infer_block_spec, infer_layout_rule
from .partition import VIT_GROUPS, BlockSpec, check_partition, matches, partition

__all__ = [
    "NORM_TYPES",
    "BlockSpec",
    "block_map",
    "block_names",
    "block_spec",
    "block_spec_source",
    "check_partition",
    "norm_layers",
    "register_block_spec",
    "resolve_blocks",
    "select_params",
    "unit_map",
    "unit_names",
]

# Modules whose affine parameters count as "norm" parameters (Tent adapts exactly these).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

KINDS = ("all", "norm", "conv")
# "affine" is accepted as a synonym of "norm" (the DESIGN.md selector vocabulary).
_KIND_ALIASES = {"affine": "norm"}

# architecture class -> spec builder, for classes we do not own (torchvision's). Filled at import time.
_SPEC_BUILDERS: dict[type, Callable[[nn.Module], BlockSpec]] = {}


def register_block_spec(cls: type, fn: Callable[[nn.Module], BlockSpec]) -> None:
    """Declare the block map of a model class you cannot add a `block_spec()` method to."""
    if cls in _SPEC_BUILDERS:
        raise KeyError(f"a block spec for {cls.__qualname__} is already registered")
    _SPEC_BUILDERS[cls] = fn


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Look through torch.compile / DataParallel wrappers; return the inner model and the name prefix they add."""
    prefix = ""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model, prefix = inner, prefix + "_orig_mod."
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model, prefix = model.module, prefix + "module."
        else:
            return model, prefix


# Attribute under which `set_block_map` (tta_surgical.models.overrides) attaches a user's map to one model instance.
OVERRIDE_ATTR = "_tta_surgical_block_spec"


def block_spec(model: nn.Module) -> BlockSpec:
    """The `BlockSpec` of `model` (with wrapper prefixes applied).

    Sources, first match wins: a map attached to this instance (`set_block_map`, `tta_surgical.blocks(model,
    block_map=...)`, `model.block_map` in a config); the class's `block_spec()` method; a spec registered for
    the class (`register_block_spec`); otherwise the map inferred from the module structure
    (`tta_surgical.models.infer`), which raises a clear error naming the unassigned parameters when it fails.
    """
    inner, prefix = _unwrap(model)
    attached = inner.__dict__.get(OVERRIDE_ATTR)
    method = getattr(inner, "block_spec", None)
    if isinstance(attached, BlockSpec):
        spec = attached
    elif callable(method):
        spec = method()
    else:
        builder = next((_SPEC_BUILDERS[c] for c in type(inner).__mro__ if c in _SPEC_BUILDERS), None)
        if builder is not None:
            spec = builder(inner)
        else:
            spec = infer_block_spec(inner)
    return spec.prefixed(prefix)


def block_spec_source(model: nn.Module) -> str:
    """Where `block_spec(model)` comes from: `given`, `built-in`, `built-in (registered)` or `inferred (<rule>)`."""
    inner, _ = _unwrap(model)
    if isinstance(inner.__dict__.get(OVERRIDE_ATTR), BlockSpec):
        return "given"
    if callable(getattr(inner, "block_spec", None)):
        return "built-in"
    if any(c in _SPEC_BUILDERS for c in type(inner).__mro__):
        return "built-in (registered)"
    return f"inferred ({infer_layout_rule(inner)})"


def block_map(model: nn.Module) -> dict[str, list[str]]:
    """Ordered `{block: [parameter names in model order]}`; raises if a parameter is in no block or in several."""
    return partition(model, block_spec(model).blocks, "block")


def unit_map(model: nn.Module) -> dict[str, list[str]]:
    """Like `block_map` at residual-unit granularity: `input`, `block1.0`, `block1.1`, ..., `head`."""
    return partition(model, block_spec(model).units, "unit")


def block_names(model: nn.Module) -> list[str]:
    """The ordered block names of `model`: `input`, `block1`, ..., `head`."""
    return [n for n, _ in block_spec(model).blocks]


def unit_names(model: nn.Module) -> list[str]:
    """The ordered unit names of `model`: `input`, `block1.0`, ..., `head`."""
    return [n for n, _ in block_spec(model).units]


def _canonical_order(spec: BlockSpec) -> list[str]:
    """input, block1, block1.0, block1.1, ..., block2, ..., head: every selectable name once, in model order."""
    order: list[str] = []
    for block, _ in spec.blocks:
        order.append(block)
        order += [u for u, _ in spec.units if u != block and u.split(".")[0] == block]
    return order


def _split_spec(spec: str | Iterable[str]) -> list[str]:
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"block specs are strings, got {item!r} ({type(item).__name__})")
        out += [s.strip() for s in item.split(",") if s.strip()]
    return out


def resolve_blocks(model: nn.Module, spec: str | Iterable[str]) -> list[str]:
    """Turn a block spec into block/unit names, in model order, without duplicates.

    Accepted: `all`; a block (`input`, `block2`, `head`); a unit (`block1.0`); a contiguous range of
    blocks (`block1-2`, `block1-block3`, `input-block1`, `block3-head`); a list of these or one
    comma-separated string (`"input,block1"`). A unit whose whole block is also selected is dropped.
    Unknown names raise a `ValueError` listing the valid ones.
    """
    bs = block_spec(model)
    blocks = [n for n, _ in bs.blocks]
    units = [n for n, _ in bs.units]
    valid = set(blocks) | set(units)
    chosen: set[str] = set()
    items = _split_spec(spec)
    if not items:
        raise ValueError(f"empty block spec; valid: all, {', '.join(_canonical_order(bs))}, or ranges like block1-2")
    for item in items:
        if item == "all":
            chosen.update(blocks)
        elif item in valid:
            chosen.add(item)
        elif "-" in item:
            lo, hi = item.split("-", 1)
            if re.fullmatch(r"\d+", hi) and lo.startswith("block"):
                hi = "block" + hi
            if lo not in blocks or hi not in blocks:
                raise ValueError(
                    f"bad block range {item!r}: both ends must be blocks ({', '.join(blocks)}), e.g. block1-2"
                )
            i, j = blocks.index(lo), blocks.index(hi)
            if i > j:
                raise ValueError(f"bad block range {item!r}: {lo} comes after {hi} (write {hi}-{lo})")
            chosen.update(blocks[i : j + 1])
        else:
            raise ValueError(
                f"unknown block {item!r} for {type(_unwrap(model)[0]).__qualname__}; valid: all, "
                f"{', '.join(_canonical_order(bs))}, or ranges like block1-2"
            )
    # a unit inside a selected block adds nothing
    chosen = {c for c in chosen if c in blocks or c.split(".")[0] not in chosen}
    return [n for n in _canonical_order(bs) if n in chosen]


def _prefixes_for(model: nn.Module, spec: str | Iterable[str] | None) -> list[str]:
    bs = block_spec(model)
    if spec is None:
        return [p for _, ps in bs.blocks for p in ps]
    table = dict(bs.units) | dict(bs.blocks)
    return [p for name in resolve_blocks(model, spec) for p in table[name]]


def _norm_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}


def select_params(
    model: nn.Module, blocks: str | Iterable[str] = "all", kind: str = "all"
) -> list[tuple[str, nn.Parameter]]:
    """The `(name, parameter)` pairs of the chosen blocks, in model order.

    `blocks` is anything `resolve_blocks` accepts. `kind`: `all` (every parameter of the blocks),
    `norm` (alias `affine`: the affine weight/bias of BatchNorm/GroupNorm/LayerNorm/InstanceNorm
    modules), `conv` (every non-norm parameter: conv and linear weights and biases, and for ViT also
    the class token, position embedding and attention projections).
    """
    kind = _KIND_ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown parameter kind {kind!r}; valid: {', '.join(KINDS)}, affine")
    block_map(model)  # validates the partition, so a broken spec never selects silently
    prefixes = _prefixes_for(model, blocks)
    norm_ids = _norm_param_ids(model) if kind != "all" else set()
    out = []
    for name, p in model.named_parameters():
        if not any(matches(name, pre) for pre in prefixes):
            continue
        if kind == "norm" and id(p) not in norm_ids or kind == "conv" and id(p) in norm_ids:
            continue
        out.append((name, p))
    return out


def norm_layers(model: nn.Module, blocks: str | Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` normalisation layers (types in `NORM_TYPES`) of the chosen blocks, in model order.

    `blocks=None` means every norm layer of the model (including any without affine parameters).
    Useful to switch BatchNorm statistics (train/eval, momentum, reset) block by block.
    """
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
    if blocks is None:
        return mods
    prefixes = _prefixes_for(model, blocks)
    return [(n, m) for n, m in mods if any(matches(n, p) for p in prefixes)]


# ----------------------------------------------------------------------------- spec helpers for architectures


def stage_spec(model: nn.Module, stem: Sequence[str], stages: Sequence[str], head: Sequence[str]) -> BlockSpec:
    """A spec for stage-structured nets: `input`=stem, `blockK`=stages[K-1], units = children of each stage.

    Each stage must be an `nn.Sequential`-like module whose children are the residual units.
    """
    blocks: list[tuple[str, tuple[str, ...]]] = [("input", tuple(stem))]
    units: list[tuple[str, tuple[str, ...]]] = [("input", tuple(stem))]
    for k, stage in enumerate(stages, 1):
        blocks.append((f"block{k}", (stage,)))
        mod = model.get_submodule(stage)
        for i, (child, _) in enumerate(mod.named_children()):
            units.append((f"block{k}.{i}", (f"{stage}.{child}",)))
    blocks.append(("head", tuple(head)))
    units.append(("head", tuple(head)))
    return BlockSpec(tuple(blocks), tuple(units))


def _torchvision_resnet_spec(model: nn.Module) -> BlockSpec:
    stages = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
    return stage_spec(model, ("conv1", "bn1"), stages, ("fc",))




def _torchvision_vit_spec(model: nn.Module) -> BlockSpec:
    """ViT: input = patch projection + class token + position embedding; the encoder layers are grouped into
    `VIT_GROUPS` (4) contiguous blocks (ViT-B/16: 12 layers -> 3 per block, mirroring ResNet-50's 4 stages);
    units are single encoder layers; head = final LayerNorm + classifier."""
    layers = [f"encoder.layers.{n}" for n, _ in model.get_submodule("encoder.layers").named_children()]
    stem = ("conv_proj", "class_token", "encoder.pos_embedding")
    head = ("encoder.ln", "heads")
    n_groups = min(VIT_GROUPS, len(layers))
    base, extra = divmod(len(layers), n_groups)
    blocks: list[tuple[str, tuple[str, ...]]] = [("input", stem)]
    units: list[tuple[str, tuple[str, ...]]] = [("input", stem)]
    start = 0
    for k in range(1, n_groups + 1):
        size = base + (1 if k <= extra else 0)
        group = layers[start : start + size]
        blocks.append((f"block{k}", tuple(group)))
        units += [(f"block{k}.{i}", (name,)) for i, name in enumerate(group)]
        start += size
    blocks.append(("head", head))
    units.append(("head", head))
    return BlockSpec(tuple(blocks), tuple(units))


def _register_torchvision() -> None:
    register_block_spec(ResNet, _torchvision_resnet_spec)
    register_block_spec(VisionTransformer, _torchvision_vit_spec)


_register_torchvision()
