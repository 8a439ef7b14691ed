"""Error of a pretrained CIFAR-10 model on CIFAR-10-C, per corruption and severity (no adaptation).

    python benchmarks/cifar10c_accuracy.py --model resnet20 --data-root ../shared/data \
        [--cifar10c DIR] [--reference DIR] [--severities 1,2,3,4,5] [--limit N] [--out FILE.json]

Images come from a CIFAR-10-C folder in the official layout (`--cifar10c`: the Zenodo release or the output
of `tta-surgical make-cifar10c`), or, without it, are generated on the fly with our engine exactly as
`make-cifar10c` would write them (same seeds, same uint8 rounding). `--reference DIR` adds a second folder
(e.g. the official generator's output) evaluated on the same images, with the difference per corruption:
this is the fidelity check of the corruption engine (target: within 2 points per corruption at severity 5,
within 1 point on the mean).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tta_surgical.corruptions import BENCHMARK_CORRUPTIONS, corrupt, make_generator, to_uint8
from tta_surgical.corruptions.textures import default_frost_dir
from tta_surgical.data.cifar import find_cifar10, load_cifar10, load_cifar10c
from tta_surgical.data.make_cifar10c import batch_seed
from tta_surgical.models import create_model


@torch.inference_mode()
def error_rate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
               batch_size: int = 500) -> float:
    """Top-1 error (%) of `model` on uint8 NHWC images."""
    wrong = 0
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i : i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255)
        pred = model(x).argmax(1).cpu().numpy()
        wrong += int((pred != labels[i : i + batch_size]).sum())
    return 100.0 * wrong / len(images)


def generate(clean: np.ndarray, name: str, severity: int, seed: int, device: torch.device,
             batch_size: int = 1000, frost_dir: str | None = None) -> np.ndarray:
    """Our corruption of `clean` (uint8 NHWC), batch for batch as make-cifar10c writes it."""
    out = np.empty_like(clean)
    for start in range(0, len(clean), batch_size):
        x = torch.from_numpy(clean[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
        g = make_generator(batch_seed(seed, name, severity, start), device)
        y = to_uint8(corrupt(x, name, severity, g, preset="cifar", frost_dir=frost_dir))
        out[start : start + len(x)] = y.permute(0, 2, 3, 1).cpu().numpy()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="model name (default resnet20)")
    p.add_argument("--data-root", default=os.environ.get("TTA_SURGICAL_DATA"), help="CIFAR-10 + weights folder")
    p.add_argument("--cifar10c", default=None, help="CIFAR-10-C folder to evaluate (default: generate on the fly)")
    p.add_argument("--reference", default=None, help="a second CIFAR-10-C folder to compare against")
    p.add_argument("--corruptions", default=",".join(BENCHMARK_CORRUPTIONS), help="comma-separated names")
    p.add_argument("--severities", default="1,2,3,4,5", help="comma-separated severities (default 1..5)")
    p.add_argument("--limit", type=int, default=None, help="first N test images only")
    p.add_argument("--seed", type=int, default=0, help="seed for on-the-fly generation (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frost-dir", default=None, help="frost textures (default <data-root>/frost or the cache)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/out/cifar10c_<model>.json)")
    args = p.parse_args()

    device = torch.device(args.device)
    root = find_cifar10(args.data_root)
    frost_dir = default_frost_dir(args.frost_dir, args.data_root)
    model, info = create_model(args.model, data_root=args.data_root)
    model.eval().to(device)
    clean, labels = load_cifar10(root)
    n = args.limit or len(clean)
    clean, labels = clean[:n], labels[:n]
    names = args.corruptions.split(",")
    sevs = [int(s) for s in args.severities.split(",")]

    result = {"model": args.model, "weights": str(info.weights), "n_images": n, "device": str(device),
              "clean_error": error_rate(model, clean, labels, device), "errors": {}, "reference_errors": {}}
    print(f"{args.model}: clean error {result['clean_error']:.2f}% on {n} images")
    t0 = time.perf_counter()
    for name in tqdm(names, desc="corruptions"):
        for s in sevs:
            if args.cifar10c:
                imgs, lab = load_cifar10c(args.cifar10c, name, s)
                imgs, lab = imgs[:n], lab[:n]
            else:
                imgs, lab = generate(clean, name, s, args.seed, device, frost_dir=frost_dir), labels
            result["errors"].setdefault(name, {})[str(s)] = error_rate(model, imgs, lab, device)
            if args.reference:
                ref = np.load(Path(args.reference) / f"{name}.npy", mmap_mode="r")
                rows = ref[(sevs.index(s)) * n : (sevs.index(s) + 1) * n] if len(ref) == len(sevs) * n else None
                if rows is None:  # the official 5-severity layout
                    per = len(ref) // 5
                    rows = ref[(s - 1) * per : (s - 1) * per + n]
                result["reference_errors"].setdefault(name, {})[str(s)] = error_rate(model, rows, labels, device)
    result["seconds"] = time.perf_counter() - t0

    header = "| corruption | " + " | ".join(f"s{s}" for s in sevs) + (" | reference s{0} | diff s{0} |".format(
        sevs[-1]) if args.reference else " |")
    print(header)
    print("|---" * (len(sevs) + 1 + (2 if args.reference else 0)) + "|")
    for name in names:
        e = result["errors"][name]
        line = f"| {name} | " + " | ".join(f"{e[str(s)]:.2f}" for s in sevs)
        if args.reference:
            r = result["reference_errors"][name][str(sevs[-1])]
            line += f" | {r:.2f} | {e[str(sevs[-1])] - r:+.2f}"
        print(line + " |")
    means = {str(s): float(np.mean([result["errors"][c][str(s)] for c in names])) for s in sevs}
    result["mean_errors"] = means
    line = "| **mean** | " + " | ".join(f"{means[str(s)]:.2f}" for s in sevs)
    if args.reference:
        rm = float(np.mean([result["reference_errors"][c][str(sevs[-1])] for c in names]))
        result["reference_mean"] = rm
        line += f" | {rm:.2f} | {means[str(sevs[-1])] - rm:+.2f}"
    print(line + " |")
    out = Path(args.out or f"benchmarks/out/cifar10c_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
