"""Run configuration: a frozen dataclass tree, read from YAML, with type-checked dotted overrides.

Data flow: YAML file (+ optional stream YAML) -> plain dict -> `from_dict` (unknown keys raise, values
type-checked and coerced, lists become tuples) -> frozen `Config` -> `apply_overrides` (each
`a.b.c=value` parsed with `yaml.safe_load` and checked against the field's type) -> a new frozen `Config`.
There is no global config: every function takes and returns values.

Enumerated fields are validated in each dataclass's `__post_init__`, so a tree built in code
(`method_config("tnet")`) fails exactly like one read from a file. The `method:` section is polymorphic: its
valid keys are those of the settings class the named method registers (`MethodSettings.variant`).
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
    "AdaptSettings",
    "Config",
    "ConfigError",
    "MethodSettings",
    "ModelConfig",
    "OptimConfig",
    "RuntimeConfig",
    "StreamSpec",
    "apply_overrides",
    "check_fields",
    "dump_yaml",
    "from_dict",
    "load_config",
    "load_stream_file",
    "load_yaml",
    "method_config",
    "parse_override",
    "read_yaml",
    "stream_section",
    "to_dict",
]

T = TypeVar("T")

PARAM_KINDS = ("all", "norm", "conv")
OPTIMIZERS = ("adam", "sgd")
OPTIM_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")
DEVICES = ("auto", "cpu", "cuda")
ON_COLLAPSE = ("warn", "reset", "stop", "off")
PRECISIONS = ("fp32", "bf16")
# torch.compile modes; reduce-overhead adds CUDA graphs (fixed-shape batches on a GPU; no effect on the CPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted key and what is valid."""


