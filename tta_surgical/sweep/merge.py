"""Merge finished cells into `sweep.jsonl`, `summary.md` and `timings.json`.

The merged files depend only on the sweep (cell order, axis values) and each cell's `DONE` record, never on
which launcher ran the cells or in which order they finished: no timestamps, hosts or wall times (those go
to `timings.json`), so two launchers give byte-identical `sweep.jsonl` and `summary.md`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..provenance import provenance
from ..tables import bold_best, escape, fmt, markdown_table, mean_sd
from .cell import TIMING_FILE, atomic_write_text, read_done
from .spec import Cell, Sweep, format_value

__all__ = ["SUMMARY_MD", "SWEEP_JSONL", "TIMINGS_JSON", "cell_dir", "merge", "merged_lines", "summary_markdown"]

SWEEP_JSONL = "sweep.jsonl"
SUMMARY_MD = "summary.md"
TIMINGS_JSON = "timings.json"
CELLS_DIR = "cells"


def cell_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / CELLS_DIR / cell.id


def merged_lines(sweep: Sweep, out: Path, failed: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One record per cell in sweep order: cell index, id, status (done / failed / pending), axes, metrics."""
    failed = set(failed)
    lines = []
    for cell in sweep.cells:
        done = read_done(cell_dir(out, cell))
        status = "done" if done is not None else "failed" if cell.id in failed else "pending"
        lines.append(
            {
                "cell": cell.index,
                "id": cell.id,
                "status": status,
                "axes": cell.axes,
                "metrics": done.get("metrics") if done is not None else None,
            }
        )
    return lines


def _cell_text(v: Any) -> str:
    return escape(format_value(v))


def _metric_columns(sweep: Sweep, lines: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any, bool]]:
    """(column title, getter, lower is better) for the kind of the sweep."""
    if sweep.kind == "run":
        return [
            ("mean error %", lambda m: m.get("mean_error"), True),
            ("online error %", lambda m: m.get("online_error"), True),
        ]
    options: list[str] = []
    for line in lines:
        for o in (line["metrics"] or {}).get("mean_accuracy") or {}:
            if o not in options:
                options.append(o)
    return [(f"acc % {o}", (lambda m, o=o: (m.get("mean_accuracy") or {}).get(o)), False) for o in options]


def summary_markdown(sweep: Sweep, lines: Sequence[Mapping[str, Any]]) -> str:
    """The sweep as Markdown: a status line, one row per cell, and means over the seed axes when there are any."""
    n = len(lines)
    counts = {s: sum(1 for x in lines if x["status"] == s) for s in ("done", "failed", "pending")}
    parts = [
        f"# Sweep {sweep.name} ({sweep.kind})",
        f"{n} cells: {counts['done']} done, {counts['failed']} failed, {counts['pending']} not run.",
    ]
    columns = _metric_columns(sweep, lines)
    keys = list(sweep.axis_keys)
    rows = []
    for line in lines:
        m = line["metrics"] or {}
        axes = [_cell_text(line["axes"][k]) if k in line["axes"] else "" for k in keys]
        status = [] if line["status"] == "done" else [f"({line['status']})"]
        rows.append([str(line["cell"]), f"`{line['id']}`", *axes, *[fmt(get(m)) for _, get, _ in columns], *status])
    width = 2 + len(keys) + len(columns)
    rows = [r + [""] * (width + 1 - len(r)) for r in rows]
    header = ["#", "id", *keys, *[c for c, _, _ in columns], "note"]
    parts.append(markdown_table(header, rows, left=2 + len(keys), right=len(columns)))

    seeds = [k for k in sweep.seed_axes]
    group_keys = [k for k in keys if k not in seeds]
    if seeds and columns:
        groups: dict[str, dict[str, Any]] = {}
        for line in lines:
            if line["status"] != "done":
                continue
            key = json.dumps([line["axes"].get(k) for k in group_keys])
            g = groups.setdefault(key, {"axes": [line["axes"].get(k) for k in group_keys], "m": []})
            g["m"].append(line["metrics"] or {})
        title, get, lower = columns[0]
        agg_rows = []
        for g in groups.values():
            vals = [float(v) for v in (get(m) for m in g["m"]) if v is not None]
            if not vals:
                continue
            mean, sd = mean_sd(vals)
            g["mean"] = mean
            agg_rows.append([*(_cell_text(v) for v in g["axes"]), fmt(mean), fmt(sd), str(len(vals))])
        parts.append(f"## {title} over {', '.join(seeds)} (mean, sample sd, n)")
        parts.append(markdown_table([*group_keys, title, "sd", "n"], agg_rows, left=len(group_keys)))
        if len(group_keys) == 2:
            parts.append(_pivot(group_keys, groups.values(), title, lower))
    return "\n\n".join(parts) + "\n"


def _pivot(group_keys: list[str], groups: Iterable[Mapping[str, Any]], title: str, lower: bool) -> str:
    """Seed means as a grid: first axis down, second across; the best of each row in bold."""
    rows_v: list[str] = []
    cols_v: list[str] = []
    grid: dict[tuple[str, str], float] = {}
    for g in groups:
        if "mean" not in g:
            continue
        r, c = _cell_text(g["axes"][0]), _cell_text(g["axes"][1])
        rows_v += [r] if r not in rows_v else []
        cols_v += [c] if c not in cols_v else []
        grid[(r, c)] = g["mean"]
    out_rows = []
    for r in rows_v:
        vals = [grid.get((r, c)) for c in cols_v]
        out_rows.append([r, *bold_best(vals, [fmt(v) for v in vals], lower=lower)])
    head = f"## {title}: {group_keys[0]} (rows) x {group_keys[1]} (columns), mean over seeds"
    return head + "\n\n" + markdown_table([group_keys[0], *cols_v], out_rows, left=1)


def merge(
    sweep: Sweep, out: str | Path, *, failed: Iterable[str] = (), session: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Write OUT/sweep.jsonl, OUT/summary.md (deterministic) and OUT/timings.json; return the merged lines."""
    out = Path(out)
    lines = merged_lines(sweep, out, failed)
    text = "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines)
    atomic_write_text(out / SWEEP_JSONL, text)
    atomic_write_text(out / SUMMARY_MD, summary_markdown(sweep, lines))
    timings: dict[str, Any] = {}
    for cell in sweep.cells:
        path = cell_dir(out, cell) / TIMING_FILE
        if path.is_file():
            try:
                timings[cell.id] = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                pass
    walls = [t["wall_s"] for t in timings.values() if isinstance(t.get("wall_s"), (int, float))]
    payload = {
        "session": dict(session or {}),
        "provenance": provenance(),
        "n_cells": len(sweep.cells),
        "cell_wall_s_total": round(sum(walls), 3),
        "cell_wall_s_mean": round(sum(walls) / len(walls), 3) if walls else None,
        "cells": timings,
    }
    atomic_write_text(out / TIMINGS_JSON, json.dumps(payload, indent=1) + "\n")
    return lines
