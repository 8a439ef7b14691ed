"""Asynchronous adaptation against synchronous steps, measured on this device: the same as-fast-as-possible stream,
interleaved runs in fresh processes. Synchronous: every batch waits for its update (predict, then adapt).
Asynchronous (`runtime.async_adapt`): every batch is predicted at once by the last finished update's weights while
the next update runs in a worker thread (on a GPU, its own CUDA stream).

    python benchmarks/time_async.py --rounds 2 --n-per-corruption 200 --threads 2 --out runs/time_async.json
    python benchmarks/time_async.py --device cuda --n-per-corruption 1000 --out OUT/time_async.json   # on a GPU

Per variant: images/s end to end (images / the loop's wall time, data generation included, the same for both), the
share of batches adapted, the response latency p50 / p95 (the run's clock: measured steps for the synchronous run,
the real clock for the asynchronous one) and the online error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.studies.time_overhead import interleaved_runs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tent.yaml")
    p.add_argument("--stream", type=Path, default=REPO / "streams" / "cifar10c_continual.yaml")
    p.add_argument("--n-per-corruption", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    p.add_argument("--async-threads", type=int, default=None,
                   help="torch threads of the asynchronous process (default --threads; its two Python threads each "
                   "use them, so 1 gives it as many CPU threads as a synchronous run with 2)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides (both variants)")
    p.add_argument("--data-root", default=os.environ.get("TTA_SURGICAL_DATA"))
    p.add_argument("--out", type=Path, default=Path("runs/time_async.json"))
    args = p.parse_args()
    variants = {"sync": (REPO, ["runtime.record_times=true"]), "async": (REPO, ["runtime.async_adapt=true"])}
    overrides = [f"stream.n_examples={args.n_per_corruption}", *args.set]
    runs = interleaved_runs(variants, config=args.config, stream=args.stream, overrides=overrides, rounds=args.rounds,
                            data_root=args.data_root, threads=args.threads, device=args.device,
                            threads_of={"async": args.async_threads or args.threads})  # fmt: skip
    table = {}
    for name, items in runs.items():
        rows = []
        for r in items:
            s = r["summary"]
            t = s["time"]
            rows.append({"images_per_s_wall": s["n_images"] / s["wall_s_this_session"],
                         "adapted_share": s["adapted_share"], "response_p50_ms": t["response_ms"]["p50"],
                         "response_p95_ms": t["response_ms"]["p95"], "online_error": s["online_error"]})  # fmt: skip
        table[name] = {k: statistics.fmean(row[k] for row in rows) for k in rows[0]} | {"runs": rows}
    settings = {"overrides": overrides, "threads": args.threads, "async_threads": args.async_threads or args.threads,
                "rounds": args.rounds}  # fmt: skip
    result = {"settings": settings, "variants": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("variant  images/s (wall)  adapted share  response p50 / p95 ms  online error %")
    for name, v in table.items():
        print(f"{name:7s}  {v['images_per_s_wall']:.1f}  {v['adapted_share']:.3f}  "
              f"{v['response_p50_ms']:.1f} / {v['response_p95_ms']:.1f}  {v['online_error']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
