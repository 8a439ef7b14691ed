"""What one bench cell runs: an object with `.model` and `.step(x)` built from a parsed label, and its precision.

`inference` and `reference_tent` always run plain (contiguous memory, eager, torch's default Adam): every ratio
is against the straightforward way of doing it. The package's methods are built by `build_method`, with the
optimiser kernels the bench asks for.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PRECISIONS, OptimConfig, method_config
from ..methods import MethodContext, batchnorm_layers, build_method
from .labels import MethodSpec
from .reference import PlainTent

__all__ = ["GuardedRunner", "InferenceRunner", "adapted_tensors", "autocast", "autocast_dtype", "build_runner"]


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a bench precision (`fp32`: none, `bf16`: bfloat16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return torch.bfloat16 if precision == "bf16" else None


def autocast(x: Tensor, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `x`'s device type; nothing when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


class InferenceRunner:
    """The baseline: eval mode, no gradients anywhere, `torch.inference_mode`."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.autocast_dtype = autocast_dtype

    @torch.inference_mode()
    def step(self, x: Tensor) -> Tensor:
        with autocast(x, self.autocast_dtype):
            return self.model(x)


class GuardedRunner:
    """A method's step with the run guard's reference forward after every `every`-th step, as the engine does on
    its checked batches (`runtime.on_collapse` with a reference): the guard's cost in a bench cell."""

    def __init__(self, method: Any, reference: Any, every: int) -> None:
        self.method, self.reference, self.every = method, reference, every
        self.model = method.model
        self.calls = 0

    def step(self, x: Tensor) -> Tensor:
        logits = self.method.step(x)
        if self.calls % self.every == 0:
            self.reference.step(x)
        self.calls += 1
        return logits

    def params(self) -> Any:
        return self.method.params()

    def reset(self) -> None:
        self.method.reset()
        self.calls = 0

    @property
    def n_skipped(self) -> int:
        return int(self.method.n_skipped)


def build_runner(
    model: nn.Module,
    ms: MethodSpec,
    autocast_dtype: torch.dtype | None,
    optim_implementation: str = "auto",
    like: Tensor | None = None,
) -> Any:
    """An object with `.model` and `.step(x)` for the method of a cell (configures `model` in place).

    like: a batch of the cell's inputs; methods that need source samples (EATA's Fisher information) get random
    images of its shape, since a timing cell measures the step, not what the samples teach.
    """
    if ms.kind == "inference":
        return InferenceRunner(model, autocast_dtype)
    if ms.kind == "reference":
        return PlainTent(model, autocast_dtype=autocast_dtype)

    context = MethodContext(source_images=_random_source(like)) if like is not None else None
    optim = OptimConfig(implementation=optim_implementation)
    reference = _reference(model, autocast_dtype) if ms.guard_every else None  # copied before `model` is configured
    method = build_method(model, ms.cfg, optim, autocast_dtype=autocast_dtype, context=context)
    return method if reference is None else GuardedRunner(method, reference, ms.guard_every)


def _reference(model: nn.Module, autocast_dtype: torch.dtype | None) -> Any:
    """The guard's reference as the engine builds it for `runtime.guard_reference=auto`: `norm` on a frozen copy of
    the source model (`source` where it has no BatchNorm)."""
    kind = "norm" if batchnorm_layers(model) else "source"
    return build_method(copy.deepcopy(model), method_config(kind), autocast_dtype=autocast_dtype)


def _random_source(like: Tensor) -> Any:
    def images(n: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, *like.shape[1:], generator=g), torch.zeros(n, dtype=torch.long)

    return images


def adapted_tensors(runner: Any) -> list[Tensor]:
    """The parameter tensors a runner updates (none for inference)."""
    if isinstance(runner, PlainTent):
        return list(runner.params)
    if isinstance(runner, InferenceRunner):
        return []
    return [p for _, p in runner.params()]
