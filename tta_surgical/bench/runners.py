"""What one bench cell runs: an object with `.model` and `.step(x)` built from a parsed label, and its precision.

`inference` and `reference_tent` always run plain (contiguous memory, eager, torch's default Adam): every ratio
is against the straightforward way of doing it. The package's methods are built by `build_method`, with the
optimiser kernels the bench asks for.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PRECISIONS, OptimConfig
from ..methods import MethodContext, build_method
from .labels import MethodSpec
from .reference import PlainTent

__all__ = ["InferenceRunner", "adapted_tensors", "autocast", "autocast_dtype", "build_runner"]


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
    return build_method(model, ms.cfg, optim, autocast_dtype=autocast_dtype, context=context)


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
