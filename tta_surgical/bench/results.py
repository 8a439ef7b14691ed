"""The bench's outputs: `bench.json` ({meta, cells}) and `bench.md`, latency plots."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write_text
from ..metrics import json_safe
from ..provenance import provenance
from ..render import pyplot, save_figure
from ..tables import fmt, markdown_table

__all__ = [
    "RESULTS_FILE",
    "TABLE_FILE",
    "bench_markdown",
    "bench_meta",
    "plot_latency",
    "progress_line",
    "write_results",
]

RESULTS_FILE = "bench.json"
TABLE_FILE = "bench.md"


def bench_meta(device: torch.device, spec: Any) -> dict[str, Any]:
    """Provenance (date, machine, versions, git), threads and the grid: what the numbers depend on."""
    cuda = device.type == "cuda"
    return {
        **provenance(device),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "timing": "CUDA events per step (device synchronised)" if cuda else "time.perf_counter per step",
        "memory": (
            "cuda_max_allocated over the timed steps (peak reset after warm-up)"
            if cuda
            else "cpu_process_peak_rss: the whole process's high-water mark so far (an upper bound, not per cell)"
        ),
        "ratios": {
            "ratio_to_inference": "cell p50 latency / inference p50 latency (same model, batch, device, precision)",
            "ratio_to_reference": "tent images/s / reference_tent images/s (same model, batch, device, precision)",
        },
        "weights": "pretrained" if spec.pretrained else "random init (latency does not depend on the weight values)",
        "spec": json_safe(asdict(spec)),
        "argv": list(sys.argv),
    }


def write_results(out_dir: Path, result: Mapping[str, Any]) -> None:
    """`bench.json` ({"meta", "cells"}) and `bench.md`, each replaced atomically."""
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(json_safe(dict(result)), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / TABLE_FILE, bench_markdown(result) + "\n")


_BENCH_COLUMNS = (
    "model", "method", "batch", "prec", "p50 ms", "p95 ms", "p99 ms", "mean ms", "img/s", "peak MiB",
    "x infer", "tent/ref", "saved MiB", "grad tensors", "error",
)  # fmt: skip


def bench_markdown(result: Mapping[str, Any]) -> str:
    """The cells as a Markdown table (latency in ms, throughput in images/s, memory in MiB)."""
    meta = result.get("meta", {})
    rows = []
    for c in result.get("cells", []):
        lat = c.get("latency_ms") or {}
        err = c.get("error") or ""
        rows.append([
            c["model"], c["method"], str(c["batch_size"]), c["precision"],
            fmt(lat.get("p50")), fmt(lat.get("p95")), fmt(lat.get("p99")), fmt(lat.get("mean")),
            fmt(c.get("images_per_s"), 0), fmt(c.get("peak_memory_mb"), 0), fmt(c.get("ratio_to_inference")),
            fmt(c.get("ratio_to_reference")), fmt(c.get("saved_mb"), 1), fmt(c.get("grad_params")),
            (err[:60] + "...") if len(err) > 60 else err,
        ])  # fmt: skip
    spec = meta.get("spec", {})
    title = (
        f"Adaptation latency on {meta.get('device', '?')} ({meta.get('machine', {}).get('device_name', '?')}), "
        f"torch {meta.get('versions', {}).get('torch', '?')}, {meta.get('threads', '?')} threads, "
        f"channels_last={spec.get('channels_last')}, compile={spec.get('compile')}; "
        f"peak memory: {meta.get('memory', '?')}"
    )
    return title + "\n\n" + markdown_table(_BENCH_COLUMNS, rows, left=4, right=10)


def plot_latency(result: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per model: p50 latency (ms) vs batch size, one line per method (and precision); needs matplotlib."""
    plt = pyplot()
    cells = [c for c in result.get("cells", []) if not c.get("error") and c.get("latency_ms")]
    paths = []
    for model in dict.fromkeys(c["model"] for c in cells):
        fig, ax = plt.subplots(figsize=(6, 4))
        mine = [c for c in cells if c["model"] == model]
        precisions = list(dict.fromkeys(c["precision"] for c in mine))
        for method in dict.fromkeys(c["method"] for c in mine):
            for prec in precisions:
                pts = sorted(
                    (c["batch_size"], c["latency_ms"]["p50"])
                    for c in mine
                    if (c["method"], c["precision"]) == (method, prec)
                )
                if pts:
                    label = method if len(precisions) == 1 else f"{method} ({prec})"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("p50 latency per step (ms)")
        ax.set_title(f"{model} on {result.get('meta', {}).get('device', '?')}")
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, Path(out_dir) / f"latency_{model}.png"))
    return paths


def progress_line(i: int, n: int, c: Mapping[str, Any]) -> str:
    """One finished cell, for the log: `[i/n] model method bsN precision: p50 ..., img/s, x inference`."""
    head = f"[{i}/{n}] {c['model']} {c['method']} bs{c['batch_size']} {c['precision']}"
    if c.get("error"):
        return f"{head}: ERROR {c['error']}"
    lat = c["latency_ms"]
    extra = f", x{c['ratio_to_inference']:.2f} inference" if c.get("ratio_to_inference") else ""
    return f"{head}: p50 {lat['p50']:.2f} ms, {c['images_per_s']:.0f} img/s{extra}"
