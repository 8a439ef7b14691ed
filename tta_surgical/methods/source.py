"""`source`: the unadapted model, as a baseline (eval mode, source BatchNorm statistics, no updates)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .base import Method, register_method
from .bn import set_bn_stats
from .settings import MethodSettings


@dataclass(frozen=True)
class SourceSettings(MethodSettings):
    """No settings: the model as it was trained."""

    name: str = "source"


@register_method("source")
class Source(Method):
    """No adaptation: `step` is a forward in eval mode under `torch.inference_mode`."""

    Settings = SourceSettings

    def configure(self, model: nn.Module) -> None:
        model.eval()
        model.requires_grad_(False)
        set_bn_stats(model, "source")

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with self.autocast(x):
            return self.model(x)