def check_choice(owner: str, key: str, value: object, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f"{owner}.{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


# ----------------------------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Which network, which weights, and how its input is normalised.

    `name`: a zoo name (resnet20, ...), `torchvision:<name>`, `timm:<name>` or `module:<python.path>:<factory>`.
    `pretrained`: true = the architecture's published weights (an error when unavailable, unless
    `allow_random: true`, which continues with random init and says so); false = random init (for `module:`,
    whatever the factory returns); a string = a checkpoint path (older form of `checkpoint`).
    `checkpoint`: your weights for the architecture, loaded strictly with weights_only=True; replaces the
    pretrained ones. `num_classes`: the classifier size (null = the architecture's default).
    `mean`/`std`: the normalisation applied inside the model, which is always fed [0, 1] images: `auto` = the
    model's own (zoo: as trained; torchvision/timm: their weights' statistics, ImageNet; module: none), null =
    raw [0, 1] input, or three numbers each. `block_map`: a YAML file mapping block names to module names
    (`input: [conv1, bn1]`, `block1: [layer1]`, ..., `head: [fc]`), for models whose blocks cannot be inferred.
    """

    name: str = "resnet20"
    pretrained: bool | str = True
    allow_random: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | str | None = "auto"
    std: tuple[float, ...] | str | None = "auto"
    block_map: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model.name must be a non-empty model name (see `tta-surgical blocks --help`)")
        if ":" in self.name:
            source, _, target = self.name.partition(":")
            if source not in ("torchvision", "timm", "module"):
                raise ConfigError(
                    f"model.name={self.name!r} has an unknown source {source!r}; valid: a zoo name, "
                    "torchvision:<name>, timm:<name>, module:<python.path>:<factory>"
                )
            if not target or target.count(":") != (1 if source == "module" else 0):
                form = "module:<python.path>:<factory>" if source == "module" else f"{source}:<name>"
                raise ConfigError(f"model.name={self.name!r} is malformed; expected {form}")
        if isinstance(self.pretrained, str) and not self.pretrained:
            raise ConfigError("model.pretrained must be true, false or a checkpoint path, got an empty string")
        if isinstance(self.pretrained, str) and self.checkpoint is not None:
            raise ConfigError("model.pretrained is a path and model.checkpoint is set: give the checkpoint once")
        for key in ("checkpoint", "block_map"):
            if getattr(self, key) == "":
                raise ConfigError(f"model.{key} must be a file path or null, got an empty string")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"model.num_classes must be >= 1 or null, got {self.num_classes}")
        self._check_normalisation()

    def _check_normalisation(self) -> None:
        kinds = {"auto" if v == "auto" else "null" if v is None else "numbers" for v in (self.mean, self.std)}
        if len(kinds) != 1:
            raise ConfigError(
                "model.mean and model.std go together (both auto, both null, or both numbers), got "
                f"{self.mean!r}, {self.std!r}"
            )
        for key, value in (("mean", self.mean), ("std", self.std)):
            if isinstance(value, str) and value != "auto":
                raise ConfigError(f"model.{key}={value!r} is not valid; choose auto, null, or three numbers")
            if isinstance(value, tuple) and (len(value) != 3 or not all(math.isfinite(v) for v in value)):
                raise ConfigError(f"model.{key} must be three finite numbers (one per RGB channel), got {list(value)}")
        if isinstance(self.std, tuple) and not all(v > 0 for v in self.std):
            raise ConfigError(f"model.std must be positive, got {list(self.std)}")


@dataclass(frozen=True)
class MethodSettings:
    """The `method:` section: which online method runs, and its own settings.

    Each method declares its settings as a frozen subclass of this class in its own module under
    `tta_surgical/methods/` (registered with the method), so the section's valid keys depend on `name`: reading a
    config picks the subclass registered for `name` (`MethodSettings.variant`), rejects keys that method does not
    have (listing the ones it has) and type-checks the rest. Build one in code with `method_config(name, **kw)`.
    """

    name: str = "tent"

    def __post_init__(self) -> None:
        cls = MethodSettings.variant(self.name)
        if not isinstance(self, cls):
            raise ConfigError(
                f"method.name={self.name!r} belongs to settings {cls.__name__}, not {type(self).__name__}; "
                f"build it with method_config({self.name!r}, ...)"
            )

    @staticmethod
    def variant(name: object) -> type[MethodSettings]:
        """The settings class registered for the method `name` (a `ConfigError` listing the names otherwise)."""
        from .methods import METHODS  # lazy: the methods import torch, and they import this module
        from .registry import UnknownNameError

        try:
            return METHODS.get(name).Settings  # type: ignore[arg-type]
        except UnknownNameError as err:
            raise ConfigError(f"method.name: {err}") from None


# A settings class picks its subclass from one key of the section (see `_coerce` and `_set_override`).
_VARIANT_KEY = {MethodSettings: "name"}


@dataclass(frozen=True)
class AdaptSettings(MethodSettings):
    """Settings of every method that updates parameters: which ones (`blocks` x `kind`, see `models.select_params`).

    `blocks`: block names (`input`, `block1`, ..., `head`, `all`, ranges `block1-2`, units `block1.0`), or `auto`
    (alone): the runtime chooses per batch, without labels (`methods.selection`; `kind` then does not apply);
    `kind`: `all` parameters of those blocks, `norm` (their norm layers' affines) or `conv` (everything else).
    The defaults are each method's authors' choice; subclasses override them.
    """

    blocks: tuple[str, ...] = ("all",)
    kind: str = "norm"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method", "kind", self.kind, PARAM_KINDS)
        if not self.blocks or not all(isinstance(b, str) and b for b in self.blocks):
            raise ConfigError(f"method.blocks must be a non-empty list of block names, got {list(self.blocks)!r}")
        if "auto" in self.blocks and len(self.blocks) > 1:
            raise ConfigError(
                f"method.blocks: auto chooses the blocks itself and cannot be combined with others, got "
                f"{list(self.blocks)!r}; write blocks: auto, or list the blocks to adapt"
            )


def method_config(name: str, **settings: Any) -> MethodSettings:
    """The settings of the method `name` with `settings` over its defaults: the one way code builds a method's config.

    Values are checked as in a YAML file (unknown keys list the valid ones; lists become tuples).
    """
    return from_dict(MethodSettings, {"name": name, **settings}, "method")


def _default_method() -> MethodSettings:
    return method_config("tent")


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
        check_choice("optim", "name", self.name, OPTIMIZERS)
        check_choice("optim", "implementation", self.implementation, OPTIM_IMPLEMENTATIONS)
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr must be a finite number >= 0, got {self.lr!r}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must both lie in [0, 1), got {list(self.betas)!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum must lie in [0, 1), got {self.momentum!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):  # NaN fails every comparison
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
    # Collapse detection (`tta_surgical.collapse`): what to do when predictions concentrate on one class while the
    # prediction entropy falls (warn: a warning and a count in summary.json; reset: also restore the method's
    # source state before the next batch; stop: end the run there; off: no monitoring), over a window of
    # `collapse_window` images, with the share and entropy-ratio thresholds of the module. 1,000 images = 5 default
    # batches: a run shorter than the window is never judged (2,000 missed Tent at lr=1000 on a 1,500-image stream),
    # and replaying 516 measured runs' results lines at 1,000 flags exactly the runs 2,000 flags (benchmarks/RESULTS.md
    # section 10).
    on_collapse: str = "warn"
    collapse_window: int = 1000
    collapse_share: float = 0.6
    collapse_entropy_ratio: float = 0.5

    def __post_init__(self) -> None:
        check_choice("runtime", "on_collapse", self.on_collapse, ON_COLLAPSE)
        if self.collapse_window < 1:
            raise ConfigError(f"runtime.collapse_window must be >= 1 image, got {self.collapse_window}")
        if not 0.0 < self.collapse_share <= 1.0:
            raise ConfigError(f"runtime.collapse_share must lie in (0, 1], got {self.collapse_share}")
        if not 0.0 < self.collapse_entropy_ratio <= 1.0:
            raise ConfigError(f"runtime.collapse_entropy_ratio must lie in (0, 1], got {self.collapse_entropy_ratio}")
        check_choice("runtime", "device", self.device, DEVICES)
        check_choice("runtime", "precision", self.precision, PRECISIONS)
        check_choice("runtime", "compile_mode", self.compile_mode, COMPILE_MODES)
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"runtime.num_workers must be >= 0 or null, got {self.num_workers!r}")


@dataclass(frozen=True)
class Config:
    """One run: model x method x optimiser x stream x runtime. `Config()` is Tent on a pretrained resnet20."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodSettings = field(default_factory=_default_method)
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
    """A type as messages write it: `int`, `bool | None`, `int | 'all' | None` (never `Union[..., NoneType]`)."""
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the type `tp` and return it in canonical form (lists -> tuples, ints -> floats)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return _coerce_union(tp, value, path)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}={value!r} is not valid; choose one of: {', '.join(map(str, typing.get_args(tp)))}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    if origin in (tuple, list, set, frozenset, dict) or tp is dict:
        return _coerce_container(tp, origin or dict, value, path)
    return _coerce_scalar(tp, value, path)


