"""One run of a method of the best-known TTA collection over a CIFAR-10-C folder, timed (a child of peer_collection).

    python benchmarks/peer_worker.py --peer-root PATH/classification --method tent --cifar10c DIR --out RESULT.json

What it imports from the collection, what it stubs and why: `benchmarks/studies/peer_worker.py`.
Requirements beyond the package: `pip install yacs iopath einops`.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # before the imports: the process's own start-up counts

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.studies.peer_worker import PEER_METHODS, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one method of the TTA collection over a CIFAR-10-C folder.")
    parser.add_argument("--peer-root", required=True, help="the collection's classification/ folder")
    parser.add_argument("--method", required=True, choices=sorted(PEER_METHODS))
    parser.add_argument("--cifar10c", required=True, help="CIFAR-10-C folder (make-cifar10c output or official)")
    parser.add_argument("--data-root", default=os.environ.get("TTA_SURGICAL_DATA"), help="weights and CIFAR-10")
    parser.add_argument("--n-per-domain", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--domains", default=None, help="comma-separated corruptions (default: the config's 15)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="write the result JSON here")
    args = parser.parse_args(argv)
    args.peer_root = str(Path(args.peer_root).resolve())
    args.cifar10c = str(Path(args.cifar10c).resolve())
    out = Path(args.out).resolve()
    result = run(args, T_PROCESS)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
