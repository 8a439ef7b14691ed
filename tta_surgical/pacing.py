"""The engine's hook for runs under time pressure: each batch is adapted or only predicted as the schedule says.

`make_pacer(cfg, built)` returns None for the classic loop (as fast as possible, an update on every batch, nothing
timed): the engine then runs exactly the code every earlier result came from. Otherwise a `Pacer` runs each batch:

- **synchronously** (the default): `method.step(x)` on a batch the schedule adapts, `method.predict(x)` (the latest
  weights, no update, no state change) on the others; the schedule (`tta_surgical.schedule`) keeps the clock;
- **asynchronously** (`runtime.async_adapt`): every batch is predicted at once by the weights of the last finished
  update while the next update runs in the background. With measured costs it is real: a worker thread (on a GPU
  with its own CUDA stream) runs `method.step`, and predictions come from a serving copy of the method that the
  worker refreshes after each update under a lock, so a prediction never sees half-updated weights. With fixed
  costs it is simulated exactly: the update of a batch is applied when the clock passes its end (deferred), and
  every prediction before that uses the weights from before it.

The plain forward a stream speed and the default time budgets refer to is measured once per run (a copy of the
model in eval mode with its source statistics, contiguous, under inference_mode: the "plain inference" of `bench`)
unless `runtime.forward_ms` gives it; a resumed run keeps the value of its checkpoint.
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .methods.base import StepInfo
from .methods.bn import set_bn_stats
from .metrics import BatchTimer
from .schedule import Scheduler, Slot, cost_ratio_for, time_machinery_on
from .schema import ConfigError

__all__ = ["AsyncAdapter", "Pacer", "make_pacer", "measure_forward_ms"]

FORWARD_WARMUP, FORWARD_REPEATS = 1, 3  # 4 forwards once per run: the time a run under time pressure pays first


def measure_forward_ms(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """Median time (ms) of a plain forward of a random batch of `shape`: a copy of `model` in eval mode, source
    BatchNorm statistics, contiguous memory, inference_mode, device-synchronised; a warm-up forward first."""
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    set_bn_stats(plain, "source")
    plain.eval().requires_grad_(False)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    with torch.inference_mode():
        for i in range(FORWARD_WARMUP + FORWARD_REPEATS):
            with BatchTimer(device) as timer:
                plain(x)
            if i >= FORWARD_WARMUP:
                times.append(float(timer.ms))
    del plain
    return statistics.median(times)


def _predicts(cfg: Any) -> bool:
    """Whether a run may predict a batch without its step (then the prediction path is warmed up first)."""
    rt = cfg.runtime
    return bool(
        cfg.stream.arrival.timed
        or rt.update_every > 1
        or rt.latency_budget_ms is not None
        or rt.overhead_budget_ms is not None
        or rt.async_adapt
    )


def warm_up_predict(method: Any, shape: tuple[int, ...], device: torch.device) -> None:
    """Two predictions on a random batch (a prediction changes no state): lazy initialisation happens here."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)).to(device)
    if getattr(method, "model", None) is not None and _is_channels_last(method.model):
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        method.predict(x)


def _is_channels_last(model: torch.nn.Module) -> bool:
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@dataclass
class Report:
    """What a results line reads of the method (`last`, `n_skipped`) when the method itself is busy elsewhere."""

    last: Any
    n_skipped: int


def make_pacer(cfg: Any, built: Any) -> Pacer | None:
    """The pacer of a run, or None when nothing about time is asked (the classic loop runs unchanged)."""
    if not time_machinery_on(cfg.stream, cfg.runtime):
        return None
    return Pacer(cfg, built)


