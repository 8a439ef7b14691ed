"""`cotta`: Continual Test-Time Adaptation (Wang et al., CVPR 2022).

Three copies of the network: the student (the model, adapted by gradient), a mean teacher (an exponential moving
average of the student's adapted parameters) and the anchor (the frozen source model). Per batch:

1. the anchor's confidence: the batch mean of its maximum softmax probability;
2. the teacher's prediction: its logits on the clean batch when that confidence is >= `ap`, otherwise the mean of
   its logits over `n_augmentations` augmented views (`augment.cotta_views`, the authors' CIFAR pipeline);
3. the student's loss: the soft cross-entropy to the teacher's prediction, -sum_c softmax(teacher)_c log softmax(
   student)_c, averaged over the batch; one optimiser step;
4. after a successful step: teacher <- m * teacher + (1 - m) * student on the adapted parameters
   (`teacher_momentum` m), then the stochastic restore: every adapted element goes back to its source value with
   probability `rst` (reported as the method reset "stochastic_restore" on that batch's results line).

The prediction is the teacher's of step 2, before this batch's update: the augmentation-averaged logits when it
augmented, as the authors' `forward_and_adapt` returns `outputs_ema`. `predict` (no side effects, no random draws) is
the teacher on the clean batch. All three networks normalise with test-batch BatchNorm statistics (the authors'
`configure_model` turns running statistics off); the teacher normalises each augmented view with that view's own
statistics, as the authors' one forward per view does, also when several views share a forward
(`bn.batch_stats_per_group`). Random draws, all from `self.rng` in this order per batch: the views' parameters and
noise (only when augmenting), then the restore mask.

Cost (`benchmarks/augment_cost.py`, resnet20, one CPU thread, batch 200, 32 views): 7.8 s per step, dominated by
the teacher's 32 forwards; the same step looping over the views costs 7.9 s with these augmentations and 10.1 s with
the authors' torchvision pipeline; on a CPU all views in one forward is 4x slower (31 s: out of cache, and grouped
statistics), so the CPU default runs one view per forward. Host syncs per step: the anchor gate, the update guard,
and the augmentation's index selections (`augment`).

Followed: the paper (Sec. 3.2-3.4) and the authors' code (qinenergy/cotta `cifar/cotta.py`, `my_transforms.py`,
`cfgs/cifar10/cotta.yaml`: Adam 1e-3, batch 200, MT 0.999, RST 0.01, AP 0.92, all weights and biases adapted),
cross-checked with mariodoebler/test-time-adaptation `classification/methods/cotta.py`. Deliberate differences:
the teacher and the restore only act after a finite update (the authors always do both), so a skipped update changes
no state; only the adapted parameters take part in the EMA and the restore (the authors adapt all of them, where
the two are the same); `augment_per="image"` optionally draws the augmentation per image instead of per view.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..schema import ConfigError, check_choice
from .augment import cotta_views, units_per_forward
from .base import Method, Objective, register_method
from .bn import batch_stats_per_group
from .losses import softmax_cross_entropy
from .settings import AdaptSettings

AUGMENT_PER = ("view", "image")


@dataclass(frozen=True)
class CoTTASettings(AdaptSettings):
    """CoTTA's CIFAR-10-C settings (every weight and bias adapted: blocks [all], kind all).

    teacher_momentum: EMA momentum of the mean teacher (0.999). rst: probability that an adapted element is restored
    to its source value after each step (0.01). ap: the anchor-confidence threshold below which the teacher averages
    augmented views (0.92). n_augmentations: views per batch (32). augment_per: `view` (one draw of the augmentation
    per view, shared by the batch, as the authors' torchvision transforms on a batch tensor) or `image`.
    images_per_forward: the most images one teacher forward takes (whole views of the batch, at least one);
    0 = auto: one view per forward on a CPU, all views in one forward on an accelerator.
    """

    # Adam 1e-3 on CIFAR-10-C; SGD lr 0.01, momentum 0.9 (Nesterov, as the authors' config) on ImageNet-C.
    optimizers: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "cifar": {"name": "adam", "lr": 1e-3},
        "imagenet": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True},
    }

    name: str = "cotta"
    blocks: tuple[str, ...] = ("all",)
    kind: str = "all"
    teacher_momentum: float = 0.999
    rst: float = 0.01
    ap: float = 0.92
    n_augmentations: int = 32
    augment_per: str = "view"
    images_per_forward: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("teacher_momentum", "rst", "ap"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ConfigError(f"method.{key} must lie in [0, 1], got {value!r}")
        if self.n_augmentations < 1:
            raise ConfigError(
                f"method.n_augmentations must be >= 1 (augmented views per batch), got {self.n_augmentations}"
            )
        check_choice("method", "augment_per", self.augment_per, AUGMENT_PER)
        if self.images_per_forward < 0:
            raise ConfigError(f"method.images_per_forward must be >= 0 (0 = auto), got {self.images_per_forward}")


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` (its modes and BatchNorm settings included) with no parameter requiring gradients."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone


@register_method("cotta")
class CoTTA(Method):
    """CoTTA (Wang et al. 2022): EMA-teacher targets, augmentation-averaged when unsure; stochastic restore.

    Details in the module docstring.

    Order per batch: anchor confidence -> teacher prediction (returned) -> student forward -> soft cross-entropy ->
    one optimiser step -> (if it was taken) teacher EMA -> stochastic restore."""

    Settings = CoTTASettings
    adapts = True

    def configure(self, model: nn.Module) -> None:
        selected = self.configure_adaptation(model)
        self.teacher = _frozen_copy(model)
        self.anchor = _frozen_copy(model)
        teacher, anchor = dict(self.teacher.named_parameters()), dict(self.anchor.named_parameters())
        # Registered modules are restored in place (load_state_dict), so these references stay valid.
        self._teacher_params = [teacher[name] for name, _ in selected]
        self._source_params = [anchor[name] for name, _ in selected]
        self.register_state("teacher", "anchor")

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The teacher's logits on the clean batch (no augmentation, so no random draws)."""
        with self.autocast(x):
            return self.teacher(x)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        with torch.no_grad():
            with self.autocast(x):
                confidence = self.anchor(x).float().softmax(dim=1).amax(dim=1).mean()
            # One host sync: whether the n_augmentations-view teacher forward runs at all.
            target = self._teacher_on_views(x) if bool(confidence < cfg.ap) else self.predict(x).float()
        with self.autocast(x):
            student = self.model(x)
        if self.update(Objective(softmax_cross_entropy(student, target))).updated:
            self._update_teacher()
            if cfg.rst > 0:
                self._stochastic_restore()
        return target

    def _teacher_on_views(self, x: Tensor) -> Tensor:
        """Mean teacher logits over the augmented views of `x`, several views per forward where allowed."""
        n_views, batch = self.cfg.n_augmentations, x.shape[0]
        views = cotta_views(x, n_views, self.rng, per=self.cfg.augment_per)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            views = views.contiguous(memory_format=torch.channels_last)  # the layout the engine feeds the model
        step = self._views_per_forward(n_views, batch)
        total = torch.zeros((), device=x.device)
        for start in range(0, n_views, step):
            chunk = views[start * batch : (start + step) * batch]
            k = chunk.shape[0] // batch
            with batch_stats_per_group(self.teacher, k), self.autocast(chunk):
                total = total + self.teacher(chunk).float().view(k, batch, -1).sum(dim=0)
        return total / n_views

    def _views_per_forward(self, n_views: int, batch: int) -> int:
        if self.cfg.images_per_forward:
            return units_per_forward(n_views, batch, self.cfg.images_per_forward)
        # auto: on a CPU one view per forward, faster there than several views in one forward (batch-sized
        # forwards stay in cache, and plain BatchNorm beats the grouped statistics: benchmarks/augment_cost.py);
        # on an accelerator all views in one forward.
        return 1 if self.device.type == "cpu" else n_views

    @torch.no_grad()
    def _update_teacher(self) -> None:
        student = [p for _, p in self._params]
        torch._foreach_lerp_(self._teacher_params, student, 1.0 - self.cfg.teacher_momentum)

    @torch.no_grad()
    def _stochastic_restore(self) -> None:
        """Each adapted element back to its source value with probability rst: one draw for all of them."""
        params = [p for _, p in self._params]
        sizes = [p.numel() for p in params]
        draws = torch.rand(sum(sizes), generator=self.rng, device=self.device).split(sizes)
        for p, source, u in zip(params, self._source_params, draws):
            p.copy_(torch.where(u.view(p.shape) < self.cfg.rst, source, p))
        self.note_method_reset("stochastic_restore")
