"""The schedule of a run under time pressure: which batches get an update, and when each batch arrives, starts and
finishes on the run's clock. Pure bookkeeping (no torch): the engine's pacer (`tta_surgical.pacing`) asks it before
each batch and tells it what the batch cost afterwards.

The clock. Two cost modes (`runtime.cost_mode`):

- `measured`: a batch costs what it took (milliseconds, device-synchronised): the protocol's answer for this device.
- `fixed`: an update costs `runtime.cost_ratio` plain forwards of a batch, a prediction without update one plain
  forward. The clock then runs in exact fractions of a plain forward, so the schedule (and every number of the run)
  is identical on any machine and in every rerun; times are shown in ms as units x `forward_ms` (given as
  `runtime.forward_ms`, else measured in the run: then only the ms values, not the schedule, depend on the machine).

Who processes what (`stream.arrival.protocol`):

- as fast as possible (no arrival clock): the next batch arrives when the previous one is done; nothing waits.
- `realistic` (Alfarra et al., ICML 2024): a batch that arrives while the last update is still running is predicted
  by the latest weights without an update; such predictions run beside the update (they do not occupy it), and the
  method adapts again on the first batch that arrives after its update is done. A method k x slower than the stream
  adapts on one batch in ceil(k).
- `queue`: batches wait for the method, which processes them one at a time in arrival order; the wait is measured.
- asynchronous adaptation (`runtime.async_adapt`): every batch is predicted at once by the weights of the last
  *finished* update, while the adapter runs the update of the last batch it took in the background.

Update budgets (applied on top, in this order): `runtime.update_every: k` (batch_index % k == 0 may adapt);
Tempora's amortised budget `runtime.overhead_budget_ms` (adapt until the summed overhead of updates, max(0, cost -
response budget), reaches it; then never again); `runtime.latency_budget_ms` (adapt only when the batch's expected
latency keeps the running mean, or the p95, of the per-batch latency within the budget; module `budget_allows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .schema import ConfigError
from .streams.arrival import ArrivalSpec, arrival_offsets, exact

__all__ = [
    "DEADLINE_TOLERANCE_MS",
    "Scheduler",
    "Slot",
    "check_time_config",
    "cost_ratio_for",
    "method_label",
    "time_machinery_on",
]

# A latency counts as over a deadline or budget only when it exceeds it by more than this (results lines keep times
# to 1e-4 ms, so an exact tie stays a tie after rounding).
DEADLINE_TOLERANCE_MS = 1e-3
Time = Any  # Fraction (fixed mode: plain-forward units) or float (measured mode: ms)


def time_machinery_on(stream: Any, rt: Any) -> bool:
    """Whether a run needs the schedule: anything but as-fast-as-possible, updating on every batch, synchronously,
    with measured costs and no time metric asked for runs exactly the loop every earlier result came from."""
    return bool(
        stream.arrival.timed
        or rt.cost_mode == "fixed"
        or rt.update_every > 1
        or rt.latency_budget_ms is not None
        or rt.overhead_budget_ms is not None
        or rt.deadline_ms is not None
        or rt.async_adapt
        or rt.record_times
    )


def check_time_config(stream: Any, rt: Any) -> None:
    """Cross-section rules of `stream.arrival` and the runtime's time keys (each section checks its own values)."""
    arrival: ArrivalSpec = stream.arrival
    if rt.cost_mode == "fixed" and arrival.timed and not arrival.relative and rt.forward_ms is None:
        raise ConfigError(
            "runtime.cost_mode=fixed with arrivals in seconds (stream.arrival.rate or a trace) needs "
            "runtime.forward_ms (the plain forward's time per batch that the fixed cost ratios are in units of); or "
            "give the arrival as stream.arrival.speed"
        )
    if rt.async_adapt and arrival.timed and arrival.protocol == "queue":
        raise ConfigError(
            "runtime.async_adapt predicts every batch at once and never queues one: use it with "
            "stream.arrival.protocol=realistic (or an as_fast_as_possible stream)"
        )


def method_label(method: Any) -> str:
    """`tent` for a method on its own parameters; `tent:block1+block2` for every parameter of chosen blocks;
    `tent:block1/norm` for another kind (the labels of `tta-surgical bench` and of `runtime.cost_ratio` tables)."""
    name = str(method.name)
    fields = getattr(type(method), "__dataclass_fields__", {})
    if "blocks" not in fields or "kind" not in fields:
        return name
    blocks = method.blocks if isinstance(method.blocks, (list, tuple)) else (method.blocks,)
    default_blocks, default_kind = tuple(fields["blocks"].default), fields["kind"].default
    if tuple(blocks) == default_blocks and method.kind == default_kind:
        return name
    label = f"{name}:{'+'.join(map(str, blocks))}"
    return label if method.kind == "all" else f"{label}/{method.kind}"


