"""Corruption engine throughput: images/s per corruption, ours vs the NumPy `imagecorruptions` package
(`benchmarks/corruption_speed.py`).

For each corruption: our engine at 32x32 (CIFAR preset, batch 1,000 by default) and 224x224 (ImageNet preset,
batch 64), timed device-synchronised after a warm-up call, median of `repeats`; and, when `imagecorruptions` is
installed (`pip install tta-surgical[bench]`), that package on the same 224x224 images, one image at a time as
it works, on a few images (`ref_images`, it is slow). The ratio column is ours / theirs in images/s at 224x224;
the summary gives the mean ratio over the corruptions both implement and our mean throughput at 32x32 over the
15 benchmark corruptions.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta_surgical.corruptions import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, corrupt, make_generator
from tta_surgical.fileio import atomic_write_text
from tta_surgical.provenance import provenance
from tta_surgical.streams import StreamSpec, open_source

__all__ = ["SpeedOptions", "run_corruption_speed", "sample_images", "time_ours", "time_reference"]


@dataclasses.dataclass(frozen=True)
class SpeedOptions:
    """One corruption-speed run; `corruptions` None = all 19; `quick` = small batches, one repeat, one image."""

    device: str = "cpu"
    corruptions: tuple[str, ...] | None = None
    severity: int = 3
    batch32: int = 1000
    batch224: int = 64
    repeats: int = 3
    ref_images: int = 4
    reference: bool = True
    quick: bool = False
    data_root: str | None = None
    frost_dir: str | None = None
    out: str | Path = Path("benchmarks") / "out" / "corruption_speed.json"

    def sized(self) -> SpeedOptions:
        """The options with `quick` applied (batches 100 and 8, one repeat, one reference image)."""
        if not self.quick:
            return self
        return dataclasses.replace(self, batch32=100, batch224=8, repeats=1, ref_images=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(x: torch.Tensor, name: str, severity: int, repeats: int, frost_dir: str | None) -> float:
    """Median images/s of our engine on batch `x` (one warm-up call excluded)."""
    device = x.device
    g = make_generator(0, device)
    corrupt(x, name, severity, g, frost_dir=frost_dir)  # warm-up: caches (frost textures, kernels), CUDA init
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        corrupt(x, name, severity, g, frost_dir=frost_dir)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def _imagecorruptions() -> Any:
    """Import imagecorruptions (its `corrupt` entry point) with two shims for current libraries (it predates
    NumPy 2 and scikit-image 0.19): `np.float_` and `gaussian(..., multichannel=True)`. The shims only rename
    arguments; its algorithms run as is. None when the package is not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import imagecorruptions
            import imagecorruptions.corruptions as ic
        except ImportError:
            return None
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    skimage_gaussian = ic.gaussian

    def gaussian(image, sigma=1, multichannel=None, **kw):
        if multichannel:
            kw["channel_axis"] = -1
        return skimage_gaussian(image, sigma=sigma, **kw)

    ic.gaussian = gaussian
    return imagecorruptions


def time_reference(images: np.ndarray, name: str, severity: int) -> float | None:
    """images/s of imagecorruptions on uint8 HWC images, one at a time; None when the package is absent."""
    ic = _imagecorruptions()
    if ic is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ic.corrupt(images[0], corruption_name=name, severity=severity)  # warm-up (file reads, imports)
        t0 = time.perf_counter()
        for img in images:
            ic.corrupt(img, corruption_name=name, severity=severity)
        return len(images) / (time.perf_counter() - t0)


def sample_images(n: int, size: int, data_root: str | None, seed: int = 0) -> torch.Tensor:
    """Natural images when CIFAR-10 is at hand (upscaled for 224), else smooth random images; float (n, 3, s, s)."""
    if data_root:
        imgs = open_source(StreamSpec(source="cifar10"), data_root).images  # the test set, uint8 NHWC
        x = torch.from_numpy(imgs[:n]).permute(0, 3, 1, 2).float() / 255
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=False, align_corners=False)
    return x.clamp(0, 1).contiguous()


def run_corruption_speed(opts: SpeedOptions, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Time every corruption of `opts`; write the JSON ({meta, summary, rows}) to `opts.out`; return it."""
    from tta_surgical.corruptions.textures import default_frost_dir

    opts = opts.sized()
    frost_dir = default_frost_dir(opts.frost_dir, opts.data_root)
    names = list(opts.corruptions or ALL_CORRUPTIONS)
    device = torch.device(opts.device)
    x32 = sample_images(opts.batch32, 32, opts.data_root).to(device)
    x224 = sample_images(opts.batch224, 224, opts.data_root).to(device)
    ref_imgs = (x224[: opts.ref_images].cpu().permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    say = log or (lambda _: None)
    say(f"{'corruption':<18} {'ours 32px img/s':>16} {'ours 224px img/s':>17} {'numpy 224px img/s':>18} {'ratio':>8}")
    rows = []
    for name in names:
        r32 = time_ours(x32, name, opts.severity, opts.repeats, frost_dir)
        r224 = time_ours(x224, name, opts.severity, opts.repeats, frost_dir)
        ref = time_reference(ref_imgs, name, opts.severity) if opts.reference else None
        ratio = r224 / ref if ref else None
        rows.append({"corruption": name, "ours_32_img_s": r32, "ours_224_img_s": r224, "numpy_224_img_s": ref,
                     "ratio_224": ratio})  # fmt: skip
        ref_s = f"{ref:18.1f}" if ref else f"{'-':>18}"
        ratio_s = f"{ratio:7.1f}x" if ratio else f"{'-':>8}"
        say(f"{name:<18} {r32:16.0f} {r224:17.1f} {ref_s} {ratio_s}")
    summary = _summary(rows)
    say("")
    for k, v in summary.items():
        say(f"{k}: {v:.1f}" if v is not None else f"{k}: -")
    settings = {k: getattr(opts, k) for k in ("severity", "batch32", "batch224", "repeats", "ref_images")}
    meta = {"device": str(device), "threads": torch.get_num_threads(), **settings, **provenance(device)}
    result = {"meta": meta, "summary": summary, "rows": rows}
    atomic_write_text(opts.out, json.dumps(result, indent=1))
    say(f"wrote {opts.out}")
    return result


def _summary(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    ratios = [r["ratio_224"] for r in rows if r["ratio_224"]]
    bench32 = [r["ours_32_img_s"] for r in rows if r["corruption"] in BENCHMARK_CORRUPTIONS]
    return {
        "mean_ratio_224": statistics.mean(ratios) if ratios else None,
        "geomean_ratio_224": float(np.exp(np.mean(np.log(ratios)))) if ratios else None,
        "mean_ours_32_img_s_benchmark15": statistics.mean(bench32) if bench32 else None,
        "total_ours_32_img_s_benchmark15": (len(bench32) / sum(1 / r for r in bench32)) if bench32 else None,
    }
