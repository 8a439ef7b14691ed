"""Adaptation latency, throughput and memory: the harness behind `tta-surgical bench` and `benchmarks/latency.py`.

A run measures a grid of cells (model x precision x batch size x method) on one device. Each cell builds a
fresh model (random init: latency does not depend on the weight values), pre-generates one random input
batch of the model's input size *on the device* (the harness times adaptation, not data), runs `warmup`
steps that are not timed (lazy initialisation, cuDNN autotuning, Adam state allocation, compilation), then
times `iters` steps one by one, device-synchronised (`metrics.BatchTimer`: CUDA events on a GPU,
`perf_counter` on the CPU). Peak memory is CUDA `max_memory_allocated` over the timed steps (the peak is
reset after the warm-up) or, on the CPU, the process's peak resident set (`metrics.peak_memory`, an upper
bound: it never goes down, so it is not a per-cell figure); every cell says which in `peak_memory_kind`.

Methods (`--methods`, see `parse_method`):

- `inference`: the plain model forward in eval mode under `torch.inference_mode` (the baseline every
  cell's `ratio_to_inference` divides by; always measured first in each group, added when not asked for);
- `source`, `norm`, `tent`: the package's methods with their defaults (Adam, lr 1e-3);
- `surgical:<blocks>`: surgical entropy minimisation of every parameter (kind all) of the named blocks,
  e.g. `surgical:block1`, `surgical:all`, `surgical:block1+block2`, `surgical:block1.0`;
- `autorgn`: `surgical:all` with online auto-RGN per-tensor learning rates;
- `reference_tent`: `PlainTent`, Tent written the straightforward way with no code shared with the package's
  methods (also the test oracle of `benchmarks/reference_tent.py`); the `tent` cell's `ratio_to_reference` is
  our tent's images/s over this loop's.

The fast path (`BenchSpec.channels_last`, on by default as in the engine; `compile`; `optim_implementation`,
fused Adam by default) applies to the package's methods only. `inference` and `reference_tent` always run
plain: contiguous memory, eager, fp32 unless the cell's precision says bf16, torch's default Adam. So
`ratio_to_inference` is the cost over inference done the obvious way; the `source` method's cell (eval mode,
`inference_mode`, the fast path) shows what inference itself gains from it.

`interleave` (`--interleave`) times the methods of a group (model x batch size x precision) round-robin, one step
of each in turn, after building and warming up all of them: on a shared machine whose speed drifts between cells
(this project's 2-core CPU box drifts by +-20% over minutes) only this keeps the ratios honest.

Results are rewritten (atomically) after every cell, so an interrupted run keeps what it measured, and a
failing cell (out of memory, an unknown model, a `torch.compile` failure) records `error` and the run goes
on. For the adapting methods a cell also carries `autograd_report`'s figures for one step: how many
parameter tensors received a gradient (and in which blocks), and how many tensors and bytes autograd saved
for the backward pass.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .metrics import BatchTimer, LatencyMeter, json_safe, peak_memory, reset_peak_memory

__all__ = [
    "DEFAULT_METHODS",
    "INFERENCE",
    "QUICK_METHODS",
    "REFERENCE",
    "BenchSpec",
    "MethodSpec",
    "PlainTent",
    "attach_ratios",
    "autograd_report",
    "bench_markdown",
    "bench_meta",
    "git_revision",
    "parse_method",
    "plain_entropy",
    "plot_latency",
    "prepare_plain_tent",
    "quick_spec",
    "run_bench",
    "run_cell",
]

INFERENCE = "inference"
REFERENCE = "reference_tent"
AUTORGN = "autorgn"
DEFAULT_METHODS = (INFERENCE, "source", "norm", "tent", "surgical:block1", "surgical:all", AUTORGN, REFERENCE)
QUICK_METHODS = (INFERENCE, "tent", "surgical:block1", REFERENCE)
RESULTS_FILE = "bench.json"
TABLE_FILE = "bench.md"
_PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------------------------- the plain Tent


def prepare_plain_tent(source: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of `source` set up for Tent: batch statistics in every BN, gradients only for BN affines."""
    model = copy.deepcopy(source)
    model.train()  # BN layers in train mode normalise with the batch's statistics
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # Drop the source statistics: with no running buffers, BN always uses batch statistics.
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            if m.affine:
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
                params += [m.weight, m.bias]
    return model, params


