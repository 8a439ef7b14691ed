"""A user's block map as data: `{"input": [...], "block1": [...], ..., "head": [...]}`, from Python or YAML.

    set_block_map(model, {"input": ["conv1", "bn1"], "block1": ["layer1"], "block2": ["layer2"], "head": ["fc"]})
    set_block_map(model, "my_blocks.yaml")     # the same mapping in a YAML file (`model.block_map: FILE`)

Keys are `input`, `block1` ... `blockN` (numbered from 1 without gaps) and `head`; values are dotted names
of modules or parameters of the model (a single string or a list), matched on whole components like the
built-in maps. Units are optional: keys `blockK.0`, `blockK.1`, ... give a block's units explicitly;
without them a block's units are the residual units of its names that are stages (lists of units, the
same rule as inference, `infer.as_stage`), in order, with its other names joining the next unit; a block
without any stage is one unit `blockK.0`.

The map is validated like a hand-written one before it is used: unknown names, empty blocks, a parameter
in no block (named, first few + count) or in several, units outside their block are errors. A valid map is
attached to the model instance, so every later selection (`select_params`, methods, `tta_surgical.blocks`)
uses it; `torch.compile` / `DataParallel` wrappers are looked through as usual.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from ..schema import read_yaml
from .blocks import OVERRIDE_ATTR, _unwrap, block_spec
from .infer import HOW_TO_GIVE_A_BLOCK_MAP, as_stage
from .partition import BlockSpec, check_partition, partition

__all__ = ["BlockMapError", "load_block_map", "set_block_map", "spec_from_mapping"]

_BLOCK_KEY = re.compile(r"^block([1-9]\d*)$")
_UNIT_KEY = re.compile(r"^(block[1-9]\d*)\.(\d+)$")
BlockMapLike = Mapping[str, object] | str | os.PathLike | BlockSpec


class BlockMapError(ValueError):
    """A user-given block map is malformed or does not partition the model's parameters."""


