"""End to end against the authors' code: each method of the best-known TTA collection and our `tta-surgical run` over
the identical continual CIFAR-10-C stream, images/s, CPU time, online error and our time breakdown.

    pip install yacs iopath einops        # the collection's config system and DeYO's patch shuffle (not ours)
    tta-surgical make-cifar10c --out /tmp/c10c --limit 1000 --severities 5 --corruptions benchmark
    python benchmarks/peer_collection.py --peer-root PATH/test-time-adaptation/classification --cifar10c /tmp/c10c \
        --methods tent,eta,eata,sar,deyo,roid --rounds 3 --together --out /tmp/peer-bench --json peer.json

The collection is imported from `--peer-root` by `benchmarks/peer_worker.py` (a child process per run), never
copied. What each figure is and how it is measured: `benchmarks/studies/peer_collection.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

from benchmarks.studies.peer_collection import BENCHMARK_DOMAINS, compare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Our run vs the TTA collection's methods, end to end, alternated.")
    parser.add_argument("--peer-root", required=True, help="the collection's classification/ folder")
    parser.add_argument("--cifar10c", required=True, help="CIFAR-10-C folder read by both sides")
    parser.add_argument("--data-root", default=os.environ.get("TTA_SURGICAL_DATA"), help="weights and CIFAR-10")
    parser.add_argument("--methods", default="tent,eta,eata,sar,deyo,roid,cotta,rotta")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-per-domain", type=int, default=1000)
    parser.add_argument("--domains", default=BENCHMARK_DOMAINS, help="comma-separated corruptions, in stream order")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (one run at a time)")
    parser.add_argument("--out", required=True, help="work folder: our run folders, worker results, logs")
    parser.add_argument("--json", default=None, help="write every run and the summary here")
    parser.add_argument(
        "--together",
        action="store_true",
        help="start the sides of a round at the same time instead of one after the other: on a machine shared with "
        "other jobs both then meet the same load (each still has --threads threads)",
    )
    parser.add_argument(
        "--baseline-src",
        default=None,
        help="also run our code from this source tree (e.g. `git archive` of the commit before a change) as a "
        "third side of every round: the before/after comparison under the same conditions",
    )
    return compare(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
