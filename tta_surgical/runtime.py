"""Process-level run mechanics shared by every command: the `runtime:` section, the device, the global RNGs.

`engine` (online runs) and `finetune` (supervised runs) both use these; neither imports the other for them.
"""

from __future__ import annotations

import math
import platform
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .guards import POLICIES as ON_COLLAPSE
from .hostmem import HOST_MEMORY
from .schema import ConfigError, check_choice

__all__ = [
    "COMPILE_MODES",
    "COST_MODES",
    "DEVICES",
    "GUARD_REFERENCES",
    "HOST_MEMORY",
    "ON_COLLAPSE",
    "PRECISIONS",
    "RuntimeConfig",
    "describe_device",
    "pick_device",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
# The guard's frozen reference: auto = norm where the model has BatchNorm layers and the method normalises with
# test-batch statistics (not `method.bn_stats: source`), else source; none = no reference (only the one-class
# collapse detector watches).
GUARD_REFERENCES = ("auto", "norm", "source", "none")
# torch.compile modes; reduce-overhead adds CUDA graphs (fixed-shape batches on a GPU; no effect on the CPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# How the clock of a run under time pressure is kept (tta_surgical.schedule): measured step times, or fixed ratios.
COST_MODES = ("measured", "fixed")
LATENCY_STATS = ("mean", "p95")
_TIME_MS = ("forward_ms", "latency_budget_ms", "overhead_budget_ms", "response_budget_ms", "decay_threshold_ms")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the run executes; none of these change which parameters adapt."""

    device: str = "auto"
    precision: str = "fp32"
    # channels_last (NHWC) for 4-D inputs: on by default because oneDNN's NHWC convolutions are faster on the CPU
    # (benchmarks/RESULTS.md §5); no effect on which parameters adapt, results equal to floating-point tolerance.
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"
    # reuse: keep the host memory a step frees for the next step instead of returning it to the OS (glibc's malloc
    # thresholds, `tta_surgical.hostmem`; ~15% of a CPU step was page faults); system: leave the C library's policy.
    host_memory: str = "reuse"
    # DataLoader worker processes that read and decode ImageNet-style files (null = min(8, CPUs); 0 = in this
    # process); CIFAR sources ignore it (their images are in memory).
    num_workers: int | None = None
    seed: int = 0
    progress: bool = True
    # The guard (`tta_surgical.guards`): what to do when a detector fires (warn: a warning on stderr and a count in
    # summary.json / summary.md; reset: also restore the method's source state before the next batch; fallback: reset,
    # and serve the reference's predictions until the adapted model agrees with it again (`guards.fallback`); stop:
    # end the run there, status stopped_on_collapse; off: no monitoring and no reference). The policy acts on every
    # detector: one-class collapse, confident drift and uncertain drift.
    on_collapse: str = "warn"
    # One-class collapse: over a window of `collapse_window` images and over each domain at its end, with the share
    # and entropy-ratio thresholds of the module. 1,000 images = 5 default batches: a window longer than the run
    # never fills (2,000 missed Tent at lr=1000 on a 1,500-image continual stream), and replaying 516 measured runs'
    # results lines at 1,000 flagged exactly the runs 2,000 flagged (benchmarks/RESULTS.md section 10a; measured
    # before domains were also judged on their own, section 10c).
    collapse_window: int = 1000
    collapse_share: float = 0.6
    collapse_entropy_ratio: float = 0.5
    # Drift against a frozen reference (`guards.drift`): every `guard_every`-th batch the reference predicts it too;
    # a window of `guard_window` images of such checked batches (at least 3 of them) whose share of overruled
    # confident reference predictions reaches `guard_flip` is confident or uncertain drift (benchmarks/RESULTS.md
    # section 16 measures these defaults).
    guard_reference: str = "auto"
    guard_every: int = 2
    guard_window: int = 600
    guard_flip: float = 0.1

    # Time pressure (tta_surgical.schedule; README "Time pressure"). The clock: `measured` step times, or `fixed`:
    # an update costs `cost_ratio` plain forwards of a batch (a number, or a table by method label such as `tent` or
    # `tent:block1`; exact and identical on any machine). `forward_ms`: the plain forward's time per batch (null =
    # measured in the run). Update budgets: adapt on one batch in `update_every`; keep the mean (or p95) per-batch
    # latency within `latency_budget_ms`; Tempora's amortised budget `overhead_budget_ms` (the summed overhead of
    # updates beyond `response_budget_ms`, default one plain forward). `deadline_ms`, `response_budget_ms` and
    # `decay_threshold_ms` (default 2x the response budget) define the time-contingent metrics. `async_adapt`:
    # predict every batch at once with the last finished update's weights while the next update runs (a thread,
    # on a GPU its own CUDA stream). `record_times`: keep the clock and its metrics even when nothing else asks.
    cost_mode: str = "measured"
    cost_ratio: float | dict[str, float] | None = None
    forward_ms: float | None = None
    update_every: int = 1
    latency_budget_ms: float | None = None
    latency_budget_stat: str = "mean"
    overhead_budget_ms: float | None = None
    response_budget_ms: float | None = None
    decay_threshold_ms: float | None = None
    deadline_ms: float | None = None
    async_adapt: bool = False
    record_times: bool = False

    def __post_init__(self) -> None:
        check_choice("runtime", "on_collapse", self.on_collapse, ON_COLLAPSE)
        if self.collapse_window < 1:
            raise ConfigError(f"runtime.collapse_window must be >= 1 image, got {self.collapse_window}")
        if not 0.0 < self.collapse_share <= 1.0:
            raise ConfigError(f"runtime.collapse_share must lie in (0, 1], got {self.collapse_share}")
        if not 0.0 < self.collapse_entropy_ratio <= 1.0:
            raise ConfigError(f"runtime.collapse_entropy_ratio must lie in (0, 1], got {self.collapse_entropy_ratio}")
        check_choice("runtime", "guard_reference", self.guard_reference, GUARD_REFERENCES)
        if self.on_collapse == "fallback" and self.guard_reference == "none":
            raise ConfigError(
                "runtime.on_collapse=fallback serves the guard's reference after an alarm, but "
                "runtime.guard_reference=none asks for none; use guard_reference auto, norm or source (or "
                "on_collapse=reset)"
            )
        if self.guard_every < 1:
            raise ConfigError(f"runtime.guard_every must be >= 1 batch (1 = check every batch), got {self.guard_every}")
        if self.guard_window < 1:
            raise ConfigError(f"runtime.guard_window must be >= 1 image, got {self.guard_window}")
        if not 0.0 < self.guard_flip <= 1.0:
            raise ConfigError(f"runtime.guard_flip must lie in (0, 1] (a share of the batch), got {self.guard_flip}")
        check_choice("runtime", "device", self.device, DEVICES)
        check_choice("runtime", "precision", self.precision, PRECISIONS)
        check_choice("runtime", "compile_mode", self.compile_mode, COMPILE_MODES)
        check_choice("runtime", "host_memory", self.host_memory, HOST_MEMORY)
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"runtime.num_workers must be >= 0 or null, got {self.num_workers!r}")
        self._check_time()

    def _check_time(self) -> None:
        """The time-pressure keys: positive finite times, a cost table for fixed costs (and only for them)."""
        check_choice("runtime", "cost_mode", self.cost_mode, COST_MODES)
        check_choice("runtime", "latency_budget_stat", self.latency_budget_stat, LATENCY_STATS)
        for name in (*_TIME_MS, "deadline_ms"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"runtime.{name} must be a positive number of milliseconds or null, got {value}")
        if self.update_every < 1:
            raise ConfigError(
                f"runtime.update_every must be an integer >= 1 (1 = every batch), got {self.update_every}"
            )
        ratios = self.cost_ratio.values() if isinstance(self.cost_ratio, Mapping) else [self.cost_ratio]
        if self.cost_ratio is not None and any(not (r > 0 and math.isfinite(r)) for r in ratios):
            raise ConfigError(
                f"runtime.cost_ratio must hold positive finite numbers (plain forwards), got {self.cost_ratio}"
            )
        if self.cost_mode == "fixed" and self.cost_ratio is None:
            raise ConfigError(
                "runtime.cost_mode=fixed needs runtime.cost_ratio: an update's cost in plain forwards of a batch, "
                "e.g. 2.28, or a table by method such as {tent: 2.28, 'tent:block1': 2.46}"
            )
        if self.cost_mode == "measured" and self.cost_ratio is not None:
            raise ConfigError("runtime.cost_ratio is used only with runtime.cost_mode=fixed; set both or neither")
        rho, threshold = self.response_budget_ms, self.decay_threshold_ms
        if rho is not None and threshold is not None and threshold <= rho:
            raise ConfigError(
                f"runtime.decay_threshold_ms ({threshold}) must exceed runtime.response_budget_ms ({rho})"
            )


def pick_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA device is available; use cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """A short human description of `device` for summaries ("cuda (NVIDIA H100)", "cpu (x86_64, 2 threads)")."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> None:
    """Seed every global RNG code might draw from (torch CPU and CUDA, NumPy, Python)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain values, so a checkpoint holding them loads with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
