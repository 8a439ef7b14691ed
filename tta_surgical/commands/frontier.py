"""`tta-surgical frontier`: accuracy against compute per image over methods x block selections x update budgets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..fileio import atomic_write_text
from .options import add_data_root, add_frost_dir, data_context

HELP = "sweep methods x block selections x update budgets; accuracy vs cost per image with the Pareto front"
DESCRIPTION = (
    "Run every method x block selection x update budget (each a sweep cell in OUT/cells/<id>/: resumable, local "
    "workers or Ray) and write OUT/frontier.md (every point by cost, the Pareto front, the error per budget and how "
    "much of each method's gain over the reference survives), OUT/frontier.json and OUT/frontier.png (accuracy vs "
    "compute per image, x plain inference, log scale; needs matplotlib). Budgets: wait (the stream waits: the "
    "classic protocol), every:K, speed:S (a constant stream at S x plain inference, realistic protocol), queue:S, "
    "latency:MS, overhead:MS, each optionally +async. With fixed costs (runtime.cost_mode=fixed, e.g. --base "
    "configs/time/cpu_step_costs.yaml) a point whose schedule equals an earlier one's is not run again. key=value "
    "arguments override every cell."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", metavar="NAME", default=None,
                        help="registered method names, spaces or commas (default: every registered one)")  # fmt: skip
    parser.add_argument("--blocks", nargs="+", metavar="SEL", default=None,
                        help="block selections: default, auto, block names or block1+block2 (every parameter of "
                        "those blocks); default: default block1 block2 head all auto")  # fmt: skip
    parser.add_argument("--budgets", nargs="+", metavar="B", default=None,
                        help="update budgets (default: wait speed:1 speed:0.5 speed:0.25)")  # fmt: skip
    parser.add_argument("--base", metavar="FILE", default=None,
                        help="a config file under every cell (e.g. configs/time/cpu_step_costs.yaml)")  # fmt: skip
    parser.add_argument("--stream", metavar="FILE", default=None, help="stream file (default: the config's stream)")
    parser.add_argument("--reference", default="norm", help="the method whose error the gains are measured from")
    parser.add_argument("--out", metavar="DIR", default="runs/frontier", help="output folder (default runs/frontier)")
    parser.add_argument("--launcher", choices=("local", "ray"), default="local", help="as for tta-surgical sweep")
    parser.add_argument("--max-parallel", type=int, metavar="N", default=None, help="worker processes (local)")
    parser.add_argument("--address", metavar="ADDR", default=None, help="Ray cluster to join (--launcher ray)")
    parser.add_argument("--resume", action="store_true", help="skip finished points, continue interrupted ones")
    parser.add_argument("--dry-run", action="store_true", help="list the points and the runs they need; run nothing")
    parser.add_argument("--no-dedupe", action="store_true", help="run every point, also those of identical schedule")
    parser.add_argument("--no-plot", action="store_true", help="no frontier.png")
    parser.add_argument("--title", default="", help="the plot's title")
    add_data_root(parser)
    add_frost_dir(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every cell")


def _names(values: list[str] | None) -> list[str] | None:
    from ..bench import split_args

    items = split_args(values)
    return list(items) if items is not None else None


def main(args: argparse.Namespace) -> int:
    from ..methods import METHODS
    from ..studies.frontier import (
        DEFAULT_BUDGETS,
        DEFAULT_SELECTIONS,
        collect_points,
        frontier_markdown,
        plan_frontier,
        plot_frontier,
    )
    from ..sweep import run_sweep

    data = data_context(args)
    plan = plan_frontier(
        _names(args.methods) or list(METHODS),
        _names(args.blocks) or list(DEFAULT_SELECTIONS),
        _names(args.budgets) or list(DEFAULT_BUDGETS),
        base=Path(args.base) if args.base else None,
        stream=Path(args.stream) if args.stream else None,
        overrides=list(args.overrides or []),
        data=data,
        dedupe=not args.no_dedupe,
    )
    out = Path(args.out)
    for note in plan.skipped:
        print(f"skipped: {note}", file=sys.stderr)
    n_twins = sum(e.same_schedule_as is not None for e in plan.entries)
    print(f"{len(plan.entries)} points, {len(plan.sweep.cells)} runs ({n_twins} share an earlier point's schedule)")
    if args.dry_run:
        for e in plan.entries:
            print(f"  {e.cell_id}  {e.label}" + (f"  (= {e.same_schedule_as})" if e.same_schedule_as else ""))
        return 0
    result = run_sweep(
        plan.sweep, out, launcher=args.launcher, max_parallel=args.max_parallel, address=args.address,
        resume=args.resume, data=data,
    )  # fmt: skip
    points = collect_points(plan, out)
    atomic_write_text(out / "frontier.json", json.dumps({"points": points, "skipped": plan.skipped}, indent=1) + "\n")
    text = frontier_markdown(points, reference=args.reference)
    atomic_write_text(out / "frontier.md", text)
    print(text)
    if not args.no_plot:
        try:
            print(f"plot: {plot_frontier(points, out / 'frontier.png', args.title)}")
        except ImportError as err:
            print(f"no plot: {err}", file=sys.stderr)
    if result.failed:
        print(f"{len(result.failed)} runs failed; rerun with --resume (see OUT/cells/<id>/cell.log)", file=sys.stderr)
        return 1
    return 0
