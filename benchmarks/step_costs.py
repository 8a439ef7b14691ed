"""Write a fixed step-cost table (`runtime.cost_mode: fixed`) from `tta-surgical bench --interleave` runs.

    tta-surgical bench --models resnet56 --methods inference,tent,tent:block1 --batch-sizes 200 --interleave \
        --threads 1 --device cpu --out runs/bench56
    python benchmarks/step_costs.py runs/bench56 runs/bench56_slow --model resnet56 \
        --out configs/time/cpu_step_costs_resnet56.yaml

Each label's cost is its p50 step over plain inference's p50 in the same run (median over the runs that timed it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout: its package (installed or not) and benchmarks.studies

from benchmarks.studies.step_costs import cost_table_yaml, read_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bench", nargs="+", type=Path, help="bench output folders or their bench.json files")
    p.add_argument("--model", default=None, help="the model whose cells to use (needed when the runs hold several)")
    p.add_argument("--note", default="", help="what the table describes (machine, model, batch), first in its header")
    p.add_argument("--out", type=Path, default=None, help="write the YAML here (default: print it)")
    a = p.parse_args(argv)
    try:
        read = [read_bench(path) for path in a.bench]
        text = cost_table_yaml([f for f, _ in read], [run for _, run in read], a.model, a.note)
    except (FileNotFoundError, ValueError) as e:
        print(f"step_costs: {e}", file=sys.stderr)
        return 2
    if a.out is None:
        sys.stdout.write(text)
    else:
        a.out.write_text(text, encoding="utf-8")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