def cost_ratio_for(table: float | Mapping[str, float] | None, method: Any) -> Fraction | None:
    """The fixed cost of an update of `method` in plain forwards: the number, or the table's entry for the method's
    label (`method_label`), else for its name, else for `*`. A table without any of them is an error."""
    if table is None:
        return None
    if isinstance(table, (int, float)):
        return exact(table)
    label = method_label(method)
    for key in (label, str(method.name), "*"):
        if key in table:
            return exact(table[key])
    raise ConfigError(
        f"runtime.cost_ratio has no entry for {label!r} (nor {method.name!r} or '*'); keys: {', '.join(table)}"
    )


@dataclass
class Slot:
    """One batch's place in the schedule: whether it is adapted and its times (ms on the run's clock).

    adapt: the method takes its step on this batch (predict and update); otherwise `method.predict` only.
    why: for a batch not adapted, the reason: busy (an update still running), every (update_every), overhead
        (the amortised budget is spent), budget (the latency budget), "" when adapted.
    apply_pending: asynchronous mode, fixed cost: the deferred update that finished before this batch arrived
        must be applied first (the pacer runs it).
    """

    index: int
    adapt: bool
    why: str
    arrive: Time
    start: Time
    apply_pending: bool = False
    finish: Time = None


class Scheduler:
    """Decides, batch by batch, adapt or predict, and keeps the clock (module doc). State is plain data, so a
    checkpoint holds it and a resumed run continues with exactly the same decisions (fixed mode)."""

    def __init__(
        self,
        batch_sizes: Sequence[int],
        arrival: ArrivalSpec,
        rt: Any,
        *,
        forward_ms: float,
        step_units: Fraction | None,
    ) -> None:
        self.fixed = rt.cost_mode == "fixed"
        if self.fixed and step_units is None:
            raise ConfigError("runtime.cost_mode=fixed needs runtime.cost_ratio (an update's cost in plain forwards)")
        self.rt, self.arrival = rt, arrival
        self.protocol = arrival.protocol if arrival.timed else "afap"
        self.async_mode = bool(rt.async_adapt)
        self.step_units = step_units
        self.offsets = arrival_offsets(arrival, batch_sizes)
        self.set_forward_ms(forward_ms)
        zero = Fraction(0) if self.fixed else 0.0
        # The state (all checkpointed): when the adapter (the method's update) is free, when the last batch finished,
        # the latency budget's running sums, the amortised overhead spent, the pending asynchronous update, the costs.
        self.free_at, self.last_finish, self.pending_finish = zero, zero, None
        self.lat_sum, self.n_lat, self.n_over = zero, 0, 0
        self.overhead = zero
        self.last_step_cost: Time = self.step_units if self.fixed else None
        self.compute = zero  # the compute the batches used (updates + predictions), for the cost per image
        self.n_adapted = 0

    # ------------------------------------------------------------------------------------------------ units
    def set_forward_ms(self, forward_ms: float) -> None:
        """The plain forward's time, and the budgets it puts on the clock (a resumed run restores its run's)."""
        rt = self.rt
        self.forward_ms = float(forward_ms)
        self._fwd = exact(self.forward_ms) if self.fixed else None
        self.budget = self._in_clock(rt.latency_budget_ms)
        self.rho = self._in_clock(rt.response_budget_ms) if rt.response_budget_ms is not None else self.one_forward
        self.overhead_budget = self._in_clock(rt.overhead_budget_ms)

    @property
    def one_forward(self) -> Time:
        return Fraction(1) if self.fixed else self.forward_ms

    def _in_clock(self, ms: float | None) -> Time:
        if ms is None:
            return None
        return exact(ms) / self._fwd if self.fixed else float(ms)

    def to_ms(self, t: Time) -> float:
        return float(t * self._fwd) if self.fixed else float(t)

    def _arrival(self, index: int) -> Time:
        if self.offsets is None:
            return self.last_finish  # as fast as possible: the batch arrives when the previous one is done
        t = self.offsets[index]
        if self.arrival.relative:
            return t if self.fixed else float(t) * self.forward_ms
        return t * 1000 / self._fwd if self.fixed else float(t) * 1000.0

    # ------------------------------------------------------------------------------------------------ decisions
    def plan(self, index: int, *, now: float | None = None, adapter_busy: bool | None = None) -> Slot:
        """The decision for batch `index` (batches are planned in order, each once, then `done`).

        now / adapter_busy: asynchronous mode with measured costs, where time and the adapter are real: the run's
        clock now (ms; an as-fast-as-possible batch arrives now, a timed one starts no earlier) and whether the
        background update is still running.
        """
        arrive = now if (now is not None and self.offsets is None) else self._arrival(index)
        apply_pending = False
        if adapter_busy is not None:
            start, busy = (max(arrive, now) if now is not None else arrive), adapter_busy
        elif self.async_mode:
            if self.pending_finish is not None and self.pending_finish <= arrive:
                apply_pending, self.pending_finish = True, None
            start, busy = arrive, self.pending_finish is not None
        elif self.protocol == "realistic":
            start, busy = arrive, self.free_at > arrive
        else:  # queue, or as fast as possible: the batch starts when the pipeline is free
            start, busy = max(arrive, self.free_at), False
        why = self._veto(index, start - arrive, busy)
        return Slot(index, not why, why, arrive, start, apply_pending)

    def _veto(self, index: int, wait: Time, busy: bool) -> str:
        if busy:
            return "busy"
        if index % int(self.rt.update_every):
            return "every"
        if self.overhead_budget is not None and self.overhead >= self.overhead_budget:
            return "overhead"
        if self.budget is not None and not self.async_mode and not self.budget_allows(wait):
            return "budget"
        return ""

    def budget_allows(self, wait: Time) -> bool:
        """Whether an update now keeps the latency statistic within `runtime.latency_budget_ms`.

        mean: (latencies so far + wait + expected update cost) / (n + 1) <= budget. p95: with this batch over the
        budget, at most n - ceil(0.95 n) of the n + 1 latencies exceed it (then the 95th percentile, linearly
        interpolated as NumPy does, is within it). The expected cost is the fixed cost, or the last measured update
        (the first update is always allowed: nothing is known yet).
        """
        if self.last_step_cost is None:
            return True
        latency = wait + self.last_step_cost
        if self.rt.latency_budget_stat == "mean":
            return (self.lat_sum + latency) / (self.n_lat + 1) <= self.budget
        over = self.n_over + self._over(latency, self.budget)
        return over <= self.n_lat - (-(-95 * self.n_lat // 100))  # n - ceil(0.95 n), in integers

    def _over(self, latency: Time, limit: Time) -> bool:
        """latency > limit: exactly on the fixed clock; beyond the rounding tolerance on a measured one."""
        if self.fixed:
            return latency > limit
        return latency - limit > DEADLINE_TOLERANCE_MS

    def done(self, slot: Slot, measured_ms: float) -> Slot:
        """Account the finished batch: `measured_ms` is the foreground work's time (the step, or the prediction;
        unused with fixed costs). Fills `slot.finish`."""
        if self.fixed:
            cost = self.step_units if slot.adapt and not self.async_mode else Fraction(1)
        else:
            cost = float(measured_ms)
        slot.finish = slot.start + cost
        self.compute += cost
        if slot.adapt:
            self.n_adapted += 1
            if self.async_mode:
                if self.fixed:  # the simulated background update: known cost, applied when the clock passes its end
                    self.compute += self.step_units
                    self.overhead += max(self.step_units - self.rho, Fraction(0))
                    self.pending_finish = self.free_at = slot.start + self.step_units
                # measured: the worker reports its time when it finishes (update_finished)
            else:
                update = cost
                self.overhead += max(update - self.rho, 0 * update)
                self.last_step_cost = update
                self.free_at = slot.finish
        elif self.protocol in ("queue", "afap") and not self.async_mode:
            self.free_at = slot.finish  # a prediction occupies the one pipeline too
        self.last_finish = slot.finish
        latency = slot.finish - slot.arrive
        self.lat_sum += latency
        self.n_lat += 1
        if self.budget is not None and self._over(latency, self.budget):
            self.n_over += 1
        return slot

    def update_finished(self, update_ms: float) -> None:
        """Asynchronous mode, measured: a background update took `update_ms` (its compute and overhead count)."""
        update = float(update_ms)
        self.compute += update
        self.overhead += max(update - self.rho, 0.0)
        self.last_step_cost = update

    def cancel_pending(self) -> None:
        """A reset discards an update still in flight (fixed asynchronous mode)."""
        self.pending_finish = None
        self.free_at = min(self.free_at, self.last_finish)

    def times_ms(self, slot: Slot) -> list[float]:
        """[arrive, start, finish] in ms, rounded to 1e-4 ms (as the results line holds them)."""
        return [round(self.to_ms(t), 4) for t in (slot.arrive, slot.start, slot.finish)]

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        keys = ("free_at", "last_finish", "pending_finish", "lat_sum", "overhead", "last_step_cost", "compute")
        state = {k: _encode(getattr(self, k)) for k in keys}
        state.update(n_lat=self.n_lat, n_over=self.n_over, n_adapted=self.n_adapted, forward_ms=self.forward_ms)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in ("free_at", "last_finish", "pending_finish", "lat_sum", "overhead", "last_step_cost", "compute"):
            setattr(self, k, _decode(state[k]))
        self.n_lat, self.n_over, self.n_adapted = int(state["n_lat"]), int(state["n_over"]), int(state["n_adapted"])

    def totals(self) -> dict[str, Any]:
        """The run's compute (ms, and in plain forwards) and adapted batches, for the summary."""
        compute_ms = self.to_ms(self.compute)
        return {
            "compute_ms": compute_ms,
            "compute_forwards": float(self.compute) if self.fixed else compute_ms / self.forward_ms,
            "n_adapted": self.n_adapted,
            "overhead_ms": self.to_ms(self.overhead),
        }


def _encode(v: Time) -> Any:
    """Plain values a weights-only checkpoint holds: a Fraction as [numerator, denominator]."""
    if isinstance(v, Fraction):
        return [v.numerator, v.denominator]
    return v


def _decode(v: Any) -> Time:
    if isinstance(v, (list, tuple)):
        return Fraction(int(v[0]), int(v[1]))
    return v
