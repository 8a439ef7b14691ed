"""`tta-surgical sweep`: run a sweep file's cells (locally or on a Ray cluster) and merge their results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import add_data_root, add_frost_dir, data_context

HELP = "run a sweep (corruptions x blocks x methods x seeds ...) locally or on a Ray cluster, resumably"
DESCRIPTION = (
    "Expand a sweep file (configs/sweeps/*.yaml: a base config, overrides, axes or cells, resources, retries) "
    "into cells, validate every cell, run each into OUT/cells/<id>/ (id = hash of its resolved config) and "
    "merge them into OUT/sweep.jsonl and OUT/summary.md (deterministic: the same bytes whichever launcher ran "
    "them) and OUT/timings.json. --resume skips finished cells and continues interrupted ones. "
    "key=value arguments (anywhere after the command) override every cell's config (not the keys the sweep "
    "varies), e.g. runtime.device=cpu."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="sweep YAML (e.g. configs/sweeps/online_blocks_small.yaml)")
    parser.add_argument(
        "--launcher",
        choices=("local", "ray"),
        default="local",
        help="local: this machine (in this process, or worker processes with --max-parallel / several GPUs); "
        "ray: one Ray task per cell (needs pip install 'tta-surgical[ray]')",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        default=None,
        help="Ray cluster to join (HEAD_IP:6379 or auto); default: start a local Ray instance for this sweep",
    )
    parser.add_argument(
        "--max-parallel",
        type=int,
        metavar="N",
        default=None,
        help="local: N worker processes (default: one per GPU when several exist, else 1 = in this process); "
        "ray: CPUs of the on-demand local cluster, or a cap on cells in flight on --address",
    )
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/sweep-<file-stem>)")
    parser.add_argument("--resume", action="store_true", help="skip finished cells, continue interrupted ones")
    parser.add_argument(
        "--busy-wait",
        type=float,
        metavar="S",
        default=None,
        help="seconds a cell waits for another live process that holds its folder (e.g. an attempt of an earlier "
        "session still finishing) before it is reported busy and left for a later --resume (default 60)",
    )
    add_data_root(parser, note="; on a Ray cluster it must exist at this path on every node")
    add_frost_dir(parser)
    parser.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar over cells")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides for every cell, anywhere after the command, e.g. stream.n_examples=100",
    )


def _dry_run(sweep, out: Path) -> int:
    from ..sweep import cell_dir, format_value, read_done

    print(
        f"sweep {sweep.name} ({sweep.kind}): {len(sweep.cells)} cells, retries {sweep.retries}, per cell "
        f"{sweep.resources.num_cpus:g} CPU / {sweep.resources.num_gpus:g} GPU; output {out}/"
    )
    print(f"base {sweep.base}" + (f", stream {sweep.stream}" if sweep.stream else ""))
    n_done = 0
    for cell in sweep.cells:
        done = read_done(cell_dir(out, cell)) is not None
        n_done += done
        values = "  ".join(f"{k}={format_value(v)}" for k, v in cell.axes.items())
        print(f"  {cell.index:4d}  {cell.id}  {'done ' if done else '     '} {values}")
    left = len(sweep.cells) - n_done
    print(f"{n_done} finished, {left} to run")
    mean = _mean_cell_seconds(out)
    if mean is not None and left:
        print(
            f"estimated cost: {left} cells x {mean:.1f} s (mean wall time of the finished cells, timings.json) = "
            f"{left * mean / 3600:.2f} worker-hours; divide by the number of parallel workers"
        )
    return 0


def _mean_cell_seconds(out: Path) -> float | None:
    """The mean per-cell wall time recorded in OUT/timings.json by an earlier session, if any."""
    try:
        value = json.loads((out / "timings.json").read_text(encoding="utf-8")).get("cell_wall_s_mean")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def main(args: argparse.Namespace) -> int:
    from ..sweep import load_sweep, run_sweep
    from ..sweep.cell import BUSY_WAIT_S

    overrides = list(args.overrides or [])
    busy_wait = BUSY_WAIT_S if args.busy_wait is None else args.busy_wait
    if busy_wait < 0:
        raise ValueError(f"--busy-wait must be >= 0 seconds, got {args.busy_wait}")
    sweep = load_sweep(args.file, overrides=overrides)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.file).stem}"
    if args.dry_run:
        return _dry_run(sweep, out)
    if args.address and args.launcher != "ray":
        raise ValueError("--address is for --launcher ray")
    try:
        result = run_sweep(
            sweep,
            out,
            launcher=args.launcher,
            max_parallel=args.max_parallel,
            address=args.address,
            resume=args.resume,
            data=data_context(args),
            progress=not args.no_progress,
            busy_wait_s=busy_wait,
        )
    except ImportError as err:
        print(f"tta-surgical sweep: error: {err}", file=sys.stderr)
        return 2
    busy = f", {len(result.busy)} held by another process" if result.busy else ""
    print(
        f"{result.n_cells} cells: {len(result.ran)} run now, {len(result.skipped)} already finished, "
        f"{len(result.failed)} failed{busy} ({result.wall_s:.1f} s)"
    )
    print(f"results in {out}/ (sweep.jsonl, summary.md, timings.json, cells/<id>/)")
    if result.busy:
        print("cells not run, their folder held by another live process (rerun with --resume once it has ended):",
              file=sys.stderr)  # fmt: skip
        for f in result.busy:
            print(f"  cell {f.cell.index} {f.cell.id} ({f.cell.label()}): {f.reason}", file=sys.stderr)
    if result.failed:
        print("failed cells (rerun with --resume after fixing; finished cells are kept):", file=sys.stderr)
        for f in result.failed:
            print(
                f"  cell {f.cell.index} {f.cell.id} ({f.cell.label()}): {f.reason}\n    log: {f.log}", file=sys.stderr
            )
    return 0 if result.ok else 1
