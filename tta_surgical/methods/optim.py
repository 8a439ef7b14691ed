"""The optimiser of the adapted parameters: the `optim:` section (`OptimConfig`) and `build_optimizer`.

A run's `optim:` section defaults to the optimiser of the method it names (`MethodSettings.default_optim`, the
authors' choice for the data regime), so the section holds only what the user changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..schema import ConfigError, check_choice

__all__ = ["OPTIMIZERS", "OPTIM_IMPLEMENTATIONS", "OptimConfig", "build_optimizer"]

OPTIMIZERS = ("adam", "sgd")
OPTIM_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser of the adapted parameters. `OptimConfig()` is Adam lr 1e-3 (Tent's CIFAR setting); a run's
    `optim:` section starts from its method's `default_optim` instead."""

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


def build_optimizer(
    params: Iterable[nn.Parameter | tuple[str, nn.Parameter] | dict[str, Any]], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """The optimiser `cfg` names over `params`: Parameters or (name, Parameter) pairs (one parameter group), or
    parameter-group dicts (e.g. `tta_surgical.autotune.weighted_param_groups`; keys they omit take `cfg`'s values).
    `cfg.implementation` picks torch's fused / foreach / per-tensor kernels (`auto`: fused where supported)."""
    items = list(params)
    if not items:
        raise ValueError("build_optimizer got no parameters to optimise")
    if isinstance(items[0], dict):
        groups: list[Any] = items
    else:
        groups = [p[1] if isinstance(p, tuple) else p for p in items]
    if cfg.name == "adam":
        kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
        cls: type[torch.optim.Optimizer] = torch.optim.Adam
    elif cfg.name == "sgd":
        kwargs = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "nesterov": cfg.nesterov}
        cls = torch.optim.SGD
    else:
        raise ValueError(f"unknown optimiser {cfg.name!r}; valid: adam, sgd")
    impl = getattr(cfg, "implementation", "auto")
    if impl == "auto":
        try:
            return cls(groups, **kwargs, fused=True)
        except (RuntimeError, TypeError, ValueError):
            # This torch has no fused kernel for these tensors' device/dtype (the constructor checks): foreach.
            return cls(groups, **kwargs, foreach=True)
    if impl == "fused":
        return cls(groups, **kwargs, fused=True)  # unsupported device/dtype: torch's error says why
    return cls(groups, **kwargs, foreach=impl == "foreach")
