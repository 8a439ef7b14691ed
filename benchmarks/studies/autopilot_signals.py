"""The evidence behind `method.blocks: auto` (`benchmarks/autopilot_signals.py` is its command line): label-free
signals per domain, what each would choose, what each costs. See the script's docstring for what is measured."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta_surgical.config import OptimConfig, method_config
from tta_surgical.data.context import DataContext
from tta_surgical.fileio import atomic_write_text
from tta_surgical.methods import build_method
from tta_surgical.methods.augment import cotta_views
from tta_surgical.methods.bn import batchnorm_layers, set_bn_stats
from tta_surgical.methods.losses import entropy_per_sample
from tta_surgical.methods.signals import SourceReference, agreement, block_rgn, prior_drift
from tta_surgical.models import block_map, create_model
from tta_surgical.models.blocks import norm_layers
from tta_surgical.schema import read_yaml
from tta_surgical.streams import build_stream, load_stream_spec
from tta_surgical.tables import fmt, markdown_table

# ---- running target statistics (the `ema` column): measured here, not used by the runtime (README)


class TargetStatistics(nn.Module):
    """Running (EMA) estimates of the target domain's BatchNorm statistics, one mean/variance pair per layer.

    Buffers only: registered as method state it is restored in place (so the layers' forwards keep their reference).
    `updating` (a plain flag, not state) lets one forward per layer and step move the estimates: the owner sets it
    before the step's first forward and clears it after the step, so extra forwards of the step (augmented views,
    a sharpness-aware second pass) and `predict` read the estimates without moving them.
    """

    def __init__(self, layers: list[_BatchNorm], momentum: float) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"target statistics momentum must lie in (0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.n_layers = len(layers)
        for i, bn in enumerate(layers):
            device = bn.weight.device if bn.weight is not None else None
            self.register_buffer(f"mean{i}", torch.zeros(bn.num_features, device=device))
            self.register_buffer(f"var{i}", torch.ones(bn.num_features, device=device))
        first = layers[0].weight.device if layers and layers[0].weight is not None else None
        self.register_buffer("initialized", torch.zeros(len(layers), dtype=torch.bool, device=first))
        self.updating = False
        self._moved: set[int] = set()

    def start_step(self) -> None:
        """The next forward of each layer moves its estimate (once per layer until `end_step`)."""
        self.updating, self._moved = True, set()

    def end_step(self) -> None:
        self.updating, self._moved = False, set()

    def clear(self) -> None:
        """Forget the estimates: the next updating forward starts them at its batch's statistics."""
        self.initialized.zero_()

    def normalise(self, bn: _BatchNorm, index: int, x: Tensor) -> Tensor:
        """`x` normalised with the EMA mixed with this batch's statistics (in float32; differentiable through the
        batch part)."""
        xf = x.float()
        dims = [0] + list(range(2, xf.dim()))
        var_b, mean_b = torch.var_mean(xf, dim=dims, correction=0)
        seen = self.initialized[index]
        # no host sync: an uninitialised estimate starts at this batch's statistics (then mu = mu_batch exactly)
        prev_mean = torch.where(seen, getattr(self, f"mean{index}"), mean_b.detach())
        prev_var = torch.where(seen, getattr(self, f"var{index}"), var_b.detach())
        m = self.momentum
        mean = (1.0 - m) * prev_mean + m * mean_b
        var = (1.0 - m) * prev_var + m * var_b
        if self.updating and index not in self._moved:
            self._moved.add(index)
            with torch.no_grad():
                getattr(self, f"mean{index}").copy_(mean.detach())
                getattr(self, f"var{index}").copy_(var.detach())
                self.initialized[index] = True
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.affine:
            y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
        return y.to(x.dtype)


def _target_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    self._check_input_dim(x)
    return self._tta_target.normalise(self, self._tta_target_index, x)


