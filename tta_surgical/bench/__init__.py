"""Adaptation latency, throughput and memory (`tta-surgical bench`).

One job per module:
- `labels`: the method labels `--methods` takes (`inference`, every registered method, `<method>:<blocks>`,
  `autorgn`, `reference_tent`) and the one function that turns a label into a method config;
- `reference`: `PlainTent`, Tent as a plain loop sharing no code with the package's methods (the test oracle of
  the engine's `tent` and the baseline it is timed against);
- `runners`: what a cell runs (`build_runner`) and its precision;
- `autograd`: `autograd_report`, what autograd saves and which tensors get gradients in one step;
- `measure`: the timing grid (`BenchSpec`, `run_bench`): warm-up, cells, interleaving, ratios;
- `results`: `bench.json` / `bench.md`, latency plots.

The one-off benchmark studies behind RESULTS.md (stream timing, corruption speed, CIFAR-10-C accuracy, sweep wall
time, augmentation cost, bring-your-own-model, the methods grid and the soak) live above the package, in
`benchmarks/studies/`.

The fast path (`BenchSpec.channels_last`, on by default as in the engine; `compile`; `optim_implementation`,
fused Adam by default) applies to the package's methods only. `inference` and `reference_tent` always run
plain: contiguous memory, eager, fp32 unless the cell's precision says bf16, torch's default Adam. So
`ratio_to_inference` is the cost over inference done the obvious way; the `source` method's cell (eval mode,
`inference_mode`, the fast path) shows what inference itself gains from it. `interleave` times the methods of a
group round-robin: on a shared machine whose speed drifts between cells (this project's 2-core CPU box drifts
by +-20% over minutes) only this keeps the ratios honest. Results are rewritten atomically after every cell, so
an interrupted run keeps what it measured.
"""

from __future__ import annotations

from .autograd import autograd_report
from .labels import (
    AUTORGN,
    DEFAULT_METHODS,
    INFERENCE,
    QUICK_METHODS,
    REFERENCE,
    MethodSpec,
    method_settings,
    parse_method,
    split_args,
)
from .measure import BenchSpec, attach_ratios, quick_spec, run_bench, run_cell, run_group_interleaved
from .reference import PlainTent, plain_entropy, prepare_plain_tent, reference_tent
from .results import RESULTS_FILE, TABLE_FILE, bench_markdown, bench_meta, plot_latency, write_results

__all__ = [
    "AUTORGN",
    "DEFAULT_METHODS",
    "INFERENCE",
    "QUICK_METHODS",
    "REFERENCE",
    "RESULTS_FILE",
    "TABLE_FILE",
    "BenchSpec",
    "MethodSpec",
    "PlainTent",
    "attach_ratios",
    "autograd_report",
    "bench_markdown",
    "bench_meta",
    "method_settings",
    "parse_method",
    "plain_entropy",
    "plot_latency",
    "prepare_plain_tent",
    "quick_spec",
    "reference_tent",
    "run_bench",
    "run_cell",
    "run_group_interleaved",
    "split_args",
    "write_results",
]
