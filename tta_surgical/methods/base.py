"""The `Method` interface (version 2), its registry, and the machinery every online method shares.

A method is one module under `tta_surgical/methods/`: a frozen settings dataclass (a subclass of
`methods.settings.MethodSettings`, or `AdaptSettings` for methods that update parameters) and a `Method` subclass that
names it (`Settings = ...`), registered with `@register_method("name")`. Everything else follows from the
registry: config validation, CLI choices, sweep validation, bench labels and the contract tests.

What the base class does so that no method repeats it:

- **Parameter selection** (`select_adapted`): freeze the model, enable `cfg.blocks` x `cfg.kind`, and raise the
  one clear error when that selects nothing; `configure_adaptation` adds what most adapting methods' `configure`
  does with it (eval mode, test-batch BatchNorm statistics, the optimiser over the selection).
- **State lifecycle**: everything a method carries between batches is registered once by attribute name
  (`register_state`): the model, the optimiser and the method's random generator are registered by the base;
  a method adds its teacher, anchor model, memory bank, running statistics, clocks. `reset()` restores all of it
  exactly to the state right after `configure`; `state_dict()` / `load_state_dict()` checkpoint it for resume.
  Counters (`COUNTERS`) are run bookkeeping: checkpointed, never reset.
- **Guarded updates** (`update`): a method hands in an `Objective` (per-sample losses, optional weights, an
  optional keep-mask from its filter, an optional regulariser); the base reduces it, backpropagates and steps
  the optimiser unless the loss or a gradient is not finite (`n_skipped`). Samples removed by a filter are not
  a failure: they count in `n_filtered`, and a batch whose filter keeps nothing takes no step. A two-pass
  sharpness-aware update (SAM, used by SAR) runs through the same guard (`second_pass=`).
- **Per-step report** (`last`, a `StepInfo`): the loss, filtered images, whether the update was skipped, and any
  reset the method did on its own (SAR's model recovery, CoTTA's stochastic restore), which the engine writes
  to every results line and totals in the summary.
- **Inputs with NaN/Inf** are predicted but never adapted on (counted in `n_skipped`), so a bad batch cannot
  reach any state.

A method owns the modes of the model it is given (train/eval per module, `requires_grad`, BatchNorm
statistics): it sets them in `configure` and nobody else should change them during the run. It never moves the
model; build it after the engine has placed the model on its device (and set channels_last), so the reset
snapshot and the optimiser live where the parameters live.
"""

from __future__ import annotations

import contextlib
import copy
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..models.blocks import block_spec, select_params
from ..models.partition import matches
from ..registry import Registry
from .bn import set_bn_stats
from .optim import OptimConfig, build_optimizer
from .selection import Selector, is_auto
from .settings import SETTINGS, AdaptSettings, MethodSettings, method_config

__all__ = [
    "COUNTERS",
    "METHODS",
    "Method",
    "MethodContext",
    "Objective",
    "StepInfo",
    "all_finite",
    "UpdateResult",
    "build_method",
    "build_optimizer",
    "grads_finite",
    "guarded_backward",
    "guarded_step",
    "register_method",
    "resolve_autocast_dtype",
    "select_adapted",
]

NamedParams = list[tuple[str, nn.Parameter]]
M = TypeVar("M", bound="type[Method]")

# method name -> Method subclass (each registered class names its settings dataclass in `Settings`).
METHODS: Registry[type[Method]] = Registry("method")

# Run bookkeeping every method keeps: checkpointed with the state, never restored by `reset`.
COUNTERS = ("n_steps", "n_updates", "n_skipped", "n_filtered", "n_resets", "n_method_resets")

_DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a `Method` subclass under `name` (duplicates raise).

    Checks the contract the rest of the package relies on: `Settings` is a `MethodSettings` subclass whose
    `name` defaults to `name`, and an adapting method's settings have `blocks` / `kind` (`AdaptSettings`).
    """

    def add(cls: M) -> M:
        settings = cls.Settings
        if not (isinstance(settings, type) and issubclass(settings, MethodSettings)):
            raise TypeError(f"method {name!r}: {cls.__qualname__}.Settings must subclass MethodSettings")
        if settings.__dataclass_fields__["name"].default != name:
            raise TypeError(f"method {name!r}: {settings.__qualname__}.name must default to {name!r}")
        if cls.adapts and not issubclass(settings, AdaptSettings):
            raise TypeError(f"method {name!r} adapts parameters, so its settings must subclass AdaptSettings")
        if any(METHODS.get(other).Settings is settings for other in METHODS):
            raise TypeError(f"method {name!r}: {settings.__qualname__} is already the settings of another method")
        METHODS.register(name, cls)
        SETTINGS.register(name, settings)
        return cls

    return add


def resolve_autocast_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None/"fp32" -> no autocast; "bf16"/torch.bfloat16 -> bf16 autocast (other torch dtypes pass through)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype is torch.float32 else dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown autocast precision {dtype!r}; valid: fp32, bf16") from None


def _grad_norm_sum(grads: Sequence[Tensor]) -> Tensor:
    """Sum of the per-tensor gradient norms: one fused kernel; non-finite iff any gradient element is."""
    return torch.stack(torch._foreach_norm(list(grads))).float().sum()


def grads_finite(loss: Tensor, grads: Sequence[Tensor]) -> bool:
    """True when `loss` and every tensor of `grads` are finite; one host sync.

    One fused norm per tensor list instead of an `isfinite(...).all()` kernel pair per tensor (Tent has ~40 small
    tensors, so this is fewer kernel launches): a NaN or Inf anywhere makes its tensor's norm, and so the sum,
    non-finite. A finite gradient whose norm overflows float32 (> 3e38) also counts as non-finite, which is the
    right call for an update anyway.
    """
    total = loss.detach().float().reshape(())
    if grads:
        total = total + _grad_norm_sum(grads)
    return bool(torch.isfinite(total))


def all_finite(x: Tensor) -> bool:
    """Whether every element of `x` is finite; one host sync.

    The sum of a tensor is finite when all its elements are (a NaN or an Inf anywhere makes it NaN or Inf), so one
    reduction without a temporary mask answers the common case; only a non-finite sum, which a finite tensor gives
    when its sum overflows, asks the elementwise question. The answer is always the elementwise one.
    """
    if not x.is_floating_point() or bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(x).all())


def guarded_backward(
    loss: Tensor, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, n_kept: Tensor | int | None = None
) -> tuple[float, bool, int]:
    """Zero the gradients, backward `loss`, and read (loss value, loss and gradients all finite, n_kept) in one
    host sync. The one non-finite guard of the package: online methods and supervised fine-tuning both use it."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    parts = [loss.detach().float().reshape(()), _grad_norm_sum(grads) if grads else loss.new_zeros(())]
    if isinstance(n_kept, Tensor):
        parts.append(n_kept.float().reshape(()))
    value, grad_norm, *kept = torch.stack([p.float() for p in parts]).tolist()
    count = int(kept[0]) if kept else int(n_kept or 0)
    return value, math.isfinite(value) and math.isfinite(grad_norm), count


def guarded_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], loss: Tensor) -> bool:
    """Backward and step unless the loss or a gradient is not finite (then nothing changes); True if stepped."""
    _, ok, _ = guarded_backward(loss, params, optimizer)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ok


def select_adapted(model: nn.Module, blocks: Iterable[str], kind: str, owner: str = "method") -> NamedParams:
    """Freeze every parameter of `model`, then enable and return those of `blocks` x `kind` (model order).

    The one place that turns a block selection into trainable tensors (online methods and supervised fine-tuning
    alike); autograd then does no work for the frozen rest. An empty selection is an error that says why.
    """
    blocks = list(blocks)
    selected = select_params(model, blocks, kind)
    if not selected:
        raise ValueError(
            f"{owner}: blocks={blocks} with kind={kind} select no parameters (e.g. kind=norm on a block without "
            "norm layers); choose other blocks or kind=all"
        )
    model.requires_grad_(False)
    for _, p in selected:
        p.requires_grad_(True)
    return selected


