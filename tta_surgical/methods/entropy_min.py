"""`surgical` and `tent`: entropy minimisation on a chosen subset of parameters.

Tent (Wang et al. 2021) is this method with blocks=[all], kind=norm, bn_stats=batch: the affine scale and
shift of every norm layer adapt, BatchNorm uses test-batch statistics. Surgical adaptation keeps the same
objective and lets the config choose the blocks (`input`, `block1`, ..., `head`, units like `block1.0`),
the parameter kind (`all`, `norm`, `conv`) and the BatchNorm statistics (`batch` or `source`) of the
whole model. Both names map to this one class; `MethodConfig` rejects a `tent` that is not Tent.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models import select_params
from .base import METHODS, Method, build_optimizer
from .bn import set_bn_stats
from .losses import entropy


class EntropyMinimization(Method):
    """Order per batch: forward -> keep these logits as the prediction -> entropy -> one optimiser step;
    repeated `cfg.steps` times (later forwards see the updated parameters); the returned logits are those
    of the first forward, i.e. before any update on this batch. `episodic` resets before every batch."""

    name = "surgical"
    adapts = True

    def configure(self, model: nn.Module) -> None:
        model.eval()
        # Everything frozen first, then only the selection re-enabled: autograd does no work for the rest.
        model.requires_grad_(False)
        selected = select_params(model, self.cfg.blocks, self.cfg.kind)
        if not selected:
            raise ValueError(
                f"method {self.cfg.name}: blocks={list(self.cfg.blocks)} with kind={self.cfg.kind} select no "
                "parameters (e.g. kind=norm on a block without norm layers); choose other blocks or kind=all"
            )
        for _, p in selected:
            p.requires_grad_(True)
        self._params = selected
        set_bn_stats(model, self.cfg.bn_stats, self.cfg.prior_strength)
        self.optimizer = build_optimizer(selected, self.optim_cfg)

    @torch.enable_grad()  # adapts even when the caller's loop runs under no_grad
    def step(self, x: Tensor) -> Tensor:
        if self.cfg.episodic:
            self.reset()
        prediction = None
        for _ in range(self.cfg.steps):
            with self.autocast(x):
                logits = self.model(x)
            if prediction is None:
                prediction = logits.detach()
            self.update(entropy(logits))
        self.n_steps += 1
        return prediction


METHODS.register("surgical", EntropyMinimization)
METHODS.register("tent", EntropyMinimization)
