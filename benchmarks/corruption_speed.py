"""Corruption engine throughput: images/s per corruption, ours vs the NumPy `imagecorruptions` package.

    python benchmarks/corruption_speed.py [--device cpu|cuda] [--quick] [--out benchmarks/out/corruption_speed.json]

For each corruption: our engine at 32x32 (CIFAR preset, batch 1,000 by default) and 224x224 (ImageNet preset,
batch 64), timed device-synchronised after a warm-up call, median of `--repeats`; and, when `imagecorruptions`
is installed (`pip install tta-surgical[bench]`), that package on the same 224x224 images, one image at a
time as it works, on a few images (`--ref-images`, it is slow). The ratio column is ours / theirs in images/s
at 224x224; the summary gives the mean ratio over the corruptions both implement and, on CUDA, our mean
throughput at 32x32 over the 15 benchmark corruptions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from tta_surgical.corruptions import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, corrupt, make_generator
from tta_surgical.corruptions.textures import default_frost_dir


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


def _imagecorruptions():
    """Import imagecorruptions (its `corrupt` entry point) with two shims for current libraries (it predates
    NumPy 2 and scikit-image 0.19): `np.float_` and `gaussian(..., multichannel=True)`. The shims only rename
    arguments; its algorithms run as is."""
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
        from tta_surgical.data.cifar import load_cifar10

        imgs, _ = load_cifar10(data_root)
        x = torch.from_numpy(imgs[:n]).permute(0, 3, 1, 2).float() / 255
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=False, align_corners=False)
    return x.clamp(0, 1).contiguous()


def main() -> None:
    import os

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--corruptions", default="all", help="comma-separated names or 'all' (default)")
    p.add_argument("--severity", type=int, default=3, help="severity timed (default 3)")
    p.add_argument("--batch32", type=int, default=1000, help="batch size at 32x32 (default 1000)")
    p.add_argument("--batch224", type=int, default=64, help="batch size at 224x224 (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per cell, median reported (default 3)")
    p.add_argument("--ref-images", type=int, default=4, help="images timed for imagecorruptions (default 4)")
    p.add_argument("--no-reference", action="store_true", help="skip the imagecorruptions baseline")
    p.add_argument("--quick", action="store_true", help="small batches, 1 repeat: a smoke run in seconds")
    p.add_argument("--data-root", default=os.environ.get("TTA_SURGICAL_DATA"), help="CIFAR-10 folder for images")
    p.add_argument("--frost-dir", default=None, help="frost texture folder (default <data-root>/frost or the cache)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/out/corruption_speed.json", help="JSON output path")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch32, args.batch224, args.repeats, args.ref_images = 100, 8, 1, 1
    frost_dir = default_frost_dir(args.frost_dir, args.data_root)
    names = list(ALL_CORRUPTIONS) if args.corruptions == "all" else args.corruptions.split(",")
    device = torch.device(args.device)
    x32 = sample_images(args.batch32, 32, args.data_root).to(device)
    x224 = sample_images(args.batch224, 224, args.data_root).to(device)
    ref_imgs = (x224[: args.ref_images].cpu().permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)

    rows = []
    print(f"{'corruption':<18} {'ours 32px img/s':>16} {'ours 224px img/s':>17} {'numpy 224px img/s':>18} {'ratio':>8}")
    for name in names:
        r32 = time_ours(x32, name, args.severity, args.repeats, frost_dir)
        r224 = time_ours(x224, name, args.severity, args.repeats, frost_dir)
        ref = None if args.no_reference else time_reference(ref_imgs, name, args.severity)
        ratio = r224 / ref if ref else None
        rows.append({"corruption": name, "ours_32_img_s": r32, "ours_224_img_s": r224, "numpy_224_img_s": ref,
                     "ratio_224": ratio})
        ref_s = f"{ref:18.1f}" if ref else f"{'-':>18}"
        ratio_s = f"{ratio:7.1f}x" if ratio else f"{'-':>8}"
        print(f"{name:<18} {r32:16.0f} {r224:17.1f} {ref_s} {ratio_s}", flush=True)

    ratios = [r["ratio_224"] for r in rows if r["ratio_224"]]
    bench32 = [r["ours_32_img_s"] for r in rows if r["corruption"] in BENCHMARK_CORRUPTIONS]
    summary = {
        "mean_ratio_224": statistics.mean(ratios) if ratios else None,
        "geomean_ratio_224": float(np.exp(np.mean(np.log(ratios)))) if ratios else None,
        "mean_ours_32_img_s_benchmark15": statistics.mean(bench32) if bench32 else None,
        "total_ours_32_img_s_benchmark15": (len(bench32) / sum(1 / r for r in bench32)) if bench32 else None,
    }
    print()
    for k, v in summary.items():
        print(f"{k}: {v:.1f}" if v is not None else f"{k}: -")
    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "severity": args.severity, "batch32": args.batch32,
            "batch224": args.batch224, "repeats": args.repeats, "ref_images": args.ref_images}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
