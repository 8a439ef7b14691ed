"""`rotta`: Robust Test-Time Adaptation (Yuan, Xie, Li, CVPR 2023, "Robust Test-Time Adaptation in Dynamic Scenarios").

Three parts (paper section 3), all as the authors' code does them (BIT-DA/RoTTA: `core/adapter/rotta.py`,
`core/utils/memory.py`, `core/utils/bn_layers.py`, `core/utils/custom_transforms.py`, `configs/adapter/rotta.yaml`;
the collection mariodoebler/test-time-adaptation `classification/methods/rotta.py` runs the same algorithm on
CIFAR-10-C with batches of 200, Adam 1e-3):

- **Robust BatchNorm** (RBN, section 3.2): every BatchNorm layer keeps its running statistics as the global
  statistics. In an update forward they move one EMA step towards the current batch's (biased) statistics,
  mu <- (1 - alpha) mu + alpha mu_batch (the same for the variance, alpha 0.05), and the layer normalises with
  the *updated* values (the gradient flows through the batch part); outside updates it normalises with the
  stored values. So the statistics change only in the update forwards on the memory bank: the teacher's from the
  clean memory, the student's from its strongly augmented copy. This is the one method whose algorithm writes
  BatchNorm buffers (`updates_norm_statistics`); the layers keep their class, parameter and buffer names (a
  per-instance forward, as `bn.py` does), so block maps and checkpoints see the same model.
- **Category-balanced sampling with timeliness and uncertainty** (CSTU, section 3.3): a memory bank of
  `memory_size` test images. Each instance arrives with the teacher's pseudo-label and the entropy of its
  prediction; heuristic score = lambda_t / (1 + exp(-age / memory_size)) + lambda_u * entropy / ln C. If the
  instance's class holds fewer than memory_size / C items, it is added (when the bank is full, the
  highest-score item of the majority classes must go first, and only if its score beats the newcomer's); else it
  may replace the highest-score item of its own class (same condition). Every insertion attempt ages every item
  by one. Ties go to the last item in class order, as the authors' `>=` scan does.
- **Time-aware robust training** (section 3.4): every `update_every` instances, one Adam step on the bank:
  loss = mean_i w(A_i) * CE(softmax(teacher(m_i)), student(strong_aug(m_i))) with the timeliness weight
  w(A) = exp(-A) / (1 + exp(-A)), A = age / memory_size; then the teacher's parameters take an EMA step
  theta_t <- (1 - nu) theta_t + nu theta_s (nu 0.001).

Order per batch: the teacher (RBN with stored statistics) predicts the batch -> these logits are the prediction
(the teacher's, as the authors return `ema_out`) -> the batch's instances enter the bank one by one, with the
pseudo-labels and entropies of that single teacher forward, and an update runs each time the instance clock
reaches a multiple of `update_every` (several per batch of 200: the bank state at that instance is used, as the
authors' per-instance loop does). The bank's bookkeeping is plain Python over <= memory_size items (no forward
per instance); the images move once per update with one gather.

Deliberate differences from the authors' code:
- Only the BatchNorm layers switch to training behaviour during an update (the authors call `model.train()`):
  the same on networks without dropout (the CIFAR ResNets), and no dropout noise from the global RNG otherwise.
- The EMA teacher step runs over the adapted tensors only (the other parameters of teacher and student are
  identical, so the result is the same) and, like the RBN statistics of both models, only after a finite update:
  a skipped (non-finite) update changes nothing.
- The strong augmentation is CoTTA's (`augment.cotta_views`, one draw for the whole bank, as the authors' torchvision
  transform applied to a batched tensor).
- If the teacher's predictions for a batch are not finite, the batch is predicted but not added to the bank.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..schema import ConfigError
from ._checks import check_finite_number, check_unit_interval
from .augment import cotta_views
from .base import Method, Objective, build_optimizer, register_method
from .bn import batchnorm_layers
from .losses import softmax_cross_entropy
from .settings import AdaptSettings

__all__ = ["RoTTA", "RoTTASettings", "robust_bn_forward"]


@dataclass(frozen=True)
class RoTTASettings(AdaptSettings):
    """RoTTA's CIFAR-10-C defaults (authors' `configs/adapter/rotta.yaml`): the norm affines of every layer adapt.

    memory_size: images in the category-balanced bank. update_every: instances between two updates. nu: EMA rate
    of the teacher. alpha: RBN momentum of the statistics. lambda_t / lambda_u: weights of timeliness and
    uncertainty in the bank's replacement score.
    """

    # Adam 1e-3 in both regimes (the authors' and the collection's configs).
    optimizers: ClassVar[Mapping[str, Mapping[str, Any]]] = {"cifar": {"name": "adam", "lr": 1e-3}}

    name: str = "rotta"
    kind: str = "norm"
    memory_size: int = 64
    update_every: int = 64
    nu: float = 0.001
    alpha: float = 0.05
    lambda_t: float = 1.0
    lambda_u: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_size < 1:
            raise ConfigError(f"method.memory_size must be >= 1 (images in the bank), got {self.memory_size}")
        if self.update_every < 1:
            raise ConfigError(f"method.update_every must be >= 1 (instances per update), got {self.update_every}")
        check_unit_interval("nu", self.nu)
        check_unit_interval("alpha", self.alpha)
        check_finite_number("lambda_t", self.lambda_t)
        check_finite_number("lambda_u", self.lambda_u)


# ------------------------------------------------------------------------------------------------ robust BN
def robust_bn_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    """RBN forward of one BatchNorm layer (bound per instance): EMA-updated statistics in training mode, stored ones
    otherwise. The updated statistics are left in `_rotta_pending` for the method to commit after a finite update."""
    if not self.training:  # the stored statistics: PyTorch's fused kernel (no gradient to the statistics needed)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    # Two passes (mean, then the mean squared deviation): stable, and much faster than var_mean on the CPU.
    mean_b = xf.mean(dim=dims)
    var_b = (xf - mean_b.view(shape)).square().mean(dim=dims)
    a = self._rotta_alpha
    mean = (1.0 - a) * self.running_mean.float() + a * mean_b
    var = (1.0 - a) * self.running_var.float() + a * var_b
    self._rotta_pending = (mean.detach(), var.detach())
    scale = torch.rsqrt(var + self.eps)
    if self.affine:
        scale = scale * self.weight.float()
    shift = -mean * scale
    if self.affine:
        shift = shift + self.bias.float()
    # (x - mean) / sqrt(var + eps) * weight + bias as one multiply-add per element.
    return torch.addcmul(shift.view(shape), xf, scale.view(shape)).to(x.dtype)


def _make_robust(model: nn.Module, alpha: float) -> list[_BatchNorm]:
    layers = batchnorm_layers(model)
    for bn in layers:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("rotta's robust BN needs BatchNorm layers with running statistics (track_running_stats)")
        bn._rotta_alpha = float(alpha)
        bn._rotta_pending = None
        bn.forward = types.MethodType(robust_bn_forward, bn)
        bn.train(False)
    return layers


# ------------------------------------------------------------------------------------------------ the method
@register_method("rotta")
class RoTTA(Method):
    """RoTTA: robust BN, a category-balanced memory bank and a time-reweighted EMA teacher-student update.

    The prediction is the teacher's (with its robust BN statistics), from one forward before any update on this
    batch; the instances then enter the bank and an update on the bank runs every `update_every` instances.
    """

    Settings = RoTTASettings
    adapts = True
    updates_norm_statistics = True

    def configure(self, model: nn.Module) -> None:
        model.eval()
        teacher = copy.deepcopy(model)
        selected = self.select_adapted()
        self._student_bn = _make_robust(model, self.cfg.alpha)
        self._teacher_bn = _make_robust(teacher, self.cfg.alpha)
        teacher.requires_grad_(False)
        self.teacher = teacher
        named = dict(teacher.named_parameters())
        self._teacher_params = [named[name] for name, _ in selected]  # the EMA's targets, in `params()` order
        self.optimizer = build_optimizer(selected, self.optim_cfg)
        # The bank, in the authors' order (by class, then arrival): images, and per item its class, entropy and
        # the instance number it arrived at (its age is clock - arrival). `clock` counts the instances seen.
        self.memory: Tensor | None = None
        self.mem_class: list[int] = []
        self.mem_uncertainty: list[float] = []
        self.mem_arrival: list[int] = []
        self.clock = 0
        self.register_state("teacher", "memory", "mem_class", "mem_uncertainty", "mem_arrival", "clock")

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The teacher's logits with its stored robust-BN statistics; changes nothing."""
        with self.autocast(x):
            return self.teacher(x)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        logits = self.predict(x)
        probs = logits.float().softmax(dim=1)
        entropy = -(probs * torch.log(probs + 1e-6)).sum(dim=1)  # the authors' uncertainty (1e-6 inside the log)
        stats = torch.stack([probs.argmax(dim=1).float(), entropy]).cpu()  # one sync for the bookkeeping
        if not bool(torch.isfinite(stats).all()):
            self.n_skipped += 1
            self.last.skipped = True
            return logits
        labels, uncertainties = stats[0].long().tolist(), stats[1].tolist()
        bank = _Bank.from_state(self, n_classes=logits.shape[1])
        for i, (label, uncertainty) in enumerate(zip(labels, uncertainties)):
            bank.add(label, uncertainty, self.clock, source=-1 - i)
            self.clock += 1
            if self.clock % self.cfg.update_every == 0:
                bank.store(self, x)
                self._update()
        if bank.changed:
            bank.store(self, x)
        return logits

    def _update(self) -> None:
        """One step on the bank: teacher on the clean images, student on their strong augmentation (both RBN in
        update mode), time-reweighted cross-entropy; then, only after a finite step, the new RBN statistics of both
        models and the teacher's EMA step."""
        memory = self.memory
        assert memory is not None and memory.shape[0] > 0
        ages = torch.tensor([self.clock - a for a in self.mem_arrival], dtype=torch.float32, device=memory.device)
        weights = torch.sigmoid(-ages / self.cfg.memory_size)  # exp(-A) / (1 + exp(-A)), A = age / memory_size
        strong = cotta_views(memory, 1, self.rng)  # one draw for the bank, as the authors' batched transform
        layers = self._student_bn + self._teacher_bn
        for bn in layers:
            bn.train(True)
        try:
            with torch.no_grad(), self.autocast(memory):
                teacher_logits = self.teacher(memory)
            with self.autocast(memory):
                student_logits = self.model(strong)
            per_sample = softmax_cross_entropy(student_logits, teacher_logits.detach())
            result = self.update(Objective(per_sample, weights=weights, normalize="batch"))
        finally:
            for bn in layers:
                bn.train(False)
        with torch.no_grad():
            for bn in layers:
                pending, bn._rotta_pending = bn._rotta_pending, None
                if result.updated and pending is not None:
                    bn.running_mean.copy_(pending[0])
                    bn.running_var.copy_(pending[1])
            if result.updated:
                student = [p.detach() for _, p in self._params]
                torch._foreach_lerp_(self._teacher_params, student, self.cfg.nu)