def _coerce_union(tp: Any, value: Any, path: str) -> Any:
    """`X | Y | None`: null where allowed, else the first arm that accepts the value."""
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
    for arm in args:
        if arm is type(None):
            continue
        try:
            return _coerce(arm, value, path)
        except ConfigError:
            continue
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _coerce_container(tp: Any, origin: Any, value: Any, path: str) -> Any:
    """Tuples (fixed or `...`), lists, sets and dicts, item by item."""
    args = typing.get_args(tp)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping ({_type_name(tp)}), got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, f"{path}.{k}"): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    variadic = origin is tuple and len(args) == 2 and args[1] is Ellipsis
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        if not variadic:
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}")
        value = [value]  # a single item where a list is expected: `method.blocks=head`
    if origin is not tuple:
        return origin(_coerce(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value))
    if variadic:
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if not args:
        return tuple(value)
    if len(value) != len(args):
        raise ConfigError(f"{path}: expected a list of {len(args)} items ({_type_name(tp)}), got {list(value)!r}")
    return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _coerce_scalar(tp: Any, value: Any, path: str) -> Any:
    """null, bool, int (whole numbers written as floats or `1e4` strings too), float, str, Path, other classes."""
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp in (int, float):
        if tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        # YAML reads `1e4` as a string and `1.0e4` as a float; accept either (for int: when it is whole).
        number = _as_number(value)
        if number is not None and (tp is float or (math.isfinite(number) and float(number).is_integer())):
            return tp(number)
        raise ConfigError(f"{path}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")
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


