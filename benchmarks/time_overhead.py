"""Overhead of the time machinery on the classic (waiting) protocol: interleaved end-to-end runs of the commit before
it (`old`), this tree with it off (the default) and on (`runtime.record_times=true`), plus its bookkeeping per batch.

    git archive f095aed | tar -x -C /tmp/old      # a tree without the machinery
    python benchmarks/time_overhead.py --old-src /tmp/old --rounds 3 --n-per-corruption 200 \
        --out runs/time_overhead.json

What is measured and how: `benchmarks/studies/time_overhead.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.studies.time_overhead import bookkeeping_us_per_batch, time_overhead  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-src", type=Path, default=None, help="a source tree without the machinery (optional)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tent.yaml")
    p.add_argument("--stream", type=Path, default=REPO / "streams" / "cifar10c_continual.yaml")
    p.add_argument("--n-per-corruption", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=os.environ.get("TTA_SURGICAL_DATA"))
    p.add_argument("--out", type=Path, default=Path("runs/time_overhead.json"))
    args = p.parse_args()
    variants = {"off": (REPO, []), "on": (REPO, ["runtime.record_times=true"])}
    if args.old_src is not None:
        variants = {"old": (args.old_src, []), **variants}
    overrides = [f"stream.n_examples={args.n_per_corruption}", f"stream.batch_size={args.batch_size}"]
    result = time_overhead(variants, config=args.config, stream=args.stream, overrides=overrides, rounds=args.rounds,
                           data_root=args.data_root, threads=args.threads)  # fmt: skip
    result["bookkeeping_us_per_batch"] = bookkeeping_us_per_batch()
    result["settings"] = {"config": str(args.config), "stream": str(args.stream), "overrides": overrides,
                          "threads": args.threads}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("variant  loop s (mean, sd)  steps s (mean, sd)  outside steps ms/batch (mean, sd)  error %")
    for name, v in result["variants"].items():
        loop, step, out = v["loop_s"], v["step_s"], v["outside_steps_ms_per_batch"]
        same = "" if v["identical_error"] else " (varies)"
        print(f"{name:7s}  {loop['mean']:.2f}, {loop['sd'] or 0:.2f}   {step['mean']:.2f}, {step['sd'] or 0:.2f}   "
              f"{out['mean']:.1f}, {out['sd'] or 0:.1f}   {v['online_error']:.2f}{same}")  # fmt: skip
    print("bookkeeping per batch (us):", result["bookkeeping_us_per_batch"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
