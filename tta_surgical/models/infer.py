"""Block-map inference for models without a hand-written spec (torchvision, timm, your own).

`block_spec(model)` falls back to `infer_block_spec(model)` when the model has no `block_spec()` method and
no registered spec. The rule is structural, read from the module tree (parameter-free modules such as
ReLU, pooling or dropout are ignored throughout):

1. Walk down from the model, at each level into the child holding the most parameters. At each level,
   look for *stages*: children that are containers of residual units. A child is a stage when it is an
   `nn.Sequential`/`nn.ModuleList` whose parameter-holding children are all composite modules (units),
   or when it holds exactly one such list carrying most of its parameters (e.g. timm's `ConvNeXtStage`
   = `downsample` + `blocks`; the list's siblings join the unit next to them).
2. The first level with two or more stages of the same class is the stage level: those stages, in
   order, are `block1..N`, and each stage's units are `blockK.0, blockK.1, ...`. Parameter-holding
   children *between* two stages (ConvNeXt's downsampling layers, Swin's patch merging) open the next
   stage: they join its block and its unit 0.
3. Everything before the stages (at the stage level and, on the way down, the siblings before the
   followed child, plus the followed modules' own parameters such as ViT's class token and position
   embedding) is `input`; everything after them is `head`. So a final norm layer after the last stage
   (ViT's `encoder.ln`, Swin's `norm`, a WideResNet's `bn1`) belongs to the head, as in the zoo's maps.
4. A model without stages but with one long list of identical units (a ViT's encoder layers) has its
   units grouped into `VIT_GROUPS` (4) contiguous blocks, as the zoo's ViT-B/16 map does.

Family hints cover what structure alone gets wrong: torchvision's MobileNetV2/V3 keep all inverted
residual units in one flat `features` list next to the stem and final convolutions; their stages are
the runs that torchvision's `inverted_residual_setting` rows build, i.e. a new stage starts at every
unit without an identity shortcut (`use_res_connect` false), and the final 1x1 convolution joins the head
(as EfficientNet's `features[-1]` does under rule 3).

The result is asserted like a hand-written map (every parameter in exactly one block and one unit);
when no rule applies, `BlockInferenceError` names the unassigned parameters and says how to give a map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn
from torchvision.models import MobileNetV2, MobileNetV3

from .partition import VIT_GROUPS, BlockSpec, check_partition

__all__ = ["HOW_TO_GIVE_A_BLOCK_MAP", "BlockInferenceError", "infer_block_spec", "unassigned_message"]

HOW_TO_GIVE_A_BLOCK_MAP = (
    "give a block map: tta_surgical.blocks(model, block_map={'input': ['conv1', 'bn1'], 'block1': ['layer1'], "
    "..., 'head': ['fc']}) or `model.block_map: FILE` (a YAML file with the same keys) in a config, or "
    "tta_surgical.models.register_block_spec(cls, fn) for a class"
)


class BlockInferenceError(TypeError):
    """No block map could be inferred for a model (a TypeError: the architecture is not understood)."""


def unassigned_message(names: Sequence[str], shown: int = 5) -> str:
    """`N parameter(s) unassigned: a, b, c, ... (+M more)`: the first few names and the count."""
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return f"{len(names)} parameter(s) unassigned: {', '.join(names[:shown])}{more}"


# ----------------------------------------------------------------------------------------------- tree helpers


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


Sizes = dict[nn.Module, int]


def _sizes(model: nn.Module) -> Sizes:
    """Parameter count of every module, in one bottom-up pass (the walk compares subtree sizes at every level)."""
    sizes: Sizes = {}

    def visit(module: nn.Module) -> int:
        if module not in sizes:
            own = sum(p.numel() for p in module.parameters(recurse=False))
            sizes[module] = own + sum(visit(c) for c in module.children())
        return sizes[module]

    visit(model)
    return sizes


def _param_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children holding at least one parameter, in order (ReLU, pooling, dropout, Identity drop out)."""
    return [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]


def _own_params(module: nn.Module, prefix: str) -> list[str]:
    """Full names of the parameters registered directly on `module` (class token, position embedding...)."""
    return [_join(prefix, n) for n, _ in module.named_parameters(recurse=False)]


def _is_composite(module: nn.Module) -> bool:
    """A unit-like module: it has parameter-holding children (a conv or norm layer is not composite)."""
    return bool(_param_children(module))