@dataclass(frozen=True)
class MethodContext:
    """What a method may need from the run besides the model and its settings.

    seed: seeds the method's own random generator (`Method.rng`: augmentations, stochastic restore).
    source_images: `n -> (images, labels)`, up to `n` clean source-domain images (float (N, 3, H, W) in [0, 1],
        CPU) for methods that need source statistics (EATA's Fisher information); None when the run has none.
    source_note: what `source_images` really is, e.g. that it is the clean *test* set and not a source split
        (a method that uses it repeats the note as a warning).
    """

    seed: int = 0
    source_images: Callable[[int], tuple[Tensor, Tensor]] | None = None
    source_note: str = ""


@dataclass
class StepInfo:
    """What the last `step` did, for the results line: filled by the base class and the method."""

    loss: float | None = None  # mean of the finite losses of this step's updates (None: no update attempted)
    n_filtered: int = 0  # images a filter removed from this step's updates
    n_updates: int = 0  # optimiser steps taken in this step
    skipped: bool = False  # an update (or the whole batch) was skipped for a non-finite input/loss/gradient
    method_reset: str | None = None  # a reset the method did on its own (e.g. "recovery", "stochastic_restore")
    adapted: str | None = None  # `blocks: auto` only: what this step adapted ("block1", "none", ...)
    bn_stats: str | None = None  # `blocks: auto` only: the BatchNorm statistics of this step ("batch", "source", ...)
    _losses: list[float] = field(default_factory=list, repr=False)


@dataclass
class UpdateResult:
    """What one `update` did: `updated` (the optimiser stepped), the reduced loss of each pass, images kept."""

    updated: bool
    loss: float | None
    second_loss: float | None = None
    n_kept: int = 0


@dataclass
class Objective:
    """The loss of one update, per sample, so that filters and weights are data rather than code.

    per_sample: (B,) loss of every sample. weights: (B,) factors on it (no gradient flows through them).
    keep: (B,) bool, False for samples a filter removed. extra: a scalar added to the reduced loss (a
    regulariser such as EATA's Fisher penalty or a consistency term). normalize: "kept" (divide by the number
    of kept samples, the mean over what the filter kept: EATA, SAR, DeYO), "batch" (by B) or "sum".
    """

    per_sample: Tensor
    weights: Tensor | None = None
    keep: Tensor | None = None
    extra: Tensor | None = None
    normalize: str = "kept"

    def reduce(self) -> tuple[Tensor, Tensor | int]:
        """(scalar loss, number of kept samples). Filtered samples contribute exactly 0 (even if their loss is NaN)."""
        if self.per_sample.dim() != 1:
            raise ValueError(f"Objective.per_sample must be (batch,), got {tuple(self.per_sample.shape)}")
        values = self.per_sample.float()
        if self.weights is not None:
            values = values * self.weights.detach().float()
        n: Tensor | int = values.numel()
        if self.keep is not None:
            keep = self.keep.bool()
            values = torch.where(keep, values, values.new_zeros(()))
            n = keep.sum()
        if self.normalize == "kept":
            total = values.sum() / (n.clamp(min=1) if isinstance(n, Tensor) else max(n, 1))
        elif self.normalize == "batch":
            total = values.sum() / max(values.numel(), 1)
        elif self.normalize == "sum":
            total = values.sum()
        else:
            raise ValueError(f"Objective.normalize must be kept, batch or sum, got {self.normalize!r}")
        if self.extra is not None:
            total = total + self.extra.float().reshape(())
        return total, n


