"""Compare the engine's `tent` with a plain reference Tent loop over the same stream (target: within 0.3 points).

    python benchmarks/reference_tent.py --data-root ../shared/data --n-examples 1000 --json out.json

The loop (`tta_surgical.bench.reference.PlainTent`) is Tent written the straightforward way, sharing no code with
the package's methods; see `tta_surgical/bench/reference.py`. Exit status 1 when the errors differ by more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package of this checkout, installed or not

# `reference_tent`, the oracle loop itself, stays importable from this script for callers that load it.
from tta_surgical.bench.reference import TOLERANCE_POINTS, compare_with_engine, reference_tent  # noqa: E402, F401
from tta_surgical.data.context import DataContext  # noqa: E402
from tta_surgical.fileio import atomic_write_text  # noqa: E402


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
    try:
        result = compare_with_engine(
            args.config,
            args.stream,
            n_examples=args.n_examples,
            device=args.device,
            batch_size=args.batch_size,
            domains=args.domains,
            data=DataContext.resolve(args.data_root, args.frost_dir),
        )
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0 if result[f"within_{TOLERANCE_POINTS}_points"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
