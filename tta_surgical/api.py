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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import OptimConfig, from_dict, method_config, to_dict
from .methods import COUNTERS, MethodContext, build_method
from .methods.bn import uses_batch_statistics
from .models import set_block_map

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
        self._expect = _Expected.of(method)

    @property
    def model(self) -> nn.Module:
        return self.method.model

    def __call__(self, x: Tensor) -> Tensor:
        self._expect.check(x)
        return self.method.step(x)

    def predict(self, x: Tensor) -> Tensor:
        """Logits with the current parameters; no update, no state change."""
        self._expect.check(x)
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt() needs a torch.nn.Module, got {type(model).__name__}")
    if block_map is not None:
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


@dataclass(frozen=True)
class _Expected:
    """What a batch must look like for this model and method, checked at the door of every call (no host sync), so
    a wrong batch fails with one clear error instead of deep inside torch, and counts as no step."""

    method: str
    channels: int | None  # the first convolution's input channels (None: the model has none to read it from)
    dtypes: tuple[torch.dtype, ...]
    device: torch.device
    min_batch: int  # 2 where BatchNorm normalises with the test batch's own statistics

    @staticmethod
    def of(method: Any) -> _Expected:
        model = method.model
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        param = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
        dtype = param.dtype if param is not None else torch.float32
        # bf16 autocast casts float32 inputs itself, and takes bf16 ones as they are.
        bf16 = method.autocast_dtype == torch.bfloat16 and dtype != torch.bfloat16
        dtypes = (dtype, torch.bfloat16) if bf16 else (dtype,)
        batch_stats = uses_batch_statistics(model)
        channels = conv.in_channels if conv is not None else None
        return _Expected(method.cfg.name, channels, dtypes, method.device, 2 if batch_stats else 1)

    def check(self, x: Any) -> None:
        shape = "(B, C, H, W)" if self.channels is None else f"(B, {self.channels}, H, W)"
        want = f"a batch of images: a torch.Tensor of shape {shape}, dtype {' or '.join(map(str, self.dtypes))}"
        if not isinstance(x, Tensor):
            raise TypeError(f"expected {want}; got a {type(x).__name__} (convert it with torch.as_tensor)")
        if x.dim() != 4:
            hint = ""
            if x.dim() == 3:
                hint = " (one image: x.unsqueeze(0))" if self.min_batch == 1 else f" ({self.method} needs B >= 2)"
            raise ValueError(f"expected {want}; got a {x.dim()}-D tensor of shape {tuple(x.shape)}{hint}")
        if self.channels is not None and x.shape[1] != self.channels:
            hint = "x.permute(0, 3, 1, 2) for channels-last images" if x.shape[-1] == self.channels else ""
            if x.shape[1] == 1 and self.channels == 3:
                hint = "x.expand(-1, 3, -1, -1) for grey images"
            raise ValueError(
                f"expected {want}: the model's first convolution takes {self.channels} channels; got shape "
                f"{tuple(x.shape)}" + (f" ({hint})" if hint else "")
            )
        if x.dtype not in self.dtypes:
            fix = f"x.to({self.dtypes[0]})" if x.is_floating_point() else "images as floats, e.g. x.float() / 255"
            if x.dtype == torch.bfloat16:
                fix += ", or adapt(..., precision='bf16')"
            raise TypeError(f"expected {want}; got {x.dtype} ({fix})")
        if x.shape[0] == 0:
            raise ValueError(f"expected {want}; got an empty batch, shape {tuple(x.shape)}")
        if x.shape[0] < self.min_batch:
            raise ValueError(
                f"method {self.method} normalises with the BatchNorm statistics of the test batch, which one image "
                f"cannot give: pass batches of B >= 2 images (got shape {tuple(x.shape)}), or use a method that "
                "does not need them (source, lame, memo, rotta)"
            )
        if x.device != self.device:
            raise ValueError(f"the batch is on {x.device} but the model is on {self.device}: x.to('{self.device}')")
