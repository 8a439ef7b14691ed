"""The schema layer: typed frozen dataclass trees from YAML and dotted overrides. It imports nothing of tta_surgical.

Data flow: YAML file -> plain dict (`read_yaml`: safe loader, a key twice is an error, problems reported as
`file:line:col`) -> `from_dict` (unknown keys raise naming the valid ones, values type-checked and coerced, lists
become tuples) -> a frozen dataclass -> `apply_overrides` (each `a.b.c=value` parsed with `yaml.safe_load` and
checked against the field's type) -> a new frozen dataclass. There is no global config: every function takes and
returns values. Each part of the package owns its section's dataclass next to its code (a method's settings, the
stream spec, the runtime, the model); `tta_surgical.config` composes them into a run config.

Two protocols a section class may follow (duck-typed, so this module needs no knowledge of any section):

- **Polymorphic section**: a class that declares `variant_key` (a ClassVar naming one of its fields) and a
  classmethod `variant(name) -> subclass` is resolved to the subclass its data names (`method: {name: eata}` reads
  as EATA's settings), and unknown keys are reported for that variant.
- **Context defaults**: a class with a classmethod `context_defaults(data) -> {section: {key: value}}` gives
  defaults of some sections that depend on the values of others (a run's optimiser defaults to the optimiser of
  the method it names). `from_dict` fills them under the data; `apply_overrides` first drops values that equal
  them (they were not the user's choice), so after `method.name=memo` the optimiser is MEMO's unless set.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_choice",
    "check_fields",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "merge",
    "parse_override",
    "read_yaml",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted key and what is valid."""


def check_choice(owner: str, key: str, value: object, valid: Iterable[str]) -> None:
    """`owner.key=value` must be one of `valid`; the error lists them."""
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f"{owner}.{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _variant_key(cls: Any) -> str | None:
    """The field that picks the subclass of a polymorphic section class (declared on that class itself)."""
    return cls.__dict__.get("variant_key") if isinstance(cls, type) else None


def _section_type(tp: Any) -> type | None:
    """The dataclass of a section field: `Section` or `Section | None`; None for value fields."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]) and isinstance(arms[0], type):
            return arms[0]
    return None


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
    section = _section_type(tp)
    if section is not None and value is not None and section is not tp:
        return _coerce(section, value, path)  # an optional section: its own errors, not "expected X | None"
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


def _shown_key(key: object) -> str:
    """A key as messages write it: plain names as they are, anything else (a number, odd characters) as its repr,
    so every message stays on one line."""
    return key if isinstance(key, str) and key.isprintable() and key.strip() == key and key else repr(key)


def _unknown_key_error(cls: type, keys: Iterable[object], path: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    dotted = [_dotted(path, k) for k in sorted(map(_shown_key, keys))]
    where = f"in section {path!r}" if path else "at the top level"
    key = next((k for k in (getattr(c, "variant_key", None) for c in cls.__mro__) if k), None)
    if key and path:
        where += f" for {path} {getattr(cls, key, '?')!r} ({path}.{key})"
    # A section class may list keys that used to exist and what replaced them (`moved_keys`, a ClassVar).
    moved = {_dotted(path, k): v for k, v in getattr(cls, "moved_keys", {}).items()}
    hints = "".join(f"; {k}: {moved[k]}" for k in dotted if k in moved)
    return ConfigError(f"unknown config key {', '.join(dotted)}; valid keys {where}: {', '.join(valid)}{hints}")


def _resolve_variant(cls: type[T], data: Any, path: str = "") -> type[T]:
    """For a polymorphic section type (see the module doc), the subclass its data names; else `cls` itself."""
    key = _variant_key(cls)
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
    context = getattr(cls, "context_defaults", None)
    if context is not None:
        data = merge(context(data), data)
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
    section = _section_type(tp)
    is_section = section is not None
    variant_key = _variant_key(section)
    if rest:
        if section is None:
            raise ConfigError(f"{here} is a value, not a section; cannot set {_dotted(here, '.'.join(rest))}")
        if data.get(key) is None:
            data[key] = {}  # an optional section left to its defaults: the override starts it
        if rest == [variant_key]:
            data[key] = _switch_variant(section, data[key], variant_key, value, here)
            return
        _set_override(_resolve_variant(section, data[key], here), data[key], rest, value, raw, here)
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


def _without_context_defaults(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` with the values that equal its context defaults dropped (see the module doc): they were filled in, not
    chosen, so after the overrides `from_dict` fills them again from the new context."""
    context = getattr(cls, "context_defaults", None)
    if context is None:
        return data
    out = dict(data)
    for section, defaults in context(data).items():
        values = out.get(section)
        if isinstance(values, Mapping):
            out[section] = {
                k: v for k, v in values.items() if _normalise_plain(v) != _normalise_plain(to_dict(defaults.get(k)))
            }
    return out


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `extra` wins, nested mappings merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


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
    data = _without_context_defaults(type(cfg), to_dict(cfg))
    # `method.name=eata` first: the method's other keys are checked against the method it names.
    hints = _hints(type(cfg)) if dataclasses.is_dataclass(cfg) else {}
    variant_keys = {name: _variant_key(_section_type(tp)) for name, tp in hints.items()}
    switches = {f"{name}.{key}" for name, key in variant_keys.items() if key}
    overrides.sort(key=lambda text: text.split("=", 1)[0].strip() not in switches)
    for text in overrides:
        keys, value = parse_override(text)
        raw = text.split("=", 1)[1].strip()
        _set_override(type(cfg), data, keys, value, raw, "")
    return from_dict(type(cfg), data)


