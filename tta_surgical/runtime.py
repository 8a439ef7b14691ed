"""Process-level run mechanics shared by every command: the `runtime:` section, the device, the global RNGs.

`engine` (online runs) and `finetune` (supervised runs) both use these; neither imports the other for them.
"""

from __future__ import annotations

import platform
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .collapse import POLICIES as ON_COLLAPSE
from .schema import ConfigError, check_choice

__all__ = [
    "COMPILE_MODES",
    "DEVICES",
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
# torch.compile modes; reduce-overhead adds CUDA graphs (fixed-shape batches on a GPU; no effect on the CPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    # DataLoader worker processes that read and decode ImageNet-style files (null = min(8, CPUs); 0 = in this
    # process); CIFAR sources ignore it (their images are in memory).
    num_workers: int | None = None
    seed: int = 0
    progress: bool = True
    # Collapse detection (`tta_surgical.collapse`): what to do when predictions concentrate on one class while the
    # prediction entropy falls (warn: a warning on stderr and a count in summary.json / summary.md; reset: also
    # restore the method's source state before the next batch; stop: end the run there, status stopped_on_collapse;
    # off: no monitoring), over a window of `collapse_window` images and over each domain at its end, with the share
    # and entropy-ratio thresholds of the module. 1,000 images = 5 default batches: a window longer than the run
    # never fills (2,000 missed Tent at lr=1000 on a 1,500-image continual stream), and replaying 516 measured runs'
    # results lines at 1,000 flagged exactly the runs 2,000 flagged (benchmarks/RESULTS.md section 10a; measured
    # before domains were also judged on their own, section 10c).
    on_collapse: str = "warn"
    collapse_window: int = 1000
    collapse_share: float = 0.6
    collapse_entropy_ratio: float = 0.5

    def __post_init__(self) -> None:
        check_choice("runtime", "on_collapse", self.on_collapse, ON_COLLAPSE)
        if self.collapse_window < 1:
            raise ConfigError(f"runtime.collapse_window must be >= 1 image, got {self.collapse_window}")
        if not 0.0 < self.collapse_share <= 1.0:
            raise ConfigError(f"runtime.collapse_share must lie in (0, 1], got {self.collapse_share}")
        if not 0.0 < self.collapse_entropy_ratio <= 1.0:
            raise ConfigError(f"runtime.collapse_entropy_ratio must lie in (0, 1], got {self.collapse_entropy_ratio}")
        check_choice("runtime", "device", self.device, DEVICES)
        check_choice("runtime", "precision", self.precision, PRECISIONS)
        check_choice("runtime", "compile_mode", self.compile_mode, COMPILE_MODES)
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"runtime.num_workers must be >= 0 or null, got {self.num_workers!r}")


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
