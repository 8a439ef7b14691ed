"""Fixed step-cost tables (`runtime.cost_mode: fixed`) from `tta-surgical bench --interleave` runs.

A label's cost is its p50 step latency over plain inference's p50 in the same run, model, batch and precision (bench's
`ratio_to_inference`); a label timed in several runs gets the median of its ratios, so a slow method (CoTTA, MEMO)
can be timed in a shorter run of its own beside `inference`. The table's header names the bench files and their
machine, date and load, so every number can be traced to its raw output.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

# Ratio baselines and reference loops: measured by bench, never a method a run can be given.
NOT_METHODS = frozenset({"inference", "reference_tent", "reference_tent_twin"})


def read_bench(path: Path) -> tuple[Path, dict[str, Any]]:
    """A bench folder or its bench.json, parsed; a clear error when the run is absent."""
    f = path / "bench.json" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no bench.json (run `tta-surgical bench --interleave --out {path}` first)")
    return f, json.loads(f.read_text(encoding="utf-8"))


def step_costs(runs: list[dict[str, Any]], model: str | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """({label: median ratio to inference, 2 decimals}, {label: every ratio}) over bench results for one model."""
    seen: dict[str, list[float]] = {}
    models = {c["model"] for run in runs for c in run["cells"] if model is None or c["model"] == model}
    if len(models) > 1:
        raise ValueError(f"the bench runs hold several models ({', '.join(sorted(models))}); pick one")
    for run in runs:
        for c in run["cells"]:
            r = c.get("ratio_to_inference")
            if (model is None or c["model"] == model) and c["method"] not in NOT_METHODS and r and not c.get("error"):
                seen.setdefault(c["method"], []).append(float(r))
    if not seen:
        raise ValueError(f"no method cell with a ratio to inference{f' for {model}' if model else ''}")
    return {k: round(statistics.median(v), 2) for k, v in seen.items()}, seen


def cost_table_yaml(
    files: list[Path], runs: list[dict[str, Any]], model: str | None = None, note: str = ""
) -> str:
    """The YAML a run or `tta-surgical frontier --base` takes, with a header saying where each number came from
    (`note`: what the table describes, in the user's words, first)."""
    table, seen = step_costs(runs, model)
    lines = [
        *note.splitlines(),
        "Fixed step costs for runs under time pressure (runtime.cost_mode=fixed): one step as a multiple of a plain",
        "forward of the same batch (p50 over p50 in interleaved `tta-surgical bench` runs; median over runs).",
        "Written by benchmarks/step_costs.py from:",
    ]
    for f, run in zip(files, runs):
        m = run.get("meta", {})
        lines.append(
            f"  {f}: {m.get('date', '?')}, device {m.get('device', '?')}, torch "
            f"{m.get('versions', {}).get('torch', '?')}, threads {m.get('threads', '?')}, "
            f"load {m.get('machine', {}).get('load_avg_1m', '?')}"
        )
    several = [f"  {k}: {', '.join(f'{r:.2f}' for r in v)}" for k, v in seen.items() if len(v) > 1]
    if several:
        lines += ["Labels timed in several runs (every ratio, in the order above):", *several]
    return "".join(f"# {line}\n" for line in lines) + yaml.safe_dump(
        {"runtime": {"cost_mode": "fixed", "cost_ratio": table}}, sort_keys=False
    )
