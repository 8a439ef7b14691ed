"""The method x adapted-blocks table of a sweep (`configs/sweeps/methods_blocks.yaml`): one row per method, one
column per (protocol, selection), the online error of each cell.

Reads the sweep folder's `plan.json` (each cell's axes: `base` = the method's config, `stream.reset`,
`method.blocks`) and every finished cell's `summary.json`; cells not finished are left blank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tta_surgical.tables import bold_best, fmt, markdown_table

from .sweep_cells import finished_cells

__all__ = ["grid_markdown", "grid_rows"]

PROTOCOLS = {"never": "continual", "per_domain": "reset"}
SELECTIONS = ("default", "block1", "block2", "all")


def _selection(axes: dict[str, Any]) -> str:
    blocks = axes.get("method.blocks")
    if blocks is None:
        return "default"
    return "+".join(blocks) if isinstance(blocks, list) else str(blocks)


def grid_rows(sweep_out: str | Path) -> list[dict[str, Any]]:
    """One record per finished cell: method, protocol, selection, errors and the method's counters."""
    rows = []
    for cell, s in finished_cells(sweep_out):
        axes = cell["axes"]
        rows.append(
            {
                "method": s["method"],
                "protocol": PROTOCOLS.get(axes.get("stream.reset", "never"), axes.get("stream.reset")),
                "selection": _selection(axes),
                "online_error": s["online_error"],
                "mean_error": s["mean_error"],
                "n_filtered": s.get("n_filtered", 0),
                "n_method_resets": s.get("n_method_resets", 0),
                "n_collapse_warnings": s.get("n_collapse_warnings", 0),
                "adapted_numel": s.get("adapted_numel", 0),
                "images_per_s": s.get("images_per_s"),
                "n_images": s["n_images"],
            }
        )
    return rows


def grid_markdown(rows: list[dict[str, Any]], protocol: str) -> str:
    """Online error (%) per method (rows) and selection (columns) for one protocol; the best of each row in bold,
    the selection a method's authors chose marked `default`."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["protocol"] == protocol))
    body = []
    for m in methods:
        cells = {r["selection"]: r["online_error"] for r in rows if r["method"] == m and r["protocol"] == protocol}
        values = [cells.get(sel) for sel in SELECTIONS]
        texts = bold_best(values, [fmt(v, 2) if v is not None else "" for v in values])
        body.append([m, *texts])
    return markdown_table(["method", *SELECTIONS], body)
