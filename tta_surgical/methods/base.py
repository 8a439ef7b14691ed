"""The `Method` interface, its registry, and the shared machinery: optimiser, non-finite guard, reset, checkpoint.

A method owns the modes of the model it is given (train/eval per module, `requires_grad`, BatchNorm
statistics): it sets them in `configure` and nobody else should change them during the run. It never
moves the model; build it after the engine has placed the model on its device (and set channels_last),
so the reset snapshot and the optimiser live where the parameters live.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import MethodConfig, OptimConfig
from ..registry import Registry

__all__ = ["METHODS", "Method", "build_method", "build_optimizer", "grads_finite", "resolve_autocast_dtype"]

NamedParams = list[tuple[str, nn.Parameter]]

# method name -> Method subclass (tent and surgical map to the same class; see entropy_min.py).
METHODS: Registry[type[Method]] = Registry("method")

_DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_autocast_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None/"fp32" -> no autocast; "bf16"/torch.bfloat16 -> bf16 autocast (other torch dtypes pass through)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype is torch.float32 else dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown autocast precision {dtype!r}; valid: fp32, bf16") from None


def build_optimizer(
    params: Iterable[nn.Parameter | tuple[str, nn.Parameter] | dict[str, Any]], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """The optimiser `cfg` names over `params`: Parameters or (name, Parameter) pairs (one parameter group), or
    parameter-group dicts (e.g. `tta_surgical.autotune.weighted_param_groups`; keys they omit take `cfg`'s values).
    `cfg.implementation` picks torch's fused / foreach / per-tensor kernels (`auto`: fused where supported)."""
    items = list(params)
    if not items:
        raise ValueError("build_optimizer got no parameters to optimise")
    if isinstance(items[0], dict):
        groups: list[Any] = items
    else:
        groups = [p[1] if isinstance(p, tuple) else p for p in items]
    if cfg.name == "adam":
        kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
        cls: type[torch.optim.Optimizer] = torch.optim.Adam
    elif cfg.name == "sgd":
        kwargs = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "nesterov": cfg.nesterov}
        cls = torch.optim.SGD
    else:
        raise ValueError(f"unknown optimiser {cfg.name!r}; valid: adam, sgd")
    impl = getattr(cfg, "implementation", "auto")
    if impl == "auto":
        try:
            return cls(groups, **kwargs, fused=True)
        except (RuntimeError, TypeError, ValueError):
            # This torch has no fused kernel for these tensors' device/dtype (the constructor checks): foreach.
            return cls(groups, **kwargs, foreach=True)
    if impl == "fused":
        return cls(groups, **kwargs, fused=True)  # unsupported device/dtype: torch's error says why
    return cls(groups, **kwargs, foreach=impl == "foreach")


def grads_finite(loss: Tensor, grads: Sequence[Tensor]) -> bool:
    """True when `loss` and every tensor of `grads` are finite; one host sync.

    One fused norm per tensor list instead of an `isfinite(...).all()` kernel pair per tensor (Tent has ~40 small
    tensors, so this is fewer kernel launches): a NaN or Inf anywhere makes its tensor's norm, and so the sum,
    non-finite. A finite gradient whose norm overflows float32 (> 3e38) also counts as non-finite, which is the
    right call for an update anyway.
    """
    total = loss.detach().float().reshape(())
    if grads:
        total = total + torch.stack(torch._foreach_norm(list(grads))).float().sum()
    return bool(torch.isfinite(total))


