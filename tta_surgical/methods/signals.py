"""Label-free signals for choosing online what to adapt (`method.blocks: auto`, see `selection`).

Each signal needs no labels and no domain boundaries; `benchmarks/autopilot_signals.py` measures them against each
other (what each would pick per corruption, and what it costs) and README explains which ones the selector uses.

- **Input-statistics shift** (`SourceReference`, `gaussian_kl`): a frozen copy of the source model (source weights,
  source BatchNorm statistics) records the mean and variance of every BatchNorm layer's input on the test batch;
  per layer, the Gaussian KL divergence of the batch's per-channel statistics from the layer's source running
  statistics, averaged over channels. Where the distribution moved, by how much. The copy never changes, so the
  signal does not depend on what the adapted model has learnt so far.
- **Overdispersion of batch means** (`BatchMeans`, `overdispersion`): for two batches of the same distribution the
  difference of a layer's per-channel batch means varies with the sampling noise, (var_1 / n_1 + var_2 / n_2) with
  var the variance of the images' own channel means; batches that hold few classes at a time (label shift) differ
  by more. The squared difference in units of that noise is about 1 for i.i.d. batches and several times larger
  for few-class batches in the layers that carry class information (the last stage). A change of domain between
  the two batches gives far larger values (the selector leaves those out).
- **Class-prior drift** (`prior_drift`): the KL divergence of a batch's mean prediction from a running average of
  the mean predictions. Batches drawn i.i.d. stay close to the average (sampling noise only); batches that hold a
  few classes at a time (label shift, temporally correlated streams) move far from it.
- **Agreement** (`agreement`): the share of a batch on which two models (the adapted one and a frozen reference)
  predict the same class.
- **Relative gradient norm** (`block_rgn`): per block, ||g|| / ||theta|| of the entropy gradient (auto-RGN's
  statistic, `tta_surgical.autotune`), from one backward through every candidate block.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .bn import batchnorm_layers, set_bn_stats

__all__ = [
    "BNInputStats",
    "BatchMeans",
    "SourceReference",
    "agreement",
    "block_rgn",
    "gaussian_kl",
    "overdispersion",
    "prior_drift",
]


def gaussian_kl(mean: Tensor, var: Tensor, ref_mean: Tensor, ref_var: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean over channels of KL(N(mean, var) || N(ref_mean, ref_var)) (a 0-dim float32 tensor)."""
    mean, var = mean.float(), var.float() + eps
    ref_mean, ref_var = ref_mean.float(), ref_var.float() + eps
    ratio = var / ref_var
    return (0.5 * (ratio + (mean - ref_mean).square() / ref_var - 1.0 - torch.log(ratio))).mean()


class BNInputStats:
    """Forward pre-hooks that record the per-channel mean and variance of each BatchNorm layer's input.

    Only the first forward after `arm()` is recorded (a method's later forwards in the same step, e.g. augmented
    views, are left out); `shifts()` gives, per layer, `gaussian_kl` of the recorded statistics from the layer's
    source running statistics. For the layers (indices into `self.layers`) in `dispersion`, `means()` also gives the
    batch means with their sampling noise (`BatchMeans`). Computed without gradient and without a host sync.
    """

    def __init__(self, layers: Sequence[_BatchNorm], dispersion: Iterable[int] = ()) -> None:
        self.layers = [bn for bn in layers if bn.running_mean is not None and bn.running_var is not None]
        self.dispersion = sorted(set(dispersion))
        self._stats: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self._noise: dict[int, Tensor] = {}
        self._armed = False
        self._handles = [bn.register_forward_pre_hook(self._hook(i)) for i, bn in enumerate(self.layers)]

    def _hook(self, index: int):
        keep_noise = index in self.dispersion

        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if self._armed and self._stats[index] is None:
                with torch.no_grad():
                    x = args[0].detach().float()
                    var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.dim())), correction=0)
                    if keep_noise and x.shape[0] > 1:
                        # variance over the batch of the images' own channel means, / n: the batch mean's noise
                        own = x.mean(dim=list(range(2, x.dim()))) if x.dim() > 2 else x
                        self._noise[index] = own.var(dim=0, correction=1) / x.shape[0]
                self._stats[index] = (mean, var)

        return record

    def arm(self) -> None:
        self._stats = [None] * len(self.layers)
        self._noise = {}
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    def shifts(self) -> Tensor | None:
        """(layers,) KL of each recorded layer from its source statistics, or None if the forward did not reach all."""
        if not self.layers or any(s is None for s in self._stats):
            return None
        with torch.no_grad():
            return torch.stack(
                [
                    gaussian_kl(s[0], s[1], bn.running_mean, bn.running_var, bn.eps)
                    for s, bn in zip(self._stats, self.layers)  # type: ignore[index]
                ]
            )

    def means(self) -> BatchMeans | None:
        """The recorded batch means and their sampling noise in the `dispersion` layers, or None if the forward did
        not reach them all (or the batch held one image)."""
        if not self.dispersion or any(self._stats[i] is None or i not in self._noise for i in self.dispersion):
            return None
        means = [self._stats[i][0] for i in self.dispersion]  # type: ignore[index]
        return BatchMeans(means, [self._noise[i] for i in self.dispersion])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class BatchMeans(NamedTuple):
    """Per layer: a batch's per-channel means of the layer's input and their sampling noise (the variance of the
    images' own channel means over the batch, divided by the batch size)."""

    means: list[Tensor]
    noise: list[Tensor]


