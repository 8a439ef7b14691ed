"""`norm`: test-time BatchNorm statistics (Schneider et al. 2020; the "BN" baseline of the Tent paper).

No parameter changes: BatchNorm normalises with the current test batch's statistics, optionally mixed
with the source running statistics at prior strength N (see `bn.py`); the running buffers are never
written, so the source model is intact after the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ._checks import check_finite_number
from .base import Method, register_method
from .bn import set_bn_stats
from .settings import MethodSettings


@dataclass(frozen=True)
class NormSettings(MethodSettings):
    """prior_strength N: mu = N/(N+n) mu_source + n/(N+n) mu_batch (the same for the variance), n the batch size;
    0 = test-batch statistics only."""

    name: str = "norm"
    prior_strength: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_prior_strength(self.prior_strength)


def check_prior_strength(value: float) -> None:
    check_finite_number("prior_strength", value)


@register_method("norm")
class Norm(Method):
    """Test-batch normalisation statistics; `step` is a forward under `torch.inference_mode`."""

    Settings = NormSettings

    def configure(self, model: nn.Module) -> None:
        model.eval()
        model.requires_grad_(False)
        if set_bn_stats(model, "batch", self.cfg.prior_strength) == 0:
            # Refused rather than warned: the run would be `source` under the name `norm`, a number that reads as a
            # result of BN adaptation in every table it reaches.
            raise ValueError(
                f"method norm adapts BatchNorm statistics only, and this {type(model).__name__} has no BatchNorm layer "
                f"({_norm_layers(model)}): it would run as `source`; use method source, or a method that adapts "
                "parameters (e.g. tent, which adapts the norm layers' affine parameters)"
            )

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with self.autocast(x):
            return self.model(x)


def _norm_layers(model: nn.Module) -> str:
    """What normalises this model instead, e.g. "its norm layers: LayerNorm x 25", for the error."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if "Norm" in type(m).__name__:
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    if not counts:
        return "and no other norm layer"
    return "its norm layers: " + ", ".join(f"{k} x {v}" for k, v in counts.items())
