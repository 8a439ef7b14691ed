"""Time-contingent metrics of a run: how many batches were adapted, how late predictions came, and what they were
worth under Tempora's three models of time-contingent utility. Computed from the results lines alone (their
`correct`, `count`, `adapted`, `why`, `t_ms` = [arrive, start, finish] on the run's clock), so a resumed run replays
them exactly.

Definitions (a batch's response latency L = finish - arrive: queueing plus the work that produced its prediction;
our engine hands out a batch's prediction when its step returns, so all adaptation time is in L, what Tempora
calls intrinsic, and Tempora's carry-over of post-hoc adaptation from the previous batch is zero):

- deadline (`runtime.deadline_ms` D): a batch misses it when L > D; `error_within_deadline` counts the predictions of
  late batches as wrong.
- discrete (Tempora's hard-deadline utility): a batch that arrives while the method is busy gets no prediction of
  the method's own (the realistic protocol's predicted-only batches count as null); utility = correct predictions of
  the served batches / all images; availability = served images / all images.
- continuous (Tempora's hyperbolic decay): response budget rho (`runtime.response_budget_ms`, default: the plain
  forward of a batch) and decay threshold T (`runtime.decay_threshold_ms`, default 2 rho); per batch the discount
  d = 1 / (1 + max(0, L - rho) / (T - rho)); with a = the batch's accuracy, timeliness = mean d, accuracy = mean a,
  alignment = the sample covariance of a and d (n - 1; 0 for one batch), utility = accuracy * timeliness + alignment.
- amortised (Tempora's budget): with `runtime.overhead_budget_ms` O the method adapts until the summed overhead of its
  updates, max(0, update time - rho), reaches O, then only predicts; utility = the run's accuracy, with the batches
  cleared before the budget ran out and the overhead spent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .metrics import percentile
from .schedule import DEADLINE_TOLERANCE_MS

__all__ = ["TimeMeter", "continuous_utility", "time_summary"]


@dataclass
class TimeMeter:
    """Per-batch (correct, count, adapted, served, times) of a run, in batch order."""

    correct: list[int] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    adapted: list[bool] = field(default_factory=list)
    served: list[bool] = field(default_factory=list)
    times: list[tuple[float, float, float]] = field(default_factory=list)

    def update(self, rec: Mapping[str, Any]) -> None:
        """Add one results line (a line without time fields is a classic step: adapted, served)."""
        self.correct.append(int(rec["correct"]))
        self.count.append(int(rec["count"]))
        self.adapted.append(bool(rec.get("adapted", True)))
        self.served.append(rec.get("why") != "busy")
        t = rec.get("t_ms")
        if t is not None:
            self.times.append((float(t[0]), float(t[1]), float(t[2])))

    @property
    def n_adapted(self) -> int:
        return sum(self.adapted)

    def latencies(self) -> list[float]:
        return [finish - arrive for arrive, _, finish in self.times]


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    return {
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values),
    }


def _error(correct: Sequence[int], count: Sequence[int]) -> float | None:
    n = sum(count)
    return 100.0 * (1.0 - sum(correct) / n) if n else None


def continuous_utility(
    accuracy: Sequence[float], latency_ms: Sequence[float], rho_ms: float, threshold_ms: float
) -> dict[str, float]:
    """Tempora's continuous utility of per-batch accuracies and response latencies (module doc)."""
    if not threshold_ms > rho_ms:
        raise ValueError(f"the decay threshold ({threshold_ms} ms) must exceed the response budget ({rho_ms} ms)")
    k = 1.0 / (threshold_ms - rho_ms)
    discount = [1.0 / (1.0 + k * max(0.0, lat - rho_ms)) for lat in latency_ms]
    n = len(discount)
    mean_a, mean_d = sum(accuracy) / n, sum(discount) / n
    cov = sum((a - mean_a) * (d - mean_d) for a, d in zip(accuracy, discount)) / (n - 1) if n > 1 else 0.0
    return {
        "response_budget_ms": rho_ms,
        "decay_threshold_ms": threshold_ms,
        "timeliness": mean_d,
        "alignment": cov,
        "accuracy": mean_a,
        "utility": mean_a * mean_d + cov,
    }


