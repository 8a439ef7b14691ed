"""Judge finished runs with another collapse window or threshold, without rerunning them.

    python benchmarks/collapse_replay.py --window 1000 runs/soak/cells/*/results.jsonl

The collapse monitor is a pure function of the results lines (`tta_surgical.guards.collapse`), so replaying each
results.jsonl through a monitor with the given settings gives the batches a run with runtime.on_collapse=warn
would have flagged. Prints the flagged runs and a count; --json writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package of this checkout, installed or not

from tta_surgical.config import RuntimeConfig  # noqa: E402
from tta_surgical.guards import CollapseMonitor, replay_collapses  # noqa: E402
from tta_surgical.runfolder import peek_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    rt = RuntimeConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="results.jsonl files of finished runs")
    p.add_argument("--window", type=int, default=rt.collapse_window, help="images per window (default: the shipped)")
    p.add_argument("--share", type=float, default=rt.collapse_share, help="top-class share threshold")
    p.add_argument("--entropy-ratio", type=float, default=rt.collapse_entropy_ratio, help="entropy ratio threshold")
    p.add_argument("--json", type=Path, default=None, help="also write {file: flagged batches} here")
    a = p.parse_args(argv)
    flagged: dict[str, list[int]] = {}
    for f in a.results:
        monitor = CollapseMonitor(window_images=a.window, share=a.share, entropy_ratio=a.entropy_ratio)
        batches = replay_collapses(peek_jsonl(f), monitor)
        if batches:
            flagged[str(f)] = batches
            print(f"{f}: {len(batches)} collapse(s), first at batch {batches[0]}")
    print(f"{len(flagged)} of {len(a.results)} runs flagged (window {a.window} images, share {a.share}, "
          f"entropy ratio {a.entropy_ratio})")
    if a.json:
        a.json.write_text(json.dumps(flagged, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