def _is_unit_list(module: nn.Module) -> bool:
    """An `nn.Sequential`/`nn.ModuleList` of composite modules and nothing else: a list of residual units."""
    if not isinstance(module, (nn.Sequential, nn.ModuleList)) or _own_params(module, ""):
        return False
    kids = _param_children(module)
    return bool(kids) and all(_is_composite(c) for _, c in kids)


@dataclass
class _Stage:
    """One block: its own prefix, its units' prefixes, and prefixes that join its first / last unit."""

    prefixes: list[str]
    units: list[str]
    first: list[str] = field(default_factory=list)
    last: list[str] = field(default_factory=list)

    def unit_groups(self, block: str) -> list[tuple[str, tuple[str, ...]]]:
        groups = [[u] for u in self.units]
        groups[0] = self.first + groups[0]
        groups[-1] = groups[-1] + self.last
        return [(f"{block}.{i}", tuple(g)) for i, g in enumerate(groups)]


def as_stage(module: nn.Module, prefix: str, sizes: Sizes | None = None) -> _Stage | None:
    """`module` seen as a stage (rule 1 of the module docstring), or None when it is not one."""
    sizes = _sizes(module) if sizes is None else sizes
    kids = _param_children(module)
    if _is_unit_list(module):
        return _Stage([prefix], [_join(prefix, n) for n, _ in kids])
    lists = [(i, n, c) for i, (n, c) in enumerate(kids) if _is_unit_list(c)]
    if len(lists) != 1 or 2 * sizes[lists[0][2]] < sizes[module]:
        return None
    i, name, inner = lists[0]
    stage = _Stage([prefix], [_join(prefix, _join(name, n)) for n, _ in _param_children(inner)])
    stage.first = _own_params(module, prefix) + [_join(prefix, n) for n, _ in kids[:i]]
    stage.last = [_join(prefix, n) for n, _ in kids[i + 1 :]]
    return stage


# ----------------------------------------------------------------------------------------------- the layout


@dataclass
class _Layout:
    input: list[str] = field(default_factory=list)
    stages: list[_Stage] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    rule: str = ""


def _stage_level(kids: list[tuple[str, nn.Module]], prefix: str, sizes: Sizes) -> _Layout | None:
    """Rule 2 at one level: the largest same-class group (>= 2) of stages among `kids`, with input/head around."""
    found = [(i, type(c), as_stage(c, _join(prefix, n), sizes)) for i, (n, c) in enumerate(kids)]
    by_class: dict[type, list[tuple[int, _Stage]]] = {}
    for i, cls, stage in found:
        if stage is not None:
            by_class.setdefault(cls, []).append((i, stage))
    groups = [g for g in by_class.values() if len(g) >= 2]
    if not groups:
        return None
    group = max(groups, key=lambda g: (len(g), sum(sizes[kids[i][1]] for i, _ in g)))
    layout = _Layout(rule="stages")
    pending: list[str] = []  # parameter-holding modules between two stages: they open the next one
    members = dict(group)
    first, last = group[0][0], group[-1][0]
    for i, (name, _) in enumerate(kids):
        path = _join(prefix, name)
        if i < first:
            layout.input.append(path)
        elif i > last:
            layout.head.append(path)
        elif i in members:
            stage = members[i]
            stage.prefixes = pending + stage.prefixes
            stage.first = pending + stage.first
            layout.stages.append(stage)
            pending = []
        else:
            pending.append(path)
    return layout


def _flat_level(module: nn.Module, prefix: str) -> _Layout | None:
    """Rule 4: a list of >= 2 units of one class (ViT encoder layers) grouped into `VIT_GROUPS` blocks."""
    kids = _param_children(module)
    if not _is_unit_list(module) or len(kids) < 2 or len({type(c) for _, c in kids}) != 1:
        return None
    units = [_join(prefix, n) for n, _ in kids]
    n_groups = min(VIT_GROUPS, len(units))
    base, extra = divmod(len(units), n_groups)
    layout, start = _Layout(rule="flat"), 0
    for k in range(n_groups):
        size = base + (1 if k < extra else 0)
        chunk = units[start : start + size]
        layout.stages.append(_Stage(list(chunk), list(chunk)))
        start += size
    return layout


