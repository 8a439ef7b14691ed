"""A short CIFAR-10-C stream through `tta_surgical.adapt` on models outside the zoo: the cost of adapting a user's
own network, as a ratio to plain inference measured in the same run (interleaved, batch by batch).

For each model: one copy runs plain inference (eval mode, `torch.inference_mode`, the obvious loop) and one runs
`adapt(copy, method, blocks=...)`; every batch of the stream (CIFAR-10 test images corrupted on the fly, severity
5) goes through both, timed one after the other, so machine drift hits both alike. Weights are random (no
torchvision / timm weights offline): the errors are those of untrained networks, reported for completeness only.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tta_surgical.metrics import BatchTimer
from tta_surgical.streams import StreamSpec, open_source
from tta_surgical.tables import fmt, markdown_table

__all__ = ["ByomSpec", "byom_markdown", "run_byom"]


@dataclass(frozen=True)
class ByomSpec:
    """The models (`torchvision:<name>` / `timm:<name>`), the method and blocks, and the stream."""

    models: tuple[str, ...] = ("torchvision:mobilenet_v3_small", "torchvision:convnext_tiny")
    method: str = "tent"
    blocks: tuple[str, ...] = ("block1",)
    kind: str = "all"
    lr: float = 1e-4
    corruptions: tuple[str, ...] = ("gaussian_noise", "fog", "contrast")
    n_per_corruption: int = 256
    batch_size: int = 64
    image_size: int = 32
    warmup: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


def _stream(spec: ByomSpec, data_root: str | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from tta_surgical import corrupt

    source = open_source(StreamSpec(source="cifar10"), data_root)  # the CIFAR-10 test set, as a run reads it
    images, labels = source.images, source.labels
    x = torch.from_numpy(images[: spec.n_per_corruption]).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.as_tensor(labels[: spec.n_per_corruption], dtype=torch.long)
    if spec.image_size != 32:
        x = torch.nn.functional.interpolate(x, size=spec.image_size, mode="bilinear", antialias=True).clamp_(0, 1)
    batches = []
    for k, name in enumerate(spec.corruptions):
        xc = corrupt(x, name, severity=5, seed=k, preset="cifar")
        batches += [
            (xc[i : i + spec.batch_size], y[i : i + spec.batch_size]) for i in range(0, len(y), spec.batch_size)
        ]
    return batches


def _one_model(name: str, spec: ByomSpec, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    from tta_surgical import adapt
    from tta_surgical.models import create_model

    model, _ = create_model(name, pretrained=False, num_classes=10)  # ImageNet normalisation inside, as for weights
    plain = copy.deepcopy(model).eval()
    adapted = adapt(model.eval(), spec.method, blocks=list(spec.blocks), kind=spec.kind, optim={"lr": spec.lr})
    times: dict[str, list[float]] = {"inference": [], "adapt": []}
    correct = {"inference": 0, "adapt": 0}
    for i, (x, y) in enumerate(batches):
        with BatchTimer(torch.device("cpu")) as t_inf, torch.inference_mode():
            logits = plain(x)
        correct["inference"] += int((logits.argmax(1) == y).sum())
        with BatchTimer(torch.device("cpu")) as t_ad:
            logits = adapted(x)
        correct["adapt"] += int((logits.argmax(1) == y).sum())
        if i >= spec.warmup:
            times["inference"].append(t_inf.ms)
            times["adapt"].append(t_ad.ms)
    n = sum(len(y) for _, y in batches)
    inf_ms, ad_ms = statistics.median(times["inference"]), statistics.median(times["adapt"])
    return {
        "model": name,
        "adapted_tensors": len(adapted.params()),
        "adapted_numel": sum(p.numel() for _, p in adapted.params()),
        "total_numel": sum(p.numel() for p in model.parameters()),
        "inference_ms_p50": inf_ms,
        "adapt_ms_p50": ad_ms,
        "ratio_to_inference": ad_ms / inf_ms,
        "error_inference": 100.0 * (1 - correct["inference"] / n),
        "error_adapt": 100.0 * (1 - correct["adapt"] / n),
        "n_updates": adapted.counters["n_updates"],
        "n_images": n,
    }


def run_byom(spec: ByomSpec, data_root: str | None = None) -> dict[str, Any]:
    """Time every model of `spec` on the same stream; returns `{"spec", "rows", "provenance"}`."""
    from tta_surgical.provenance import provenance

    batches = _stream(spec, data_root)
    rows = [_one_model(name, spec, batches) for name in spec.models]
    return {"spec": asdict(spec), "rows": rows, "provenance": provenance(torch.device("cpu"))}


def byom_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    header = ["model", "adapted tensors", "adapted params", "inference ms", "adapt ms", "ratio", "n images"]
    rows = [
        [
            r["model"],
            str(r["adapted_tensors"]),
            f"{r['adapted_numel']:,} of {r['total_numel']:,}",
            fmt(r["inference_ms_p50"], 1),
            fmt(r["adapt_ms_p50"], 1),
            f"{r['ratio_to_inference']:.2f}x",
            str(r["n_images"]),
        ]
        for r in result["rows"]
    ]
    return markdown_table(header, rows)


def write(result: dict[str, Any], out: Path) -> None:
    import json

    from tta_surgical.fileio import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "byom.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "byom.md", byom_markdown(result) + "\n")
