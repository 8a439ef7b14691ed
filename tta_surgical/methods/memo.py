"""`memo`: Marginal Entropy Minimisation with One test point (Zhang, Levine & Finn, NeurIPS 2022).

Per test image, independently of every other image (episodic: each starts from the source weights):

1. `n_augmentations` AugMix views of the image (`augment.augmix_views`, the authors' CIFAR augmentation);
2. the marginal prediction p = (1/V) sum_v softmax(f(view_v)) and its entropy H(p) = -sum_c p_c log p_c;
3. one optimiser step on H(p) from the source weights (a fresh optimiser: SGD lr 0.005 on CIFAR, the authors');
4. the prediction: the adapted network on the clean image.

Batched with `torch.func`: every image of a chunk gets its own copy of the adapted parameters (stacked on a leading
dimension), `vmap(functional_call)` runs all its views through its own copy in one forward, one backward of the
chunk's mean loss gives every copy its own image's gradient (rescaled by the chunk size before the step, so that the
update is exactly the per-image one while the reported loss is the mean marginal entropy), and a fresh optimiser over
the stacked copies takes the step, through `Method.update` and its non-finite guard (a non-finite loss or gradient
skips the chunk: its images are predicted with the source weights). No per-image Python loop: measured with
`benchmarks/augment_cost.py` (resnet20, one CPU thread, 16 images x 32 views) a step takes 3.1 s at the CPU auto
chunk (8 images per forward) and 3.4 s with all 16 in one forward (the per-image weights become grouped
convolutions), against 3.6 s for the authors' per-image loop with one augmentation call per view; on an
accelerator the batched forward is the point (not measured here). `images_per_forward` bounds the views per forward.

BatchNorm: as the authors' BatchNorm models (their ImageNet code; their CIFAR network uses GroupNorm), the test
statistics come from the one image, mixed with the source statistics at prior strength N: weight N / (N + 1) for
the source whether the image enters as its V views (adaptation) or alone (prediction), i.e. the views count as one
sample (`nn.BatchNorm2d.prior = N / (N + 1)` in zhangmarvin/memo, N = 16). Implemented with `bn.set_bn_stats` at
prior strength N * V for the views and N for the image (its formula weighs the source by N / (N + n)).

After a batch the model holds the weights adapted to the batch's last image, the state the authors' per-image loop
leaves behind; nothing reads them (each image starts again from `source`). `predict` (no side effects) is the
source weights with MEMO's BatchNorm statistics, i.e. MEMO without the adaptation step.

Followed: the paper (Sec. 3, Alg. 1) and the authors' code (zhangmarvin/memo `cifar-10-exps/test_calls/test_adapt.py`:
SGD lr 0.005, one step, 32 views, all parameters; `utils/third_party.py`: AugMix; `imagenet-exps/utils/
adapt_helpers.py`: the BatchNorm prior), cross-checked with mariodoebler/test-time-adaptation
`classification/methods/memo.py`. Differences: the stream's batch only groups images for speed; every image is
adapted and predicted on its own, so the result equals a batch-1 stream up to floating point (the random views of
an image do depend on where it sits in its batch). The gradient also flows through the image's 1/(N+1) share of the
BatchNorm statistics (`bn.mixed_batch_norm`); the authors' BatchNorm forward treats the statistics as constants.

Measured (resnet20, continual CIFAR-10-C, 100 images per corruption, `tta-surgical run`): the source model errs
43.4%, MEMO's starting point (source weights, the image's statistics at N = 16) 39.4%, MEMO 36.3%, but `norm`
(statistics of 200-image batches) 28.7%: one image moves the statistics little at N = 16. N = 4 gives 28.9%,
N = 1 40.4% (one image's statistics are too noisy): tune `prior_strength` for a BatchNorm network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..schema import ConfigError, check_choice
from .augment import augmix_views, units_per_forward
from .base import Method, Objective, build_optimizer, register_method
from .bn import set_bn_stats
from .norm import check_prior_strength
from .settings import AdaptSettings

BN_STATS = ("batch", "source")


@dataclass(frozen=True)
class MEMOSettings(AdaptSettings):
    """MEMO's CIFAR-10-C settings: every parameter adapted (blocks [all], kind all), 32 AugMix views, one step.

    bn_stats: `batch` (statistics of the image, see prior_strength) or `source` (the running statistics).
    prior_strength N: the source statistics weigh N / (N + 1) against the image's (the authors' N = 16); 0 = the
    image's statistics alone. images_per_forward: the most augmented views one forward takes (whole images, at
    least one); 0 = auto (256 on a CPU, 4096 on an accelerator).
    """

    # The authors' optimiser: plain SGD (no momentum, no weight decay), lr 0.005 on CIFAR (cifar-10-exps) and
    # 2.5e-4 on ImageNet (imagenet-exps), one step from the source weights per image. Momentum would change the
    # step itself: Nesterov momentum 0.9 (the best-known collection's SGD default) makes the first step 1.9x as long.
    optimizers: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "cifar": {"name": "sgd", "lr": 5e-3, "momentum": 0.0},
        "imagenet": {"name": "sgd", "lr": 2.5e-4, "momentum": 0.0},
    }

    name: str = "memo"
    blocks: tuple[str, ...] = ("all",)
    kind: str = "all"
    n_augmentations: int = 32
    bn_stats: str = "batch"
    prior_strength: float = 16.0
    images_per_forward: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_augmentations < 1:
            raise ConfigError(
                f"method.n_augmentations must be >= 1 (augmented views per image), got {self.n_augmentations}"
            )
        check_choice("method", "bn_stats", self.bn_stats, BN_STATS)
        check_prior_strength(self.prior_strength)
        if self.prior_strength > 0 and self.bn_stats != "batch":
            raise ConfigError(
                "method.prior_strength mixes the source statistics into the image's; it needs bn_stats=batch "
                "(set prior_strength=0 with bn_stats=source)"
            )
        if self.images_per_forward < 0:
            raise ConfigError(f"method.images_per_forward must be >= 0 (0 = auto), got {self.images_per_forward}")


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean softmax over the views: logits (..., V, C) -> (...), in float32 via log-sum-exp."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mean_logp = torch.logsumexp(logp, dim=-2) - math.log(logits.shape[-2])
    return -(mean_logp.exp() * mean_logp).sum(dim=-1)


@register_method("memo")
class MEMO(Method):
    """MEMO (Zhang et al. 2022): per image, one step on the marginal entropy over AugMix views, then predict.

    Details in the module docstring.

    Order per image: views -> marginal entropy -> one step from the source weights -> prediction on the clean image
    with the adapted weights (the returned logits)."""

    Settings = MEMOSettings
    adapts = True
    supports_auto = False  # per image from the source weights: there is no stream-level choice to make

    def configure(self, model: nn.Module) -> None:
        model.eval()
        selected = self.select_adapted()
        self._names = [name for name, _ in selected]
        self.source = {name: p.detach().clone() for name, p in selected}  # where every image starts
        self._chunk: tuple[list[Tensor], int] | None = None  # the copies being stepped (see _before_optimizer_step)
        self._use_bn_stats(1)
        self.register_state("source")

    def _use_bn_stats(self, views_per_image: int) -> None:
        """Source weight N / (N + 1) for an image that enters the network as `views_per_image` rows."""
        if self.cfg.bn_stats == "source":
            set_bn_stats(self.model, "source")
        else:
            set_bn_stats(self.model, "batch", self.cfg.prior_strength * views_per_image)

    def _forward(self, params: tuple[Tensor, ...], x: Tensor) -> Tensor:
        """The model with the adapted tensors replaced by `params` (one image's copy under vmap)."""
        return functional_call(self.model, dict(zip(self._names, params)), (x,))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Every image alone, with the source weights and MEMO's BatchNorm statistics (MEMO without its step)."""
        self._use_bn_stats(1)
        source = tuple(self.source[name] for name in self._names)
        with self.autocast(x):
            return vmap(self._forward, in_dims=(None, 0))(source, x.unsqueeze(1)).squeeze(1)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        n_views, batch = self.cfg.n_augmentations, x.shape[0]
        views = augmix_views(x, n_views, self.rng).view(n_views, batch, *x.shape[1:]).transpose(0, 1)
        # auto: 256 views per forward on a CPU (8 images of 32 views: the fastest measured there), 4096 elsewhere
        # (not measured; lower it for large models)
        limit = self.cfg.images_per_forward or (256 if x.device.type == "cpu" else 4096)
        step = units_per_forward(batch, n_views, limit)
        return torch.cat([self._adapt_chunk(x[s : s + step], views[s : s + step]) for s in range(0, batch, step)])

    def _adapt_chunk(self, x: Tensor, views: Tensor) -> Tensor:
        """One step per image of `x` (n, C, H, W) on its views (n, V, C, H, W); the adapted logits (n, classes)."""
        n = x.shape[0]
        copies = [self.source[name].unsqueeze(0).repeat(n, *[1] * p.dim()).requires_grad_() for name, p in self._params]
        self._use_bn_stats(views.shape[1])
        with self.autocast(views):
            logits = vmap(self._forward)(tuple(copies), views)  # (n, V, classes)
        self._chunk = (copies, n)
        try:
            self.update(Objective(marginal_entropy(logits)), optimizer=build_optimizer(copies, self.optim_cfg))
        finally:
            self._chunk = None
        with torch.no_grad():
            self._use_bn_stats(1)
            with self.autocast(x):
                prediction = vmap(self._forward)(tuple(copies), x.unsqueeze(1)).squeeze(1)
            for (_, p), adapted in zip(self._params, copies):
                p.copy_(adapted[-1])  # the state the authors' loop leaves: the last image's weights
        return prediction

    def _before_optimizer_step(self) -> None:
        """The chunk's loss is the mean over its n images, so each copy's gradient is 1/n of its own image's:
        scale it back, making the step exactly the per-image one whatever the optimiser."""
        if self._chunk is not None:
            copies, n = self._chunk
            grads = [p.grad for p in copies if p.grad is not None]
            if grads and n > 1:
                torch._foreach_mul_(grads, float(n))
