"""Run configuration: a frozen dataclass tree, read from YAML, with type-checked dotted overrides.

Data flow: YAML file (+ optional stream YAML) -> plain dict -> `from_dict` (unknown keys raise, values
type-checked and coerced, lists become tuples) -> frozen `Config` -> `apply_overrides` (each
`a.b.c=value` parsed with `yaml.safe_load` and checked against the field's type) -> a new frozen `Config`.
There is no global config: every function takes and returns values.

Enumerated fields are validated in each dataclass's `__post_init__`, so a tree built in code
(`MethodConfig(name="tnet")`) fails exactly like one read from a file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .streams import StreamSpec

__all__ = [
    "METHOD_NAMES",
    "Config",
    "ConfigError",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "RuntimeConfig",
    "StreamSpec",
    "apply_overrides",
    "dump_yaml",
    "from_dict",
    "load_config",
    "load_yaml",
    "method_config",
    "parse_override",
    "to_dict",
]

T = TypeVar("T")

# The method names `tta_surgical.methods.METHODS` registers (kept here so reading a config does not import torch
# models; `tests/test_methods.py` checks the two agree).
METHOD_NAMES = ("source", "norm", "tent", "surgical")
PARAM_KINDS = ("all", "norm", "conv")
BN_STATS = ("batch", "source")
WEIGHTINGS = ("none", "auto-rgn")
# methods whose optimiser a weighting can drive (the ones with a gradient update)
WEIGHTED_METHODS = ("tent", "surgical")
OPTIMIZERS = ("adam", "sgd")
OPTIM_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
# torch.compile modes; reduce-overhead adds CUDA graphs (fixed-shape batches on a GPU; no effect on the CPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted key and what is valid."""


