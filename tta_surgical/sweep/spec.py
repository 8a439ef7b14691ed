"""Sweep files: a base config, overrides, and axes (a Cartesian product) or explicit cells -> validated cells.

A sweep file (YAML, see `configs/sweeps/`):

    kind: run                      # run | finetune: which command each cell runs
    base: configs/surgical_block1.yaml
    stream: streams/cifar10c_reset.yaml   # run kind only
    overrides: [stream.n_examples=200]    # applied to every cell
    axes:                                 # dotted key -> list of values; product in the listed order
      stream.domains: [gaussian_noise, fog]
      method.blocks: [block1, all]
    # or cells: [{method.blocks: [block1]}, {method.name: tent, method.blocks: [all], method.kind: norm}]
    # `base` may also be an axis or a cell key: that cell's config file (e.g. one YAML per method)
    resources: {num_gpus: 0, num_cpus: 1}   # per cell (Ray scheduling; threads per cell)
    retries: 2                            # re-runs of a cell whose worker process died

Every cell's config is built with the real loader (`load_config` / `load_finetune_config`) when the file is
read, so unknown keys, wrong types and invalid values fail before anything runs, naming the cell. A cell's id
is the first 12 hex digits of the SHA-256 of its kind and resolved config as canonical JSON: the same config
always gets the same id (and output folder), so a changed sweep file reuses the cells it still contains.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import (
    ConfigError,
    ModelConfig,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    parse_override,
    to_dict,
)
from ..finetune import validate_options
from ..finetune.config import load_finetune_config
from ..methods.selection import candidate_blocks
from ..models import create_model_from_config, resolve_blocks, select_params

__all__ = [
    "SWEEP_KEYS",
    "SWEEP_KINDS",
    "Cell",
    "Resources",
    "Sweep",
    "cell_id",
    "check_cells",
    "format_value",
    "load_sweep",
    "sweep_from_dict",
]

SWEEP_KINDS = ("run", "finetune")
SWEEP_KEYS = ("name", "description", "kind", "base", "stream", "overrides", "axes", "cells", "resources", "retries")
RESOURCE_KEYS = ("num_gpus", "num_cpus")
# Keys whose axis is a repetition of the same experiment (summary.md averages over them).
SEED_KEYS = ("runtime.seed", "stream.seed", "finetune.seeds", "finetune.generation_seed")
ID_LENGTH = 12
# Where relative `base:` / `stream:` paths may live: next to the sweep file, the working directory, the checkout.
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Resources:
    """What one cell needs: Ray schedules on it; a cell runs with max(1, int(num_cpus)) torch threads."""

    num_gpus: float = 0.0
    num_cpus: float = 1.0

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: its position, id, the values that define it, and its resolved config."""

    index: int
    id: str
    axes: dict[str, Any]
    overrides: tuple[str, ...]
    config: dict[str, Any] = field(repr=False)

    def label(self) -> str:
        return ", ".join(f"{k}={format_value(v)}" for k, v in self.axes.items()) or "(base config)"


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: every cell's config already resolved."""

    name: str
    kind: str
    base: Path | None
    stream: Path | None
    overrides: tuple[str, ...]
    axis_keys: tuple[str, ...]
    cells: tuple[Cell, ...]
    resources: Resources = field(default_factory=Resources)
    retries: int = 2
    source: Path | None = None

    @property
    def seed_axes(self) -> tuple[str, ...]:
        return tuple(k for k in self.axis_keys if k in SEED_KEYS)


def format_value(v: Any) -> str:
    """A compact human label of an axis value: [fog] -> fog, [a, b] -> a,b, {name: tent} -> name=tent."""
    if isinstance(v, (list, tuple)):
        return ",".join(format_value(x) for x in v)
    if isinstance(v, Mapping):
        return " ".join(f"{k}={format_value(x)}" for k, x in v.items())
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def cell_id(kind: str, config: Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over the kind and the resolved config as canonical JSON (sorted keys)."""
    text = json.dumps({"kind": kind, "config": config}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_LENGTH]


def _plain(value: Any, where: str) -> Any:
    """A YAML value as JSON data (tuples -> lists); other types (dates, sets) are an error naming `where`."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ConfigError(f"{where}: {value!r} ({type(value).__name__}) is not a plain YAML value; quote it as a string")


def _override(key: str, value: Any) -> str:
    """`key=value` text for `apply_overrides`: JSON is YAML, so every plain value round-trips."""
    return f"{key}={json.dumps(value)}"


def _find(path: str | Path, sweep_file: Path | None, what: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        if p.is_file():
            return p
        raise ConfigError(f"{what}: file not found: {p}")
    tried = ([sweep_file.parent / p] if sweep_file is not None else []) + [Path.cwd() / p, REPO_ROOT / p]
    for cand in tried:
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"{what}: {str(path)!r} not found; looked in " + ", ".join(str(c.parent) for c in tried))


def _resources(data: Any) -> Resources:
    if data is None:
        return Resources()
    if not isinstance(data, Mapping):
        raise ConfigError(f"resources: expected a mapping like {{num_gpus: 1, num_cpus: 4}}, got {data!r}")
    unknown = sorted(set(map(str, data)) - set(RESOURCE_KEYS))
    if unknown:
        raise ConfigError(f"unknown key resources.{unknown[0]}; valid keys in resources: {', '.join(RESOURCE_KEYS)}")
    values = {}
    for key in RESOURCE_KEYS:
        if key not in data:
            continue
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"resources.{key}: expected a number >= 0, got {v!r}")
        values[key] = float(v)
    res = Resources(**values)
    if res.num_cpus <= 0:
        raise ConfigError("resources.num_cpus must be > 0 (a cell needs some CPU)")
    return res


