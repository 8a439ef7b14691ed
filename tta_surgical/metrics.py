"""Metrics of an online run: error per domain and over the stream, latency percentiles, peak memory.

Small accumulators with no torch state of their own, so the engine can rebuild them from
`results.jsonl` when a run resumes and end with exactly the numbers an uninterrupted run gives.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

ROUND_MARK = "/r"  # "fog/r2": the domain fog in the second round of a stream with stream.rounds > 1


def domain_key(corruption: str, severity: int | None, multi_severity: bool, round_index: int | None = None) -> str:
    """Name of a domain in results: "<corruption>" when the stream has one severity, "<corruption>@<s>" otherwise;
    with a `round_index` (0-based; streams with several rounds) followed by "/r<round>" (1-based): "fog@5/r2"."""
    key = str(corruption)
    if multi_severity and severity:  # severity 0 marks a batch mixing severities (a mixed stream)
        key = f"{corruption}@{int(severity)}"
    return key if round_index is None else f"{key}{ROUND_MARK}{int(round_index) + 1}"


def round_of(key: str) -> int:
    """The (1-based) round a domain key belongs to; 1 for keys without a round mark."""
    _, mark, tail = key.rpartition(ROUND_MARK)
    return int(tail) if mark and tail.isdigit() else 1


@dataclass
class ErrorMeter:
    """Correct / seen counts per domain (in first-seen order) and over the whole stream."""

    correct: dict[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def update(self, domain: str, correct: int, count: int) -> None:
        if count < 0 or not 0 <= correct <= count:
            raise ValueError(f"need 0 <= correct <= count, got correct={correct}, count={count}")
        self.correct[domain] = self.correct.get(domain, 0) + int(correct)
        self.count[domain] = self.count.get(domain, 0) + int(count)

    @property
    def n_images(self) -> int:
        return sum(self.count.values())

    def errors(self) -> dict[str, float]:
        """Error (%) per domain."""
        return {d: 100.0 * (1.0 - self.correct[d] / n) for d, n in self.count.items() if n > 0}

    def mean_error(self) -> float:
        """Unweighted mean of the per-domain errors (the number papers report for CIFAR-10-C / ImageNet-C)."""
        errs = list(self.errors().values())
        return sum(errs) / len(errs) if errs else math.nan

    def online_error(self) -> float:
        """Error (%) over every prediction of the stream (weights domains by their number of images)."""
        n = self.n_images
        return 100.0 * (1.0 - sum(self.correct.values()) / n) if n else math.nan

    def by_round(self) -> tuple[list[float], list[float]]:
        """(mean error, online error) of each round in order (`round_of` the domain keys): one item per round."""
        rounds: dict[int, ErrorMeter] = {}
        for d in self.count:
            part = rounds.setdefault(round_of(d), ErrorMeter())
            part.update(d, self.correct[d], self.count[d])
        ordered = [rounds[r] for r in sorted(rounds)]
        return [m.mean_error() for m in ordered], [m.online_error() for m in ordered]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (NumPy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class LatencyMeter:
    """Per-batch latencies (ms) and images, for percentiles and throughput.

    Warm-up batches (the first batch a process runs: lazy initialisation, cuDNN autotuning, compilation)
    are kept apart so they do not distort the steady-state figures.
    """

    latencies_ms: list[float] = field(default_factory=list)
    images: int = 0
    warmup_ms: list[float] = field(default_factory=list)

    def update(self, latency_ms: float, n_images: int, warmup: bool = False) -> None:
        if warmup:
            self.warmup_ms.append(float(latency_ms))
        else:
            self.latencies_ms.append(float(latency_ms))
            self.images += int(n_images)

    def summary(self) -> dict[str, float]:
        """p50/p95/p99/mean of the steady-state batches (of the warm-up ones when there are no others)."""
        lat = self.latencies_ms or self.warmup_ms
        return {
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
            "mean": sum(lat) / len(lat) if lat else math.nan,
            "n_batches": len(lat),
            "n_warmup_batches": len(self.warmup_ms),
        }

    def images_per_s(self) -> float:
        """Images per second of adaptation (step time only: stream generation and I/O excluded)."""
        total_s = sum(self.latencies_ms) / 1000.0
        return self.images / total_s if total_s > 0 else math.nan


class BatchTimer:
    """Device-synchronised timing of one region: CUDA events on a GPU, `perf_counter` on the CPU.

    On CUDA the work is asynchronous, so a host clock alone would time the kernel launches, not the
    kernels; the device is synchronised before the start event (so earlier work is not billed to this
    batch) and the end event is waited for before reading the time.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.ms = math.nan

    def __enter__(self) -> BatchTimer:
        if self.cuda:
            torch.cuda.synchronize()
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t0) * 1000.0


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak on CUDA (the CPU process peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(peak MiB, what was measured): CUDA `max_memory_allocated`, or the process's peak resident set on CPU.

    The CPU figure is the whole process's high-water mark since it started (data, Python, earlier work
    included), so it is an upper bound on what the run itself needed.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    mib = rss / 2**20 if sys.platform == "darwin" else rss / 1024
    return mib, "cpu_process_peak_rss"


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Boolean per-sample correctness of the arg-max prediction (on the logits' device)."""
    return logits.argmax(dim=1) == y.to(logits.device)


def group_correct(correct: Iterable[bool], keys: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(correct, count) per key for a batch whose samples come from several domains (mixed streams)."""
    out: dict[str, list[int]] = {}
    for ok, k in zip(correct, keys, strict=True):
        c = out.setdefault(k, [0, 0])
        c[0] += int(bool(ok))
        c[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def json_safe(v: Any) -> Any:
    """NaN / inf -> None, tuples -> lists: values `json.dumps(..., allow_nan=False)` accepts."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v
