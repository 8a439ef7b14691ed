"""A run's configuration: the sections each part of the package owns, composed into one frozen `Config`.

`Config` = model (`models.config.ModelConfig`) x method (`methods.settings.MethodSettings`, polymorphic on
`method.name`) x optimiser (`methods.optim.OptimConfig`) x stream (`streams.StreamSpec`) x runtime
(`runtime.RuntimeConfig`). The generic machinery (typed loading, YAML reading with `file:line:col` errors, dotted
overrides) is the schema layer (`tta_surgical.schema`), which knows none of these sections; this module only
composes them, and re-exports the names callers use (`load_config`, `apply_overrides`, `ConfigError`, ...).

The optimiser's defaults come from the method: the `optim:` section starts from the method's authors' optimiser
for the stream source's data regime (`MethodSettings.default_optim`), and a config file or override sets only what
differs (`optim.lr=1e-4` changes the learning rate of that optimiser). Nothing below `config` imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods.optim import OPTIM_IMPLEMENTATIONS, OPTIMIZERS, OptimConfig
from .methods.settings import PARAM_KINDS, REGIMES, AdaptSettings, MethodSettings, method_config
from .models.config import ModelConfig
from .runtime import COMPILE_MODES, DEVICES, ON_COLLAPSE, PRECISIONS, RuntimeConfig
from .schema import (
    ConfigError,
    apply_overrides,
    check_choice,
    check_fields,
    dump_yaml,
    from_dict,
    load_yaml,
    merge,
    parse_override,
    read_yaml,
    to_dict,
)
from .streams import StreamSpec, source_class
from .streams.spec import load_stream_file, stream_section

__all__ = [
    "COMPILE_MODES",
    "DEVICES",
    "ON_COLLAPSE",
    "OPTIMIZERS",
    "OPTIM_IMPLEMENTATIONS",
    "PARAM_KINDS",
    "PRECISIONS",
    "REGIMES",
    "AdaptSettings",
    "Config",
    "ConfigError",
    "MethodSettings",
    "ModelConfig",
    "OptimConfig",
    "RuntimeConfig",
    "StreamSpec",
    "apply_overrides",
    "check_choice",
    "check_fields",
    "default_optim",
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


def _default_method() -> MethodSettings:
    return method_config("tent")


def default_optim(method: MethodSettings | str, source: str = "cifar10") -> OptimConfig:
    """The optimiser `method` (settings or name) defaults to on a stream from `source` (its data regime)."""
    cls = type(method) if isinstance(method, MethodSettings) else MethodSettings.variant(method)
    return cls.default_optim(source_class(source).regime)


@dataclass(frozen=True)
class Config:
    """One run: model x method x optimiser x stream x runtime. `Config()` is Tent on a pretrained resnet20.

    `optim` None (or a section that leaves keys out) = the method's authors' optimiser for the stream's regime.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodSettings = field(default_factory=_default_method)
    optim: OptimConfig | None = None
    stream: StreamSpec = field(default_factory=StreamSpec)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.optim is None:
            object.__setattr__(self, "optim", default_optim(self.method, self.stream.source))

    @classmethod
    def context_defaults(cls, data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The optimiser section's defaults for the method and stream source `data` names (schema protocol)."""
        method, stream = data.get("method"), data.get("stream")
        if isinstance(method, MethodSettings):
            name: Any = method.name
        else:
            name = method.get("name", "tent") if isinstance(method, Mapping) else "tent"
        if isinstance(stream, StreamSpec):
            source: Any = stream.source
        else:
            source = stream.get("source", "cifar10") if isinstance(stream, Mapping) else "cifar10"
        if not isinstance(name, str) or not isinstance(source, str):
            return {}  # from_dict reports the bad value with its key
        try:
            optim = default_optim(name, source)
        except (ConfigError, KeyError):
            return {}  # an unknown method or source: from_dict reports it with the valid names
        return {"optim": to_dict(optim)}


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
        data = {**data, "stream": merge(base, section)}
    cfg = from_dict(Config, data)
    return apply_overrides(cfg, overrides)
