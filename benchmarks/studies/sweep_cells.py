"""The finished cells of a sweep folder, for the reports that tabulate a sweep (`grid`, `soak`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["finished_cells"]


def finished_cells(sweep_out: str | Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(cell, summary) for every cell of `plan.json` whose `cells/<id>/summary.json` exists, in plan order; cells
    not finished (still running, failed) are skipped, so a report can be drawn while the sweep runs."""
    out = Path(sweep_out)
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    for cell in plan["cells"]:
        path = out / "cells" / cell["id"] / "summary.json"
        if path.is_file():
            yield cell, json.loads(path.read_text(encoding="utf-8"))