def _copy_state(value: Any, clone: bool) -> Any:
    """The checkpointable form of one registered attribute (cloned for snapshots, live for `state_dict`)."""
    if isinstance(value, nn.Module):
        return {k: v.detach().clone() if clone else v for k, v in value.state_dict().items()}
    if isinstance(value, torch.optim.Optimizer):
        return copy.deepcopy(value.state_dict()) if clone else value.state_dict()
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, Tensor):
        return value.detach().clone() if clone else value.detach()
    return copy.deepcopy(value)


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors inside plain containers, moved to `device` (checkpoints load on the CPU)."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class Method:
    """Online test-time adaptation: build once (`configure` runs), then `step(x) -> logits` per test batch.

    Verbs: `configure(model)` (modes, requires_grad, BatchNorm statistics, optimiser, extra state),
    `params()` (the named adapted parameters), `step(x)` (predict and, for adapting methods, update; each
    subclass's `forward_and_adapt` says in which order), `predict(x)` (a side-effect-free forward), `reset()`
    (every registered state back to right after `configure`, exactly). `state_dict()`/`load_state_dict()`
    checkpoint the run for resume.
    """

    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    adapts: ClassVar[bool] = False
    # True for methods whose algorithm updates normalisation statistics held in model buffers (RoTTA's robust BN);
    # every other method leaves all buffers of the model (the source BN statistics) bit-identical.
    updates_norm_statistics: ClassVar[bool] = False
    # False for adapting methods that cannot take `blocks: auto` (their update is not a step on shared parameters).
    supports_auto: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        cfg: MethodSettings | None = None,
        optim_cfg: OptimConfig | None = None,
        *,
        autocast_dtype: torch.dtype | str | None = None,
        context: MethodContext | None = None,
    ) -> None:
        default_name = self.Settings.__dataclass_fields__["name"].default
        self.cfg = cfg if cfg is not None else method_config(default_name)
        if not isinstance(self.cfg, self.Settings):
            raise TypeError(f"{type(self).__name__} needs {self.Settings.__name__}, got {type(self.cfg).__name__}")
        self.model = model
        # None = the method's authors' optimiser (CIFAR regime); a run config passes its resolved `optim` section.
        self.optim_cfg = optim_cfg if optim_cfg is not None else type(self.cfg).default_optim()
        self.context = context if context is not None else MethodContext()
        self.autocast_dtype = resolve_autocast_dtype(autocast_dtype)
        self.device = _module_device(model)
        self.optimizer: torch.optim.Optimizer | None = None
        self.selector: Selector | None = None  # the `blocks: auto` policy (`selection.Selector`), else None
        self._params: NamedParams = []
        self._state_names: list[str] = []
        self.warnings: list[str] = []
        self.last = StepInfo()
        for name in COUNTERS:
            setattr(self, name, 0)
        self.method_resets_by_kind: dict[str, int] = {}
        # The method's own random numbers (augmentations, stochastic restore): seeded from runtime.seed and the
        # method's name, registered as state, so reset and resume replay them exactly and no global RNG is touched.
        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(int(self.context.seed) * 1_000_003 + zlib.crc32(self.cfg.name.encode()))
        self.register_state("model", "rng")
        self.configure(model)
        if self.optimizer is not None:
            self.register_state("optimizer")
        if self.selector is not None:
            self.selector.setup()
        self._initial = self._capture(clone=True)

    # ------------------------------------------------------------------------------------------------ the verbs
    def configure(self, model: nn.Module) -> None:
        """Set modes, requires_grad and BatchNorm behaviour; build the optimiser when the method adapts; register
        any extra state. Called once, by `__init__`."""
        raise NotImplementedError

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """The method's work for one batch: return its logits (and update, for adapting methods)."""
        raise NotImplementedError

    def params(self) -> NamedParams:
        """The (name, Parameter) pairs this method updates (empty for non-adapting methods)."""
        return list(self._params)

    def step(self, x: Tensor) -> Tensor:
        """Logits for the batch `x` (and the method's update). Fills `last` with what happened."""
        self.last = StepInfo()
        if not self.adapts:
            with torch.inference_mode():
                logits = self.forward_and_adapt(x)
        elif not all_finite(x):
            # A corrupt input must not reach any state (BN statistics, memory banks, teachers): predict only.
            self.n_skipped += 1
            self.last.skipped = True
            if self.selector is not None:
                self.selector.note_skipped()
            logits = self.predict(x)
        elif self.selector is not None:
            logits = self.selector.step(x)  # decides what to adapt, then calls `adapt_step`
        else:
            logits = self.adapt_step(x)
        self.n_steps += 1  # counted once the step is done: a call that raised is no step
        return logits

    def adapt_step(self, x: Tensor) -> Tensor:
        """The method's forward and update on a finite batch, with gradients on; records the mean loss in `last`."""
        with torch.enable_grad():  # adapts even when the caller's loop runs under no_grad
            logits = self.forward_and_adapt(x)
        if self.last._losses:
            self.last.loss = sum(self.last._losses) / len(self.last._losses)
        return logits

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits with the current parameters and the method's normalisation statistics; changes nothing."""
        if self.selector is not None:  # `blocks: auto`: as its current choice predicts (maybe the source model)
            return self.selector.predict(x)
        with self.autocast(x):
            return self.model(x)

    def reset(self) -> None:
        """Restore every registered state to the state right after `configure` (the engine's reset policy)."""
        self._restore(self._initial)
        self.n_resets += 1

    # ------------------------------------------------------------------------------------------------ state
    def register_state(self, *names: str) -> None:
        """Declare attributes (by name) that `reset` restores and checkpoints carry.

        Supported values: modules (their state_dict), optimisers, torch Generators, tensors, and plain data
        (numbers, strings, None, lists/tuples/dicts of those and of tensors). Register after assigning the
        attribute; the snapshot `reset` restores is taken right after `configure`.
        """
        for name in names:
            if not hasattr(self, name):
                raise AttributeError(f"register_state({name!r}): set self.{name} before registering it")
            if name in COUNTERS or name in self._state_names:
                raise ValueError(f"state {name!r} is already registered (or is a counter)")
            self._state_names.append(name)

    def _capture(self, clone: bool) -> dict[str, Any]:
        return {name: _copy_state(getattr(self, name), clone) for name in self._state_names}

    def _restore(self, saved: Mapping[str, Any], keep: Iterable[str] = ()) -> None:
        keep = set(keep)
        for name in self._state_names:
            if name in keep:
                continue
            current, value = getattr(self, name), saved[name]
            if isinstance(current, nn.Module):
                current.load_state_dict(value)
            elif isinstance(current, torch.optim.Optimizer):
                current.zero_grad(set_to_none=True)
                current.load_state_dict(copy.deepcopy(value))
            elif isinstance(current, torch.Generator):
                current.set_state(value)
            else:
                setattr(self, name, _to_device(copy.deepcopy(value), self.device))

    def self_reset(self, kind: str, keep: Iterable[str] = ("rng",)) -> None:
        """A reset the method decides on (SAR's model recovery): restore the state after `configure` (but `keep`),
        count it in `n_method_resets` by `kind`, and report it on this step's results line."""
        self._restore(self._initial, keep)
        self.note_method_reset(kind)

    def note_method_reset(self, kind: str) -> None:
        """Count a reset of the method's own (full or partial, e.g. CoTTA's stochastic restore) and report it."""
        self.n_method_resets += 1
        self.method_resets_by_kind[kind] = self.method_resets_by_kind.get(kind, 0) + 1
        self.last.method_reset = kind

    def state_dict(self) -> dict[str, Any]:
        """Every registered state and the counters (live tensors, as `nn.Module.state_dict`): enough to resume."""
        return {
            "method": self.cfg.name,
            "state": self._capture(clone=False),
            "counters": {name: int(getattr(self, name)) for name in COUNTERS},
            "method_resets_by_kind": dict(self.method_resets_by_kind),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()` taken from a method of the same name and settings on the same architecture."""
        if state.get("method") != self.cfg.name:
            raise ValueError(
                f"checkpoint is for method {state.get('method')!r} but this run uses {self.cfg.name!r}; "
                "resume with the same config"
            )
        saved = state.get("state", {})
        if set(saved) != set(self._state_names):
            raise ValueError(
                f"checkpoint holds state {sorted(saved)} but method {self.cfg.name!r} has {sorted(self._state_names)}"
            )
        self._restore(saved)
        counters = state.get("counters", {})
        for name in COUNTERS:
            setattr(self, name, int(counters.get(name, 0)))
        self.method_resets_by_kind = {str(k): int(v) for k, v in state.get("method_resets_by_kind", {}).items()}

    # ------------------------------------------------------------------------------------------------ helpers
    def select_adapted(self, blocks: Iterable[str] | None = None, kind: str | None = None) -> NamedParams:
        """Freeze the model and enable `blocks` x `kind` (default: the settings'); they become `params()`.

        `blocks: auto`: the union of the selector's candidates becomes `params()` (the optimiser's tensors); each
        step enables the chosen ones only (`selection.Selector`)."""
        cfg = self.cfg
        blocks = blocks if blocks is not None else cfg.blocks  # type: ignore[attr-defined]
        kind = kind if kind is not None else cfg.kind  # type: ignore[attr-defined]
        if is_auto(blocks):
            if not self.supports_auto:
                raise ValueError(f"method {cfg.name} does not support blocks: auto; name its blocks instead")
            self.selector = Selector(self)
            self.model.requires_grad_(False)
            self._params = list(self.selector.union)
            return self._params
        self._params = select_adapted(self.model, blocks, kind, owner=f"method {cfg.name}")
        return self._params

    def configure_adaptation(self, model: nn.Module) -> NamedParams:
        """The usual start of an adapting method's `configure`: eval mode (dropout and the like off), only
        `blocks` x `kind` trainable, BatchNorm on test-batch statistics, `self.optimizer` over that selection
        (returned). Methods with other statistics or optimisers (Tent's, MEMO's, RoTTA's) do it themselves."""
        model.eval()
        selected = self.select_adapted()
        set_bn_stats(model, "batch")
        self.optimizer = build_optimizer(selected, self.optim_cfg)
        return selected

    def autocast(self, x: Tensor) -> contextlib.AbstractContextManager:
        """bf16 (or the configured dtype) autocast on the device of `x`, or nothing in fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)

    def features_and_logits(self, x: Tensor, model: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """(features, logits): the input of the classifier (the last linear layer of the block map's `head`) and
        the model's output, from one forward; no architecture-specific code in the methods that need features."""
        model = self.model if model is None else model
        classifier = head_classifier(model)
        seen: list[Tensor] = []
        handle = classifier.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            with self.autocast(x):
                logits = model(x)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"the head's classifier ran {len(seen)} times in one forward; expected once")
        return seen[0].flatten(1), logits

    def update(
        self,
        objective: Objective,
        second_pass: Callable[[], Objective] | None = None,
        rho: float = 0.05,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> UpdateResult:
        """Backward `objective` and take one optimiser step, unless nothing was kept or anything is not finite.

        With `second_pass` (sharpness-aware minimisation, Foret et al. 2021): after the first backward the adapted
        parameters move to theta + rho * g / ||g||, `second_pass()` computes the objective there, its gradient is
        backpropagated, theta is restored exactly, and the optimiser steps with that gradient. Both passes go
        through the same guard. One host sync per pass (the guard reads loss, gradient norm and kept count at once).
        `optimizer`: step this one instead of `self.optimizer` (e.g. one over per-image copies of the adapted
        parameters that live for one batch, as MEMO's); the guard then reads its parameters' gradients.
        """
        opt = optimizer if optimizer is not None else self.optimizer
        assert opt is not None, "update() needs an adapting method (one with an optimiser)"
        if self.selector is not None and not self.selector.adapting:
            return UpdateResult(False, None)  # `auto` chose to adapt nothing on this batch
        first = self._backward(objective, count_filtered=True, optimizer=opt)
        if first is None:
            return UpdateResult(False, None)
        loss, n_kept = first
        if n_kept == 0:
            return UpdateResult(False, None, n_kept=0)
        self.last._losses.append(loss)
        second_loss = None
        if second_pass is not None:
            second_loss = self._sharpness_pass(second_pass, rho, opt)
            if second_loss is None:
                return UpdateResult(False, loss, n_kept=n_kept)
        self._before_optimizer_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.n_updates += 1
        self.last.n_updates += 1
        return UpdateResult(True, loss, second_loss, n_kept)

    def _backward(
        self, objective: Objective, count_filtered: bool, optimizer: torch.optim.Optimizer
    ) -> tuple[float, int] | None:
        """Backward the reduced objective through the guard: (loss, kept), or None when anything is not finite."""
        loss, n_kept = objective.reduce()
        value, finite, kept = guarded_backward(loss, _optimized(optimizer), optimizer, n_kept)
        if count_filtered:
            filtered = objective.per_sample.numel() - kept
            self.n_filtered += filtered
            self.last.n_filtered += filtered
        if kept == 0:
            optimizer.zero_grad(set_to_none=True)
            return value, 0
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            self.n_skipped += 1
            self.last.skipped = True
            return None
        return value, kept

    @torch.no_grad()
    def _perturb(self, rho: float, optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[Tensor]]:
        params = [p for p in _optimized(optimizer) if p.grad is not None]
        saved = [p.detach().clone() for p in params]
        scale = rho / (torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params]))) + 1e-12)
        torch._foreach_add_(params, torch._foreach_mul([p.grad for p in params], scale))
        return params, saved

    def _sharpness_pass(
        self, second_pass: Callable[[], Objective], rho: float, optimizer: torch.optim.Optimizer
    ) -> float | None:
        """SAM's second pass: perturb, recompute, backward, restore theta exactly; its loss or None (no step)."""
        params, saved = self._perturb(rho, optimizer)
        try:
            with torch.enable_grad():
                result = self._backward(second_pass(), count_filtered=False, optimizer=optimizer)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):  # a copy, not theta + e - e: bit-exact
                    p.copy_(s)
        if result is None or result[1] == 0:
            optimizer.zero_grad(set_to_none=True)
            return None
        return result[0]

    def _before_optimizer_step(self) -> None:
        """Hook: `update` calls it after a finite backward, right before `optimizer.step()` (gradients are in
        `p.grad`). Default: nothing; the entropy methods set their auto-RGN learning rates here."""

    def __repr__(self) -> str:
        n = sum(p.numel() for _, p in self._params)
        return f"{type(self).__name__}(name={self.cfg.name!r}, tensors={len(self._params)}, adapted_numel={n})"


def _optimized(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors `optimizer` steps (for the default optimiser: the adapted parameters)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _module_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def head_classifier(model: nn.Module) -> nn.Module:
    """The last `nn.Linear` (else the last module) of the block map's `head` block: where features meet the classes."""
    prefixes = dict(block_spec(model).blocks)["head"]
    candidates = [m for n, m in model.named_modules() if n and any(matches(n, p) for p in prefixes)]
    if not candidates:
        raise ValueError(f"the block map's head {list(prefixes)} names no module of {type(model).__name__}")
    linears = [m for m in candidates if isinstance(m, nn.Linear)]
    return linears[-1] if linears else candidates[-1]


def build_method(
    model: nn.Module,
    method_cfg: MethodSettings,
    optim_cfg: OptimConfig | None = None,
    *,
    autocast_dtype: torch.dtype | str | None = None,
    context: MethodContext | None = None,
) -> Method:
    """Configure `model` for the method `method_cfg.name` and return it (see `METHODS` for the names)."""
    cls = METHODS.get(method_cfg.name)
    return cls(model, method_cfg, optim_cfg, autocast_dtype=autocast_dtype, context=context)