def overdispersion(a: BatchMeans, b: BatchMeans, eps: float = 1e-8) -> Tensor:
    """How far two batches' means are apart in units of their sampling noise: per layer, the mean over channels of
    (mean_a - mean_b)^2 / (noise_a + noise_b); the geometric mean over layers (a 0-dim float32 tensor). About 1 for
    two i.i.d. batches of one distribution (less when a finite pool is drawn without replacement), several times
    more for batches holding different few classes."""
    per_layer = torch.stack(
        [
            ((ma.float() - mb.float()).square() / (na.float() + nb.float() + eps)).mean()
            for ma, na, mb, nb in zip(a.means, a.noise, b.means, b.noise)
        ]
    )
    return per_layer.clamp_min(eps).log().mean().exp()


class SourceReference:
    """A frozen copy of the source model with source BatchNorm statistics: its predictions and the input-statistics
    shift of every BatchNorm layer on a batch (one inference forward, no gradient)."""

    def __init__(self, model: nn.Module, dispersion: Callable[[nn.Module], Iterable[int]] | None = None) -> None:
        """dispersion: given the copy, the indices (among its BatchNorm layers with running statistics) whose batch
        means `probe` also returns (`BatchMeans`); None records none."""
        self.model = copy.deepcopy(model)
        self.model.eval()
        self.model.requires_grad_(False)
        set_bn_stats(self.model, "source")
        layers = batchnorm_layers(self.model)
        self.stats = BNInputStats(layers, dispersion(self.model) if dispersion is not None else ())

    @torch.no_grad()
    def probe(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(logits, per-layer shifts) of the source model on `x`."""
        self.stats.arm()
        try:
            logits = self.model(x)
        finally:
            self.stats.disarm()
        return logits, self.stats.shifts()


def prior_drift(probs: Tensor, reference: Tensor, eps: float = 1e-6) -> Tensor:
    """KL(mean prediction of the batch || reference class distribution), a 0-dim float32 tensor.

    probs: (B, C) probabilities; reference: (C,) a running average of past batches' mean predictions."""
    p = probs.float().mean(0).clamp_min(eps)
    q = reference.float().clamp_min(eps)
    return (p * (p.log() - q.log())).sum()


def agreement(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Share of the batch on which the two predictions have the same top class (0-dim float32 tensor)."""
    return (logits_a.argmax(1) == logits_b.argmax(1)).float().mean()


def block_rgn(named_grads: Mapping[str, Iterable[tuple[Tensor, Tensor | None]]]) -> dict[str, float]:
    """Per block, ||g|| / ||theta|| over all the block's tensors: `{block: [(param, grad), ...]}` -> `{block: rgn}`.

    The block-level version of auto-RGN's per-tensor statistic (norms over the concatenated tensors of a block)."""
    out = {}
    for block, pairs in named_grads.items():
        g2 = t2 = 0.0
        for p, g in pairs:
            t2 += float(p.detach().float().square().sum())
            if g is not None:
                g2 += float(g.detach().float().square().sum())
        out[block] = (g2**0.5) / (t2**0.5) if t2 > 0 else 0.0
    return out