def use_target_statistics(model: nn.Module, store: TargetStatistics) -> int:
    """Make every BatchNorm layer of `model` normalise with the running target statistics of `store` (built for
    `batchnorm_layers(model)`); `set_bn_stats` switches back. Returns the number of layers."""
    layers = batchnorm_layers(model)
    if len(layers) != store.n_layers:
        raise ValueError(f"target statistics hold {store.n_layers} layers but the model has {len(layers)}")
    for i, bn in enumerate(layers):
        if not hasattr(bn, "_tta_track_running_stats"):
            bn._tta_track_running_stats = bn.track_running_stats
        # in __dict__, not as a submodule: the store's buffers must not join the model's state_dict
        bn.__dict__["_tta_target"] = store
        bn._tta_target_index = i
        bn.forward = types.MethodType(_target_forward, bn)
        bn.track_running_stats = False
        bn.train(False)  # the forward above ignores the mode; eval keeps any stray call read-only
    return len(layers)


CORRUPTIONS = (
    "gaussian_noise shot_noise impulse_noise defocus_blur glass_blur motion_blur zoom_blur snow frost fog "
    "brightness contrast elastic_transform pixelate jpeg_compression"
).split()
BLOCKS = ("input", "block1", "block2", "block3")
CANDIDATE_BLOCKS = ("block1", "block2")


def stream_spec(domain: str, label_shift: bool, images: int, seed: int) -> dict[str, Any]:
    """Part A's stream of one domain: i.i.d. batches of 200, or Dirichlet-ordered labels in batches of 64."""
    spec: dict[str, Any] = {"source": "cifar10", "domains": [domain], "severities": [5], "seed": seed}
    if not label_shift:
        return {**spec, "n_examples": images, "batch_size": 200}
    spec.update(label_shift="dirichlet", dirichlet_delta=0.1, n_examples=images, batch_size=64)
    if domain == "none":  # the label-shifted clean stream of RESULTS section 11: also a class-prior change
        spec.update(class_imbalance=10, batch_size=200, n_examples="all")
    return spec


class Models:
    """The models part A compares on every batch (all from the same pretrained weights)."""

    def __init__(self, data_root: str | None) -> None:
        base, _ = create_model("resnet20", pretrained=True, data=data_root)
        base.eval()
        self.reference = SourceReference(base)
        self.norm = copy.deepcopy(base)
        set_bn_stats(self.norm, "batch")
        self.norm.requires_grad_(False)
        self.ema = copy.deepcopy(base)
        self.ema.requires_grad_(False)
        self.ema_stats = TargetStatistics(batchnorm_layers(self.ema), 0.1)
        use_target_statistics(self.ema, self.ema_stats)
        self.grad = copy.deepcopy(base)  # test-batch statistics, every parameter trainable: the entropy gradient
        set_bn_stats(self.grad, "batch")
        self.step_model = copy.deepcopy(base)
        self.eta = build_method(self.step_model, method_config("eta", blocks=["block1-2"], kind="all"), OptimConfig())
        self.layer_block = _layer_blocks(self.reference.model)
        self.blocks = block_map(self.grad)

    def reset(self) -> None:
        """Per domain: the running target statistics and the ETA step start afresh (signals need no history)."""
        self.ema_stats.clear()
        self.eta.reset()


def _layer_blocks(model: torch.nn.Module) -> list[str]:
    """The block of each BatchNorm layer, in `batchnorm_layers` order."""
    owner = {id(m): b for b in BLOCKS for _, m in norm_layers(model, [b])}
    return [owner.get(id(bn), "head") for bn in batchnorm_layers(model)]


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _rgn(models: Models, x: torch.Tensor) -> dict[str, float]:
    params = dict(models.grad.named_parameters())
    models.grad.zero_grad(set_to_none=True)
    with torch.enable_grad():
        entropy_per_sample(models.grad(x)).mean().backward()
    pairs = {b: [(params[n], params[n].grad) for n in names] for b, names in models.blocks.items() if b in BLOCKS}
    return block_rgn(pairs)


