"""Wall time of one sweep with 1 and N local workers (or Ray), and a check that the merged results agree.

    python benchmarks/sweep_wall.py                                   # the demo sweep, 1 and 2 workers
    python benchmarks/sweep_wall.py --workers 1 2 4 --json benchmarks/out/sweep_wall.json
    python benchmarks/sweep_wall.py --launcher ray --workers 2        # a local Ray instance with 2 CPUs
    python benchmarks/sweep_wall.py FILE KEY=VALUE ...                 # another sweep, overrides for every cell

Each setting runs the whole sweep from scratch into its own temporary folder (nothing reused), so the times
include every worker's start-up (importing torch, building the model and the stream). 1 worker runs the cells
in this process; N > 1 starts N worker processes, each with resources.num_cpus torch threads. The merged
`sweep.jsonl` of every setting must be byte-identical (the script exits 1 otherwise). Also reported: the sum of
the per-cell wall times (timings.json), so speed-up = wall(1) / wall(N) and per-cell cost can be read off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from tta_surgical.bench import git_revision

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", default=str(REPO / "configs" / "sweeps" / "online_blocks_small.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every cell")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--launcher", choices=("local", "ray"), default="local")
    parser.add_argument(
        "--data-root", default=os.environ.get("TTA_SURGICAL_DATA") or str(REPO.parent / "shared" / "data")
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)

    import torch

    from tta_surgical.corruptions.textures import default_frost_dir
    from tta_surgical.sweep import load_sweep, run_sweep

    overrides = [o for o in args.overrides if "=" in o]
    sweep = load_sweep(args.file, overrides=overrides)
    data_root = args.data_root if args.data_root and Path(args.data_root).is_dir() else None
    frost = default_frost_dir(None, data_root)
    print(f"sweep {sweep.name}: {len(sweep.cells)} cells, launcher {args.launcher}, workers {args.workers}")
    rows, merged = [], {}
    with tempfile.TemporaryDirectory(prefix="sweep_wall_") as tmp:
        for n in args.workers:
            out = Path(tmp) / f"w{n}"
            t0 = time.perf_counter()
            result = run_sweep(
                sweep,
                out,
                launcher=args.launcher,
                max_parallel=n,
                data_root=data_root,
                frost_dir=frost,
                progress=False,
            )
            wall = time.perf_counter() - t0
            if not result.ok:
                for f in result.failed:
                    print(f"cell {f.cell.index} failed: {f.reason} (log {f.log})", file=sys.stderr)
                return 1
            timings = json.loads((out / "timings.json").read_text())
            merged[n] = (out / "sweep.jsonl").read_bytes()
            rows.append(
                {
                    "workers": n,
                    "wall_s": round(wall, 2),
                    "cell_wall_s_total": timings["cell_wall_s_total"],
                    "cell_wall_s_mean": timings["cell_wall_s_mean"],
                }
            )
            print(
                f"  {n} worker(s): {wall:7.1f} s wall, {timings['cell_wall_s_mean']:.2f} s per cell inside its "
                f"worker, {len(sweep.cells) / wall:.2f} cells/s"
            )
            if n == args.workers[0]:
                (Path(tmp) / "summary.md").write_text((out / "summary.md").read_text())
        summary_md = (Path(tmp) / "summary.md").read_text()
    identical = len(set(merged.values())) == 1
    base = rows[0]["wall_s"]
    for r in rows:
        r["speedup_vs_first"] = round(base / r["wall_s"], 2)
    print(f"merged sweep.jsonl identical across settings: {identical}")
    print(summary_md)
    payload = {
        "sweep": str(args.file),
        "overrides": overrides,
        "n_cells": len(sweep.cells),
        "launcher": args.launcher,
        "results": rows,
        "merged_identical": identical,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git": git_revision(),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"written {args.json}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