def load_block_map(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a block map from a YAML (or JSON) file with `config.read_yaml`: a top-level mapping of block names."""

    p = Path(path).expanduser()
    data = read_yaml(p, "block map file")  # malformed YAML: a one-line ConfigError with file, line and column
    if not isinstance(data, Mapping):
        raise BlockMapError(
            f"block map file {p} must hold a mapping such as `input: [conv1, bn1]`, `block1: [layer1]`, "
            f"`head: [fc]`; got {type(data).__name__}"
        )
    return {str(k): v for k, v in data.items()}


def _names(block: str, value: object) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, str) and v for v in items):
        raise BlockMapError(f"block map: {block!r} needs a non-empty list of module or parameter names, got {value!r}")
    for name in items:
        if name.startswith(".") or name.endswith(".") or ".." in name:
            raise BlockMapError(f"block map: {block!r} has the malformed name {name!r} (dotted, no edge dots)")
    return list(items)


def _split_keys(mapping: Mapping[str, object]) -> tuple[list[str], dict[str, list[str]]]:
    """The block names in order and the unit names per block; errors for anything else."""
    blocks, units = [], {}
    for key in mapping:
        if not isinstance(key, str):
            raise BlockMapError(f"block map keys are block names (strings), got {key!r}")
        unit = _UNIT_KEY.match(key)
        if unit:
            units.setdefault(unit.group(1), []).append(key)
        elif key in ("input", "head") or _BLOCK_KEY.match(key):
            blocks.append(key)
        else:
            raise BlockMapError(
                f"block map: unknown key {key!r}; valid keys: input, block1 ... blockN, head, and optional units "
                "block1.0, block1.1, ..."
            )
    middle = sorted((b for b in blocks if b not in ("input", "head")), key=lambda b: int(b[5:]))
    expected = [f"block{k}" for k in range(1, len(middle) + 1)]
    if "input" not in blocks or "head" not in blocks or middle != expected:
        raise BlockMapError(
            f"block map: needs input, block1 ... blockN numbered without gaps, and head; got {list(mapping)}"
        )
    for block, keys in units.items():
        if block not in middle:
            raise BlockMapError(f"block map: units {keys} belong to {block!r}, which is not one of the blocks")
        idx = sorted(int(k.split(".")[1]) for k in keys)
        if idx != list(range(len(idx))):
            raise BlockMapError(f"block map: number the units of {block} as {block}.0, {block}.1, ...; got {keys}")
        units[block] = [f"{block}.{i}" for i in idx]
    return ["input", *middle, "head"], units


def _check_names(model: nn.Module, groups: dict[str, list[str]]) -> None:
    known = {n for n, _ in model.named_modules() if n} | {n for n, _ in model.named_parameters()}
    for group, names in groups.items():
        for name in names:
            if name not in known:
                top = ", ".join(n for n, _ in model.named_children())
                raise BlockMapError(
                    f"block map: {name!r} (in {group}) names no module or parameter of {type(model).__qualname__}; "
                    f"its top-level modules: {top}"
                )


def _derived_units(model: nn.Module, block: str, names: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """A block's units when none are given: the units of each of its names that is a stage (a list of residual
    units, `infer.as_stage`), in order; a name that is not a stage joins the next unit (the last unit when it
    comes last), as a downsampling layer opens the stage after it; no stage at all makes one unit."""
    known = dict(model.named_modules())
    groups: list[list[str]] = []
    pending: list[str] = []
    for name in names:
        stage = as_stage(known[name], name) if name in known else None
        if stage is None:
            pending.append(name)
            continue
        stage.first = pending + stage.first
        pending = []
        groups += [list(g) for _, g in stage.unit_groups(block)]
    if not groups:
        return [(f"{block}.0", tuple(names))]
    groups[-1] += pending
    return [(f"{block}.{i}", tuple(g)) for i, g in enumerate(groups)]


def spec_from_mapping(model: nn.Module, mapping: Mapping[str, object]) -> BlockSpec:
    """Validate a block map given as data against `model` (unwrapped) and return it as a `BlockSpec`."""
    inner, _ = _unwrap(model)
    if not isinstance(mapping, Mapping):
        raise BlockMapError(f"a block map is a mapping of block names to name lists, got {type(mapping).__name__}")
    order, unit_keys = _split_keys(mapping)
    groups = {key: _names(key, value) for key, value in mapping.items()}
    _check_names(inner, groups)
    blocks = tuple((b, tuple(groups[b])) for b in order)
    units: list[tuple[str, tuple[str, ...]]] = []
    for b in order:
        if b in ("input", "head"):
            units.append((b, tuple(groups[b])))
        elif b in unit_keys:
            units += [(u, tuple(groups[u])) for u in unit_keys[b]]
        else:
            units += _derived_units(inner, b, groups[b])
    spec = BlockSpec(blocks, tuple(units))
    for what, grouping in (("block", spec.blocks), ("unit", spec.units)):
        problem = check_partition(inner, grouping, what)
        if problem:
            raise BlockMapError(
                f"block map for {type(inner).__qualname__}: {problem}. To fix it, {HOW_TO_GIVE_A_BLOCK_MAP}"
            )
    _check_units_inside_blocks(inner, spec)
    return spec


def _check_units_inside_blocks(model: nn.Module, spec: BlockSpec) -> None:
    in_block = {n: b for b, names in partition(model, spec.blocks, "block").items() for n in names}
    for unit, names in partition(model, spec.units, "unit").items():
        outside = [n for n in names if in_block[n] != unit.split(".")[0]]
        if outside:
            raise BlockMapError(
                f"block map: unit {unit} holds {outside[:3]}, which belong to block {in_block[outside[0]]}; a unit "
                "must lie inside its block"
            )


def set_block_map(model: nn.Module, block_map: BlockMapLike | None) -> BlockSpec:
    """Validate `block_map` (a mapping, a YAML file path or a `BlockSpec`) and attach it to `model`.

    Every later `block_spec(model)` (hence `select_params`, the methods, `tta_surgical.blocks`) uses it.
    `None` attaches nothing and returns the model's current spec. Returns the spec in the model's names.
    """
    if block_map is None:
        return block_spec(model)
    inner, _ = _unwrap(model)
    if isinstance(block_map, BlockSpec):
        for what, grouping in (("block", block_map.blocks), ("unit", block_map.units)):
            problem = check_partition(inner, grouping, what)
            if problem:
                raise BlockMapError(f"block map for {type(inner).__qualname__}: {problem}")
        spec = block_map
    else:
        data = load_block_map(block_map) if isinstance(block_map, (str, os.PathLike)) else block_map
        spec = spec_from_mapping(inner, data)
    # in __dict__ (not a submodule, buffer or parameter): copied by deepcopy, invisible to state_dict
    inner.__dict__[OVERRIDE_ATTR] = spec
    return block_spec(model)
