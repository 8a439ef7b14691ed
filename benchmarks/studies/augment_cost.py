"""Cost of CoTTA's and MEMO's augmented views: the batched steps of the package vs a Python loop over the views.

The logic behind `benchmarks/augment_cost.py` (see its docstring for the variants). The loop references are the
baselines, the straightforward way of doing it, and live here rather than in the methods.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tta_surgical.config import OptimConfig, method_config
from tta_surgical.methods import MethodContext, build_method
from tta_surgical.methods.augment import augmix_views, cotta_views
from tta_surgical.methods.bn import set_bn_stats
from tta_surgical.methods.memo import marginal_entropy
from tta_surgical.models import create_model
from tta_surgical.streams import StreamSpec, open_source

__all__ = ["run_augment_cost", "table"]


# ------------------------------------------------------------------------------------------- loop references


class LoopCoTTA:
    """The authors' CoTTA step written the straightforward way: a Python loop over the views (the baseline)."""

    def __init__(self, model: nn.Module, views: int, augment: Callable[[Tensor, torch.Generator], Tensor]) -> None:
        self.model = model
        self.views, self.augment = views, augment
        self.teacher, self.anchor = copy.deepcopy(model), copy.deepcopy(model)
        for m in (self.teacher, self.anchor):
            m.requires_grad_(False)
        self.source = [p.detach().clone() for p in model.parameters()]
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)

    def step(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.anchor(x).softmax(1).amax(1).mean().item()  # the gate (ap = 1: always augment)
            outputs = [self.teacher(self.augment(x, self.generator)) for _ in range(self.views)]
            target = torch.stack(outputs).mean(0)
        loss = -(target.softmax(1) * self.model(x).log_softmax(1)).sum(1).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.model.parameters()):
                t.mul_(0.999).add_(s, alpha=0.001)
            for p, src in zip(self.model.parameters(), self.source):
                mask = torch.rand(p.shape, generator=self.generator, device=p.device) < 0.01
                p.copy_(torch.where(mask, src, p))
        return target


def torchvision_cotta_view(x: Tensor, generator: torch.Generator) -> Tensor:
    """One view of the batch through the authors' torchvision pipeline (one draw for the whole batch)."""
    import torchvision.transforms.functional as TF

    g = generator

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g, device=g.device).item()

    img = x.clamp(0.0, 1.0)
    for op in torch.randperm(5, generator=g, device=g.device).tolist():
        if op == 0:
            img = TF.adjust_brightness(img, uniform(0.6, 1.4))
        elif op == 1:
            img = TF.adjust_contrast(img, uniform(0.7, 1.3))
        elif op == 2:
            img = TF.adjust_saturation(img, uniform(0.5, 1.5))
        elif op == 3:
            img = TF.adjust_hue(img, uniform(-0.06, 0.06))
        else:
            img = TF.adjust_gamma(img.clamp(1e-8, 1.0), uniform(0.7, 1.3))
    size = img.shape[-1]
    img = TF.pad(img, [size // 2], padding_mode="edge")
    max_shift = size * 2 / 16
    shift = [round(uniform(-max_shift, max_shift)), round(uniform(-max_shift, max_shift))]
    img = TF.affine(img, uniform(-15, 15), shift, uniform(0.9, 1.1), [0.0], TF.InterpolationMode.BILINEAR)
    sigma = uniform(0.001, 0.5)
    img = TF.center_crop(TF.gaussian_blur(img, [5, 5], [sigma, sigma]), [size, size])
    if uniform(0.0, 1.0) < 0.5:
        img = TF.hflip(img)
    noise = torch.randn(img.shape, generator=g, device=g.device) * 0.005
    return (img + noise).clamp(0.0, 1.0)


class LoopMEMO:
    """The authors' MEMO step: a Python loop over the images and, for the augmentation, over the views."""

    def __init__(self, model: nn.Module, views: int, prior_strength: float = 16.0) -> None:
        self.model, self.views, self.prior = model, views, prior_strength
        self.source = copy.deepcopy(model.state_dict())
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.005)
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)

    def step(self, x: Tensor) -> Tensor:
        predictions = []
        for image in x:
            self.model.load_state_dict(self.source)
            views = torch.cat([augmix_views(image[None], 1, self.generator) for _ in range(self.views)])
            set_bn_stats(self.model, "batch", self.prior * self.views)
            loss = marginal_entropy(self.model(views))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                set_bn_stats(self.model, "batch", self.prior)
                predictions.append(self.model(image[None]))
        return torch.cat(predictions)


# ------------------------------------------------------------------------------------------- the measurement


