"""Error of a pretrained CIFAR-10 model on CIFAR-10-C, per corruption and severity (no adaptation).

    python benchmarks/cifar10c_accuracy.py --model resnet20 --data-root ../shared/data \\
        [--cifar10c DIR] [--reference DIR] [--severities 1,2,3,4,5] [--limit N] [--out FILE.json]

Images from a CIFAR-10-C folder (`--cifar10c`), or generated on the fly exactly as `make-cifar10c` writes them;
`--reference DIR` adds a second folder (e.g. the official generator's output) and the difference per corruption,
the fidelity check of the corruption engine. See `benchmarks/studies/accuracy.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

import torch  # noqa: E402

from benchmarks.studies.accuracy import AccuracyOptions, run_cifar10c_accuracy  # noqa: E402
from tta_surgical.bench.labels import split_args  # noqa: E402
from tta_surgical.corruptions import BENCHMARK_CORRUPTIONS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    opts = AccuracyOptions(
        model=args.model, data_root=args.data_root, cifar10c=args.cifar10c, reference=args.reference,
        corruptions=split_args([args.corruptions]), severities=tuple(int(s) for s in split_args([args.severities])),
        limit=args.limit, seed=args.seed, device=args.device, frost_dir=args.frost_dir, out=args.out,
    )  # fmt: skip
    run_cifar10c_accuracy(opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
