"""Corruption engine throughput: images/s per corruption, ours vs the NumPy `imagecorruptions` package.

    python benchmarks/corruption_speed.py [--device cpu|cuda] [--quick] [--out benchmarks/out/corruption_speed.json]

Our engine at 32x32 (batch 1,000) and 224x224 (batch 64), median of `--repeats` device-synchronised calls after a
warm-up; `imagecorruptions` (when installed: `pip install tta-surgical[bench]`) one image at a time on
`--ref-images` images. What is measured and summarised: `benchmarks/studies/corruption_speed.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

import torch  # noqa: E402

from benchmarks.studies.corruption_speed import SpeedOptions, run_corruption_speed  # noqa: E402
from tta_surgical.bench.labels import split_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = SpeedOptions(
        device=args.device, corruptions=None if args.corruptions == "all" else split_args([args.corruptions]),
        severity=args.severity, batch32=args.batch32, batch224=args.batch224, repeats=args.repeats,
        ref_images=args.ref_images, reference=not args.no_reference, quick=args.quick, data_root=args.data_root,
        frost_dir=args.frost_dir, out=args.out,
    )  # fmt: skip
    run_corruption_speed(opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
