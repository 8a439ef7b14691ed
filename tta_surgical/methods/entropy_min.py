"""`surgical` and `tent`: entropy minimisation on a chosen subset of parameters.

Tent (Wang et al. 2021) is this method with blocks=[all], kind=norm, bn_stats=batch: the affine scale and
shift of every norm layer adapt, BatchNorm uses test-batch statistics. Surgical adaptation keeps the same
objective and lets the config choose the blocks (`input`, `block1`, ..., `head`, units like `block1.0`),
the parameter kind (`all`, `norm`, `conv`) and the BatchNorm statistics (`batch` or `source`) of the
whole model. Both names map to this one class; `MethodConfig` rejects a `tent` that is not Tent.

`method.weighting=auto-rgn` (online auto-RGN, after Lee et al. 2023): the optimiser holds one parameter group
per adapted tensor; at the first batch (after `configure` or any `reset`) and then every `weighting_every`
batches, the gradient of that batch's entropy loss (no labels) gives per-tensor weights
w_i = RGN_i / max_j RGN_j, RGN_i = ||g_i|| / ||theta_i|| (`tta_surgical.autotune`), and tensor i's learning
rate becomes optim.lr * w_i before the batch's optimiser step. The weights come from the very gradient the
update uses (read from `p.grad` in the `_before_optimizer_step` hook), so a refresh costs no extra forward
or backward. Refreshing updates the groups' `lr` in place and keeps the optimiser state (Adam moments), unlike
the supervised protocol (`tta_surgical.finetune`), which rebuilds Adam at every epoch as the official code
does: online, a refresh every N batches would otherwise throw away the moment estimates of a stream that has
no epochs, and Adam's bias correction would restart the step size at its largest. If a refresh batch's
update is skipped (non-finite loss or gradient), the refresh happens at the next finite update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..autotune import rgn_weights_from_grads, weighted_param_groups
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
        self._weighting_clock = 0  # batches since configure/reset, for the auto-RGN refresh schedule
        self._refresh_pending = False
        self.weights: dict[str, float] | None = None  # the latest auto-RGN weights (for reporting)
        if self.cfg.weighting == "auto-rgn":
            # One group per tensor; lr = optim.lr until the first refresh, which precedes the first step.
            ones = {name: 1.0 for name, _ in selected}
            groups = weighted_param_groups(selected, ones, self.optim_cfg.lr, self.optim_cfg.weight_decay)
            self.optimizer = build_optimizer(groups, self.optim_cfg)
        else:
            self.optimizer = build_optimizer(selected, self.optim_cfg)

    @torch.enable_grad()  # adapts even when the caller's loop runs under no_grad
    def step(self, x: Tensor) -> Tensor:
        if self.cfg.episodic:
            self.reset()
        if self.cfg.weighting != "none":
            if self._weighting_clock % self.cfg.weighting_every == 0:
                self._refresh_pending = True
            self._weighting_clock += 1
        prediction = None
        for _ in range(self.cfg.steps):
            with self.autocast(x):
                logits = self.model(x)
            if prediction is None:
                prediction = logits.detach()
            self.update(entropy(logits))
        self.n_steps += 1
        return prediction

    def _before_optimizer_step(self) -> None:
        """auto-RGN refresh: set each group's lr to optim.lr * weight from the gradients now in `p.grad`."""
        if not self._refresh_pending:
            return
        assert self.optimizer is not None
        tensors = [p for _, p in self._params]
        values = rgn_weights_from_grads(tensors, [p.grad for p in tensors]).tolist()  # one host sync per refresh
        for group, p, w in zip(self.optimizer.param_groups, tensors, values):
            assert group["params"][0] is p, "auto-RGN expects one optimiser group per adapted tensor, in order"
            group["lr"] = self.optim_cfg.lr * w
            group["weight"] = w
        self.weights = {name: w for (name, _), w in zip(self._params, values)}
        self._refresh_pending = False

    def reset(self) -> None:
        """Restore model and optimiser (group learning rates included); the next batch recomputes the weights."""
        super().reset()
        self._weighting_clock = 0
        self._refresh_pending = False
        self.weights = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["weighting"] = {"clock": self._weighting_clock, "pending": self._refresh_pending, "weights": self.weights}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("weighting") or {}
        self._weighting_clock = int(saved.get("clock", 0))
        self._refresh_pending = bool(saved.get("pending", False))
        self.weights = dict(saved["weights"]) if saved.get("weights") is not None else None


METHODS.register("surgical", EntropyMinimization)
METHODS.register("tent", EntropyMinimization)
