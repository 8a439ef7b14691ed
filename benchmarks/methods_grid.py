"""The method x adapted-blocks tables (issue 10): online error per method and selection, continual and reset.

    tta-surgical sweep configs/sweeps/methods_blocks.yaml --out runs/methods_blocks --max-parallel 2
    python benchmarks/methods_grid.py --sweep-out runs/methods_blocks

Writes grid.json and grid.md to --out (default: the sweep folder) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

from benchmarks.studies.grid import grid_markdown, grid_rows  # noqa: E402
from tta_surgical.fileio import atomic_write_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep-out", required=True, metavar="DIR", help="the methods_blocks sweep's output folder")
    p.add_argument(
        "--out", metavar="DIR", default=None, help="where to write grid.json / grid.md (default --sweep-out)"
    )
    a = p.parse_args(argv)
    rows = grid_rows(a.sweep_out)
    if not rows:
        raise SystemExit(f"no finished cells in {a.sweep_out}")
    text = "\n\n".join(f"{proto}:\n\n{grid_markdown(rows, proto)}" for proto in ("continual", "reset"))
    out = Path(a.out or a.sweep_out)
    atomic_write_text(out / "grid.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "grid.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
