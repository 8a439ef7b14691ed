"""Sweeps: many cells (corruptions x blocks x methods x seeds ...) of `run` or `finetune`, locally or on Ray.

    from tta_surgical.sweep import load_sweep, run_sweep
    sweep = load_sweep("configs/sweeps/online_blocks_small.yaml")     # validates every cell first
    result = run_sweep(sweep, "runs/online_blocks_small", max_parallel=2, resume=True)

Modules: `spec` (the sweep file -> validated cells with stable ids), `cell` (the cell runner and the wrapper
every launcher calls), `launch` (local inline / local worker processes / Ray), `merge` (sweep.jsonl,
summary.md, timings.json), `worker` (the local worker process). Output layout:

    OUT/plan.json            the expanded cells: index, id, axis values
    OUT/cells/<id>/          one folder per cell: the run's own files + cell.log, DONE, timing.json
    OUT/sweep.jsonl          one line per cell, in sweep order: id, axis values, key metrics (deterministic)
    OUT/summary.md           the same as tables, with means over the seed axes (deterministic)
    OUT/timings.json         per-cell wall time, attempts, throughput (varies run to run)
"""

from .cell import DONE_FILE, LOG_FILE, execute_cell, key_metrics, read_done, run_cell
from .launch import LAUNCHERS, Failure, SweepResult, gpu_ids, run_sweep
from .merge import SUMMARY_MD, SWEEP_JSONL, TIMINGS_JSON, cell_dir, merge, merged_lines, summary_markdown
from .spec import Cell, Resources, Sweep, cell_id, check_cells, format_value, load_sweep, sweep_from_dict

__all__ = [
    "DONE_FILE",
    "LAUNCHERS",
    "LOG_FILE",
    "SUMMARY_MD",
    "SWEEP_JSONL",
    "TIMINGS_JSON",
    "Cell",
    "Failure",
    "Resources",
    "Sweep",
    "SweepResult",
    "cell_dir",
    "cell_id",
    "check_cells",
    "execute_cell",
    "format_value",
    "gpu_ids",
    "key_metrics",
    "load_sweep",
    "merge",
    "merged_lines",
    "read_done",
    "run_cell",
    "run_sweep",
    "summary_markdown",
    "sweep_from_dict",
]
