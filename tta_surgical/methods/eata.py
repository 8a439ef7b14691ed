"""`eta` and `eata`: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022, arXiv 2204.02610).

Both minimise the entropy of the test predictions, like Tent, but only on samples that are worth an update:

- **reliable** (paper Eqn. 3): entropy H(x) < E0, with E0 = e_margin * ln C (C classes; 0.4 * ln C on CIFAR);
- **non-redundant** (Eqn. 5): cosine(p(x), m) < d_margin, where m is a moving average of the mean softmax of the
  samples kept so far (Eqn. 4): m <- (1 - 0.1) m + 0.1 * mean(p of this batch's kept samples). The first batch has
  no m yet, so only the reliability filter applies to it and m starts at the mean of its reliable samples' p;
  a batch that keeps nothing leaves m as it was (authors' `update_model_probs`);
- each kept sample's entropy is weighted by 1 / exp(H(x) - E0) (no gradient through the weight) and the loss is
  the mean over the kept samples; a batch that keeps nothing takes no step.

`eata` adds the anti-forgetting regulariser (Eqns. 8-9): alpha * sum_i F_i (theta_i - theta0_i)^2 over the adapted
tensors, theta0 their values after `configure`, and F a diagonal Fisher information computed once, in `configure`,
on `fisher_samples` source images with the model exactly as the method runs it (test-batch BatchNorm statistics):
pseudo-labels y = argmax f(x), and, as in the authors' code (`main.py` of mr-eggplant/EATA, followed by
`classification/methods/eata.py` of mariodoebler/test-time-adaptation), F is the *squared gradient of the batch-mean
cross-entropy*, averaged over the batches (of `fisher_batch_size` images; the collection uses the test batch size,
200 on CIFAR-10-C). `fisher_alpha=0` is ETA.

Deliberate differences: (1) the paper's Eqn. 9 averages per-sample squared gradients; we follow the authors' code
(batch form), with which the CIFAR default alpha = 1.0 was chosen. (2) The moving average m absorbs a batch only when
the guarded update was taken (the authors' code has no non-finite guard and updates m whenever samples are kept), so a
batch with a non-finite loss or gradient changes no state.

Source samples: `method.source_data` (a CIFAR-10 python-layout folder with `data_batch_*`; a seeded random subset of
`fisher_samples` training images, drawn with the method's `rng`), else the run's `MethodContext.source_images`
(the engine passes the clean CIFAR-10 *test* images) with its `source_note` repeated in `self.warnings` (written to
`summary.json`) and as a `UserWarning`; with neither, a clear error asks for `method.source_data`.

State: the moving average m is registered (reset restores "no m yet"). F and theta0 never change after `configure`;
they are registered too, so a checkpoint carries them and a resumed run (which builds the method, so computes them
once more, then loads the checkpoint) does not depend on recomputing them bit-identically (backward kernels on a GPU
need not be deterministic). They are as large as the adapted tensors (for the default norm affines, ~1,400 numbers
on resnet20; for kind=all, twice the adapted parameters in every checkpoint and in the reset snapshot).

Defaults are the authors' CIFAR-10-C settings as run by the best-known collection
(`classification/cfgs/cifar10_c/eata.yaml` / `eta.yaml` of mariodoebler/test-time-adaptation): batch 200, Adam lr 1e-3,
every norm layer's affine scale and shift (blocks [all], kind norm), test-batch BatchNorm statistics, e_margin 0.4,
d_margin 0.4, fisher_alpha 1.0, 2,000 source samples. Written from the paper and that code; no code copied.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.cifar import load_cifar10
from ..schema import ConfigError
from ._checks import check_finite_number, check_fraction
from .base import Method, Objective, register_method
from .losses import entropy_per_sample
from .settings import AdaptSettings

__all__ = ["EATA", "ETA", "EATASettings", "ETASettings", "ewc_penalty", "fisher_diagonal", "reliable_non_redundant"]

# Weight of the current batch in the moving average of the mean prediction (Eqn. 4; 0.9 / 0.1 in the authors' code).
PROBS_MOMENTUM = 0.1


@dataclass(frozen=True)
class ETASettings(AdaptSettings):
    """ETA: entropy minimisation on reliable, non-redundant samples, weighted by their confidence.

    e_margin: the reliability threshold as a fraction of ln C (E0 = e_margin * ln C; 1 keeps every sample).
    d_margin: the redundancy threshold on the cosine similarity to the running mean prediction (samples at or above
    it are redundant; 1 keeps all but predictions parallel to the mean). Defaults: the authors' CIFAR-10-C values.
    """

    # The authors' optimisers: Adam 1e-3 on CIFAR-10-C (the best-known collection's config); on ImageNet SGD lr 2.5e-4
    # with momentum 0.9 (batch 64) as in the authors' code, which does not use Nesterov momentum.
    optimizers: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "cifar": {"name": "adam", "lr": 1e-3},
        "imagenet": {"name": "sgd", "lr": 2.5e-4, "momentum": 0.9},
    }

    name: str = "eta"
    e_margin: float = 0.4
    d_margin: float = 0.4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("e_margin", self.e_margin, "a fraction of ln C: the entropy threshold E0 = e_margin * ln C")
        check_fraction("d_margin", self.d_margin, "a threshold on the cosine similarity of probability vectors")


@dataclass(frozen=True)
class EATASettings(ETASettings):
    """EATA: ETA plus the Fisher-weighted anti-forgetting penalty fisher_alpha * sum F (theta - theta0)^2.

    fisher_samples: source images for the Fisher information, in batches of fisher_batch_size (BatchNorm uses their
    batch statistics, as the method does). source_data: a CIFAR-10 python-layout folder (the data root holding
    cifar-10-batches-py/, or that folder) whose data_batch_* files are the source split; null = the run's clean
    source images (for CIFAR streams the clean *test* images, with a warning). fisher_alpha 0 skips the Fisher (= ETA).
    """

    name: str = "eata"
    fisher_alpha: float = 1.0
    fisher_samples: int = 2000
    fisher_batch_size: int = 200
    source_data: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_finite_number("fisher_alpha", self.fisher_alpha, meaning="0 = ETA")
        if self.fisher_samples < 1:
            raise ConfigError(f"method.fisher_samples must be >= 1 (source images), got {self.fisher_samples!r}")
        if self.fisher_batch_size < 2:
            raise ConfigError(
                "method.fisher_batch_size must be >= 2 (BatchNorm normalises with the batch's statistics), "
                f"got {self.fisher_batch_size!r}"
            )
        if self.source_data is not None and not self.source_data.strip():
            raise ConfigError("method.source_data must be a folder path or null, got an empty string")


# ---------------------------------------------------------------------------------------------------- the maths


def reliable_non_redundant(
    logits: Tensor, probs_mean: Tensor | None, e_margin: float, d_margin: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(entropy, keep, weights, probs) of one batch, all per sample (float32, no host sync).

    keep = [H < E0] and [cosine(p, probs_mean) < d_margin] (the second filter only once a mean exists);
    weights = 1 / exp(H - E0), detached; E0 = e_margin * ln C.
    """
    logits = logits.float()
    entropy = entropy_per_sample(logits)
    e0 = e_margin * math.log(logits.shape[1])
    keep = entropy < e0
    probs = logits.detach().softmax(1)
    if probs_mean is not None:
        cosine = F.cosine_similarity(probs, probs_mean.unsqueeze(0), dim=1)
        keep = keep & (cosine.abs() < d_margin)
    weights = torch.exp(e0 - entropy.detach())
    return entropy, keep, weights, probs