def batch_signals(models: Models, x: torch.Tensor, y: torch.Tensor, priors: dict[str, torch.Tensor], g) -> dict:
    """Every signal of one batch, with the time each took and an ETA step's time."""
    _, t_step = _timed(models.eta.step, x)
    (ref_logits, shifts), t_shift = _timed(models.reference.probe, x)
    with torch.no_grad():
        norm_logits, t_norm = _timed(models.norm, x)
        view = cotta_views(x, 1, g)
        aug_logits, t_aug = _timed(models.norm, view)
        models.ema_stats.start_step()
        ema_logits = models.ema(x)
        models.ema_stats.end_step()
    rgn, t_rgn = _timed(_rgn, models, x)
    probs, probs_norm = ref_logits.softmax(1), norm_logits.softmax(1)
    noise = (probs.shape[1] - 1) / (2.0 * probs.shape[0])
    by_block = {b: float(shifts[[i for i, lb in enumerate(models.layer_block) if lb == b]].mean()) for b in BLOCKS}
    return {
        "shift": float(shifts.mean()),
        "shift_by_block": by_block,
        "drift": float(prior_drift(probs, priors["source"])) / noise if priors else None,
        "drift_norm": float(prior_drift(probs_norm, priors["norm"])) / noise if priors else None,
        "agree": float(agreement(ref_logits, norm_logits)),
        "aug": float(agreement(norm_logits, aug_logits)),
        "rgn": rgn,
        "err": {k: float((v.argmax(1) != y).float().mean()) * 100 for k, v in
                (("source", ref_logits), ("norm", norm_logits), ("ema", ema_logits))},
        "cost": {"shift": t_shift / t_step, "agree": (t_shift + t_norm) / t_step, "aug": (t_norm + t_aug) / t_step,
                 "rgn": t_rgn / t_step, "drift": 0.0},
        "probs_mean": {"source": probs.mean(0), "norm": probs_norm.mean(0)},
    }