class Pacer:
    """Runs one batch at a time as the schedule decides (module doc); its state goes into the checkpoint."""

    def __init__(self, cfg: Any, built: Any) -> None:
        rt = cfg.runtime
        self.method, self.device = built.method, built.device
        sizes = [len(p) for p in built.stream.plan]
        self.forward_source = "given" if rt.forward_ms is not None else "measured"
        if rt.forward_ms is not None:
            forward_ms = float(rt.forward_ms)
        else:
            shape = (sizes[0], 3, cfg.stream.resolved_image_size, cfg.stream.resolved_image_size)
            forward_ms = measure_forward_ms(built.model, shape, built.device)
        step_units = cost_ratio_for(rt.cost_ratio, cfg.method) if rt.cost_mode == "fixed" else None
        self.schedule = Scheduler(sizes, cfg.stream.arrival, rt, forward_ms=forward_ms, step_units=step_units)
        self.step_units = step_units
        self.real_async = bool(rt.async_adapt) and rt.cost_mode == "measured"
        self.pending_x: Tensor | None = None  # fixed asynchronous mode: the batch of the update in flight
        self.adapter = AsyncAdapter(self.method, self.device) if self.real_async else None
        self._t0: float | None = None  # measured asynchronous mode: the real clock's start
        if rt.cost_mode == "measured" and _predicts(cfg):  # the first prediction's lazy set-up is no cost of the stream
            shape = (sizes[0], 3, cfg.stream.resolved_image_size, cfg.stream.resolved_image_size)
            warm_up_predict(self.adapter.serving if self.adapter is not None else self.method, shape, self.device)
        rho = rt.response_budget_ms if rt.response_budget_ms is not None else forward_ms
        if rt.decay_threshold_ms is not None and rt.decay_threshold_ms <= rho:
            raise ConfigError(
                f"runtime.decay_threshold_ms ({rt.decay_threshold_ms}) must exceed the response budget ({rho:.4g} ms"
                f"{'' if rt.response_budget_ms is not None else ', the plain forward measured in this run'})"
            )

    # ------------------------------------------------------------------------------------------------ one batch
    def run(self, index: int, x: Tensor, reset: bool) -> tuple[Tensor, float, dict[str, Any], Any]:
        """(logits, foreground ms, the results line's time fields, what the line reads of the method)."""
        if self.adapter is not None:
            return self._run_real_async(index, x, reset)
        slot = self.schedule.plan(index)
        method = self.method
        if slot.apply_pending and self.pending_x is not None:
            method.step(self.pending_x)  # the deferred update, finished before this batch arrived
            self.pending_x = None
        elif self.schedule.async_mode:
            method.last = StepInfo()
        if reset:
            self.schedule.cancel_pending()
            self.pending_x = None
            method.reset()
        sync_step = slot.adapt and not self.schedule.async_mode
        if not sync_step and not self.schedule.async_mode:
            method.last = StepInfo()
        with BatchTimer(self.device) as timer:
            logits = method.step(x) if sync_step else method.predict(x)
        if not sync_step and getattr(method, "selector", None) is not None:
            method.selector.note_skipped()  # `blocks: auto`: the line says nothing was adapted, and which statistics
        if slot.adapt and self.schedule.async_mode:
            self.pending_x = x
        self.schedule.done(slot, timer.ms)
        return logits, float(timer.ms), self._fields(slot), method

    def _run_real_async(self, index: int, x: Tensor, reset: bool) -> tuple[Tensor, float, dict[str, Any], Any]:
        adapter, schedule = self.adapter, self.schedule
        assert adapter is not None
        if self._t0 is None:
            self._t0 = time.perf_counter() - schedule.to_ms(schedule.last_finish) / 1000.0
        if schedule.offsets is not None:  # a timed stream: wait (really) for the batch to arrive
            wait_s = schedule.to_ms(schedule._arrival(index)) / 1000.0 - (time.perf_counter() - self._t0)
            if wait_s > 0:
                time.sleep(wait_s)
        if reset:
            adapter.drain()
            self.method.reset()
            adapter.publish()
        for ms in adapter.collect():
            schedule.update_finished(ms)
        slot = schedule.plan(index, now=self._now(), adapter_busy=adapter.busy())
        with BatchTimer(self.device) as timer:
            logits = adapter.predict(x)
        if slot.adapt:
            adapter.submit(x)
        schedule.done(slot, timer.ms)
        return logits, float(timer.ms), self._fields(slot), adapter.report()

    def _now(self) -> float:
        return (time.perf_counter() - (self._t0 or 0.0)) * 1000.0

    def _fields(self, slot: Slot) -> dict[str, Any]:
        fields: dict[str, Any] = {"adapted": bool(slot.adapt)}
        if not slot.adapt:
            fields["why"] = slot.why
        fields["t_ms"] = self.schedule.times_ms(slot)
        return fields

    # ------------------------------------------------------------------------------------------------ lifecycle
    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (and a deferred update's batch, on the CPU) for the checkpoint; waits for a
        background update first, so the method's state saved beside it is complete."""
        if self.adapter is not None:
            self.adapter.drain()
            for ms in self.adapter.collect():
                self.schedule.update_finished(ms)
        state: dict[str, Any] = {"schedule": self.schedule.state_dict()}
        if self.pending_x is not None:
            state["pending_x"] = self.pending_x.detach().cpu()
        return state

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        self.schedule.load_state_dict(state["schedule"])
        self.schedule.set_forward_ms(float(state["schedule"]["forward_ms"]))
        pending = state.get("pending_x")
        self.pending_x = pending.to(self.device) if pending is not None else None
        if self.adapter is not None:
            self.adapter.publish()

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.drain()
            for ms in self.adapter.collect():
                self.schedule.update_finished(ms)
            self.adapter.shutdown()

    def summary(self) -> dict[str, Any]:
        """What the run's summary says about its clock (beside the metrics of `timeliness`)."""
        s = self.schedule
        return {
            "cost_mode": "fixed" if s.fixed else "measured",
            "update_cost_forwards": float(self.step_units) if self.step_units is not None else None,
            "forward_ms": s.forward_ms,
            "forward_ms_source": self.forward_source,
            "asynchronous": "thread" if self.real_async else ("simulated" if s.async_mode else None),
            **s.totals(),
        }


class AsyncAdapter:
    """Background updates with a consistent serving copy (module doc): `predict` reads the serving copy under the
    lock; the worker runs `method.step` on its own (on a GPU: its own CUDA stream), then copies the method's state
    into the serving copy under the same lock. One update at a time; `busy()` says whether one is running."""

    def __init__(self, method: Any, device: torch.device) -> None:
        self.method = method
        self.serving = copy.deepcopy(method)
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tta-adapt")
        self.future: Future | None = None
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self._finished: list[float] = []
        self._report = Report(None, int(method.n_skipped))

    def busy(self) -> bool:
        """Whether an update is running; an update that failed raises its error here, at the next batch."""
        if self.future is not None and self.future.done() and self.future.exception() is not None:
            self.drain()
        return self.future is not None and not self.future.done()

    def predict(self, x: Tensor) -> Tensor:
        with self.lock:
            return self.serving.predict(x)

    def submit(self, x: Tensor) -> None:
        if self.cuda:
            assert self.side is not None
            self.side.wait_stream(torch.cuda.current_stream(x.device))
            x.record_stream(self.side)  # the caching allocator must not reuse x while the side stream reads it
        self.future = self.pool.submit(self._adapt, x)

    def _adapt(self, x: Tensor) -> None:
        t0 = time.perf_counter()
        if self.side is not None:
            with torch.cuda.stream(self.side):
                self.method.step(x)
            self.side.synchronize()
        else:
            self.method.step(x)
        ms = (time.perf_counter() - t0) * 1000.0
        self.publish()
        with self.lock:
            self._finished.append(ms)
            self._report = Report(copy.copy(self.method.last), int(self.method.n_skipped))

    def publish(self) -> None:
        """Copy the method's current state into the serving copy (under the lock: never seen half-copied)."""
        with self.lock:
            if self.side is not None:
                with torch.cuda.stream(self.side):
                    self.serving.load_state_dict(self.method.state_dict())
                self.side.synchronize()
            else:
                self.serving.load_state_dict(self.method.state_dict())

    def collect(self) -> list[float]:
        """The times (ms) of the updates that finished since the last call."""
        with self.lock:
            done, self._finished = self._finished, []
        return done

    def report(self) -> Report:
        """The last finished update's step report; a line whose batch started no new update shows that one."""
        with self.lock:
            report = self._report
            self._report = Report(None, report.n_skipped)
        return Report(report.last if report.last is not None else StepInfo(), report.n_skipped)

    def drain(self) -> None:
        """Wait for the update in flight (its exceptions surface here)."""
        if self.future is not None:
            self.future.result()
            self.future = None

    def shutdown(self) -> None:
        self.drain()
        self.pool.shutdown(wait=True)