def plain_entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of the softmax predictions of a batch."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


class PlainTent:
    """Tent (Wang et al., ICLR 2021) as a plain loop, sharing no code with `tta_surgical.methods`.

    Every BatchNorm normalises with the current batch's statistics, only the BN affine scale and shift
    require gradients, and `step(x)` takes one Adam step on the mean softmax entropy and returns the logits of
    that same forward (before the update). `reset()` restarts from a fresh copy of the source model with a
    fresh optimiser. Under bf16 autocast the entropy is computed from float32 logits (in fp32 this is the
    identical computation). No non-finite guard and no host sync: it is the lean baseline the package's
    `tent` is timed against.
    """

    def __init__(
        self,
        source: nn.Module,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.source = source
        self.lr = lr
        self.betas = tuple(betas)
        self.autocast_dtype = autocast_dtype
        self.reset()

    def reset(self) -> None:
        """Back to the source model and a fresh Adam."""
        self.model, self.params = prepare_plain_tent(self.source)
        if not self.params:
            raise ValueError(
                "the plain Tent loop adapts BatchNorm affine parameters and this model has none (e.g. a GroupNorm "
                "model); leave reference_tent out for it"
            )
        self.optimizer = torch.optim.Adam(self.params, lr=self.lr, betas=self.betas, weight_decay=0.0)

    def step(self, x: Tensor) -> Tensor:
        """Forward, one Adam step on the entropy of this batch, and the logits of that forward."""
        with torch.enable_grad(), _autocast(x, self.autocast_dtype):
            logits = self.model(x)
        loss = plain_entropy(logits.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()


# --------------------------------------------------------------------------------------------- methods of a cell


@dataclass(frozen=True)
class MethodSpec:
    """A parsed `--methods` entry: `label` as given, `kind` inference|method|reference, the method config."""

    label: str
    kind: str
    cfg: Any = None  # a MethodSettings for kind "method"

    @property
    def adapts(self) -> bool:
        from .methods import METHODS

        return self.kind == "reference" or (self.cfg is not None and METHODS.get(self.cfg.name).adapts)


def parse_method(spec: str) -> MethodSpec:
    """`inference`, `source`, `norm`, `tent`, `surgical:<block>[+<block>...]`, `autorgn` or `reference_tent`."""
    from .config import method_config

    label = spec.strip()
    if label == INFERENCE:
        return MethodSpec(label, "inference")
    if label == REFERENCE:
        return MethodSpec(label, "reference")
    if label in ("source", "norm", "tent"):
        return MethodSpec(label, "method", method_config(label))
    if label == AUTORGN:
        return MethodSpec(
            label, "method", method_config("surgical", blocks=("all",), kind="all", weighting="auto-rgn")
        )
    if label.startswith("surgical:"):
        blocks = tuple(b for b in label.split(":", 1)[1].split("+") if b)
        if not blocks:
            raise ValueError(f"method {label!r} names no block; write e.g. surgical:block1 or surgical:block1+block2")
        return MethodSpec(label, "method", method_config("surgical", blocks=blocks, kind="all"))
    raise ValueError(
        f"unknown bench method {label!r}; valid: inference, source, norm, tent, surgical:<block>[+<block>...] "
        "(e.g. surgical:block1, surgical:all), autorgn, reference_tent"
    )


def _autocast(x: Tensor, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


class _Inference:
    """The baseline: eval mode, no gradients anywhere, `torch.inference_mode`."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.autocast_dtype = autocast_dtype

    @torch.inference_mode()
    def step(self, x: Tensor) -> Tensor:
        with _autocast(x, self.autocast_dtype):
            return self.model(x)


def _build_runner(
    model: nn.Module, ms: MethodSpec, autocast_dtype: torch.dtype | None, optim_implementation: str = "auto"
) -> Any:
    """An object with `.model` and `.step(x)` for the method of a cell (configures `model` in place)."""
    if ms.kind == "inference":
        return _Inference(model, autocast_dtype)
    if ms.kind == "reference":
        return PlainTent(model, autocast_dtype=autocast_dtype)
    from .config import OptimConfig
    from .methods import build_method

    return build_method(model, ms.cfg, OptimConfig(implementation=optim_implementation), autocast_dtype=autocast_dtype)


def _autocast_dtype(precision: str) -> torch.dtype | None:
    if precision not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(_PRECISIONS)}")
    return torch.bfloat16 if precision == "bf16" else None


# ----------------------------------------------------------------------------------------------- autograd work


def _block_of(model: nn.Module) -> dict[str, str]:
    """Parameter name -> block name (empty when the model has no block map)."""
    from .models import block_map

    try:
        return {name: block for block, names in block_map(model).items() for name in names}
    except Exception:  # noqa: BLE001 - a model without a block map still gets the other figures
        return {}


def autograd_report(
    model: nn.Module,
    method: str | MethodSpec | Any,
    x: Tensor | None = None,
    *,
    batch_size: int = 8,
    input_size: int | None = None,
    autocast_dtype: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """What autograd saves and computes in one adaptation step of `method` on `model`.

    `method` is a bench method name (`"tent"`, `"surgical:block1"`, ...), a `MethodSpec`, or a built method
    (anything with `.model`, `.step(x)`, `.reset()`: a `Method` or a `PlainTent`). A name is built on a deep
    copy of `model` (left untouched); an instance is stepped once and then `reset()`. `x` defaults to a
    random batch of `batch_size` images of `input_size` x `input_size` (default 32).

    Returns: `grad_params` (parameter tensors that received a gradient), `grad_numel`, `grad_blocks`
    (block -> tensors with a gradient), `frozen_with_grad` (frozen tensors holding a gradient: must be 0),
    `saved_tensors` (tensors packed for backward, counted once per save), `saved_mb` (distinct storages
    saved, MiB; parameters included), `saved_activation_mb` (the same without the model's parameters and
    buffers), `unpacked_tensors` (saved tensors the backward actually read), and, from
    `torch.utils.flop_counter`, `forward_gflops` (one forward) and `backward_gflops` (step minus forward:
    the gradient work of the backward; optimiser arithmetic is not counted).
    """
    dtype = _autocast_dtype(autocast_dtype) if isinstance(autocast_dtype, str) else autocast_dtype
    if isinstance(method, (str, MethodSpec)):
        ms = parse_method(method) if isinstance(method, str) else method
        runner = _build_runner(copy.deepcopy(model), ms, dtype)
        owned = True
    else:
        runner, owned = method, False
    net = runner.model
    first = next(net.parameters())
    if x is None:
        input_size = input_size or 32
        g = torch.Generator(device=first.device).manual_seed(0)
        x = torch.rand((batch_size, 3, input_size, input_size), generator=g, device=first.device)

    params = dict(net.named_parameters())
    storage_of = {_storage_key(t) for t in list(net.parameters()) + list(net.buffers())}
    fired: dict[str, int] = {}
    handles = []

    def on_grad(name: str) -> Callable[[Tensor], None]:
        def hook(t: Tensor) -> None:  # runs after the gradient is accumulated into t.grad
            fired[name] = t.numel()

        return hook

    for name, p in params.items():
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(on_grad(name)))
    packed: list[tuple[tuple[int, int], int, bool]] = []
    unpacked = [0]

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        packed.append((key, t.untyped_storage().nbytes(), key in storage_of))
        return t

    def unpack(t: Tensor) -> Tensor:
        unpacked[0] += 1
        return t

    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad():
            forward_counter = FlopCounterMode(display=False)
            with forward_counter, _autocast(x, dtype):
                runner_model_out = net(x)  # one forward, for the forward flops (no side effect on BN buffers)
            del runner_model_out
        step_counter = FlopCounterMode(display=False)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), step_counter:
            runner.step(x)
        frozen_with_grad = sum(1 for n, p in params.items() if not p.requires_grad and p.grad is not None)
    finally:
        for h in handles:
            h.remove()
        if not owned:
            runner.reset()
    distinct: dict[tuple[int, int], tuple[int, bool]] = {}
    for key, nbytes, is_param in packed:
        distinct[key] = (nbytes, is_param)
    block = _block_of(net)
    grad_blocks: dict[str, int] = {}
    for name in fired:
        b = block.get(name, "?")
        grad_blocks[b] = grad_blocks.get(b, 0) + 1
    fwd = forward_counter.get_total_flops()
    return {
        "grad_params": len(fired),
        "grad_numel": int(sum(fired.values())),
        "grad_blocks": grad_blocks,
        "frozen_with_grad": frozen_with_grad,
        "saved_tensors": len(packed),
        "saved_mb": sum(n for n, _ in distinct.values()) / 2**20,
        "saved_activation_mb": sum(n for n, is_param in distinct.values() if not is_param) / 2**20,
        "unpacked_tensors": unpacked[0],
        "forward_gflops": fwd / 1e9,
        "backward_gflops": max(step_counter.get_total_flops() - fwd, 0) / 1e9,
        "autograd_batch_size": int(x.shape[0]),
    }


def _storage_key(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


# --------------------------------------------------------------------------------------------------- the grid


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
            parse_method(m)  # unknown names fail before anything runs
        for p in self.precisions:
            _autocast_dtype(p)
        from .config import COMPILE_MODES, OPTIM_IMPLEMENTATIONS

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
        rest = tuple(dict.fromkeys(m.strip() for m in self.methods if m.strip() != INFERENCE))
        return (INFERENCE, *rest)

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


def _new_cell(model: str, method: str, batch_size: int, device: torch.device, precision: str, spec: BenchSpec):
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


def run_cell(
    model_name: str, method: str, batch_size: int, precision: str, spec: BenchSpec, device: torch.device
) -> dict[str, Any]:
    """Measure one cell; any exception (OOM, unknown model, compile failure) is recorded in `error`, not raised."""
    cell = _new_cell(model_name, method, batch_size, device, precision, spec)
    stage = ["build"]
    try:
        _measure(cell, stage, model_name, parse_method(method), int(batch_size), precision, spec, device)
    except Exception as err:  # noqa: BLE001 - a failed cell is a result; the grid goes on
        _record_error(cell, stage[0], err)
    finally:
        _free(device, collect=True)
    return cell


def _measure(
    cell: dict[str, Any],
    stage: list[str],
    model_name: str,
    ms: MethodSpec,
    batch_size: int,
    precision: str,
    spec: BenchSpec,
    device: torch.device,
) -> None:
    runner, x = _prepare(cell, stage, model_name, ms, batch_size, precision, spec, device)
    stage[0] = "measure"
    _sync(device)
    _free(device)
    reset_peak_memory(device)
    base_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    meter = LatencyMeter()
    for _ in range(spec.iters):
        with BatchTimer(device) as t:
            runner.step(x)
        meter.update(t.ms, batch_size)
    peak_mb, kind = peak_memory(device)
    _finish(cell, runner, meter, peak_mb, kind)
    cell["base_memory_mb"] = base_mb  # CUDA: allocated before the timed steps (weights, snapshot, Adam state, input)


def _prepare(
    cell: dict[str, Any],
    stage: list[str],
    model_name: str,
    ms: MethodSpec,
    batch_size: int,
    precision: str,
    spec: BenchSpec,
    device: torch.device,
) -> tuple[Any, Tensor]:
    """Build the cell's model, input and runner, attach the autograd report, compile, warm up."""
    from .models import create_model

    dtype = _autocast_dtype(precision)
    torch.manual_seed(spec.seed)
    model, info = create_model(model_name, pretrained=spec.pretrained)
    model = model.to(device)
    if cell["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    size = info.input_size
    g = torch.Generator(device=device).manual_seed(spec.seed)
    x = torch.rand((batch_size, 3, size, size), generator=g, device=device)
    if cell["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    cell["input_size"] = size

    if spec.autograd and ms.adapts:
        stage[0] = "autograd_report"
        try:  # eager, on a copy, before any compile: hooks see every saved tensor
            cell.update(autograd_report(model, ms, x, autocast_dtype=dtype))
        except Exception as err:  # noqa: BLE001 - the timing is still worth having
            cell["autograd_error"] = f"{type(err).__name__}: {err}"
        _free(device)

    stage[0] = "build"
    runner = _build_runner(model, ms, dtype, spec.optim_implementation)
    if isinstance(runner, PlainTent):
        tensors = list(runner.params)
    elif ms.kind == "method":
        tensors = [p for _, p in runner.params()]
    else:
        tensors = []
    cell["adapted_tensors"] = len(tensors)
    cell["adapted_numel"] = int(sum(p.numel() for p in tensors))
    if cell["compile"]:
        stage[0] = "compile"
        # A fresh dynamo cache per cell: otherwise the grid's many models, batch sizes and grad modes exhaust
        # the recompile limit and later cells silently fall back to eager.
        torch._dynamo.reset()
        # In place, as the engine does: names and state_dict keys are unchanged.
        runner.model.compile(mode=spec.compile_mode)
    stage[0] = "compile" if cell["compile"] else "warmup"  # compilation happens lazily at the first call
    with BatchTimer(device) as warm:
        for _ in range(spec.warmup):
            runner.step(x)
    cell["warmup_ms"] = warm.ms  # all warm-up steps together (includes compilation with --compile)
    return runner, x


def _finish(cell: dict[str, Any], runner: Any, meter: LatencyMeter, peak_mb: float | None, kind: str) -> None:
    lat = meter.summary()
    cell["latency_ms"] = {k: lat[k] for k in ("p50", "p95", "p99", "mean")}
    cell["images_per_s"] = meter.images_per_s()
    cell["peak_memory_mb"] = peak_mb
    cell["peak_memory_kind"] = kind
    if hasattr(runner, "n_skipped"):
        cell["skipped_updates"] = int(runner.n_skipped)  # non-finite guard: a skipped step does less work


def _record_error(cell: dict[str, Any], stage: str, err: BaseException) -> None:
    msg = f"{type(err).__name__}: {err}"
    cell["error"] = msg if len(msg) <= 600 else msg[:600] + " ..."
    cell["error_stage"] = stage


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
    cells: list[dict[str, Any]] = []
    live: list[tuple[dict[str, Any], Any, Tensor, LatencyMeter, list[float]]] = []
    cuda = device.type == "cuda"
    for method in methods:
        cell = _new_cell(model_name, method, batch_size, device, precision, spec)
        cell["interleaved"] = True
        cells.append(cell)
        stage = ["build"]
        before = torch.cuda.memory_allocated(device) if cuda else 0
        try:
            ms = parse_method(method)
            runner, x = _prepare(cell, stage, model_name, ms, int(batch_size), precision, spec, device)
        except Exception as err:  # noqa: BLE001 - a failed cell is a result; the group goes on
            _record_error(cell, stage[0], err)
            _free(device, collect=True)
            continue
        _sync(device)
        resident = (torch.cuda.memory_allocated(device) - before) / 2**20 if cuda else 0.0
        cell["base_memory_mb"] = resident if cuda else None
        live.append((cell, runner, x, LatencyMeter(), [0.0]))
    for _ in range(spec.iters):
        for item in list(live):
            cell, runner, x, meter, step_peak = item
            try:
                if cuda:
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                with BatchTimer(device) as t:
                    runner.step(x)
                if cuda:
                    step_peak[0] = max(step_peak[0], (torch.cuda.max_memory_allocated(device) - before) / 2**20)
            except Exception as err:  # noqa: BLE001 - drop the cell from the rotation, keep the others going
                _record_error(cell, "measure", err)
                live.remove(item)
                continue
            meter.update(t.ms, batch_size)
    for cell, runner, _x, meter, step_peak in live:
        if cuda:
            _finish(cell, runner, meter, cell["base_memory_mb"] + step_peak[0], "cuda_resident_plus_step_peak")
        else:
            _finish(cell, runner, meter, *peak_memory(device))
    live.clear()
    _free(device, collect=True)
    return cells


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
            if c["method"] == "tent":
                c["ratio_to_reference"] = _div(c["images_per_s"], ref["images_per_s"])
            elif c["method"] == REFERENCE:
                c["ratio_to_reference"] = 1.0


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------------------------------------- meta and output


def _git(args: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_revision() -> str | None:
    """The checkout's short commit hash (None outside a git checkout): benchmark JSON records what was measured."""
    return _git(["rev-parse", "--short", "HEAD"])


def bench_meta(device: torch.device, spec: BenchSpec) -> dict[str, Any]:
    """Machine, versions, threads, git commit (when in a checkout), date and the grid: what the numbers depend on."""
    from . import __version__

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        tv = None
    commit = _git(["rev-parse", "HEAD"])
    dirty = _git(["status", "--porcelain", "--untracked-files=no"])
    cuda = device.type == "cuda"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        },
        "versions": {
            "tta_surgical": __version__,
            "torch": torch.__version__,
            "torchvision": tv,
            "python": platform.python_version(),
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
        },
        "git": {"commit": commit, "dirty": bool(dirty)} if commit else None,
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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out_dir: Path, result: Mapping[str, Any]) -> None:
    """`bench.json` ({"meta", "cells"}) and `bench.md`, each replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / RESULTS_FILE, json.dumps(json_safe(dict(result)), indent=2, allow_nan=False) + "\n")
    _atomic_write(out_dir / TABLE_FILE, bench_markdown(result) + "\n")


def _f(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def bench_markdown(result: Mapping[str, Any]) -> str:
    """The cells as a Markdown table (latency in ms, throughput in images/s, memory in MiB)."""
    meta = result.get("meta", {})
    cells = result.get("cells", [])
    head = [
        "model", "method", "batch", "prec", "p50 ms", "p95 ms", "p99 ms", "mean ms", "img/s", "peak MiB",
        "x infer", "tent/ref", "saved MiB", "grad tensors", "error",
    ]  # fmt: skip
    rows = []
    for c in cells:
        lat = c.get("latency_ms") or {}
        err = c.get("error") or ""
        rows.append([
            c["model"], c["method"], str(c["batch_size"]), c["precision"],
            _f(lat.get("p50")), _f(lat.get("p95")), _f(lat.get("p99")), _f(lat.get("mean")),
            _f(c.get("images_per_s"), 0), _f(c.get("peak_memory_mb"), 0), _f(c.get("ratio_to_inference")),
            _f(c.get("ratio_to_reference")), _f(c.get("saved_mb"), 1), _f(c.get("grad_params")),
            (err[:60] + "...") if len(err) > 60 else err,
        ])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 10 + ["---"]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    title = (
        f"Adaptation latency on {meta.get('device', '?')} ({meta.get('machine', {}).get('device_name', '?')}), "
        f"torch {meta.get('versions', {}).get('torch', '?')}, {meta.get('threads', '?')} threads, "
        f"channels_last={meta.get('spec', {}).get('channels_last')}, compile={meta.get('spec', {}).get('compile')}; "
        f"peak memory: {meta.get('memory', '?')}"
    )
    return title + "\n\n" + "\n".join(lines)


def plot_latency(result: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per model: p50 latency (ms) vs batch size, one line per method (and precision); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

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


def _one_line(i: int, n: int, c: Mapping[str, Any]) -> str:
    head = f"[{i}/{n}] {c['model']} {c['method']} bs{c['batch_size']} {c['precision']}"
    if c.get("error"):
        return f"{head}: ERROR {c['error']}"
    lat = c["latency_ms"]
    extra = f", x{c['ratio_to_inference']:.2f} inference" if c.get("ratio_to_inference") else ""
    return f"{head}: p50 {lat['p50']:.2f} ms, {c['images_per_s']:.0f} img/s{extra}"


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
    from .engine import pick_device

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
    for model in spec.models:
        for precision in spec.precisions:
            for bs in spec.batch_sizes:
                if spec.interleave and cell_fn is None:
                    group = run_group_interleaved(model, spec.grid_methods(), int(bs), precision, spec, device)
                else:
                    group = (measure(model, m, int(bs), precision, spec, device) for m in spec.grid_methods())
                for cell in group:
                    cells.append(cell)
                    attach_ratios(cells)
                    result["meta"]["finished"] = len(cells) == n
                    write_results(out, result)
                    if log:
                        log(_one_line(len(cells), n, cell))
    return result


def split_args(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """Flatten CLI lists that may also be comma-separated (`--methods tent,norm surgical:block1`)."""
    if values is None:
        return None
    return tuple(v.strip() for item in values for v in str(item).split(",") if v.strip())
