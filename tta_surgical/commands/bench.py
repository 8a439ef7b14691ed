"""`tta-surgical bench`: adaptation latency, throughput and memory over a grid of models, methods and batch sizes."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "time adaptation (latency percentiles, images/s, peak memory) per model x method x batch size"
DESCRIPTION = (
    "Measure the step latency (p50/p95/p99/mean), throughput and peak memory of online adaptation methods on "
    "random input batches pre-generated on the device, against plain inference and a plain reference Tent loop. "
    "Writes DIR/bench.json ({meta, cells}) and DIR/bench.md after every cell, so an interrupted run keeps its "
    "results; a failing cell (e.g. out of memory) records its error and the grid goes on. Lists accept spaces "
    "or commas: --methods tent,surgical:block1 --batch-sizes 16 64."
)

DEFAULT_OUT = "runs/bench"


def _ints(values: list[str] | None) -> tuple[int, ...] | None:
    from ..bench import split_args

    items = split_args(values)
    if items is None:
        return None
    try:
        return tuple(int(v) for v in items)
    except ValueError:
        raise ValueError(f"--batch-sizes takes integers, got {' '.join(values or [])!r}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        default=None,
        help="model names (default resnet20; see `tta-surgical blocks --help`)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        default=None,
        help="method labels: a registered method name (its default settings), <method>:<block>[+<block>] for a "
        "method that adapts (every parameter of those blocks, e.g. surgical:block1), autorgn, reference_tent (the "
        "plain Tent loop), inference (always measured: the ratio baseline), any method label + @guard[<k>] (with "
        "the run guard's reference forward every k-th step, default runtime.guard_every, e.g. surgical@guard); "
        "default: every registered method, "
        "surgical:block1, autorgn and reference_tent",
    )
    parser.add_argument("--batch-sizes", nargs="+", metavar="N", default=None, help="batch sizes (default 16 64 200)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="where to run (default auto)")
    parser.add_argument(
        "--precision", nargs="+", metavar="P", default=None, help="fp32 and/or bf16 autocast, e.g. fp32,bf16"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the package's methods run model and input in channels_last memory format (default on; "
        "inference and reference_tent always stay plain contiguous eager fp32 baselines)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the package's methods' models in place (a failure is recorded per cell; compilation "
        "time is in warmup_ms, not in the timed steps)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the methods of each model x batch size round-robin, one step each in turn, so drifting machine "
        "load hits all alike (recommended on shared machines; not with --compile)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        default=None,
        help="torch.compile mode with --compile (reduce-overhead = CUDA graphs for the fixed-shape batches on a GPU)",
    )
    parser.add_argument(
        "--optim-impl",
        choices=("auto", "fused", "foreach", "for-loop"),
        default=None,
        help="optimiser kernels of the package's methods (default auto = fused where supported, else foreach)",
    )
    parser.add_argument("--warmup", type=int, default=None, metavar="N", help="untimed steps per cell (default 5)")
    parser.add_argument("--iters", type=int, default=None, metavar="N", help="timed steps per cell (default 30)")
    parser.add_argument(
        "--seed", type=int, default=None, metavar="S", help="seed of the random weights and input (default 0)"
    )
    parser.add_argument(
        "--no-autograd", action="store_true", help="skip the per-cell autograd report (saved tensors, gradients)"
    )
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny CPU grid that runs in seconds (resnet20; inference, tent, surgical:block1, reference_tent; "
        "batch 16; 2 warm-up + 3 timed steps); explicit options still apply",
    )
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="torch CPU threads (torch.set_num_threads)"
    )
    parser.add_argument(
        "--plot", action="store_true", help="also write latency_<model>.png (p50 vs batch size; needs matplotlib)"
    )


def spec_from_args(args: argparse.Namespace):
    """The `BenchSpec` the options describe (`--quick` supplies the defaults it changes)."""
    from ..bench import BenchSpec, quick_spec, split_args

    given = {
        "models": split_args(args.models),
        "methods": split_args(args.methods),
        "batch_sizes": _ints(args.batch_sizes),
        "device": args.device,
        "precisions": split_args(args.precision),
        "warmup": args.warmup,
        "iters": args.iters,
        "seed": args.seed,
    }
    flags = {
        "channels_last": args.channels_last,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "interleave": args.interleave or None,
        "optim_implementation": args.optim_impl,
        "autograd": not args.no_autograd,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    if args.quick:
        return quick_spec(**given, **flags)
    return BenchSpec(**{k: v for k, v in given.items() if v is not None}, **flags)


def main(args: argparse.Namespace) -> int:
    from ..bench import bench_markdown, plot_latency, run_bench

    spec = spec_from_args(args)
    out = Path(args.out)
    result = run_bench(spec, out, threads=args.threads)
    print()
    print(bench_markdown(result))
    if args.plot:
        try:
            paths = plot_latency(result, out)
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib); table and JSON were written")
        else:
            print("plots: " + ", ".join(str(p) for p in paths))
    failed = sum(1 for c in result["cells"] if c.get("error"))
    print(f"results in {out}/ (bench.json, bench.md); {len(result['cells'])} cells, {failed} failed")
    return 0