def domain_signals(models: Models, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Part A for one domain stream: the mean of every signal over its batches (the first batch has no drift)."""
    stream = build_stream(load_stream_spec({"stream": spec}), data=DataContext.resolve(args.data_root, args.frost_dir))
    models.reset()
    g = torch.Generator().manual_seed(0)
    rows, priors = [], {}
    for i, batch in enumerate(stream):
        if i >= args.batches:
            break
        rec = batch_signals(models, batch.x, batch.y, priors, g)
        means = rec.pop("probs_mean")
        priors = {k: means[k] if k not in priors else 0.9 * priors[k] + 0.1 * means[k] for k in means}
        rows.append(rec)
    return _mean_record(rows)


def _mean_record(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over batches of every number (nested dicts kept); costs as medians (timings are noisy)."""
    out: dict[str, Any] = {}
    for key, first in rows[0].items():
        if isinstance(first, dict):
            agg = statistics.median if key == "cost" else statistics.fmean
            out[key] = {k: agg([r[key][k] for r in rows]) for k in first}
        else:
            values = [r[key] for r in rows if r[key] is not None]
            out[key] = statistics.fmean(values) if values else None
    out["batches"] = len(rows)
    return out


def part_a(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    models = Models(args.data_root)
    out: dict[str, dict[str, Any]] = {}
    for label_shift in (False, True):
        for domain in ("none", *CORRUPTIONS):
            spec = stream_spec(domain, label_shift, args.images, args.seed)
            key = f"{'dirichlet' if label_shift else 'iid'}/{domain}"
            out[key] = domain_signals(models, spec, args)
            print(f"{key}: shift {out[key]['shift']:.4f} drift {out[key]['drift']}", flush=True)
    return out


def _argmax(values: dict[str, float], among: tuple[str, ...]) -> str:
    return max(among, key=lambda k: values[k])


def part_a_table(rows: dict[str, dict[str, Any]]) -> str:
    header = ["stream / domain", "shift", "moved most", "drift (source)", "drift (norm)", "agree", "aug", "rgn top",
              "err source", "err norm", "err ema", "best BN"]
    body = []
    for key, r in rows.items():
        errs = r["err"]
        body.append([
            key, fmt(r["shift"], 4), _argmax(r["shift_by_block"], BLOCKS), fmt(r["drift"], 2), fmt(r["drift_norm"], 2),
            fmt(r["agree"], 2), fmt(r["aug"], 2), _argmax(r["rgn"], CANDIDATE_BLOCKS),
            fmt(errs["source"], 1), fmt(errs["norm"], 1), fmt(errs["ema"], 1), min(errs, key=errs.get),
        ])
    return markdown_table(header, body, left=1, right=len(header) - 2)


def cost_table(rows: dict[str, dict[str, Any]]) -> str:
    """Median over domains of each signal's cost ratio, with the passes it needs."""
    passes = {
        "shift": "one inference forward of the frozen source copy (free when its prediction is served)",
        "drift": "none (the batch's predictions)",
        "agree": "the source copy's forward + one test-batch-statistics forward",
        "aug": "the augmentation + one forward on the view (+ the forward it is compared with)",
        "rgn": "one forward + a backward through every block with weight gradients",
    }
    body = [[k, fmt(statistics.median(r["cost"][k] for r in rows.values()), 2), v] for k, v in passes.items()]
    return markdown_table(["signal", "x one ETA step (block1-2)", "what it runs"], body, left=1, right=1)


def read_runs(folders: list[Path]) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {selection: {domain: error %}}} of finished run folders (a sweep's `cells/*` folders work too)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for folder in folders:
        summary, config = folder / "summary.json", folder / "config.yaml"
        if not (summary.is_file() and config.is_file()):
            continue
        method = read_yaml(config)["method"]
        blocks = list(method.get("blocks", []))
        label = "auto" if blocks == ["auto"] else "default" if blocks == ["all"] else "+".join(blocks)
        errors = json.loads(summary.read_text())["errors"]
        out.setdefault(method["name"], {})[label] = {**errors, "mean": statistics.fmean(errors.values())}
    return out


def part_b_table(runs: dict[str, dict[str, float]], signals: dict[str, dict[str, Any]]) -> str:
    """Per domain: each selection's error, the best fixed one in hindsight, the better of block1 / block2, and the
    block the block-level signals pick (the last row: how often a signal picked the better of the two)."""
    labels = sorted(runs)
    header = ["domain", *labels, "best fixed", "better of 1 / 2", "shift picks", "rgn picks"]
    body, hits, n = [], {"shift": 0, "rgn": 0}, 0
    for domain in [*CORRUPTIONS, "mean"]:
        errs = {k: runs[k].get(domain) for k in labels}
        fixed = {k: v for k, v in errs.items() if v is not None and k != "auto"}
        best = min(fixed, key=fixed.get) if fixed else "-"
        pair = {k: fixed[k] for k in CANDIDATE_BLOCKS if k in fixed}
        better = min(pair, key=pair.get) if len(pair) == 2 else "-"
        sig = signals.get(f"iid/{domain}")
        picks = {} if sig is None else {
            "shift": _argmax(sig["shift_by_block"], CANDIDATE_BLOCKS), "rgn": _argmax(sig["rgn"], CANDIDATE_BLOCKS)}
        if picks and better != "-":
            n += 1
            for key, pick in picks.items():
                hits[key] += pick == better
        body.append([domain, *[fmt(errs[k], 1) for k in labels], best, better, picks.get("shift", "-"),
                     picks.get("rgn", "-")])
    body.append(["signal picked the better", *[""] * len(labels), "", "", f"{hits['shift']}/{n}", f"{hits['rgn']}/{n}"])
    return markdown_table(header, body, left=1, right=len(labels))


def write_report(args: argparse.Namespace) -> str:
    """Part A (and part B for `args.runs`): write OUT/signals.json and OUT/signals.md, return the markdown."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.frost_dir is None and args.data_root:
        args.frost_dir = str(Path(args.data_root) / "frost")
    signals = part_a(args)
    parts = ["## Signals per domain (part A)", part_a_table(signals), "## Cost (part A)", cost_table(signals)]
    runs = read_runs(args.runs)
    for method, by_selection in sorted(runs.items()):
        parts += [f"## {method}: fixed selections per domain (part B)", part_b_table(by_selection, signals)]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "signals.json", json.dumps({"signals": signals, "runs": runs}, indent=1) + "\n")
    text = "\n\n".join(parts) + "\n"
    atomic_write_text(args.out / "signals.md", text)
    return text