# Keys that used to exist, and what replaced them (appended to the unknown-key message).
_MOVED_KEYS = {
    "method.episodic": "resetting before every batch is the stream's job now: set stream.reset=episodic",
}


def _shown_key(key: object) -> str:
    """A key as messages write it: plain names as they are, anything else (a number, odd characters) as its repr,
    so every message stays on one line."""
    return key if isinstance(key, str) and key.isprintable() and key.strip() == key and key else repr(key)


def _unknown_key_error(cls: type, keys: Iterable[object], path: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    dotted = [_dotted(path, k) for k in sorted(map(_shown_key, keys))]
    where = f"in section {path!r}" if path else "at the top level"
    if issubclass(cls, MethodSettings) and path:
        where += f" for method {getattr(cls, 'name', '?')!r} ({path}.name)"
    hints = "".join(f"; {k}: {_MOVED_KEYS[k]}" for k in dotted if k in _MOVED_KEYS)
    return ConfigError(f"unknown config key {', '.join(dotted)}; valid keys {where}: {', '.join(valid)}{hints}")


def _resolve_variant(cls: type[T], data: Any, path: str = "") -> type[T]:
    """For a polymorphic section type (`_VARIANT_KEY`), the subclass its data names; else `cls` itself."""
    key = _VARIANT_KEY.get(cls)
    if key is None or not isinstance(data, Mapping):
        return cls
    default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
    name = data.get(key, default)
    if not isinstance(name, str):
        raise ConfigError(f"{_dotted(path, key)}: expected a name (a string), got {name!r}")
    return cls.variant(name)  # type: ignore[attr-defined]


def _switch_variant(cls: type, section: Mapping[str, Any], key: str, value: Any, path: str) -> dict[str, Any]:
    """`method.name=other`: the section for the other variant. Keys left at the old variant's defaults are dropped
    (they are not the user's choice and may not exist in the new one); values the user changed are kept, so an
    invalid combination still fails loudly when the new section is checked."""
    new_cls = _resolve_variant(cls, {key: value}, path)
    old = _resolve_variant(cls, section, path)
    defaults = to_dict(from_dict(old, {key: section.get(key)}, path))
    kept = {k: v for k, v in section.items() if k != key and _normalise_plain(v) != _normalise_plain(defaults.get(k))}
    del new_cls  # resolved only to fail early on an unknown name
    return {key: value, **kept}


def _normalise_plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_normalise_plain(x) for x in v]
    return v


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build the dataclass `cls` from a mapping, recursing into nested dataclasses.

    Unknown keys raise `ConfigError` naming the full dotted key and the valid keys; missing keys take the
    defaults; every value is type-checked (lists become tuples). `path` is the dotted prefix for messages.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys to values, got {data!r}")
    cls = _resolve_variant(cls, data, path)
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
        # A `__post_init__` that raises plain TypeError/ValueError: keep its message, add where.
        raise ConfigError(f"{path or 'config'}: {err}") from err