def fisher_diagonal(
    model: nn.Module,
    params: list[Tensor],
    images: Tensor,
    batch_size: int,
    autocast: Callable[[Tensor], contextlib.AbstractContextManager] | None = None,
) -> list[Tensor]:
    """Diagonal Fisher information of `params` on `images` (the authors' batch form), one tensor per parameter.

    F = (1/K) sum_k g_k^2, g_k the gradient of the mean cross-entropy of batch k (of `batch_size` images, the last
    one possibly smaller) against its own pseudo-labels argmax f(x); K the number of batches. The model runs in
    whatever modes it is in (the caller sets them). `.grad` is not touched.
    """
    device = params[0].device
    total = [torch.zeros_like(p) for p in params]
    n_batches = 0
    # every tensor needs a gradient here, even those a step leaves frozen for now (`blocks: auto` enables its choice)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            precision = autocast(x) if autocast is not None else contextlib.nullcontext()
            with torch.enable_grad(), precision:
                logits = model(x).float()
            loss = F.cross_entropy(logits, logits.detach().argmax(1))
            grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
            torch._foreach_addcmul_(total, grads, grads)
            n_batches += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    torch._foreach_div_(total, float(max(n_batches, 1)))
    return total


def ewc_penalty(params: list[Tensor], fisher: list[Tensor], anchor: list[Tensor]) -> Tensor:
    """sum_i F_i (theta_i - theta0_i)^2 over every element of every tensor (EWC, Kirkpatrick et al. 2017)."""
    return torch.stack([(f * (p.float() - a).square()).sum() for p, f, a in zip(params, fisher, anchor)]).sum()