def _structural_layout(model: nn.Module) -> _Layout | None:
    """Rules 1-4: walk down the heaviest path until a stage level or a flat unit list is found."""
    sizes = _sizes(model)
    before: list[str] = []
    after: list[str] = []
    module, prefix = model, ""
    while True:
        kids = _param_children(module)
        layout = _stage_level(kids, prefix, sizes) or _flat_level(module, prefix)
        if layout is not None:
            layout.input = before + _own_params(module, prefix) + layout.input
            layout.head = layout.head + after
            return layout
        if not kids:
            return None
        i = max(range(len(kids)), key=lambda j: sizes[kids[j][1]])
        before += _own_params(module, prefix) + [_join(prefix, n) for n, _ in kids[:i]]
        after = [_join(prefix, n) for n, _ in kids[i + 1 :]] + after
        module, prefix = kids[i][1], _join(prefix, kids[i][0])


# ----------------------------------------------------------------------------------------------- family hints


def _mobilenet_layout(model: nn.Module) -> _Layout:
    """torchvision MobileNetV2/V3: stem = features[0], stages = runs starting at each non-residual unit,
    head = features[-1] (the final 1x1 convolution) + classifier."""
    feats = _param_children(model.get_submodule("features"))
    layout = _Layout(input=[f"features.{feats[0][0]}"], rule="hint: torchvision MobileNet")
    for name, unit in feats[1:-1]:
        path = f"features.{name}"
        if not getattr(unit, "use_res_connect", False) or not layout.stages:
            layout.stages.append(_Stage([path], [path]))
        else:
            layout.stages[-1].prefixes.append(path)
            layout.stages[-1].units.append(path)
    layout.head = [f"features.{feats[-1][0]}"] + [n for n, _ in _param_children(model) if n != "features"]
    return layout


def _hints() -> list[tuple[type, Callable[[nn.Module], _Layout]]]:
    return [(MobileNetV2, _mobilenet_layout), (MobileNetV3, _mobilenet_layout)]


# ----------------------------------------------------------------------------------------------- entry point


def _spec(layout: _Layout) -> BlockSpec:
    blocks: list[tuple[str, tuple[str, ...]]] = [("input", tuple(layout.input))]
    units: list[tuple[str, tuple[str, ...]]] = [("input", tuple(layout.input))]
    for k, stage in enumerate(layout.stages, 1):
        blocks.append((f"block{k}", tuple(stage.prefixes)))
        units += stage.unit_groups(f"block{k}")
    blocks.append(("head", tuple(layout.head)))
    units.append(("head", tuple(layout.head)))
    return BlockSpec(tuple(blocks), tuple(units))


def infer_layout_rule(model: nn.Module) -> str:
    """Which rule produced `model`'s inferred map (`stages`, `flat`, `hint: ...`); for tables and messages."""
    return _layout(model).rule


def _layout(model: nn.Module) -> _Layout:
    name = type(model).__qualname__
    hint = next((fn for cls, fn in _hints() if isinstance(model, cls)), None)
    layout = hint(model) if hint is not None else _structural_layout(model)
    if layout is None:
        every = [n for n, _ in model.named_parameters()]
        raise BlockInferenceError(
            f"cannot infer a block map for {name}: found no stages (two or more similar containers of residual "
            f"units) and no list of identical units; {unassigned_message(every)}. To use it, {HOW_TO_GIVE_A_BLOCK_MAP}"
        )
    if not layout.input or not layout.head:
        missing = "input (stem)" if not layout.input else "head"
        raise BlockInferenceError(
            f"cannot infer a block map for {name}: found {len(layout.stages)} stages but no {missing} parameters "
            f"around them. To use it, {HOW_TO_GIVE_A_BLOCK_MAP}"
        )
    return layout


def infer_block_spec(model: nn.Module) -> BlockSpec:
    """The inferred `BlockSpec` of `model`, checked to partition its parameters into blocks and units.

    Raises `BlockInferenceError` (a TypeError) naming the unassigned parameters when no rule applies.
    """
    spec = _spec(_layout(model))
    for what, groups in (("block", spec.blocks), ("unit", spec.units)):
        problem = check_partition(model, groups, what)
        if problem:
            raise BlockInferenceError(
                f"the block map inferred for {type(model).__qualname__} is not a partition ({problem}). "
                f"To use it, {HOW_TO_GIVE_A_BLOCK_MAP}"
            )
    return spec