def _expand(data: Mapping[str, Any]) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """The axis keys and one {key: value} mapping per cell, in order (the product, last axis fastest)."""
    has_axes, has_cells = "axes" in data, "cells" in data
    if has_axes == has_cells:
        raise ConfigError(
            "a sweep file needs exactly one of 'axes:' (key -> list of values, the Cartesian product) "
            "or 'cells:' (a list of override mappings)" + (", not both" if has_axes else "")
        )
    if has_axes:
        axes = data["axes"]
        if not isinstance(axes, Mapping) or not axes:
            raise ConfigError(f"axes: expected a non-empty mapping of dotted key -> list of values, got {axes!r}")
        keys = []
        for key, values in axes.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"axes: keys must be dotted config keys such as method.blocks, got {key!r}")
            parse_override(f"{key}=0")  # syntax only; the loader checks that the key exists
            if not isinstance(values, list):
                raise ConfigError(
                    f"axes.{key}: expected a list of values, got {values!r}; wrap a single value in [ ] "
                    "(and a list-valued one in [[ ]])"
                )
            if not values:
                raise ConfigError(f"axes.{key}: the axis is empty; give at least one value or remove the axis")
            keys.append(key)
        lists = [[_plain(v, f"axes.{k}") for v in axes[k]] for k in keys]
        return tuple(keys), [dict(zip(keys, combo)) for combo in itertools.product(*lists)]
    cells = data["cells"]
    if not isinstance(cells, list) or not cells:
        raise ConfigError(f"cells: expected a non-empty list of mappings (dotted key -> value), got {cells!r}")
    out = []
    for i, cell in enumerate(cells):
        if cell is None:
            cell = {}
        if not isinstance(cell, Mapping):
            raise ConfigError(f"cells[{i}]: expected a mapping of dotted key -> value, got {cell!r}")
        for key in cell:
            if not isinstance(key, str) or not key:
                raise ConfigError(f"cells[{i}]: keys must be dotted config keys, got {key!r}")
            parse_override(f"{key}=0")
        out.append(_plain(dict(cell), f"cells[{i}]"))
    keys = tuple(dict.fromkeys(k for c in out for k in c))
    return keys, out


def _loader(kind: str, base: Path | None, stream: Path | None):
    """A function overrides -> frozen config, using the real loader of the kind (base files read once)."""
    if kind == "run":
        base_cfg = load_config(base, stream=stream)
    else:
        base_cfg = load_finetune_config(base)
    # apply_overrides type-checks each override and reruns every cross-field check on the result, exactly
    # what load_config(base, stream=, overrides=) does after reading the files.
    return lambda overrides: apply_overrides(base_cfg, overrides)


def sweep_from_dict(
    data: Mapping[str, Any], *, source: Path | None = None, extra_overrides: Iterable[str] = ()
) -> Sweep:
    """Validate a parsed sweep file and resolve every cell (see the module docstring for the format).

    extra_overrides: `key=value` applied after the cell's own values (the CLI's trailing arguments); they may
    not set an axis key, since that would make the cells of the axis identical.
    """
    where = str(source) if source is not None else "sweep"
    head = _header(data, source, where)
    axis_keys, points = _expand(data)
    extra = list(extra_overrides)
    clash = sorted({".".join(parse_override(o)[0]) for o in extra} & set(axis_keys))
    if clash:
        raise ConfigError(f"override {clash[0]} sets a key the sweep varies; change the sweep file instead")
    cells = _resolve_cells(head, points, extra, source, where)
    name = data.get("name") or (source.stem if source is not None else "sweep")
    return Sweep(name=str(name), axis_keys=axis_keys, cells=tuple(cells), source=source, **head)


