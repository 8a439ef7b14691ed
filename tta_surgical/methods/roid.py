"""`roid`: ROID (Marsden, Doebler, Yang, WACV 2024, "Universal Test-time Adaptation through Weight Ensembling,
Diversity Weighting, and Prior Correction").

Followed: the paper (section 3) and the authors' own implementation in their collection,
mariodoebler/test-time-adaptation `classification/methods/roid.py` with the defaults of `classification/conf.py`
(`ROID.*`) and `classification/cfgs/cifar10_c/roid.yaml` (batch 200, Adam lr 1e-3, beta 0.9, no weight decay;
the norm affines adapt, BatchNorm normalises with test-batch statistics).

Per batch (one forward of the batch, the prediction; everything below is computed from it):

- **Soft likelihood ratio loss** per sample: -sum_c p_c log(p_c / (1 - p_c) + 1e-5), p = softmax clipped at 0.99
  (no vanishing gradient for confident samples, unlike entropy).
- **Certainty and diversity weighting** (`use_weighting`): diversity d_i = 1 - cos(p_i, p_ema), certainty
  c_i = -H(p_i), each min-max normalised over the batch; weight w_i = exp(d_i c_i / temperature) (temperature
  1/3); samples with d_i below the batch mean of d are removed (a filter: they count in `n_filtered`). p_ema, the
  class-probability average, moves by momentum 0.9 towards the batch mean of p after each update.
- **Consistency** (`use_consistency`, on by default for CIFAR): the kept samples once more, strongly augmented
  (`augment.cotta_views` with `ROID_CIFAR`: reflect padding, no blur, no noise: the collection's `cotta_augs=False`
  transform), symmetric cross-entropy (alpha 0.5) between the augmented and the original outputs, with the same
  weights; gradient through both outputs, as in the authors' code.
- loss = sum over kept samples of w_i (SLR_i + SCE_i), divided by the batch size; one optimiser step.
- **Weight ensembling** after each update: theta <- 0.99 theta + 0.01 theta_source for the adapted tensors.
- **Prior correction** of the returned prediction (`prior_correction`), with the batch's mean prediction
  pi = mean_i p_i smoothed as pi' = (pi + g) / (1 + g C), g = max(1/B, 1/C) / max(pi). It changes only the output,
  never the loss. `logits` (default) is the authors' code: the raw logits multiplied by pi'. `probs` is the
  paper's description, the probabilities reweighted by pi' and renormalised (returned as their log). `none`: off.

Order per batch: forward -> prediction (before this batch's update) -> weights and filter -> SLR (+ consistency
forward on the kept samples) -> one guarded step -> on success: ensembling and p_ema update -> the prediction
with the prior correction.

Deliberate differences: the loss is divided by the actual batch size (the authors divide by the configured one;
they differ only for a short last batch); p_ema moves and the ensembling runs only after a finite update, so a
skipped batch changes nothing; a batch whose weights are undefined (all diversities or certainties equal, e.g.
one image) keeps no sample and takes no step (the authors' code would produce NaN there).
Cost: the consistency forward takes the kept samples only (about two thirds of a CIFAR-10-C batch), which needs
their number on the host (one sync, besides the update's guard).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schema import check_choice
from ._checks import check_finite_number, check_unit_interval
from .augment import ROID_CIFAR, cotta_views
from .base import Method, Objective, register_method
from .losses import entropy_per_sample
from .settings import AdaptSettings

__all__ = ["ROID", "ROIDSettings", "prior_correct", "soft_likelihood_ratio", "symmetric_cross_entropy"]

PRIOR_CORRECTIONS = ("logits", "probs", "none")


@dataclass(frozen=True)
class ROIDSettings(AdaptSettings):
    """ROID's defaults (the collection's `ROID.*`): every switch on, momenta 0.99 (source) and 0.9 (probabilities),
    temperature 1/3; the norm affines adapt."""

    name: str = "roid"
    kind: str = "norm"
    use_weighting: bool = True
    use_consistency: bool = True
    prior_correction: str = "logits"
    momentum_src: float = 0.99
    momentum_probs: float = 0.9
    temperature: float = 1.0 / 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method", "prior_correction", self.prior_correction, PRIOR_CORRECTIONS)
        check_unit_interval("momentum_src", self.momentum_src)
        check_unit_interval("momentum_probs", self.momentum_probs)
        check_finite_number("temperature", self.temperature, positive=True)


def soft_likelihood_ratio(logits: Tensor, clip: float = 0.99, eps: float = 1e-5) -> Tensor:
    """Per-sample SLR loss -sum_c p_c log(p_c / (1 - p_c) + eps), p = softmax(logits) clipped to <= `clip`."""
    p = logits.float().softmax(dim=1).clamp(max=clip)
    return -(p * torch.log(p / (1.0 - p) + eps)).sum(dim=1)


def symmetric_cross_entropy(x: Tensor, target: Tensor, alpha: float = 0.5) -> Tensor:
    """Per-sample (1 - alpha) CE(softmax(target), x) + alpha CE(softmax(x), target), gradient through both."""
    x, target = x.float(), target.float()
    forward = -(target.softmax(1) * x.log_softmax(1)).sum(1)
    backward = -(x.softmax(1) * target.log_softmax(1)).sum(1)
    return (1.0 - alpha) * forward + alpha * backward


def _min_max(v: Tensor) -> Tensor:
    return (v - v.min()) / (v.max() - v.min())


def prior_correct(logits: Tensor, mode: str) -> Tensor:
    """The prediction corrected by the smoothed label prior of the batch (see the module docstring)."""
    if mode == "none":
        return logits
    probs = logits.float().softmax(dim=1)
    b, c = probs.shape
    prior = probs.mean(dim=0)
    smooth = max(1.0 / b, 1.0 / c) / prior.max()
    smoothed = (prior + smooth) / (1.0 + smooth * c)
    if mode == "logits":
        return logits * smoothed.to(logits.dtype)
    return (logits.float() + smoothed.log()).log_softmax(dim=1)  # log of p * pi' renormalised


@register_method("roid")
class ROID(Method):
    """ROID: weighted soft-likelihood-ratio self-training, consistency, weight ensembling and prior correction.

    The prediction is this batch's forward before its update (prior-corrected); one step per batch."""

    Settings = ROIDSettings
    adapts = True

    def configure(self, model: nn.Module) -> None:
        selected = self.configure_adaptation(model)
        # The source values of the adapted tensors (the ensembling target): constant, kept with the state so a
        # checkpoint is self-contained. p_ema starts uniform (None until the number of classes is known).
        self.source_params = [p.detach().clone() for _, p in selected]
        self.class_probs_ema: Tensor | None = None
        self.register_state("source_params", "class_probs_ema")

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        with self.autocast(x):
            logits = self.model(x)
        probs = logits.detach().float().softmax(dim=1)
        ema = self.class_probs_ema
        if ema is None:
            ema = probs.new_full((probs.shape[1],), 1.0 / probs.shape[1])
        weights = keep = None
        if cfg.use_weighting:
            with torch.no_grad():
                diversity = _min_max(1.0 - F.cosine_similarity(ema.unsqueeze(0), probs, dim=1))
                certainty = _min_max(-entropy_per_sample(logits.detach()))
                keep = diversity >= diversity.mean()  # NaN weights (degenerate batch) keep nothing
                weights = torch.exp(diversity * certainty / cfg.temperature)
        per_sample = soft_likelihood_ratio(logits)
        if cfg.use_consistency:
            per_sample = per_sample + self._consistency(x, logits, keep)
        result = self.update(Objective(per_sample, weights=weights, keep=keep, normalize="batch"))
        if result.updated:
            with torch.no_grad():
                self.class_probs_ema = cfg.momentum_probs * ema + (1.0 - cfg.momentum_probs) * probs.mean(dim=0)
                adapted = [p.detach() for _, p in self._params]
                torch._foreach_lerp_(adapted, self.source_params, 1.0 - cfg.momentum_src)
        return prior_correct(logits.detach(), cfg.prior_correction)

    def _consistency(self, x: Tensor, logits: Tensor, keep: Tensor | None) -> Tensor:
        """Per-sample symmetric cross-entropy between the kept samples' augmented and original outputs (0 for the
        others); the augmented forward sees only the kept samples, as in the authors' code (BatchNorm statistics
        of that sub-batch)."""
        out = logits.new_zeros(logits.shape[0], dtype=torch.float32)
        index = keep.nonzero().squeeze(1) if keep is not None else torch.arange(x.shape[0], device=x.device)
        if index.numel() < 2:  # host sync: the kept count decides the forward's shape
            # Nothing kept, or one image, whose own BatchNorm statistics are meaningless (and which torch refuses
            # where a layer's maps are 1x1): no consistency term this batch.
            return out
        augmented = cotta_views(x.index_select(0, index), 1, self.rng, ROID_CIFAR)
        with self.autocast(x):
            logits_aug = self.model(augmented)
        return out.index_put((index,), symmetric_cross_entropy(logits_aug, logits.index_select(0, index)))