def check_fields(obj: Any, path: str) -> None:
    """Type-check and canonicalise every field of the frozen dataclass `obj` in place, by the rules of `from_dict`,
    so a section built in code (`StreamSpec(order="random")`) fails exactly like one read from YAML."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.init:
            value = getattr(obj, f.name)
            new = _coerce(hints[f.name], value, _dotted(path, f.name))
            if new is not value:
                object.__setattr__(obj, f.name, new)


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects a key written twice in one mapping (plain YAML keeps the last one silently,
    so `lr: 1e-3` ... `lr: 1e-2` would hide a mistake). Merge keys (`<<: *base`) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (first on line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(text: str, err: yaml.YAMLError) -> tuple[int, int, str] | None:
    """(line, column, what) of a PyYAML error, 1-based, on one line; None when PyYAML gives no position."""
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        what = str(getattr(err, "problem", None) or "invalid YAML")
        context = getattr(err, "context", None)
        if context:
            what += f" ({context})"
        return mark.line + 1, mark.column + 1, what.replace("\n", " ")
    if isinstance(err, yaml.reader.ReaderError):
        before = text[: err.position]
        col = err.position - (before.rfind("\n") + 1) + 1
        return before.count("\n") + 1, col, f"the character {chr(err.character)!r} is not allowed in YAML"
    return None


def _yaml_error(path: Path, text: str, err: yaml.YAMLError) -> ConfigError:
    """One line: `file:line:column: invalid YAML: what (while ...)` from PyYAML's multi-line message."""
    found = _yaml_problem(text, err)
    if found is None:
        return ConfigError(f"{path}: invalid YAML: {err}".replace("\n", " "))
    line, col, what = found
    return ConfigError(f"{path}:{line}:{col}: invalid YAML: {what}")


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The data of a YAML file, read safely (`yaml.SafeLoader`; a key twice in one mapping is an error): the one
    place this package parses YAML files. A missing file raises `FileNotFoundError` naming `what`; text that is not
    UTF-8 or not valid YAML raises a one-line `ConfigError` with the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise _yaml_error(path, text, err) from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None


def load_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping with `read_yaml` (an empty file is an empty mapping; anything else is a `ConfigError`)."""
    data = read_yaml(path, what)
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
        found = _yaml_problem(raw, err)
        what = f"{found[2]} at column {found[1]}" if found else str(err).replace("\n", " ")
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {what}") from None
    except RecursionError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: nested too deeply") from None
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
    variant_key = _VARIANT_KEY.get(tp) if is_section else None
    if rest:
        if not is_section:
            raise ConfigError(f"{here} is a value, not a section; cannot set {_dotted(here, '.'.join(rest))}")
        if rest == [variant_key]:
            data[key] = _switch_variant(tp, data[key], variant_key, value, here)
            return
        _set_override(_resolve_variant(tp, data[key], here), data[key], rest, value, raw, here)
        return
    if is_section:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{here} is a section; set its keys ({here}.KEY=VALUE) or give a mapping, got {value!r}")
        # `model={name: resnet56}` merges into the section rather than resetting its other keys; a polymorphic
        # section's variant key (`method={name: eata, ...}`) is set first, so the other keys are checked against it.
        for sub, subvalue in sorted(value.items(), key=lambda kv: str(kv[0]) != variant_key):
            text = yaml.safe_dump(subvalue).strip()
            _set_override(cls, data, [key, str(sub)], subvalue, text, path)
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
    # `method.name=eata` first: the method's other keys are checked against the method it names.
    hints = _hints(type(cfg)) if dataclasses.is_dataclass(cfg) else {}
    switches = {f"{name}.{_VARIANT_KEY[tp]}" for name, tp in hints.items() if tp in _VARIANT_KEY}
    overrides.sort(key=lambda text: text.split("=", 1)[0].strip() not in switches)
    for text in overrides:
        keys, value = parse_override(text)
        raw = text.split("=", 1)[1].strip()
        _set_override(type(cfg), data, keys, value, raw, "")
    return from_dict(type(cfg), data)


def stream_section(data: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The fields of a stream file's mapping, which holds exactly one top-level `stream:` section."""
    if set(data) != {"stream"}:
        extra = sorted(set(data) - {"stream"})
        hint = f"unexpected top-level keys {extra}" if extra else "no top-level 'stream:' key"
        raise ConfigError(f"{where}: a stream file holds exactly one top-level 'stream:' section ({hint})")
    section = data["stream"] or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: 'stream:' must be a mapping of stream fields, got {section!r}")
    return section


def load_stream_file(path: str | Path) -> Mapping[str, Any]:
    """The `stream:` section of a stream YAML (`streams/*.yaml`): the one reader of stream files."""
    return stream_section(load_yaml(path), str(path))


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
        section = load_stream_file(stream)
        base = data.get("stream") or {}
        if not isinstance(base, Mapping):
            raise ConfigError(f"{path}: 'stream:' must be a mapping of stream fields, got {base!r}")
        data = {**data, "stream": _merge(base, section)}
    cfg = from_dict(Config, data)
    return apply_overrides(cfg, overrides)
