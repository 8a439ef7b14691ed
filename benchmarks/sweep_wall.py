"""Wall time of one sweep with 1 and N local workers (or Ray), and a check that the merged results agree.

    python benchmarks/sweep_wall.py                                   # the demo sweep, 1 and 2 workers
    python benchmarks/sweep_wall.py --workers 1 2 4 --json benchmarks/out/sweep_wall.json
    python benchmarks/sweep_wall.py --launcher ray --workers 2        # a local Ray instance with 2 CPUs
    python benchmarks/sweep_wall.py FILE KEY=VALUE ...                 # another sweep, overrides for every cell

Every setting runs the whole sweep from scratch (worker start-up included); the merged `sweep.jsonl` of every
setting must be byte-identical (exit status 1 otherwise, or when a cell fails). See
`benchmarks/studies/sweep_wall.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

from benchmarks.studies.sweep_wall import time_sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", default=str(REPO / "configs" / "sweeps" / "online_blocks_small.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every cell")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--launcher", choices=("local", "ray"), default="local")
    parser.add_argument(
        "--data-root", default=os.environ.get("TTA_SURGICAL_DATA") or str(REPO.parent / "shared" / "data")
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    overrides = [o for o in args.overrides if "=" in o]
    try:
        payload = time_sweep(args.file, overrides=overrides, workers=args.workers, launcher=args.launcher,
                             data_root=args.data_root, json_path=args.json)  # fmt: skip
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    return 0 if payload["merged_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
