"""`norm`: test-time BatchNorm statistics (Schneider et al. 2020; the "BN" baseline of the Tent paper).

No parameter changes: BatchNorm normalises with the current test batch's statistics, optionally mixed
with the source running statistics at prior strength N (see `bn.py`); the running buffers are never
written, so the source model is intact after the run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import METHODS, Method
from .bn import set_bn_stats


class Norm(Method):
    """Test-batch normalisation statistics; `step` is a forward under `torch.inference_mode`."""

    name = "norm"
    adapts = False

    def configure(self, model: nn.Module) -> None:
        model.eval()
        model.requires_grad_(False)
        set_bn_stats(model, "batch", self.cfg.prior_strength)

    @torch.inference_mode()
    def step(self, x: Tensor) -> Tensor:
        self.n_steps += 1
        with self.autocast(x):
            return self.model(x)


METHODS.register("norm", Norm)