def _header(data: Any, source: Path | None, where: str) -> dict[str, Any]:
    """The sweep file's settings other than its cells: kind, base, stream, overrides, resources, retries."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a YAML mapping at the top level")
    unknown = sorted(set(map(str, data)) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown sweep key {unknown[0]!r}; valid keys: {', '.join(SWEEP_KEYS)}")
    kind = data.get("kind", "run")
    if kind not in SWEEP_KINDS:
        raise ConfigError(f"{where}: kind={kind!r} is not valid; choose one of: {', '.join(SWEEP_KINDS)}")
    base = _find(data["base"], source, "base") if data.get("base") is not None else None
    stream = None
    if data.get("stream") is not None:
        if kind != "run":
            raise ConfigError(f"{where}: 'stream:' applies to kind run only (finetune configs hold their data)")
        stream = _find(data["stream"], source, "stream")
    overrides = data.get("overrides") or []
    if isinstance(overrides, str) or not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{where}: overrides: expected a list of 'key=value' strings, got {overrides!r}")
    for o in overrides:
        parse_override(o)
    retries = data.get("retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"{where}: retries: expected an integer >= 0 (re-runs of a dead worker), got {retries!r}")
    return {
        "kind": kind,
        "base": base,
        "stream": stream,
        "overrides": tuple(overrides),
        "resources": _resources(data.get("resources")),
        "retries": retries,
    }


def _resolve_cells(
    head: Mapping[str, Any], points: list[dict[str, Any]], extra: list[str], source: Path | None, where: str
) -> list[Cell]:
    """Each point's config through the real loader (its own `base` when it names one), its id, duplicates refused."""
    kind, stream = head["kind"], head["stream"]
    loaders: dict[Path | None, Any] = {}

    def loader(path: Path | None) -> Any:
        """The loader of one base config (read once, whichever cells use it)."""
        if path not in loaders:
            try:
                loaders[path] = _loader(kind, path, stream)
            except (ConfigError, ValueError, TypeError) as err:
                raise ConfigError(f"{where}: the base config {path} (stream {stream}) is invalid: {err}") from None
        return loaders[path]

    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for index, point in enumerate(points):
        label = ", ".join(f"{k}={format_value(v)}" for k, v in point.items()) or "(base config)"
        # `base` as an axis or cell key picks that cell's config file (e.g. one YAML per method).
        cell_base = _find(point["base"], source, f"cell {index} ({label}): base") if "base" in point else head["base"]
        values = {k: v for k, v in point.items() if k != "base"}
        cell_overrides = (
            *head["overrides"], *(_override(k, v) for k, v in values.items()), *extra, "runtime.progress=false"
        )  # fmt: skip
        load = loader(cell_base)
        try:
            cfg = load(list(cell_overrides))
        except (ConfigError, ValueError, TypeError, KeyError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise ConfigError(f"{where}: cell {index} ({label}): {msg}") from None
        config = _plain(to_dict(cfg), "config")
        cid = cell_id(kind, config)
        if cid in seen:
            raise ConfigError(
                f"{where}: cells {seen[cid]} and {index} ({label}) resolve to the same config (id {cid}); "
                "remove the duplicate value"
            )
        seen[cid] = index
        cells.append(Cell(index=index, id=cid, axes=point, overrides=tuple(cell_overrides), config=config))
    return cells


def load_sweep(path: str | Path, *, overrides: Iterable[str] = (), check_models: bool = True) -> Sweep:
    """Read and validate a sweep file; `check_models` also checks block names / finetune options per model."""
    path = Path(path)
    data = load_yaml(path, "sweep file")  # malformed YAML: one line with file, line and column
    sweep = sweep_from_dict(data, source=path.resolve(), extra_overrides=overrides)
    if check_models:
        check_cells(sweep)
    return sweep


def check_cells(sweep: Sweep, cells: Sequence[Cell] | None = None) -> None:
    """Check what the config loader cannot: that block names (run) / options (finetune) exist in each model.

    Builds each distinct model once without weights (a few ms for CIFAR ResNets; no download).
    """
    models: dict[str, Any] = {}
    for cell in sweep.cells if cells is None else cells:
        section = cell.config["model"]
        # The architecture, its classes and block map decide which blocks exist; weights do not.
        key = json.dumps({k: v for k, v in section.items() if k not in ("pretrained", "checkpoint")}, sort_keys=True)
        try:
            if key not in models:
                shape_only = replace(
                    from_dict(ModelConfig, section, "model"), pretrained=False, checkpoint=None, allow_random=True
                )
                models[key] = create_model_from_config(shape_only)[0]
            model = models[key]
            if sweep.kind == "run":
                method = cell.config["method"]
                if "blocks" in method and list(method["blocks"]) == ["auto"]:
                    candidate_blocks(model)  # auto needs stages to choose from
                elif "blocks" in method:  # an adapting method (its settings have blocks / kind)
                    names = resolve_blocks(model, method["blocks"])
                    if not select_params(model, names, method["kind"]):
                        raise ValueError(
                            f"method.blocks={method['blocks']} with method.kind={method['kind']} selects no tensors"
                        )
            else:
                validate_options(model, cell.config["finetune"]["options"], cell.config["finetune"]["kind"])
        except (ValueError, KeyError, TypeError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise ConfigError(f"{sweep.source or 'sweep'}: cell {cell.index} ({cell.label()}): {msg}") from None
