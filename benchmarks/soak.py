"""Tabulate and plot the long soak (`configs/sweeps/soak.yaml`): online error per round, per configuration.

    tta-surgical sweep configs/sweeps/soak.yaml --out runs/soak --max-parallel 2
    python benchmarks/soak.py --sweep-out runs/soak --plot

Writes soak.json, soak.md (and soak.png) to --out (default: the sweep folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

from benchmarks.studies.soak import plot_soak, soak_markdown, soak_rows  # noqa: E402
from tta_surgical.fileio import atomic_write_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep-out", required=True, metavar="DIR", help="the soak sweep's output folder")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write soak.json/md/png (default --sweep-out)")
    p.add_argument("--reference", default="norm", help="the config whose last round is the bar (default norm)")
    p.add_argument("--plot", action="store_true", help="also write soak.png (needs matplotlib)")
    a = p.parse_args(argv)
    out = Path(a.out or a.sweep_out)
    rows = soak_rows(a.sweep_out)
    if not rows:
        raise SystemExit(f"no finished cells in {a.sweep_out}")
    table = soak_markdown(rows, a.reference)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "soak.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "soak.md", table + "\n")
    print(table)
    if a.plot:
        print(f"plot: {plot_soak(rows, out / 'soak.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
