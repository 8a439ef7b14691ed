"""Pure loss functions of the online methods (no state, no side effects)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy"]


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) per example, averaged over the batch (Tent's objective).

    Computed in float32 from `log_softmax` (stable for large logits, and exact under bf16 autocast, whose
    logits would otherwise lose the small probabilities that dominate the gradient).
    """
    if logits.dim() != 2:
        raise ValueError(f"entropy expects logits of shape (batch, classes), got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()
