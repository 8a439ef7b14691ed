"""Where a measurement came from: the code's git revision, the package / torch / python versions, the machine and
device, and the time. Every file that records timings or results for later comparison carries `provenance()`
(the bench, the stream timing, the sweep timings, the benchmark scripts), so a figure can be traced to the code
and hardware that produced it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ._version import __version__

__all__ = ["git_revision", "git_state", "machine", "provenance", "timestamp", "versions"]


def _git(args: Sequence[str]) -> str | None:
    """`git ARGS` run in the package's folder; None outside a checkout or without git."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_revision(short: bool = True) -> str | None:
    """The checkout's commit hash (abbreviated unless `short=False`); None outside a git checkout."""
    return _git(["rev-parse", "--short", "HEAD"] if short else ["rev-parse", "HEAD"])


def git_state() -> dict[str, Any] | None:
    """`{"commit": full hash, "dirty": tracked files modified}`; None outside a git checkout."""
    commit = git_revision(short=False)
    if not commit:
        return None
    return {"commit": commit, "dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"]))}


def _is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def versions(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions of this package, torch, torchvision and python; CUDA and cuDNN when `device` is a CUDA device."""
    try:
        import torchvision  # only for its version, here: importing it nearly doubles this module's import time

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        tv = None
    cuda = _is_cuda(device)
    return {
        "tta_surgical": __version__,
        "torch": torch.__version__,
        "torchvision": tv,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
    }


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """The host (platform, processor, CPU count, 1-minute load average now) and the device's name ("cpu" off CUDA,
    None when no device is given: a sweep driver does not know where its cells ran).

    The load average says how busy a shared machine was: timings taken under load are pessimistic.
    """
    cuda = _is_cuda(device)
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if cuda else "cpu" if device else None,
    }


def timestamp() -> str:
    """Now, in UTC, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    """`{"date", "machine", "versions", "git"}`: what a recorded figure depends on (see the functions above)."""
    return {"date": timestamp(), "machine": machine(device), "versions": versions(device), "git": git_state()}