def _check_choice(owner: str, key: str, value: object, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f"{owner}.{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


# ----------------------------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Which network, and which weights (True: the registered pretrained weights; a string: a checkpoint path)."""

    name: str = "resnet20"
    pretrained: bool | str = True
    allow_random: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model.name must be a non-empty model name (see `tta-surgical blocks --help`)")
        if isinstance(self.pretrained, str) and not self.pretrained:
            raise ConfigError("model.pretrained must be true, false or a checkpoint path, got an empty string")


@dataclass(frozen=True)
class MethodConfig:
    """What adapts and how (see `tta_surgical.methods`).

    `tent` is the surgical method fixed to blocks=[all], kind=norm, bn_stats=batch; `prior_strength` N mixes
    the source BN statistics into the test-batch ones (Schneider et al. 2020):
    mu = N/(N+n) mu_source + n/(N+n) mu_batch, the same for the variance, n the batch size; 0 = batch only.

    `weighting` (tent/surgical only): `none`, every adapted tensor at optim.lr; `auto-rgn`, one optimiser group
    per tensor with lr = optim.lr x its auto-RGN weight (||g||/||theta|| of the entropy gradient, divided by the
    max over tensors; `tta_surgical.autotune`), computed at the first batch and every `weighting_every` batches
    after it (and after every reset).
    """

    name: str = "tent"
    blocks: tuple[str, ...] = ("all",)
    kind: str = "norm"
    bn_stats: str = "batch"
    prior_strength: float = 0.0
    steps: int = 1
    episodic: bool = False
    weighting: str = "none"
    weighting_every: int = 50

    def __post_init__(self) -> None:
        _check_choice("method", "name", self.name, METHOD_NAMES)
        _check_choice("method", "kind", self.kind, PARAM_KINDS)
        _check_choice("method", "bn_stats", self.bn_stats, BN_STATS)
        _check_choice("method", "weighting", self.weighting, WEIGHTINGS)
        if self.weighting != "none" and self.name not in WEIGHTED_METHODS:
            raise ConfigError(
                f"method.weighting={self.weighting} sets per-tensor learning rates, so it needs a method that updates "
                f"parameters ({', '.join(WEIGHTED_METHODS)}), not method.name={self.name}; use method.weighting=none"
            )
        if self.weighting_every < 1:
            raise ConfigError(
                f"method.weighting_every must be >= 1 (refresh the weights every N batches), got {self.weighting_every}"
            )
        if not self.blocks or not all(isinstance(b, str) and b for b in self.blocks):
            raise ConfigError(f"method.blocks must be a non-empty list of block names, got {list(self.blocks)!r}")
        if not (self.prior_strength >= 0 and math.isfinite(self.prior_strength)):
            raise ConfigError(f"method.prior_strength must be a finite number >= 0, got {self.prior_strength!r}")
        if self.prior_strength > 0 and self.bn_stats != "batch":
            raise ConfigError("method.prior_strength mixes source into test-batch statistics; it needs bn_stats=batch")
        if self.steps < 1:
            raise ConfigError(f"method.steps must be >= 1 (gradient steps per batch), got {self.steps}")
        if self.name == "tent" and (self.blocks != ("all",) or self.kind != "norm" or self.bn_stats != "batch"):
            raise ConfigError(
                "method tent fixes blocks=[all], kind=norm, bn_stats=batch; to choose blocks, kind or statistics "
                f"use method.name=surgical (got blocks={list(self.blocks)}, kind={self.kind}, bn_stats={self.bn_stats})"
            )


def method_config(name: str, **settings: Any) -> MethodConfig:
    """The settings of the method `name` with `settings` over its defaults: the one way code builds a method's config."""
    return MethodConfig(name=name, **settings)


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser of the adapted parameters (Tent's CIFAR setting by default: Adam, lr 1e-3)."""

    name: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    # How torch runs the update (same maths, floating-point differences only): `fused` one kernel over all
    # tensors, `foreach` batched ops, `for-loop` one tensor at a time; `auto` = fused where this torch supports it
    # for the parameters' device and dtype, else foreach. At small batches the per-tensor loop's fixed cost
    # (~10 small kernels per adapted tensor) is a noticeable share of a Tent step.
    implementation: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("optim", "name", self.name, OPTIMIZERS)
        _check_choice("optim", "implementation", self.implementation, OPTIM_IMPLEMENTATIONS)
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr must be a finite number >= 0, got {self.lr!r}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must both lie in [0, 1), got {list(self.betas)!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum must lie in [0, 1), got {self.momentum!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"optim.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.name == "sgd" and self.nesterov and self.momentum <= 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the run executes; none of these change which parameters adapt."""

    device: str = "auto"
    precision: str = "fp32"
    # channels_last (NHWC) for 4-D inputs: on by default because oneDNN's NHWC convolutions are faster on the CPU
    # (benchmarks/RESULTS.md §5); no effect on which parameters adapt, results equal to floating-point tolerance.
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"
    # DataLoader worker processes that read and decode ImageNet-style files (null = min(8, CPUs); 0 = in this
    # process); CIFAR sources ignore it (their images are in memory).
    num_workers: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("runtime", "device", self.device, DEVICES)
        _check_choice("runtime", "precision", self.precision, PRECISIONS)
        _check_choice("runtime", "compile_mode", self.compile_mode, COMPILE_MODES)
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"runtime.num_workers must be >= 0 or null, got {self.num_workers!r}")


@dataclass(frozen=True)
class Config:
    """One run: model x method x optimiser x stream x runtime. `Config()` is Tent on a pretrained resnet20."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stream: StreamSpec = field(default_factory=StreamSpec)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# ----------------------------------------------------------------------------------------------------------------
# Generic dict <-> dataclass conversion with type checks
# ----------------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of a dataclass (annotations are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def _dotted(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the type `tp` and return it in canonical form (lists -> tuples, ints -> floats)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(arm, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{path}={value!r} is not valid; choose one of: {', '.join(map(str, args))}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                value = [value]  # a single item where a list is expected: `method.blocks=head`
            else:
                raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if not args:
            return tuple(value)
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} items ({_type_name(tp)}), got {list(value)!r}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (list, set, frozenset):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}")
        items = [_coerce(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping ({_type_name(tp)}), got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, f"{path}.{k}"): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # YAML reads `1e4` as a string and `1.0e4` as a float; accept either when it is a whole number.
        number = _as_number(value)
        if number is not None and math.isfinite(number) and float(number).is_integer():
            return int(number)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number = _as_number(value)
        if number is not None:
            return float(number)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{path}: expected a path string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {tp!r} in the config schema")


def _as_number(value: Any) -> float | int | None:
    """An int/float, or a numeric string such as '1e-3' (which YAML 1.1 reads as a string); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return None


def _unknown_key_error(cls: type, keys: Iterable[str], path: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    names = ", ".join(_dotted(path, k) for k in sorted(map(str, keys)))
    where = f"in section {path!r}" if path else "at the top level"
    return ConfigError(f"unknown config key {names}; valid keys {where}: {', '.join(valid)}")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build the dataclass `cls` from a mapping, recursing into nested dataclasses.

    Unknown keys raise `ConfigError` naming the full dotted key and the valid keys; missing keys take the
    defaults; every value is type-checked (lists become tuples). `path` is the dotted prefix for messages.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise _unknown_key_error(cls, unknown, path)
    hints = _hints(cls)
    kwargs = {key: _coerce(hints[key], value, _dotted(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        # Validation in a `__post_init__` we do not own (e.g. StreamSpec): keep its message, add where.
        raise ConfigError(f"{path or 'config'}: {err}") from err


def to_dict(cfg: Any) -> Any:
    """The plain-data form of a config tree (dicts, lists, scalars), ready for YAML/JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple, set, frozenset)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with `yaml.safe_load` (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{path}: expected a YAML mapping (key: value lines) at the top level, got {kind}")
    return data


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included) as YAML, so a run can be repeated exactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False, default_flow_style=None)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], yaml.safe_load(value)); an empty value is null."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=1e-3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from None
    return key.split("."), value


def _set_override(cls: type, data: dict[str, Any], keys: list[str], value: Any, raw: str, path: str) -> None:
    """Type-check one override against the schema of `cls` and write it into the plain-dict tree `data`."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    key, rest = keys[0], keys[1:]
    if key not in names:
        raise _unknown_key_error(cls, [key], path)
    here = _dotted(path, key)
    tp = _hints(cls)[key]
    is_section = dataclasses.is_dataclass(tp) and isinstance(tp, type)
    if rest:
        if not is_section:
            raise ConfigError(f"{here} is a value, not a section; cannot set {_dotted(here, '.'.join(rest))}")
        _set_override(tp, data[key], rest, value, raw, here)
        return
    if is_section:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{here} is a section; set its keys ({here}.KEY=VALUE) or give a mapping, got {value!r}")
        # `model={name: resnet56}` merges into the section rather than resetting its other keys.
        for sub, subvalue in value.items():
            _set_override(tp, data[key], [str(sub)], subvalue, yaml.safe_dump(subvalue).strip(), here)
        return
    try:
        new = _coerce(tp, value, here)
    except ConfigError:
        # YAML turned e.g. `stream.path=2024` into an int; a string field takes the text as written.
        if isinstance(value, str) or not _accepts_str(tp):
            raise
        new = _coerce(tp, raw, here)
    data[key] = to_dict(new)


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return False


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Apply `section.key=value` overrides (values parsed as YAML, type-checked) and return a new frozen tree.

    Each override is checked as it is read (unknown keys and wrong types name the dotted key); the
    cross-field checks of `__post_init__` run once on the result, so the order of overrides does not matter.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    overrides = list(overrides)
    if not overrides:
        return cfg
    data = to_dict(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        raw = text.split("=", 1)[1].strip()
        _set_override(type(cfg), data, keys, value, raw, "")
    return from_dict(type(cfg), data)


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `extra` wins, nested mappings merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None,
    *,
    stream: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Read a run config: the YAML at `path` (sections model, method, optim, stream, runtime; all optional),
    then the `stream:` section of the stream YAML `stream` merged over it, then the dotted `overrides`."""
    data: dict[str, Any] = load_yaml(path) if path is not None else {}
    if stream is not None:
        sdata = load_yaml(stream)
        if set(sdata) != {"stream"}:
            extra = sorted(set(sdata) - {"stream"})
            hint = f"unexpected top-level keys {extra}" if extra else "no top-level 'stream:' key"
            raise ConfigError(f"{stream}: a stream file holds exactly one top-level 'stream:' section ({hint})")
        section = sdata["stream"] or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"{stream}: 'stream:' must be a mapping of stream fields, got {section!r}")
        base = data.get("stream") or {}
        if not isinstance(base, Mapping):
            raise ConfigError(f"{path}: 'stream:' must be a mapping of stream fields, got {base!r}")
        data = {**data, "stream": _merge(base, section)}
    cfg = from_dict(Config, data)
    return apply_overrides(cfg, overrides)