# ---------------------------------------------------------------------------------------------------- the methods


@register_method("eta")
class ETA(Method):
    """ETA (Niu et al. 2022, Sec. 3.1-3.2): sample-efficient entropy minimisation on `blocks` x `kind`.

    Order per batch: one forward (test-batch BatchNorm statistics) -> these logits are the prediction -> filter and
    weight the samples with the moving average as it was before this batch -> one guarded optimiser step -> if the
    step was taken, the moving average absorbs the mean prediction of the kept samples.
    """

    Settings = ETASettings
    adapts = True

    def configure(self, model: nn.Module) -> None:
        self.configure_adaptation(model)
        self.probs_mean: Tensor | None = None  # m of Eqn. 4; None until a batch keeps a sample
        self.register_state("probs_mean")

    def regulariser(self) -> Tensor | None:
        """The term added to the filtered entropy (None for ETA)."""
        return None

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        with self.autocast(x):
            logits = self.model(x)
        entropy, keep, weights, probs = reliable_non_redundant(
            logits, self.probs_mean, self.cfg.e_margin, self.cfg.d_margin
        )
        result = self.update(Objective(entropy, weights=weights, keep=keep, extra=self.regulariser()))
        if result.updated:  # kept samples and a finite step: their predictions are finite, so m stays finite
            kept_mean = (probs * keep.unsqueeze(1)).sum(0) / result.n_kept
            if self.probs_mean is None:
                self.probs_mean = kept_mean
            else:
                self.probs_mean = (1.0 - PROBS_MOMENTUM) * self.probs_mean + PROBS_MOMENTUM * kept_mean
        return logits.detach()


@register_method("eata")
class EATA(ETA):
    """EATA (Niu et al. 2022, Sec. 3.3): ETA plus the Fisher-weighted anti-forgetting penalty.

    Same order per batch as ETA; the penalty is part of the loss of every step. The Fisher information is computed
    once, here in `configure`, after the BatchNorm mode is set (see the module docstring).
    """

    Settings = EATASettings

    def configure(self, model: nn.Module) -> None:
        super().configure(model)
        tensors = [p for _, p in self._params]
        self.fisher: list[Tensor] = []
        self.anchor: list[Tensor] = []
        if self.cfg.fisher_alpha > 0:
            images = self._source_images()
            fisher = fisher_diagonal(model, tensors, images, self.cfg.fisher_batch_size, self.autocast)
            if not bool(torch.isfinite(torch.stack([f.sum() for f in fisher]).sum())):
                raise ValueError(
                    f"method {self.cfg.name}: the Fisher information on the source images is not finite; "
                    "check method.source_data (images must be float in [0, 1]) and the model"
                )
            self.fisher = fisher
            self.anchor = [p.detach().float().clone() for p in tensors]
        self.register_state("fisher", "anchor")

    def regulariser(self) -> Tensor | None:
        if not self.fisher:
            return None
        return self.cfg.fisher_alpha * ewc_penalty([p for _, p in self._params], self.fisher, self.anchor)

    def _source_images(self) -> Tensor:
        """`fisher_samples` source images (float (N, 3, H, W) in [0, 1], CPU) in a seeded random order."""
        cfg, n = self.cfg, self.cfg.fisher_samples
        if cfg.source_data is not None:
            pool, _ = load_cifar10(cfg.source_data, split="train")  # uint8 (N, 32, 32, 3)
            pick = self._permutation(len(pool))[:n].numpy()
            return torch.from_numpy(pool[pick]).permute(0, 3, 1, 2).float().div_(255.0)
        if self.context.source_images is None:
            raise ConfigError(
                f"method {cfg.name}: the Fisher information needs source images and this run has none: set "
                "method.source_data to a CIFAR-10 folder with data_batch_* files (or method.fisher_alpha=0, i.e. ETA)"
            )
        images, _ = self.context.source_images(n)
        # The provider says when its images are not a real source split (the engine's clean test images); images a
        # user hands over through the Python API carry no note and need no warning, unless there are too few.
        notes = [self.context.source_note] if self.context.source_note else []
        if len(images) < n:
            notes.append(f"only {len(images)} of the {n} requested source images were available")
        if notes:
            message = f"method {cfg.name}: " + "; ".join(notes)
            self.warnings.append(message)
            warnings.warn(message, UserWarning, stacklevel=2)
        return images[self._permutation(len(images))]

    def _permutation(self, n: int) -> Tensor:
        """A random permutation of range(n) from the method's generator (on its device), returned on the CPU."""
        return torch.randperm(n, generator=self.rng, device=self.rng.device).cpu()
