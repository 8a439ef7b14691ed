"""Adaptation latency, throughput and memory: the benchmark suite (a script around `tta-surgical bench`).

Same options as `tta-surgical bench`; the output folder defaults to benchmarks/out/latency. Examples:

    python benchmarks/latency.py --quick --threads 1                       # seconds, CPU smoke test
    python benchmarks/latency.py --device cuda --models resnet20 resnet50 \\
        --batch-sizes 16 64 200 --precision fp32,bf16 --plot               # the GPU grid
    python benchmarks/latency.py --device cuda --channels-last --compile --models resnet50 --batch-sizes 64

Each cell times `--iters` adaptation steps (after `--warmup` untimed ones) on one random batch held on the
device, and reports p50/p95/p99/mean latency, images/s, peak memory, the ratio to plain inference and, for
`tent`, the throughput ratio to the plain reference Tent loop; adapting cells also report what autograd
saved and which parameter tensors received gradients in one step. See `tta_surgical/bench/`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package of this checkout, installed or not

from tta_surgical.commands import bench as bench_command  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "out" / "latency"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=bench_command.DESCRIPTION)
    bench_command.configure(parser)
    parser.set_defaults(out=str(DEFAULT_OUT))
    return bench_command.main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