def load_inputs(data_root: str | None, n: int, device: torch.device) -> Tensor:
    if data_root is not None:
        images = open_source(StreamSpec(source="cifar10"), data_root).images  # the test set, uint8 NHWC
        x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float() / 255.0
    else:
        x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return x.to(device).contiguous(memory_format=torch.channels_last)


def fresh_model(data_root: str | None, device: torch.device) -> nn.Module:
    model, _ = create_model("resnet20", pretrained=data_root is not None, data=data_root, allow_random=True)
    return model.to(device).to(memory_format=torch.channels_last)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(args: argparse.Namespace, device: torch.device) -> dict[str, tuple[Callable[[], Any], str]]:
    """name -> (one step, group): the batched variants and their loop baselines."""
    variants: dict[str, tuple[Callable[[], Any], str]] = {}
    ctx = MethodContext(seed=0)
    if args.only in (None, "cotta"):
        x = load_inputs(args.data_root, args.cotta_batch, device)
        for label, per_forward in (("auto", 0), ("all", args.views * args.cotta_batch)):
            cfg = method_config("cotta", ap=1.0, n_augmentations=args.views, images_per_forward=per_forward)
            method = build_method(fresh_model(args.data_root, device), cfg, OptimConfig(), context=ctx)
            variants[f"cotta batched ({label})"] = (lambda m=method, x=x: m.step(x), "cotta")

        def same_ops(batch: Tensor, g: torch.Generator) -> Tensor:
            return cotta_views(batch, 1, g).contiguous(memory_format=torch.channels_last)

        for label, augment in (("same ops", same_ops), ("torchvision", torchvision_cotta_view)):
            model = fresh_model(args.data_root, device)
            model.eval()
            set_bn_stats(model, "batch")
            loop = LoopCoTTA(model, args.views, augment)
            variants[f"cotta loop ({label})"] = (lambda r=loop, x=x: r.step(x), "cotta")
    if args.only in (None, "memo"):
        x = load_inputs(args.data_root, args.memo_batch, device)
        for label, per_forward in (("auto", 0), ("all", args.views * args.memo_batch)):
            cfg = method_config("memo", n_augmentations=args.views, images_per_forward=per_forward)
            optim = OptimConfig(name="sgd", lr=0.005, momentum=0.0)
            method = build_method(fresh_model(args.data_root, device), cfg, optim, context=ctx)
            variants[f"memo batched ({label})"] = (lambda m=method, x=x: m.step(x), "memo")
        model = fresh_model(args.data_root, device)
        model.eval()
        loop = LoopMEMO(model, args.views)
        variants["memo loop"] = (lambda r=loop, x=x: r.step(x), "memo")
    return variants


def measure(variants: dict[str, tuple[Callable[[], Any], str]], repeats: int, device: torch.device) -> dict[str, list]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step, _ in variants.values():  # warm-up: allocations, lazy initialisation
        step()
    for _ in range(repeats):
        for name, (step, _) in variants.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    return times


def summarise(variants: dict[str, tuple[Callable[[], Any], str]], times: dict[str, list[float]]) -> list[dict]:
    rows = []
    for group in ("cotta", "memo"):
        names = [n for n, (_, g) in variants.items() if g == group]
        baselines = [n for n in names if "loop" in n]
        for name in names:
            median = statistics.median(times[name])
            row = {"variant": name, "group": group, "median_s": median, "min_s": min(times[name])}
            if "batched" in name:
                row["loop_over_batched"] = {b: statistics.median(times[b]) / median for b in baselines}
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'variant':<34} {'median s':>9} {'min s':>8}  loop / batched"]
    for r in rows:
        ratios = ", ".join(f"{b.split('(')[-1].rstrip(')') if '(' in b else b}: {v:.2f}x"
                           for b, v in r.get("loop_over_batched", {}).items())  # fmt: skip
        lines.append(f"{r['variant']:<34} {r['median_s']:>9.2f} {r['min_s']:>8.2f}  {ratios}")
    return "\n".join(lines)


def run_augment_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Time every variant (`build_variants`) interleaved; returns the record the script writes (rows, timings)."""
    from tta_surgical.provenance import provenance

    if args.quick:
        args.repeats, args.memo_batch = 2, 4
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    variants = build_variants(args, device)
    times = measure(variants, args.repeats, device)
    rows = summarise(variants, times)
    return {
        **provenance(device),
        "settings": {
            "model": "resnet20",
            "pretrained": args.data_root is not None,
            "views": args.views,
            "cotta_batch": args.cotta_batch,
            "memo_batch": args.memo_batch,
            "repeats": args.repeats,
        },
        "rows": rows,
        "times_s": times,
        "finite": all(math.isfinite(t) for ts in times.values() for t in ts),
        "elapsed_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