class Method:
    """Online test-time adaptation: `configure` once, then `step(x) -> logits` per test batch.

    Verbs: `configure(model)` (modes, requires_grad, BatchNorm statistics, optimiser), `params()` (the named
    adapted parameters), `step(x)` (predict and, for adapting methods, update; each subclass says in which
    order), `predict(x)` (a side-effect-free forward), `reset()` (model and optimiser back to the state right
    after `configure`, exactly). `state_dict()`/`load_state_dict()` checkpoint the run for resume.

    Counters: `n_steps` (batches seen by `step`), `n_updates` (optimiser steps taken), `n_skipped` (updates
    skipped because the loss or a gradient was not finite), `n_resets`.
    """

    name: ClassVar[str] = ""
    adapts: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        cfg: MethodConfig | None = None,
        optim_cfg: OptimConfig | None = None,
        *,
        autocast_dtype: torch.dtype | str | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg if cfg is not None else MethodConfig(name=self.name)
        self.optim_cfg = optim_cfg if optim_cfg is not None else OptimConfig()
        self.autocast_dtype = resolve_autocast_dtype(autocast_dtype)
        self.optimizer: torch.optim.Optimizer | None = None
        self._params: NamedParams = []
        self.n_steps = self.n_updates = self.n_skipped = self.n_resets = 0
        self.configure(model)
        # Deep copies of the state right after configure: what `reset` restores. The model buffers include
        # the BatchNorm running statistics; the optimiser state is (normally) still empty here.
        self._model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._optim_state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None

    # ------------------------------------------------------------------------------------------------ the verbs
    def configure(self, model: nn.Module) -> None:
        """Set modes, requires_grad and BatchNorm behaviour; build the optimiser when the method adapts."""
        raise NotImplementedError

    def params(self) -> NamedParams:
        """The (name, Parameter) pairs this method updates (empty for non-adapting methods)."""
        return list(self._params)

    def step(self, x: Tensor) -> Tensor:
        """Logits for the batch `x` (and an update, for adapting methods)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits with the current parameters and the method's normalisation statistics; changes nothing."""
        with self.autocast(x):
            return self.model(x)

    def reset(self) -> None:
        """Restore model parameters, buffers and optimiser state to the state right after `configure`."""
        self.model.load_state_dict(self._model_state)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.load_state_dict(copy.deepcopy(self._optim_state))
        self.n_resets += 1

    # --------------------------------------------------------------------------------------------- helpers
    def autocast(self, x: Tensor) -> contextlib.AbstractContextManager:
        """bf16 (or the configured dtype) autocast on the device of `x`, or nothing in fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)

    def update(self, loss: Tensor) -> bool:
        """Backward `loss` and take one optimiser step, unless the loss or any gradient is not finite.

        A skipped update zeroes the gradients and counts in `n_skipped`, so no NaN/Inf ever reaches the
        parameters or the optimiser state. One host sync per call (the finiteness check).
        """
        assert self.optimizer is not None, "update() needs an adapting method (one with an optimiser)"
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ok = grads_finite(loss, [p.grad for _, p in self._params if p.grad is not None])
        if ok:
            self._before_optimizer_step()
            self.optimizer.step()
            self.n_updates += 1
        else:
            self.n_skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return ok

    def _before_optimizer_step(self) -> None:
        """Hook: `update` calls it after a finite backward, right before `optimizer.step()` (gradients are in
        `p.grad`). Default: nothing; the entropy methods set their auto-RGN learning rates here."""

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Model, optimiser and counters (live tensors, as `nn.Module.state_dict`): enough to resume a run."""
        return {
            "method": self.cfg.name,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "counters": {
                "n_steps": self.n_steps,
                "n_updates": self.n_updates,
                "n_skipped": self.n_skipped,
                "n_resets": self.n_resets,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()` taken from a method of the same name on the same architecture."""
        if state.get("method") != self.cfg.name:
            raise ValueError(
                f"checkpoint is for method {state.get('method')!r} but this run uses {self.cfg.name!r}; "
                "resume with the same config"
            )
        self.model.load_state_dict(state["model"])
        if (state.get("optimizer") is None) != (self.optimizer is None):
            raise ValueError("checkpoint and method disagree on whether there is an optimiser state")
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        counters = state.get("counters", {})
        for key in ("n_steps", "n_updates", "n_skipped", "n_resets"):
            setattr(self, key, int(counters.get(key, 0)))

    def __repr__(self) -> str:
        n = sum(p.numel() for _, p in self._params)
        return f"{type(self).__name__}(name={self.cfg.name!r}, tensors={len(self._params)}, adapted_numel={n})"


def build_method(
    model: nn.Module,
    method_cfg: MethodConfig,
    optim_cfg: OptimConfig | None = None,
    *,
    autocast_dtype: torch.dtype | str | None = None,
) -> Method:
    """Configure `model` for the method `method_cfg.name` and return it (see `METHODS` for the names)."""
    cls = METHODS.get(method_cfg.name)
    return cls(model, method_cfg, optim_cfg, autocast_dtype=autocast_dtype)
