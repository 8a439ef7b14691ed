"""The `method:` section: `MethodSettings` (every method) and `AdaptSettings` (methods that update parameters).

Each method declares its settings as a frozen subclass in its own module and registers it with the method
(`methods.base.register_method`), so the section's valid keys depend on `method.name` (a polymorphic section of the
schema layer: `variant_key` / `variant`). Everything a method defaults to lives in its settings class and nowhere
else: its own fields' defaults and, in `optimizers`, its authors' optimiser per data regime. The CLI, the Python API
(`tta_surgical.adapt`) and sweeps all read these; the shipped YAMLs under `configs/` hold only what differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from ..models.blocks import KINDS
from ..registry import Registry, UnknownNameError
from ..schema import ConfigError, check_choice, from_dict
from .optim import OptimConfig

__all__ = [
    "PARAM_KINDS",
    "REGIMES",
    "SETTINGS",
    "AdaptSettings",
    "MethodSettings",
    "method_config",
]

PARAM_KINDS = KINDS
# Data regimes with their own published hyper-parameters: small-image benchmarks (CIFAR-10/100-C) and ImageNet-scale
# ones (ImageNet-C and the like). A run's regime is its stream source's (`Source.regime`).
REGIMES = ("cifar", "imagenet")
# The authors' optimiser of the entropy family on ImageNet (Tent, EATA, SAR, DeYO, ROID; batch 64): SGD, lr 2.5e-4,
# momentum 0.9. Tent's code and the best-known collection run it with Nesterov momentum (`OPTIM.NESTEROV: True`).
IMAGENET_SGD: Mapping[str, Any] = {"name": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": True}

# method name -> its settings class; filled by `register_method`, read by `MethodSettings.variant`.
SETTINGS: Registry[type[MethodSettings]] = Registry("method")


@dataclass(frozen=True)
class MethodSettings:
    """The `method:` section: which online method runs, and its own settings.

    Build one in code with `method_config(name, **kw)`; reading a config picks the subclass registered for `name`,
    rejects keys that method does not have (listing the ones it has) and type-checks the rest.
    """

    # Schema protocols (see tta_surgical.schema): `name` picks the subclass; keys that moved elsewhere.
    variant_key: ClassVar[str] = "name"
    moved_keys: ClassVar[Mapping[str, str]] = {
        "episodic": "resetting before every batch is the stream's job now: set stream.reset=episodic",
    }
    # The authors' optimiser per data regime (fields of `OptimConfig`; a regime not listed uses "cifar"'s).
    # The default is Tent's CIFAR-10-C setting (Adam, lr 1e-3), which most methods share on CIFAR.
    optimizers: ClassVar[Mapping[str, Mapping[str, Any]]] = {"cifar": {"name": "adam", "lr": 1e-3}}

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
        try:
            return SETTINGS.get(name)  # type: ignore[arg-type]
        except UnknownNameError as err:
            raise ConfigError(f"method.name: {err}") from None

    @classmethod
    def default_optim(cls, regime: str = "cifar") -> OptimConfig:
        """The optimiser this method's authors use in `regime` (`REGIMES`)."""
        check_choice("stream source", "regime", regime, REGIMES)
        fields_ = cls.optimizers.get(regime, cls.optimizers["cifar"])
        return from_dict(OptimConfig, dict(fields_), "optim")


@dataclass(frozen=True)
class AdaptSettings(MethodSettings):
    """Settings of every method that updates parameters: which ones (`blocks` x `kind`, see `models.select_params`).

    `blocks`: block names (`input`, `block1`, ..., `head`, `all`, ranges `block1-2`, units `block1.0`), or `auto`
    (alone): the runtime chooses per batch, without labels (`methods.selection`; `kind` then does not apply); `kind`:
    `all` parameters of those blocks, `norm` (their norm layers' affines) or `conv` (everything else). The defaults
    are each method's authors' choice; subclasses override them.

    `blocks: auto` only (the method's own young-domain phase, README "Choosing what to adapt"): `auto_young`, the
    batches after a detected domain change that adapt both early stages before the first stage alone takes over
    (`domain`: the whole shifted domain, never the first stage alone); `auto_young_restore`, when a domain ages out
    of that phase, put the parameters only the phase adapts (the second stage) and their optimiser state back to the
    source values, so their adaptation never outlives its domain (with `domain` nothing ages out). The defaults are
    measured per method (benchmarks/RESULTS.md 15j); subclasses override them.
    """

    optimizers: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "cifar": {"name": "adam", "lr": 1e-3},
        "imagenet": IMAGENET_SGD,
    }

    blocks: tuple[str, ...] = ("all",)
    kind: str = "norm"
    auto_young: int | Literal["domain"] = 10
    auto_young_restore: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method", "kind", self.kind, PARAM_KINDS)
        if isinstance(self.auto_young, int) and self.auto_young < 0:
            raise ConfigError(
                f"method.auto_young must be >= 0 (batches of a new domain that adapt both early stages) or 'domain' "
                f"(the whole domain), got {self.auto_young!r}"
            )
        self._check_auto_fields()
        if not self.blocks or not all(isinstance(b, str) and b for b in self.blocks):
            raise ConfigError(f"method.blocks must be a non-empty list of block names, got {list(self.blocks)!r}")
        if "auto" in self.blocks and len(self.blocks) > 1:
            raise ConfigError(
                f"method.blocks: auto chooses the blocks itself and cannot be combined with others, got "
                f"{list(self.blocks)!r}; write blocks: auto, or list the blocks to adapt"
            )


    def _check_auto_fields(self) -> None:
        """The `auto_*` fields steer `blocks: auto` only: set with named blocks they would do nothing, so refuse."""
        defaults = {f.name: f.default for f in fields(self) if f.name.startswith("auto_")}
        changed = [k for k, v in defaults.items() if getattr(self, k) != v]
        if changed and "auto" not in self.blocks:
            raise ConfigError(
                f"method.{changed[0]} applies to blocks: auto only (this config adapts {list(self.blocks)!r}); "
                f"drop it or set blocks: auto"
            )


def method_config(name: str, **settings: Any) -> MethodSettings:
    """The settings of the method `name` with `settings` over its defaults: the one way code builds a method's config.

    Values are checked as in a YAML file (unknown keys list the valid ones; lists become tuples).
    """
    return from_dict(MethodSettings, {"name": name, **settings}, "method")

