"""Wall time of one sweep with 1 and N local workers (or Ray), and a check that the merged results agree
(`benchmarks/sweep_wall.py`).

Each setting runs the whole sweep from scratch into its own temporary folder (nothing reused), so the times
include every worker's start-up (importing torch, building the model and the stream). 1 worker runs the cells
in this process; N > 1 starts N worker processes, each with resources.num_cpus torch threads. The merged
`sweep.jsonl` of every setting must be byte-identical. Also reported: the sum of the per-cell wall times
(timings.json), so speed-up = wall(1) / wall(N) and per-cell cost can be read off.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tta_surgical.data.context import DataContext
from tta_surgical.fileio import atomic_write_text
from tta_surgical.provenance import provenance

__all__ = ["time_sweep"]


def time_sweep(
    file: str | Path,
    *,
    overrides: Sequence[str] = (),
    workers: Sequence[int] = (1, 2),
    launcher: str = "local",
    data_root: str | None = None,
    json_path: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the sweep `file` once per worker count; return (and write to `json_path`) the walls and whether the
    merged `sweep.jsonl` files are identical. A failed cell raises RuntimeError naming it and its log."""
    from tta_surgical.sweep import load_sweep, run_sweep

    say = log or (lambda _: None)
    sweep = load_sweep(file, overrides=list(overrides))
    data = DataContext.resolve(data_root if data_root and Path(data_root).is_dir() else None)
    say(f"sweep {sweep.name}: {len(sweep.cells)} cells, launcher {launcher}, workers {list(workers)}")
    rows, merged, summary_md = [], {}, ""
    with tempfile.TemporaryDirectory(prefix="sweep_wall_") as tmp:
        for n in workers:
            out = Path(tmp) / f"w{n}"
            t0 = time.perf_counter()
            result = run_sweep(sweep, out, launcher=launcher, max_parallel=n, data=data, progress=False)
            wall = time.perf_counter() - t0
            if not result.ok:
                failed = "; ".join(f"cell {f.cell.index}: {f.reason} (log {f.log})" for f in result.failed)
                raise RuntimeError(f"{len(result.failed)} cell(s) failed with {n} worker(s): {failed}")
            timings = json.loads((out / "timings.json").read_text())
            merged[n] = (out / "sweep.jsonl").read_bytes()
            rows.append({"workers": n, "wall_s": round(wall, 2), "cell_wall_s_total": timings["cell_wall_s_total"],
                         "cell_wall_s_mean": timings["cell_wall_s_mean"]})  # fmt: skip
            say(f"  {n} worker(s): {wall:7.1f} s wall, {timings['cell_wall_s_mean']:.2f} s per cell inside its "
                f"worker, {len(sweep.cells) / wall:.2f} cells/s")  # fmt: skip
            summary_md = summary_md or (out / "summary.md").read_text()
    identical = len(set(merged.values())) == 1
    for r in rows:
        r["speedup_vs_first"] = round(rows[0]["wall_s"] / r["wall_s"], 2)
    say(f"merged sweep.jsonl identical across settings: {identical}")
    say(summary_md)
    payload = {
        "sweep": str(file),
        "overrides": list(overrides),
        "n_cells": len(sweep.cells),
        "launcher": launcher,
        "results": rows,
        "merged_identical": identical,
        **provenance("cuda" if torch.cuda.is_available() else None),
    }
    if json_path:
        atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
        say(f"written {json_path}")
    return payload
