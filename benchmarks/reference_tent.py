"""A plain, self-contained Tent loop, as a test oracle for the engine's `tent`.

Tent (Wang et al., ICLR 2021), written the straightforward way with no code shared with the package's
methods: every BatchNorm layer normalises with the current batch's statistics (train mode, running
statistics dropped), only the BatchNorm affine scale and shift require gradients, one Adam step
(lr 1e-3, betas 0.9/0.999) per batch on the mean softmax entropy, and the prediction returned is the
one from that same forward pass (before the update). A batch with `reset_before` restarts from the
source model with a fresh optimiser (the per-domain protocol).

As a script it runs this loop and the engine's `tent` over the same stream and reports both errors and
their difference (target: within 0.3 points):

    python benchmarks/reference_tent.py --data-root ../shared/data --n-examples 1000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tta_surgical.corruptions.textures import default_frost_dir

REPO = Path(__file__).resolve().parents[1]

try:
    from tta_surgical.bench import PlainTent, plain_entropy, prepare_plain_tent
except ImportError:  # a checkout that is not installed: use the package next to this script
    sys.path.insert(0, str(REPO))
    from tta_surgical.bench import PlainTent, plain_entropy, prepare_plain_tent

# The plain loop lives in `tta_surgical.bench` (the latency harness times it against the engine's tent); it
# shares no code with `tta_surgical.methods`, so it stays an independent oracle. Old names kept for callers.
_prepare = prepare_plain_tent
entropy = plain_entropy


def reference_tent(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run Tent over `batches` (tensors, or objects with `.x` and optionally `.reset_before`).

    Returns the predicted labels of every image in stream order (CPU, int64) and the final adapted
    model's state_dict (BN affine parameters included). `model` itself is not modified.
    """
    tent = PlainTent(model, lr=lr, betas=betas)
    preds: list[Tensor] = []
    for i, item in enumerate(batches):
        x = item.x if hasattr(item, "x") else item
        if i > 0 and getattr(item, "reset_before", False):
            tent.reset()
        logits = tent.step(x.to(next(model.parameters()).device))
        preds.append(logits.argmax(1).cpu())
    adapted = tent.model
    state = {k: v.detach().clone() for k, v in adapted.state_dict().items()}
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long), state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare the engine's tent with a plain reference Tent loop.")
    parser.add_argument(
        "--data-root",
        default=os.environ.get("TTA_SURGICAL_DATA"),
        help="folder holding cifar-10-batches-py/, weights/ and frost/ (default $TTA_SURGICAL_DATA)",
    )
    parser.add_argument("--frost-dir", default=None, help="frost textures folder (default <data-root>/frost)")
    parser.add_argument("--stream", default=str(REPO / "streams" / "cifar10c_reset.yaml"), help="stream YAML")
    parser.add_argument("--config", default=str(REPO / "configs" / "tent.yaml"), help="tent config YAML")
    parser.add_argument("--n-examples", type=int, default=1000, help="images per domain (stream.n_examples)")
    parser.add_argument("--domains", default=None, help="comma-separated corruptions (default: the stream's)")
    parser.add_argument("--batch-size", type=int, default=None, help="override stream.batch_size")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="runtime.device")
    parser.add_argument("--json", default=None, help="write the comparison here (default: print only)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from tta_surgical.config import load_config
    from tta_surgical.engine import pick_device, run
    from tta_surgical.models import create_model
    from tta_surgical.streams import build_stream

    overrides = [f"stream.n_examples={args.n_examples}", f"runtime.device={args.device}", "runtime.progress=false"]
    if args.batch_size:
        overrides.append(f"stream.batch_size={args.batch_size}")
    if args.domains:
        overrides.append(f"stream.domains=[{args.domains}]")
    cfg = load_config(args.config, stream=args.stream, overrides=overrides)
    if cfg.method.name != "tent":
        raise SystemExit(f"{args.config} is not a tent config (method.name={cfg.method.name})")
    frost = default_frost_dir(args.frost_dir, args.data_root)
    device = pick_device(cfg.runtime.device)

    with tempfile.TemporaryDirectory() as tmp:
        ours = run(cfg, Path(tmp) / "run", data_root=args.data_root, frost_dir=frost)
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "results.jsonl").read_text().splitlines() if x]

    torch.manual_seed(cfg.runtime.seed)
    model, _ = create_model(cfg.model.name, pretrained=cfg.model.pretrained, data_root=args.data_root)
    model = model.to(device)
    stream = build_stream(cfg.stream, data_root=args.data_root, device=device, frost_dir=frost)
    labels: list[Tensor] = []

    def batches() -> Iterable[Any]:
        for b in stream:  # generated lazily; keep only the labels
            labels.append(b.y.cpu())
            yield b

    preds, _ = reference_tent(model, batches(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    ref_correct = (preds == torch.cat(labels)).tolist()

    # Per-batch agreement with the engine's results (same stream order).
    per_batch_diff = []
    pos = 0
    for y, line in zip(labels, lines):
        n = len(y)
        per_batch_diff.append(int(sum(ref_correct[pos : pos + n])) - int(line["correct"]))
        pos += n
    ref_error = 100.0 * (1 - sum(ref_correct) / len(ref_correct))
    result = {
        "stream": args.stream,
        "n_images": len(ref_correct),
        "engine_online_error": ours["online_error"],
        "reference_online_error": ref_error,
        "difference_points": ours["online_error"] - ref_error,
        "engine_errors": ours["errors"],
        "max_abs_per_batch_correct_diff": max(map(abs, per_batch_diff)) if per_batch_diff else 0,
        "within_0.3_points": abs(ours["online_error"] - ref_error) <= 0.3,
        "device": ours["device"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["within_0.3_points"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
