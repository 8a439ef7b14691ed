"""When a stream's batches arrive: the `stream.arrival` section (stream data, like every other stream field).

Three arrival models:

- `as_fast_as_possible` (the default; every result before issue 22): the next batch arrives the moment the method
  asks for it, so the stream waits for the method (the classic, "waiting" protocol of the TTA literature).
- `constant`: a batch every `1 / speed` plain forwards of a batch (`speed: 1` = as fast as the model's plain
  inference, `0.5` = half as fast: two forwards' time between batches; the plain forward is measured in the same
  run, or given as `runtime.forward_ms`), or `rate` images per second (batch i arrives at (images in batches
  0..i-1) / rate seconds).
- `trace`: recorded arrival times in seconds since the stream started, one per batch, non-decreasing (`trace:
  [0, 0.1, ...]`, or `trace_file`: a text file with one time per line, or a JSON list).

What the engine does with arrivals that find the method busy is the `protocol`: `realistic` (Alfarra et al., ICML
2024: the batch is predicted by the latest weights without an update; the method adapts on the next batch that
arrives after it is free) or `queue` (the batch waits; every batch is adapted, its queueing delay measured). The
engine's schedule (`tta_surgical.schedule`) turns these into which batches are adapted and their times.

Times are exact where they can be: `arrival_offsets` returns `Fraction`s (of seconds, or of plain-forward units for
`speed`), so a fixed-cost schedule never depends on floating-point rounding.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

from ..schema import ConfigError

__all__ = ["ARRIVAL_KINDS", "PROTOCOLS", "ArrivalSpec", "arrival_offsets", "exact", "read_trace"]

ARRIVAL_KINDS = ("as_fast_as_possible", "constant", "trace")
PROTOCOLS = ("realistic", "queue")
Kind = Literal["as_fast_as_possible", "constant", "trace"]
Protocol = Literal["realistic", "queue"]


def exact(value: float | int) -> Fraction:
    """A config number as the exact decimal it was written as (0.1 -> 1/10, not the nearest binary float)."""
    return Fraction(value) if isinstance(value, int) else Fraction(repr(float(value)))


@dataclass(frozen=True)
class ArrivalSpec:
    """`stream.arrival`: when batches arrive and what happens to those that find the method busy (module doc).

    kind: as_fast_as_possible | constant | trace.
    speed: constant: batches per plain forward of a batch (1 = the speed of plain inference, 0.5 = half of it).
    rate: constant: images per second instead of `speed`.
    trace / trace_file: trace: arrival times in seconds since the stream started, one per batch (a list, or a text
        file with one number per line or a JSON list).
    protocol: realistic (busy -> predicted by the latest weights, no update) | queue (busy -> the batch waits).
        Ignored by as_fast_as_possible, where no batch ever finds the method busy.
    """

    kind: Kind = "as_fast_as_possible"
    speed: float | None = None
    rate: float | None = None
    trace: tuple[float, ...] | None = None
    trace_file: str | None = None
    protocol: Protocol = "realistic"

    def __post_init__(self) -> None:
        if isinstance(self.trace_file, os.PathLike):
            object.__setattr__(self, "trace_file", os.fspath(self.trace_file))
        for name in ("speed", "rate"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"stream.arrival.{name} must be a positive finite number, got {value}")
        given = {n for n in ("speed", "rate", "trace", "trace_file") if getattr(self, n) is not None}
        wanted = {"as_fast_as_possible": set(), "constant": {"speed", "rate"}, "trace": {"trace", "trace_file"}}
        stray = given - wanted[self.kind]
        if stray:
            raise ConfigError(
                f"stream.arrival.{sorted(stray)[0]} is set but stream.arrival.kind is {self.kind}; "
                f"set kind to {'constant' if stray & {'speed', 'rate'} else 'trace'} or remove it"
            )
        if self.kind != "as_fast_as_possible" and len(given) != 1:
            one = " or ".join(f"stream.arrival.{n}" for n in sorted(wanted[self.kind]))
            raise ConfigError(f"stream.arrival.kind={self.kind} needs exactly one of {one}")
        if self.trace is not None:
            check_trace(self.trace, "stream.arrival.trace")

    @property
    def timed(self) -> bool:
        """Whether batches arrive on a clock of their own (anything but as_fast_as_possible)."""
        return self.kind != "as_fast_as_possible"

    @property
    def relative(self) -> bool:
        """Whether arrival times are in plain-forward units (`speed`) rather than seconds."""
        return self.speed is not None

    def describe(self) -> str:
        """A short description for tables: `constant, speed 0.5x plain inference, realistic`."""
        if not self.timed:
            return "as fast as possible (the stream waits)"
        if self.kind == "constant":
            what = f"speed {self.speed:g}x plain inference" if self.speed is not None else f"{self.rate:g} images/s"
            return f"constant, {what}, {self.protocol}"
        source = self.trace_file if self.trace_file is not None else f"{len(self.trace or ())} times"
        return f"trace ({source}), {self.protocol}"


def check_trace(times: Sequence[float], where: str) -> None:
    """Arrival times must be finite, >= 0 and non-decreasing (one per batch, in batch order)."""
    if not times:
        raise ConfigError(f"{where} is empty; give one arrival time (seconds) per batch")
    for i, t in enumerate(times):
        if not (math.isfinite(t) and t >= 0):
            raise ConfigError(f"{where}[{i}] = {t}: arrival times must be finite seconds >= 0")
        if i and t < times[i - 1]:
            raise ConfigError(f"{where}[{i}] = {t} is before [{i - 1}] = {times[i - 1]}; times must not decrease")


def read_trace(path: str | os.PathLike) -> tuple[float, ...]:
    """A trace file: one arrival time (seconds) per line (blank lines and `#` comments skipped) or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stream.arrival.trace_file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            values = json.loads(text)
            if not isinstance(values, list):
                raise ValueError("not a list")
            times = tuple(float(v) for v in values)
        else:
            lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
            times = tuple(float(line) for line in lines if line)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{path}: not a trace of arrival times ({err}); write one number (seconds) per line or a JSON list"
        ) from None
    check_trace(times, str(path))
    return times


def arrival_offsets(spec: ArrivalSpec, batch_sizes: Sequence[int]) -> list[Fraction] | None:
    """The exact arrival time of every batch: plain-forward units for `speed`, seconds otherwise; None for
    as_fast_as_possible (batches arrive when the method asks). A trace shorter than the stream is an error."""
    if not spec.timed:
        return None
    n = len(batch_sizes)
    if spec.speed is not None:
        gap = 1 / exact(spec.speed)
        return [i * gap for i in range(n)]
    if spec.rate is not None:
        rate, seen, out = exact(spec.rate), 0, []
        for size in batch_sizes:
            out.append(Fraction(seen) / rate)
            seen += int(size)
        return out
    times = spec.trace if spec.trace is not None else read_trace(spec.trace_file or "")
    if len(times) < n:
        where = spec.trace_file or "stream.arrival.trace"
        raise ConfigError(
            f"{where} holds {len(times)} arrival times but the stream has {n} batches; give one time per batch"
        )
    return [exact(t) for t in times[:n]]
