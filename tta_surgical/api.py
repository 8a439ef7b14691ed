"""The Python API for your own model and loop: `adapt(model, method=..., blocks=[...])` -> call it per batch.

    import tta_surgical
    adapted = tta_surgical.adapt(model, method="tent", blocks=["block1"], optim={"lr": 1e-3})
    for x, _ in loader:            # your batches, on the model's device
        logits = adapted(x)        # predict, then adapt the chosen blocks (the method's order)

Every registered method works through it (`tta-surgical methods` lists them and their settings). The block
names come from the model's block map: the zoo's hand-written ones, the inferred ones for common torchvision /
timm families, or your own (`block_map={...}`); see `tta_surgical.blocks(model)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .config import OptimConfig, from_dict, method_config, to_dict

__all__ = ["Adapted", "adapt"]


class Adapted:
    """A model under online adaptation: `adapted(x)` returns the logits of `x` and adapts (per the method).

    `predict(x)` gives logits with the current state and changes nothing; `reset()` restores the model, the
    optimiser and every other state of the method to the moment `adapt` returned; `state_dict()` /
    `load_state_dict()` save and restore all of it (for a long-running service); `counters` and `last` say what
    happened (updates, skipped non-finite updates, images removed by the method's filter, resets).
    """

    def __init__(self, method: Any) -> None:
        self.method = method

    @property
    def model(self) -> nn.Module:
        return self.method.model

    def __call__(self, x: Tensor) -> Tensor:
        _check_batch(x)
        return self.method.step(x)

    def predict(self, x: Tensor) -> Tensor:
        """Logits with the current parameters; no update, no state change."""
        _check_batch(x)
        return self.method.predict(x)

    def reset(self) -> None:
        """Back to the state right after `adapt` (model, optimiser, teachers, memories)."""
        self.method.reset()

    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.method.load_state_dict(state)

    def params(self) -> list[tuple[str, nn.Parameter]]:
        """The (name, Parameter) pairs being adapted."""
        return self.method.params()

    @property
    def counters(self) -> dict[str, int]:
        from .methods import COUNTERS

        return {name: int(getattr(self.method, name)) for name in COUNTERS}

    @property
    def last(self) -> Any:
        """What the last call did (`loss`, `n_filtered`, `skipped`, `method_reset`)."""
        return self.method.last

    def __repr__(self) -> str:
        return f"Adapted({self.method!r})"


def adapt(
    model: nn.Module,
    method: str = "tent",
    *,
    blocks: Iterable[str] | str | None = None,
    kind: str | None = None,
    optim: Mapping[str, Any] | OptimConfig | None = None,
    regime: str = "cifar",
    block_map: Mapping[str, Iterable[str]] | None = None,
    precision: str = "fp32",
    seed: int = 0,
    source_images: Any = None,
    **settings: Any,
) -> Adapted:
    """Prepare `model` for online adaptation with `method` and return the callable `Adapted` wrapper.

    model: any classifier taking a batch `x` and returning logits (B, classes), already on its device. It is
        changed in place (train/eval modes, `requires_grad`, normalisation behaviour): pass a copy to keep yours.
    method: a registered method name (`tent`, `surgical`, `eata`, `sar`, `cotta`, ...).
    blocks / kind: which parameters adapt (default: the method's authors' choice), e.g. `blocks=["block1"]`,
        `kind="all"`; names from `tta_surgical.blocks(model)`.
    optim: the optimiser: None = the method's authors' optimiser for `regime` (MEMO: SGD lr 0.005; SAR: SGD lr 1e-3,
        momentum 0.9; most others Adam 1e-3), a mapping of the keys to change on it (`{"lr": 1e-4}`), or a
        complete `OptimConfig`.
    regime: "cifar" (default) or "imagenet": whose published optimiser the method starts from (on ImageNet the
        entropy family uses SGD lr 2.5e-4, momentum 0.9, for batches of 64).
    block_map: your own block map `{"input": [...], "block1": [...], ..., "head": [...]}` (module name prefixes),
        for models whose blocks cannot be inferred.
    precision: "fp32" or "bf16" (autocast). seed: the method's own random draws (augmentations, restores).
    source_images: `n -> (images, labels)` for methods that need source samples (EATA's Fisher information).
    settings: the method's own settings (e.g. `e_margin=0.4` for EATA); unknown ones list the valid keys.
    """
    from .methods import MethodContext, build_method

    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt() needs a torch.nn.Module, got {type(model).__name__}")
    if block_map is not None:
        from .models import set_block_map

        set_block_map(model, block_map)
    values = dict(settings)
    if blocks is not None:
        values["blocks"] = [blocks] if isinstance(blocks, str) else list(blocks)
    if kind is not None:
        values["kind"] = kind
    cfg = method_config(method, **values)
    if isinstance(optim, OptimConfig):
        optim_cfg = optim
    else:
        base = to_dict(type(cfg).default_optim(regime))
        optim_cfg = from_dict(OptimConfig, {**base, **dict(optim or {})}, "optim")
    context = MethodContext(seed=int(seed), source_images=source_images)
    return Adapted(build_method(model, cfg, optim_cfg, autocast_dtype=precision, context=context))


def _check_batch(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a batch tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"expected a batch (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"expected a floating-point batch, got {x.dtype}")
