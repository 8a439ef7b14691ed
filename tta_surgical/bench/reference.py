"""The plain Tent loop: the test oracle of the package's `tent` and the baseline the bench times it against.

Tent (Wang et al., ICLR 2021), written the straightforward way with no code shared with `tta_surgical.methods`:
every BatchNorm layer normalises with the current batch's statistics (train mode, running statistics dropped),
only the BatchNorm affine scale and shift require gradients, one Adam step (lr 1e-3, betas 0.9/0.999) per batch
on the mean softmax entropy, and the prediction returned is the one from that same forward pass (before the
update). A batch with `reset_before` restarts from the source model with a fresh optimiser (the per-domain
protocol). `compare_with_engine` runs this loop and the engine's `tent` over the same stream
(`benchmarks/reference_tent.py`; target: within 0.3 points).
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import load_config
from ..data.context import DataContext, DataLike
from ..engine import RESULTS_FILE, run
from ..models import create_model
from ..runtime import pick_device
from ..streams import build_stream
from .labels import REFERENCE_TWIN

__all__ = [
    "TOLERANCE_POINTS",
    "PlainTent",
    "compare_with_engine",
    "plain_entropy",
    "prepare_plain_tent",
    "reference_tent",
]

TOLERANCE_POINTS = 0.3  # the engine's tent and this loop agree within this many points of online error


def prepare_plain_tent(source: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of `source` set up for Tent: batch statistics in every BN, gradients only for BN affines."""
    model = copy.deepcopy(source)
    model.train()  # BN layers in train mode normalise with the batch's statistics
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # Drop the source statistics: with no running buffers, BN always uses batch statistics.
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            if m.affine:
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
                params += [m.weight, m.bias]
    return model, params


def plain_entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of the softmax predictions of a batch."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


class PlainTent:
    """Tent as a plain loop, sharing no code with `tta_surgical.methods`.

    `step(x)` takes one Adam step on the mean softmax entropy and returns the logits of that same forward
    (before the update). `reset()` restarts from a fresh copy of the source model with a fresh optimiser. Under
    bf16 autocast the entropy is computed from float32 logits (in fp32 this is the identical computation). No
    non-finite guard and no host sync: it is the lean baseline the package's `tent` is timed against.
    """

    def __init__(
        self,
        source: nn.Module,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.source = source
        self.lr = lr
        self.betas = tuple(betas)
        self.autocast_dtype = autocast_dtype
        self.reset()

    def reset(self) -> None:
        """Back to the source model and a fresh Adam."""
        self.model, self.params = prepare_plain_tent(self.source)
        if not self.params:
            raise ValueError(
                "the plain Tent loop adapts BatchNorm affine parameters and this model has none (e.g. a GroupNorm "
                "model); leave reference_tent out for it"
            )
        self.optimizer = torch.optim.Adam(self.params, lr=self.lr, betas=self.betas, weight_decay=0.0)

    def step(self, x: Tensor) -> Tensor:
        """Forward, one Adam step on the entropy of this batch, and the logits of that forward."""
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.enable_grad(), autocast:
            logits = self.model(x)
        loss = plain_entropy(logits.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()


def reference_tent(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run Tent over `batches` (tensors, or objects with `.x` and optionally `.reset_before`).

    Returns the predicted labels of every image in stream order (CPU, int64) and the final adapted model's
    state_dict (BN affine parameters included). `model` itself is not modified.
    """
    tent = PlainTent(model, lr=lr, betas=betas)
    device = next(model.parameters()).device
    preds: list[Tensor] = []
    for i, item in enumerate(batches):
        x = item.x if hasattr(item, "x") else item
        if i > 0 and getattr(item, "reset_before", False):
            tent.reset()
        preds.append(tent.step(x.to(device)).argmax(1).cpu())
    state = {k: v.detach().clone() for k, v in tent.model.state_dict().items()}
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long), state


def compare_with_engine(
    config: str | Path,
    stream: str | Path,
    *,
    n_examples: int,
    device: str = "cpu",
    batch_size: int | None = None,
    domains: str | None = None,
    data: DataLike = None,
) -> dict[str, Any]:
    """Run the engine's tent (`config` over `stream`, `n_examples` images per domain; optionally another batch size
    and comma-separated `domains`) and this loop over the identical stream.

    Returns both online errors, their difference in points, whether it is within `TOLERANCE_POINTS`, and the
    largest per-batch difference in correct predictions.
    """
    overrides = [f"stream.n_examples={n_examples}", f"runtime.device={device}", "runtime.progress=false"]
    overrides += [f"stream.batch_size={batch_size}"] if batch_size else []
    overrides += [f"stream.domains=[{domains}]"] if domains else []
    cfg = load_config(config, stream=stream, overrides=overrides)
    if cfg.method.name != REFERENCE_TWIN:
        raise ValueError(f"{config} is not a {REFERENCE_TWIN} config (method.name={cfg.method.name})")
    data = DataContext.of(data)
    with tempfile.TemporaryDirectory() as tmp:
        ours = run(cfg, Path(tmp) / "run", data=data)
        lines = [json.loads(x) for x in (Path(tmp) / "run" / RESULTS_FILE).read_text().splitlines() if x]

    torch.manual_seed(cfg.runtime.seed)
    model, _ = create_model(cfg.model.name, pretrained=cfg.model.pretrained, data=data)
    on = pick_device(cfg.runtime.device)
    labels: list[Tensor] = []

    def batches() -> Iterable[Any]:
        for b in build_stream(cfg.stream, data=data, device=on):
            labels.append(b.y.cpu())  # generated lazily: keep only the labels
            yield b

    preds, _ = reference_tent(model.to(on), batches(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    correct = (preds == torch.cat(labels)).tolist()
    per_batch, pos = [], 0
    for y, line in zip(labels, lines):  # the same stream order on both sides
        per_batch.append(int(sum(correct[pos : pos + len(y)])) - int(line["correct"]))
        pos += len(y)
    ref_error = 100.0 * (1 - sum(correct) / len(correct))
    return {
        "stream": str(stream),
        "n_images": len(correct),
        "engine_online_error": ours["online_error"],
        "reference_online_error": ref_error,
        "difference_points": ours["online_error"] - ref_error,
        "engine_errors": ours["errors"],
        "max_abs_per_batch_correct_diff": max(map(abs, per_batch)) if per_batch else 0,
        f"within_{TOLERANCE_POINTS}_points": abs(ours["online_error"] - ref_error) <= TOLERANCE_POINTS,
        "device": ours["device"],
    }
