"""Tabulate the drift guard over finished run folders: error per round, alarms, false alarms, cost, signal profile.

    python benchmarks/guard_report.py /work/runs-21-guard/soak/norm /work/runs-21-guard/soak/surgical_all_reset ...

Prints a Markdown table (benchmarks/RESULTS.md section 16); --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

from benchmarks.studies.guard_report import guard_markdown, guard_rows  # noqa: E402
from tta_surgical.config import RuntimeConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="finished run folders (summary.json + results.jsonl)")
    p.add_argument("--reference", default="norm", help="the run (folder name prefix) whose last round is the bar")
    p.add_argument("--window", type=int, default=RuntimeConfig().guard_window, help="images per profile window")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    rows = guard_rows(a.folders, a.window)
    print(guard_markdown(rows, a.reference))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
