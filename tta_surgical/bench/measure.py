"""The timing grid: cells of model x precision x batch size x method, measured one after another or interleaved.

Each cell builds a fresh model (random init unless `pretrained`: latency does not depend on the weight values),
pre-generates one random input batch of the model's input size *on the device* (the harness times adaptation,
not data), runs `warmup` steps that are not timed (lazy initialisation, cuDNN autotuning, Adam state
allocation, compilation), then times `iters` steps one by one, device-synchronised (`metrics.BatchTimer`: CUDA
events on a GPU, `perf_counter` on the CPU). Peak memory is CUDA `max_memory_allocated` over the timed steps
(the peak is reset after the warm-up) or, on the CPU, the process's peak resident set (`metrics.peak_memory`,
an upper bound: it never goes down, so it is not a per-cell figure); every cell says which in
`peak_memory_kind`. A failing cell (out of memory, an unknown model, a `torch.compile` failure) records
`error` and `error_stage`, and the grid goes on.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import COMPILE_MODES, OPTIM_IMPLEMENTATIONS
from ..metrics import BatchTimer, LatencyMeter, peak_memory, reset_peak_memory
from ..models import create_model
from ..runtime import pick_device
from .autograd import autograd_report
from .labels import (
    DEFAULT_METHODS,
    INFERENCE,
    QUICK_METHODS,
    REFERENCE,
    REFERENCE_TWIN,
    MethodSpec,
    baseline_first,
    parse_method,
)
from .results import bench_meta, progress_line, write_results
from .runners import adapted_tensors, autocast_dtype, build_runner

__all__ = ["BenchSpec", "attach_ratios", "new_cell", "quick_spec", "run_bench", "run_cell", "run_group_interleaved"]


@dataclass(frozen=True)
class BenchSpec:
    """The grid and the timing protocol of one bench run."""

    models: tuple[str, ...] = ("resnet20",)
    methods: tuple[str, ...] = DEFAULT_METHODS
    batch_sizes: tuple[int, ...] = (16, 64, 200)
    device: str = "auto"
    precisions: tuple[str, ...] = ("fp32",)
    # The fast path, applied to the package's methods only: `inference` and `reference_tent` stay plain
    # (contiguous, eager, torch's default Adam) so that every ratio is against the straightforward way of doing it.
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"
    optim_implementation: str = "auto"
    warmup: int = 5
    iters: int = 30
    interleave: bool = False  # time the methods of a group round-robin (`run_group_interleaved`)
    seed: int = 0
    autograd: bool = True  # attach autograd_report figures to the adapting cells
    pretrained: bool = False  # latency does not depend on the weights; random init needs no files

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("bench needs at least one model (e.g. --models resnet20)")
        if not self.methods:
            raise ValueError("bench needs at least one method (e.g. --methods tent)")
        for m in self.methods:
            parse_method(m)  # unknown labels fail before anything runs
        for p in self.precisions:
            autocast_dtype(p)
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile_mode!r}; valid: " + ", ".join(COMPILE_MODES))
        if self.optim_implementation not in OPTIM_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown optimiser implementation {self.optim_implementation!r}; valid: "
                + ", ".join(OPTIM_IMPLEMENTATIONS)
            )
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if self.interleave and self.compile:
            # Each compiled cell resets dynamo's cache (see _prepare); resident compiled models side by side
            # would recompile inside the timed steps.
            raise ValueError("interleave and compile cannot be combined; time compiled cells one after another")
        if self.warmup < 0 or self.iters < 1:
            raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={self.warmup}, iters={self.iters}")

    def grid_methods(self) -> tuple[str, ...]:
        """The methods in run order: `inference` first (every ratio divides by it), then as given."""
        return baseline_first(self.methods, INFERENCE)

    def groups(self) -> Iterator[tuple[str, str, int]]:
        """(model, precision, batch size) in run order; each group measures every method."""
        for model in self.models:
            for precision in self.precisions:
                for bs in self.batch_sizes:
                    yield model, precision, int(bs)

    def n_cells(self) -> int:
        return len(self.models) * len(self.precisions) * len(self.batch_sizes) * len(self.grid_methods())


def quick_spec(**overrides: Any) -> BenchSpec:
    """The `--quick` grid: resnet20; inference, tent, surgical:block1, reference_tent; batch 16; 2 + 3 steps; CPU."""
    base = {
        "models": ("resnet20",),
        "methods": QUICK_METHODS,
        "batch_sizes": (16,),
        "device": "cpu",
        "precisions": ("fp32",),
        "warmup": 2,
        "iters": 3,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    return BenchSpec(**base)


# ------------------------------------------------------------------------------------------------- one cell


@dataclass
class _Job:
    """One cell being measured: its record, the stage it is in (named when it fails), and what it measures."""

    cell: dict[str, Any]
    ms: MethodSpec
    spec: BenchSpec
    device: torch.device
    stage: str = "build"
    runner: Any = None
    x: Tensor | None = None
    meter: LatencyMeter = field(default_factory=LatencyMeter)

    @property
    def batch_size(self) -> int:
        return self.cell["batch_size"]

    def fail(self, err: BaseException) -> None:
        msg = f"{type(err).__name__}: {err}"
        self.cell["error"] = msg if len(msg) <= 600 else msg[:600] + " ..."
        self.cell["error_stage"] = self.stage


def new_cell(
    model: str, method: str, batch_size: int, device: torch.device, precision: str, spec: BenchSpec
) -> dict[str, Any]:
    """A cell's record before measuring: what it is and how it runs, every figure None."""
    fast = parse_method(method).kind == "method"  # the baselines never take the fast path
    return {
        "model": model,
        "method": method,
        "batch_size": int(batch_size),
        "device": str(device),
        "precision": precision,
        "channels_last": bool(spec.channels_last and fast),
        "compile": bool(spec.compile and fast),
        "compile_mode": spec.compile_mode if spec.compile and fast else None,
        "optim_implementation": spec.optim_implementation if fast else None,
        "latency_ms": None,
        "images_per_s": None,
        "peak_memory_mb": None,
        "peak_memory_kind": None,
        "ratio_to_inference": None,
        "ratio_to_reference": None,
        "error": None,
    }


