"""The tables of benchmarks/RESULTS.md section 12 from one or more `tta-surgical frontier` folders: their points
merged (e.g. the main grid and a separate CoTTA or MEMO frontier on the same stream), the error (rank) per budget and
the gain over the reference that survives, recomputed over the union.

    python benchmarks/time_pressure_tables.py runs/frontier_r20 runs/frontier_r20_memo --reference norm \
        --plot benchmarks/figures/frontier_resnet20_cpu.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tta_surgical.studies.frontier import frontier_markdown, pareto_front, plot_frontier  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="frontier output folders (each holds frontier.json)")
    p.add_argument("--reference", default="norm")
    p.add_argument("--out", type=Path, default=None, help="also write the merged points here (JSON)")
    p.add_argument("--plot", type=Path, default=None, help="also draw the merged frontier here (PNG)")
    p.add_argument("--title", default="")
    p.add_argument("--ymin", type=float, default=None, help="lowest accuracy (%%) the plot shows")
    args = p.parse_args()
    points = []
    for folder in args.folders:
        points += json.loads((folder / "frontier.json").read_text(encoding="utf-8"))["points"]
    front = pareto_front([(q["cost_x_inference"], q["online_error"]) for q in points])
    for q, on in zip(points, front):
        q["pareto"] = on
    print(frontier_markdown(points, reference=args.reference))
    if args.out is not None:
        args.out.write_text(json.dumps({"points": points}, indent=1) + "\n")
    if args.plot is not None:
        print(f"plot: {plot_frontier(points, args.plot, args.title, args.ymin)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
