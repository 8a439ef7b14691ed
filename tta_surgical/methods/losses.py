"""Pure loss functions of the online methods (no state, no side effects)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy", "entropy_per_sample", "softmax_cross_entropy"]


def entropy_per_sample(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits), one value per example: shape (batch,).

    Computed in float32 from `log_softmax` (stable for large logits, and exact under bf16 autocast, whose
    logits would otherwise lose the small probabilities that dominate the gradient).
    """
    if logits.dim() != 2:
        raise ValueError(f"entropy expects logits of shape (batch, classes), got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) per example, averaged over the batch (Tent's objective)."""
    return entropy_per_sample(logits).mean()


def softmax_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Per-example cross-entropy H(softmax(target), softmax(logits)) = -sum_c p_target,c log p_c, shape (batch,).

    The target is a distribution (a teacher's prediction), detached by the caller when it must not be trained.
    """
    if logits.shape != target_logits.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target_logits.shape)} must be (batch, C)")
    return -(target_logits.float().softmax(1) * torch.log_softmax(logits.float(), dim=1)).sum(1)