def _job(model: str, method: str, batch_size: int, precision: str, spec: BenchSpec, device: torch.device) -> _Job:
    cell = new_cell(model, method, batch_size, device, precision, spec)
    return _Job(cell, parse_method(method), spec, device)


def run_cell(
    model_name: str, method: str, batch_size: int, precision: str, spec: BenchSpec, device: torch.device
) -> dict[str, Any]:
    """Measure one cell; any exception (OOM, unknown model, compile failure) is recorded in `error`, not raised."""
    job = _job(model_name, method, batch_size, precision, spec, device)
    try:
        _prepare(job)
        job.stage = "measure"
        _sync(device)
        _free(device)
        reset_peak_memory(device)
        base_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
        for _ in range(spec.iters):
            with BatchTimer(device) as t:
                job.runner.step(job.x)
            job.meter.update(t.ms, job.batch_size)
        _finish(job, *peak_memory(device))
        job.cell["base_memory_mb"] = base_mb  # CUDA: allocated before the timed steps (weights, Adam state, input)
    except Exception as err:  # noqa: BLE001 - a failed cell is a result; the grid goes on
        job.fail(err)
    finally:
        job.runner = job.x = None
        _free(device, collect=True)
    return job.cell


def _prepare(job: _Job) -> None:
    """Build the cell's model, input and runner, attach the autograd report, compile, warm up."""
    cell, spec, device = job.cell, job.spec, job.device
    dtype = autocast_dtype(cell["precision"])
    torch.manual_seed(spec.seed)
    model, info = create_model(cell["model"], pretrained=spec.pretrained)
    model = model.to(device)
    size = info.input_size
    g = torch.Generator(device=device).manual_seed(spec.seed)
    x = torch.rand((job.batch_size, 3, size, size), generator=g, device=device)
    if cell["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    cell["input_size"] = size

    if spec.autograd and job.ms.adapts:
        job.stage = "autograd_report"
        try:  # eager, on a copy, before any compile: hooks see every saved tensor
            cell.update(autograd_report(model, job.ms, x, autocast_dtype=dtype))
        except Exception as err:  # noqa: BLE001 - the timing is still worth having
            cell["autograd_error"] = f"{type(err).__name__}: {err}"
        _free(device)

    job.stage = "build"
    job.runner, job.x = build_runner(model, job.ms, dtype, spec.optim_implementation, like=x), x
    tensors = adapted_tensors(job.runner)
    cell["adapted_tensors"] = len(tensors)
    cell["adapted_numel"] = int(sum(p.numel() for p in tensors))
    if cell["compile"]:
        job.stage = "compile"
        # A fresh dynamo cache per cell: otherwise the grid's many models, batch sizes and grad modes exhaust
        # the recompile limit and later cells silently fall back to eager.
        torch._dynamo.reset()
        # In place, as the engine does: names and state_dict keys are unchanged.
        job.runner.model.compile(mode=spec.compile_mode)
    job.stage = "compile" if cell["compile"] else "warmup"  # compilation happens lazily at the first call
    with BatchTimer(device) as warm:
        for _ in range(spec.warmup):
            job.runner.step(x)
    cell["warmup_ms"] = warm.ms  # all warm-up steps together (includes compilation with --compile)


def _finish(job: _Job, peak_mb: float | None, kind: str) -> None:
    cell, lat = job.cell, job.meter.summary()
    cell["latency_ms"] = {k: lat[k] for k in ("p50", "p95", "p99", "mean")}
    cell["images_per_s"] = job.meter.images_per_s()
    cell["peak_memory_mb"] = peak_mb
    cell["peak_memory_kind"] = kind
    if hasattr(job.runner, "n_skipped"):
        cell["skipped_updates"] = int(job.runner.n_skipped)  # non-finite guard: a skipped step does less work


# ----------------------------------------------------------------------------------------- a group, interleaved


def run_group_interleaved(
    model_name: str, methods: Sequence[str], batch_size: int, precision: str, spec: BenchSpec, device: torch.device
) -> list[dict[str, Any]]:
    """Measure the cells of one group (model x batch size x precision) together, one step of each in turn.

    Every method is built and warmed up first; then the timed steps go round-robin (`inference`, `tent`, ...,
    `inference`, `tent`, ...), so a change in machine load (a shared CPU, thermal or frequency drift) hits every
    method of the group alike and their ratios stay meaningful. All models stay resident meanwhile: on CUDA a
    cell's peak is its largest step-time allocation above what was allocated before that step, plus what its own
    preparation left allocated (`peak_memory_kind` says so); on the CPU it is the process peak, as ever.
    """
    cuda = device.type == "cuda"
    jobs = [_job(model_name, m, batch_size, precision, spec, device) for m in methods]
    live: list[_Job] = []
    step_peak: dict[int, float] = {}
    for job in jobs:
        job.cell["interleaved"] = True
        before = torch.cuda.memory_allocated(device) if cuda else 0
        try:
            _prepare(job)
        except Exception as err:  # noqa: BLE001 - a failed cell is a result; the group goes on
            job.fail(err)
            job.runner = job.x = None
            _free(device, collect=True)
            continue
        _sync(device)
        job.cell["base_memory_mb"] = (torch.cuda.memory_allocated(device) - before) / 2**20 if cuda else None
        job.stage = "measure"
        live.append(job)
        step_peak[id(job)] = 0.0
    for _ in range(spec.iters):
        for job in list(live):
            try:
                if cuda:
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                with BatchTimer(device) as t:
                    job.runner.step(job.x)
                if cuda:
                    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                    step_peak[id(job)] = max(step_peak[id(job)], peak)
            except Exception as err:  # noqa: BLE001 - drop the cell from the rotation, keep the others going
                job.fail(err)
                live.remove(job)
                continue
            job.meter.update(t.ms, job.batch_size)
    for job in live:
        if cuda:
            _finish(job, job.cell["base_memory_mb"] + step_peak[id(job)], "cuda_resident_plus_step_peak")
        else:
            _finish(job, *peak_memory(device))
    for job in jobs:
        job.runner = job.x = None
    _free(device, collect=True)
    return [job.cell for job in jobs]


def attach_ratios(cells: Sequence[dict[str, Any]]) -> None:
    """Fill `ratio_to_inference` (p50 latency over the same group's `inference` p50) and `ratio_to_reference`
    (on the `tent` cell: its images/s over the same group's `reference_tent`; 1.0 on the reference cell).
    A group is model x batch size x device x precision (the baselines are plain whatever the fast-path flags)."""

    def key(c: Mapping[str, Any]) -> tuple:
        return (c["model"], c["batch_size"], c["device"], c["precision"])

    def ok(c: Mapping[str, Any] | None) -> bool:
        return c is not None and not c.get("error") and c.get("latency_ms") is not None

    inference = {key(c): c for c in cells if c["method"] == INFERENCE and ok(c)}
    reference = {key(c): c for c in cells if c["method"] == REFERENCE and ok(c)}
    for c in cells:
        base = inference.get(key(c))
        c["ratio_to_inference"] = None
        if ok(c) and base is not None:
            c["ratio_to_inference"] = _div(c["latency_ms"]["p50"], base["latency_ms"]["p50"])
        ref = reference.get(key(c))
        c["ratio_to_reference"] = None
        if ok(c) and ref is not None:
            if c["method"] == REFERENCE_TWIN:
                c["ratio_to_reference"] = _div(c["images_per_s"], ref["images_per_s"])
            elif c["method"] == REFERENCE:
                c["ratio_to_reference"] = 1.0


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


# ----------------------------------------------------------------------------------------------------- the run


def run_bench(
    spec: BenchSpec,
    out_dir: str | os.PathLike,
    *,
    threads: int | None = None,
    log: Callable[[str], None] | None = print,
    cell_fn: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the grid of `spec`, rewriting `<out_dir>/bench.json` and `bench.md` after every cell; return the result.

    `threads` sets `torch.set_num_threads` for the run (recorded in meta). `cell_fn` replaces `run_cell`
    (tests use it to inject failures).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    device = pick_device(spec.device)
    out = Path(out_dir)
    result: dict[str, Any] = {"meta": bench_meta(device, spec), "cells": []}
    cells: list[dict[str, Any]] = result["cells"]
    measure = cell_fn or run_cell
    n = spec.n_cells()
    write_results(out, result)
    for model, precision, bs in spec.groups():
        if spec.interleave and cell_fn is None:
            group = run_group_interleaved(model, spec.grid_methods(), bs, precision, spec, device)
        else:
            group = (measure(model, m, bs, precision, spec, device) for m in spec.grid_methods())
        for cell in group:
            cells.append(cell)
            attach_ratios(cells)
            result["meta"]["finished"] = len(cells) == n
            write_results(out, result)
            if log:
                log(progress_line(len(cells), n, cell))
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device, collect: bool = False) -> None:
    """Return cached CUDA blocks; `collect` also runs the garbage collector (slow with torch loaded: ~0.5 s on a
    busy CPU, so once per cell, where a failed cell's traceback cycles may still hold tensors)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