def time_summary(meter: TimeMeter, rt: Any, clock: Mapping[str, Any] | None) -> dict[str, Any]:
    """The summary's time fields: `n_adapted_batches`, `adapted_share`, and `time` (None when the run kept no clock:
    the classic loop), from the lines in `meter`, the runtime settings `rt` and the pacer's `clock` summary."""
    n = len(meter.count)
    out: dict[str, Any] = {
        "n_adapted_batches": meter.n_adapted,
        "adapted_share": meter.n_adapted / n if n else None,
        "time": None,
    }
    if clock is None or len(meter.times) != n or n == 0:
        return out
    lat = meter.latencies()
    waits = [start - arrive for arrive, start, _ in meter.times]
    images = sum(meter.count)
    adapted_c = [c for c, a in zip(meter.correct, meter.adapted) if a]
    adapted_n = [c for c, a in zip(meter.count, meter.adapted) if a]
    other_c = [c for c, a in zip(meter.correct, meter.adapted) if not a]
    other_n = [c for c, a in zip(meter.count, meter.adapted) if not a]
    served_c = sum(c for c, s in zip(meter.correct, meter.served) if s)
    served_n = sum(c for c, s in zip(meter.count, meter.served) if s)
    forward_ms = float(clock["forward_ms"])
    facts: dict[str, Any] = {
        **dict(clock),
        "adapted_image_share": sum(adapted_n) / images,
        "error_adapted_batches": _error(adapted_c, adapted_n),
        "error_predicted_batches": _error(other_c, other_n),
        "compute_ms_per_image": clock["compute_ms"] / images,
        "compute_forwards_per_batch": clock["compute_forwards"] / n,
        "response_ms": _stats(lat),
        "queue_delay_ms": _stats(waits),
        "makespan_ms": meter.times[-1][2] - meter.times[0][0],
        "deadline": _deadline(meter, lat, rt.deadline_ms),
    }
    rho = float(rt.response_budget_ms) if rt.response_budget_ms is not None else forward_ms
    threshold = float(rt.decay_threshold_ms) if rt.decay_threshold_ms is not None else 2.0 * rho
    accuracy = [c / k if k else 0.0 for c, k in zip(meter.correct, meter.count)]
    facts["utility"] = {
        "discrete": {
            "utility": served_c / images,
            "availability": served_n / images,
            "served_accuracy": served_c / served_n if served_n else None,
        },
        "continuous": continuous_utility(accuracy, lat, rho, threshold),
        "amortised": _amortised(meter, rt, clock, images),
    }
    return out | {"time": facts}


def _deadline(meter: TimeMeter, lat: Sequence[float], deadline_ms: float | None) -> dict[str, Any] | None:
    if deadline_ms is None:
        return None
    late = [x - deadline_ms > DEADLINE_TOLERANCE_MS for x in lat]
    on_time_correct = [c for c, miss in zip(meter.correct, late) if not miss]
    return {
        "deadline_ms": float(deadline_ms),
        "misses": sum(late),
        "miss_share": sum(late) / len(late),
        "error_within_deadline": 100.0 * (1.0 - sum(on_time_correct) / sum(meter.count)),
    }


def _amortised(meter: TimeMeter, rt: Any, clock: Mapping[str, Any], images: int) -> dict[str, Any] | None:
    if rt.overhead_budget_ms is None:
        return None
    return {
        "overhead_budget_ms": float(rt.overhead_budget_ms),
        "overhead_spent_ms": float(clock["overhead_ms"]),
        "batches_cleared": meter.n_adapted,
        "utility": sum(meter.correct) / images if images else math.nan,
    }