@dataclass
class _Item:
    cls: int
    uncertainty: float
    arrival: int
    source: int  # row of the stored bank (>= 0) or -1 - index of the current batch (a new image)


class _Bank:
    """The CSTU bank's bookkeeping for one batch: per-class item lists (the authors' structure), then `store`."""

    def __init__(self, capacity: int, n_classes: int, lambda_t: float, lambda_u: float) -> None:
        self.capacity, self.n_classes = capacity, n_classes
        self.per_class = capacity / n_classes
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.log_c = math.log(n_classes) if n_classes > 1 else 1.0
        self.classes: list[list[_Item]] = [[] for _ in range(n_classes)]
        self.changed = False

    @classmethod
    def from_state(cls, method: RoTTA, n_classes: int) -> _Bank:
        cfg = method.cfg
        bank = cls(cfg.memory_size, n_classes, cfg.lambda_t, cfg.lambda_u)
        rows = zip(method.mem_class, method.mem_uncertainty, method.mem_arrival)
        for row, (c, u, a) in enumerate(rows):
            bank.classes[c].append(_Item(c, u, a, row))
        return bank

    def score(self, age: int, uncertainty: float) -> float:
        return self.lambda_t / (1.0 + math.exp(-age / self.capacity)) + self.lambda_u * uncertainty / self.log_c

    def add(self, label: int, uncertainty: float, now: int, source: int) -> None:
        """Offer one instance (arriving at instance number `now`) to the bank: the authors' `add_instance`."""
        new_score = self.score(0, uncertainty)
        occupancy = sum(len(items) for items in self.classes)
        if len(self.classes[label]) < self.per_class:
            if occupancy < self.capacity:
                accepted = True
            else:
                sizes = [len(items) for items in self.classes]
                majority = [c for c, size in enumerate(sizes) if size == max(sizes)]
                accepted = self._remove_worst(majority, new_score, now)
        else:
            accepted = self._remove_worst([label], new_score, now)
        if accepted:
            self.classes[label].append(_Item(label, uncertainty, now, source))
            self.changed = True

    def _remove_worst(self, classes: list[int], new_score: float, now: int) -> bool:
        """Drop the highest-score item of `classes` (the last one on ties) if it scores above the newcomer."""
        worst: tuple[float, int, int] | None = None
        for c in classes:
            for index, item in enumerate(self.classes[c]):
                s = self.score(now - item.arrival, item.uncertainty)
                if worst is None or s >= worst[0]:
                    worst = (s, c, index)
        if worst is None:
            return True
        if worst[0] > new_score:
            self.classes[worst[1]].pop(worst[2])
            self.changed = True
            return True
        return False

    def store(self, method: RoTTA, x: Tensor) -> None:
        """Write the bank into the method's registered state: one gather of stored rows and new images."""
        items = [item for items in self.classes for item in items]
        old = method.memory
        n_old = 0 if old is None else old.shape[0]
        index = [item.source if item.source >= 0 else n_old + (-1 - item.source) for item in items]
        pool = x.detach() if old is None else torch.cat([old, x.detach().to(old.dtype)])
        method.memory = pool.index_select(0, torch.tensor(index, dtype=torch.long, device=pool.device))
        method.mem_class = [item.cls for item in items]
        method.mem_uncertainty = [item.uncertainty for item in items]
        method.mem_arrival = [item.arrival for item in items]
        for row, item in enumerate(items):
            item.source = row
        self.changed = False
