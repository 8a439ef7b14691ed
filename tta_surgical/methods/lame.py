"""`lame`: LAME (Boudiaf, Mueller, Ben Ayed, Bertinetto, CVPR 2022, "Parameter-free Online Test-time Adaptation").

No parameter and no statistic changes: LAME only corrects the outputs of each batch. With the model's softmax
predictions p_i and features f_i (the input of the classifier, from the block map's head split), it finds the
assignment Y (rows on the simplex) minimising the Laplacian-regularised likelihood
    sum_i KL(y_i || p_i) - sum_ij w_ij y_i^T y_j
by the paper's bound optimisation (section 3): with unary a_i = -log(p_i + 1e-10), start from y_i = softmax(-a_i)
and iterate y_i <- softmax(-a_i + sum_j w_ij y_j) (`bound_lambda` 1), evaluating the bound
E(Y) = sum_i [a_i^T y_i - (W Y)_i^T y_i + y_i^T log y_i] after each iteration, until
|E - E_prev| <= tolerance * |E_prev| (checked from the third iteration on) or `max_steps` (100) iterations.

Affinity on the L2-normalised features (authors' `rbf_affinity`, `kNN_affinity`, `linear_affinity`):
- `rbf` (default): w_ij = exp(-||f_i - f_j||^2 / (2 s^2)), dense, diagonal included. The bandwidth is *relative to
  the data*: s = sigma x the batch mean of each point's k-th smallest distance (k = knn, itself included), so
  with the default sigma 1.0 it is exactly the authors' code, whose rbf ignores its `sigma` argument.
- `knn`: w_ij = 1 for the knn nearest neighbours j of i (itself excluded), else 0.
- `linear`: w_ij = f_i^T f_j.
`force_symmetry` replaces W by (W + W^T) / 2.

Sources: fiveai/LAME `src/adaptation/lame.py` and `configs/method/best/LAME/overall_best.yaml` (knn 5, sigma 1.0),
the collection mariodoebler/test-time-adaptation `classification/methods/lame.py` and `classification/conf.py`
(`LAME.AFFINITY` rbf, `KNN` 5, `SIGMA` 1.0, `FORCE_SYMMETRY` false) with `cfgs/cifar10_c/lame.yaml`. Both run the
model as given, in eval mode, so BatchNorm uses the source statistics (`bn_stats: source`, the default);
`bn_stats: batch` runs LAME on top of test-batch statistics instead (our addition).

The returned logits are log Y (finite: computed as log-softmax), so softmax/argmax of them is LAME's assignment.
Cost: one forward, an N x N affinity and <= 100 small (N x N) x (N x C) products per batch; the stopping test
reads the bound once per `_CHECK_EVERY` iterations (one host sync each), keeping the iterates in between, so it
stops at exactly the same iteration as a per-iteration check would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schema import ConfigError, check_choice
from ._checks import check_finite_number
from .base import Method, register_method
from .bn import set_bn_stats
from .settings import MethodSettings

__all__ = ["LAME", "LAMESettings", "affinity_matrix", "laplacian_assignment"]

AFFINITIES = ("rbf", "knn", "linear")
BN_STATS = ("source", "batch")
_CHECK_EVERY = 10


@dataclass(frozen=True)
class LAMESettings(MethodSettings):
    """LAME's defaults (authors' best CIFAR/ImageNet setting and the collection's): rbf affinity, knn 5, sigma 1.0,
    at most 100 bound iterations with relative tolerance 1e-8; source BatchNorm statistics."""

    name: str = "lame"
    affinity: str = "rbf"
    knn: int = 5
    sigma: float = 1.0
    force_symmetry: bool = False
    max_steps: int = 100
    tolerance: float = 1e-8
    bn_stats: str = "source"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method", "affinity", self.affinity, AFFINITIES)
        check_choice("method", "bn_stats", self.bn_stats, BN_STATS)
        if self.knn < 1:
            raise ConfigError(f"method.knn must be >= 1 (neighbours per point), got {self.knn}")
        check_finite_number("sigma", self.sigma, positive=True, meaning="rbf bandwidth scale")
        if self.max_steps < 1:
            raise ConfigError(f"method.max_steps must be >= 1 (bound iterations), got {self.max_steps}")
        check_finite_number("tolerance", self.tolerance)


def affinity_matrix(features: Tensor, kind: str, knn: int, sigma: float) -> Tensor:
    """(N, N) affinity of L2-normalised `features` (N, d): see the module docstring for each kind."""
    if kind == "linear":
        return features @ features.t()
    dist = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
    n = features.shape[0]
    if kind == "knn":
        neighbours = dist.topk(min(knn + 1, n), dim=1, largest=False).indices[:, 1:]
        return torch.zeros_like(dist).scatter_(1, neighbours, 1.0)
    if kind != "rbf":
        raise ValueError(f"unknown affinity {kind!r}; valid: {', '.join(AFFINITIES)}")
    kth = dist.topk(min(knn, n), dim=1, largest=False).values[:, -1]
    # A bandwidth of 0 (a single image, or identical features) would make 0/0: clamp it to the smallest normal.
    scale = (sigma * kth.mean()).clamp(min=torch.finfo(dist.dtype).tiny)
    return torch.exp(-0.5 * (dist / scale).square())


def laplacian_assignment(unary: Tensor, kernel: Tensor, max_steps: int = 100, tolerance: float = 1e-8) -> Tensor:
    """log Y of LAME's bound optimisation (the fixed point of y_i = softmax(-a_i + (W Y)_i)); see the module doc."""
    y = (-unary).softmax(dim=-1)
    previous = math.inf
    step = 0
    while step < max_steps:
        chunk_logs, chunk_energy = [], []
        for _ in range(min(_CHECK_EVERY, max_steps - step)):
            pairwise = kernel @ y
            exponent = pairwise - unary
            y = exponent.softmax(dim=-1)
            chunk_logs.append(exponent.log_softmax(dim=-1))
            chunk_energy.append((unary * y - pairwise * y + y * torch.log(y.clamp(min=1e-20))).sum())
        for log_y, energy in zip(chunk_logs, torch.stack(chunk_energy).tolist()):  # one sync per chunk
            if step > 1 and abs(energy - previous) <= tolerance * abs(previous):
                return log_y
            previous = energy
            step += 1
    return chunk_logs[-1]


@register_method("lame")
class LAME(Method):
    """LAME: Laplacian-adjusted maximum-likelihood assignment of each batch's predictions; nothing is updated.

    The prediction is log Y of the batch's assignment (softmax gives Y); `predict` computes the same."""

    Settings = LAMESettings

    def configure(self, model: nn.Module) -> None:
        model.eval()
        model.requires_grad_(False)
        if self.cfg.bn_stats == "batch":
            set_bn_stats(model, "batch")

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        features, logits = self.features_and_logits(x)
        unary = -torch.log(logits.float().softmax(dim=1) + 1e-10)
        kernel = affinity_matrix(F.normalize(features.float(), p=2, dim=-1), cfg.affinity, cfg.knn, cfg.sigma)
        if cfg.force_symmetry:
            kernel = 0.5 * (kernel + kernel.t())
        return laplacian_assignment(unary, kernel, cfg.max_steps, cfg.tolerance).to(logits.dtype)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """LAME's assignment of the batch `x` (it has no state, so this is what `step` returns)."""
        return self.forward_and_adapt(x)
