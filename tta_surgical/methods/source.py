"""`source`: the unadapted model, as a baseline (eval mode, source BatchNorm statistics, no updates)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import METHODS, Method
from .bn import set_bn_stats


class Source(Method):
    """No adaptation: `step` is a forward in eval mode under `torch.inference_mode`."""

    name = "source"
    adapts = False

    def configure(self, model: nn.Module) -> None:
        model.eval()
        model.requires_grad_(False)
        set_bn_stats(model, "source")

    @torch.inference_mode()
    def step(self, x: Tensor) -> Tensor:
        self.n_steps += 1
        with self.autocast(x):
            return self.model(x)


METHODS.register("source", Source)
