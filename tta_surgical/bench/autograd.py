"""What autograd saves and computes in one adaptation step: the figures a bench cell carries beside its timing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..models import block_map
from .labels import MethodSpec, parse_method
from .runners import autocast, autocast_dtype, build_runner

__all__ = ["autograd_report"]


def autograd_report(
    model: nn.Module,
    method: str | MethodSpec | Any,
    x: Tensor | None = None,
    *,
    batch_size: int = 8,
    input_size: int | None = None,
    autocast_dtype: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """What autograd saves and computes in one adaptation step of `method` on `model`.

    `method` is a bench label (`"tent"`, `"surgical:block1"`, ...), a `MethodSpec`, or a built method
    (anything with `.model`, `.step(x)`, `.reset()`: a `Method` or a `PlainTent`). A label is built on a deep
    copy of `model` (left untouched); an instance is stepped once and then `reset()`. `x` defaults to a
    random batch of `batch_size` images of `input_size` x `input_size` (default 32).

    Returns: `grad_params` (parameter tensors that received a gradient), `grad_numel`, `grad_blocks`
    (block -> tensors with a gradient), `frozen_with_grad` (frozen tensors holding a gradient: must be 0),
    `saved_tensors` (tensors packed for backward, counted once per save), `saved_mb` (distinct storages
    saved, MiB; parameters included), `saved_activation_mb` (the same without the model's parameters and
    buffers), `unpacked_tensors` (saved tensors the backward actually read), and, from
    `torch.utils.flop_counter`, `forward_gflops` (one forward) and `backward_gflops` (step minus forward:
    the gradient work of the backward; optimiser arithmetic is not counted).
    """
    dtype = _dtype(autocast_dtype)
    owned = isinstance(method, (str, MethodSpec))
    if x is None:
        device = next((model if owned else method.model).parameters()).device
        g = torch.Generator(device=device).manual_seed(0)
        size = input_size or 32
        x = torch.rand((batch_size, 3, size, size), generator=g, device=device)
    if owned:
        ms = parse_method(method) if isinstance(method, str) else method
        runner = build_runner(copy.deepcopy(model), ms, dtype, like=x)
    else:
        runner = method
    net = runner.model
    probe = _AutogradProbe(net)
    try:
        with torch.no_grad():
            forward_counter = FlopCounterMode(display=False)
            with forward_counter, autocast(x, dtype):
                out = net(x)  # one forward, for the forward flops (no side effect on BN buffers)
            del out
        step_counter = FlopCounterMode(display=False)
        with probe.saving(), step_counter:
            runner.step(x)
        frozen_with_grad = sum(1 for p in net.parameters() if not p.requires_grad and p.grad is not None)
    finally:
        probe.remove()
        if not owned:
            runner.reset()
    fwd = forward_counter.get_total_flops()
    return {
        **probe.figures(_block_of(net), frozen_with_grad),
        "forward_gflops": fwd / 1e9,
        "backward_gflops": max(step_counter.get_total_flops() - fwd, 0) / 1e9,
        "autograd_batch_size": int(x.shape[0]),
    }


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    return autocast_dtype(value) if isinstance(value, str) else value


class _AutogradProbe:
    """Hooks on a model: which parameters receive a gradient, and what autograd packs and unpacks for backward."""

    def __init__(self, net: nn.Module) -> None:
        self.fired: dict[str, int] = {}  # parameter name -> numel, once its gradient is accumulated
        self.packed: list[tuple[tuple[int, int], int, bool]] = []  # (storage, bytes, belongs to the model)
        self.unpacked = 0
        self.model_storages = {_storage_key(t) for t in list(net.parameters()) + list(net.buffers())}
        self.handles = [
            p.register_post_accumulate_grad_hook(self._on_grad(name))
            for name, p in net.named_parameters()
            if p.requires_grad
        ]

    def _on_grad(self, name: str) -> Callable[[Tensor], None]:
        def hook(t: Tensor) -> None:  # runs after the gradient is accumulated into t.grad
            self.fired[name] = t.numel()

        return hook

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        self.packed.append((key, t.untyped_storage().nbytes(), key in self.model_storages))
        return t

    def _unpack(self, t: Tensor) -> Tensor:
        self.unpacked += 1
        return t

    def saving(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context in which saved tensors are counted."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def figures(self, block_of: dict[str, str], frozen_with_grad: int) -> dict[str, Any]:
        distinct: dict[tuple[int, int], tuple[int, bool]] = {}
        for key, nbytes, is_param in self.packed:
            distinct[key] = (nbytes, is_param)
        grad_blocks: dict[str, int] = {}
        for name in self.fired:
            b = block_of.get(name, "?")
            grad_blocks[b] = grad_blocks.get(b, 0) + 1
        return {
            "grad_params": len(self.fired),
            "grad_numel": int(sum(self.fired.values())),
            "grad_blocks": grad_blocks,
            "frozen_with_grad": frozen_with_grad,
            "saved_tensors": len(self.packed),
            "saved_mb": sum(n for n, _ in distinct.values()) / 2**20,
            "saved_activation_mb": sum(n for n, is_param in distinct.values() if not is_param) / 2**20,
            "unpacked_tensors": self.unpacked,
        }


def _block_of(model: nn.Module) -> dict[str, str]:
    """Parameter name -> block name (empty when the model has no block map)."""
    try:
        return {name: block for block, names in block_map(model).items() for name in names}
    except Exception:  # noqa: BLE001 - a model without a block map still gets the other figures
        return {}


def _storage_key(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())
