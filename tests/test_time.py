"""Contracts of runs under time pressure (issue 22): arrival models, the realistic and queue protocols, fixed and
measured costs, update budgets, asynchronous adaptation, resume, and the time-contingent metrics.

A tiny seeded BatchNorm CNN (`tests/_toy_methods.TinyNet` as a `module:` model) over images held in memory (two
domains x 48 images of 8x8 pixels, batches of 4 = 24 batches, continual), so every run takes well under a second.
Fixed-cost runs give `runtime.forward_ms`, so their every number (times included) is machine-independent.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.studies.time_overhead import bookkeeping_us_per_batch
from tta_surgical.config import ConfigError, load_config
from tta_surgical.engine import RESULTS_FILE, STATE_FILE, build, run
from tta_surgical.guards import batch_prediction_stats
from tta_surgical.schedule import Scheduler, cost_ratio_for, method_label
from tta_surgical.streams import MemorySource
from tta_surgical.streams.arrival import ArrivalSpec, arrival_offsets
from tta_surgical.timeliness import TimeMeter, continuous_utility, time_summary

N, BATCH, DOMAINS = 48, 4, ("fog", "snow")
N_BATCHES = 2 * N // BATCH
TIMING = ("latency_ms", "warmup")  # the only per-line values that may differ between equal runs
FIXED = ["runtime.cost_mode=fixed", "runtime.forward_ms=10"]


def realistic(speed: float, ratio: float | str, *extra: str) -> list[str]:
    return ["stream.arrival.kind=constant", f"stream.arrival.speed={speed}", *FIXED, f"runtime.cost_ratio={ratio}",
            *extra]  # fmt: skip


def cfg(*extra: str, method: str = "tent"):
    return load_config(
        overrides=[
            "model.name=module:_toy_methods:TinyNet",
            f"method.name={method}",
            "stream.source=memory",
            f"stream.domains=[{','.join(DOMAINS)}]",
            f"stream.n_examples={N}",
            f"stream.batch_size={BATCH}",
            "stream.reset=never",
            "runtime.device=cpu",
            "runtime.progress=false",
            "runtime.channels_last=false",
            "optim.lr=0.05",  # updates that visibly move a toy model's predictions
            *extra,
        ]
    )


def source() -> MemorySource:
    """Images of one random colour each plus texture, so the toy model's predictions differ between images."""
    g = np.random.default_rng(0)
    images = {
        (d, 5): (g.uniform(0, 180, (N, 3, 1, 1)) + g.uniform(0, 75, (N, 3, 8, 8))).astype(np.uint8) for d in DOMAINS
    }
    return MemorySource(images, g.integers(0, 5, N))


def go(tmp_path: Path, *extra: str, name: str = "run", method: str = "tent", **kw) -> tuple[dict, list[dict]]:
    out = tmp_path / name
    summary = run(cfg(*extra, method=method), out, source=source(), record_predictions=True, **kw)
    return summary, lines_of(out)


def lines_of(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / RESULTS_FILE).read_text().splitlines() if x.strip()]


def stable(lines: list[dict], drop: tuple[str, ...] = TIMING) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in lines]


def adapted_indices(lines: list[dict]) -> list[int]:
    return [r["batch_index"] for r in lines if r.get("adapted", True)]


# ------------------------------------------------------------------------------------------------ the protocol


@pytest.mark.parametrize(
    ("speed", "ratio", "every"),
    [(1, 1, 1), (1, 2, 2), (1, 2.28, 3), (1, 3, 3), (0.5, 2.28, 2), (0.25, 2.28, 1), (0.5, 4, 2), (1, 38.4, 39)],
)
def test_fixed_ratio_adapts_exactly_one_batch_in_ceil_k(tmp_path, speed, ratio, every):
    """A method k plain forwards slow on a stream that brings a batch every 1/speed forwards adapts on one batch in
    ceil(k * speed); the others are predicted while it is busy; n_updates agrees."""
    summary, lines = go(tmp_path, *realistic(speed, ratio))
    assert adapted_indices(lines) == list(range(0, N_BATCHES, every))
    assert all(r["why"] == "busy" for r in lines if not r["adapted"])
    assert summary["n_adapted_batches"] == len(range(0, N_BATCHES, every)) == summary["n_updates"]
    assert summary["protocol"] == "realistic"
    gap = 10.0 / speed
    assert [r["t_ms"][0] for r in lines] == [pytest.approx(i * gap) for i in range(N_BATCHES)]
    # an update costs ratio forwards, a prediction one; predictions never wait (start = arrival)
    for r in lines:
        arrive, start, finish = r["t_ms"]
        assert start == arrive and finish - start == pytest.approx(10.0 * (ratio if r["adapted"] else 1))


def _reference_predictions(config, adapted: set[int], deferred: bool = False) -> list[tuple[list[int], float]]:
    """The protocol written out: step on the adapted batches, `method.predict` (the current weights) on the others.
    deferred (asynchronous): every batch is predicted, and the update of an adapted batch is applied only when the
    next adapted batch comes (the weights of the last *finished* update serve everything in between)."""
    built = build(config, source=source())
    method, preds, pending = built.method, [], None
    for batch in built.stream:
        x = batch.x
        if deferred:
            if batch.batch_index in adapted and pending is not None:
                method.step(pending)
            logits = method.predict(x)
            pending = x if batch.batch_index in adapted else pending
        else:
            logits = method.step(x) if batch.batch_index in adapted else method.predict(x)
        preds.append((logits.argmax(1).tolist(), batch_prediction_stats(logits, batch.y)[1]))
    return preds


def outputs(lines: list[dict]) -> list[tuple[list[int], float]]:
    """Each batch's predicted labels and mean prediction entropy (which any change of the logits moves)."""
    return [(r["pred"], r["pred_entropy"]) for r in lines]


def test_predicted_batches_are_the_latest_weights_prediction(tmp_path):
    """Every batch not adapted is exactly `method.predict` with the weights of the updates so far (Alfarra et al.'s
    latest adapted model), and an adapted batch is the method's own step."""
    summary, lines = go(tmp_path, *realistic(1, 2.28))
    adapted = set(adapted_indices(lines))
    assert outputs(lines) == _reference_predictions(cfg(*realistic(1, 2.28)), adapted)
    # the check can fail: another schedule (an update on every batch) gives other outputs
    assert outputs(lines) != _reference_predictions(cfg(*realistic(1, 2.28)), set(range(N_BATCHES)))


def test_fixed_mode_reruns_are_identical(tmp_path):
    a_sum, a = go(tmp_path, *realistic(0.5, 2.28, "runtime.deadline_ms=25"), name="a")
    b_sum, b = go(tmp_path, *realistic(0.5, 2.28, "runtime.deadline_ms=25"), name="b")
    assert stable(a) == stable(b)
    drop = {"wall_s_this_session", "timing_this_session", "latency_ms", "images_per_s", "peak_memory_mb",
            "cpu_s_this_session", "cpu_s_step_this_session"}  # fmt: skip
    assert {k: v for k, v in a_sum.items() if k not in drop} == {k: v for k, v in b_sum.items() if k not in drop}
    # without runtime.forward_ms only the ms values depend on the machine: the schedule and the errors do not
    c_sum, c = go(tmp_path, *[o for o in realistic(0.5, 2.28) if "forward_ms" not in o], name="c")
    assert stable(c, (*TIMING, "t_ms")) == stable(a, (*TIMING, "t_ms"))
    assert c_sum["time"]["forward_ms_source"] == "measured" and a_sum["time"]["forward_ms_source"] == "given"


def test_queue_protocol_adapts_every_batch_and_measures_the_wait(tmp_path):
    summary, lines = go(tmp_path, *realistic(1, 2, "stream.arrival.protocol=queue"))
    assert adapted_indices(lines) == list(range(N_BATCHES)) and summary["protocol"] == "queue"
    # arrivals every 10 ms, each update 20 ms: batch i starts at 20 i, after waiting 10 i
    assert [r["t_ms"] for r in lines] == [[10.0 * i, 20.0 * i, 20.0 * i + 20] for i in range(N_BATCHES)]
    delay = summary["time"]["queue_delay_ms"]
    assert delay["max"] == pytest.approx(10.0 * (N_BATCHES - 1))
    assert delay["mean"] == pytest.approx(5.0 * (N_BATCHES - 1))


def test_trace_and_rate_arrivals(tmp_path):
    # a trace in seconds: a burst of 3 batches, then quiet; with fixed costs it needs runtime.forward_ms
    times = [0.0, 0.0, 0.0] + [0.1 * i for i in range(1, N_BATCHES - 2)]
    trace = tmp_path / "trace.txt"
    trace.write_text("# arrival seconds\n" + "\n".join(map(str, times)) + "\n")
    over = ["stream.arrival.kind=trace", f"stream.arrival.trace_file={trace}", *FIXED, "runtime.cost_ratio=3"]
    summary, lines = go(tmp_path, *over)
    assert [r["t_ms"][0] for r in lines] == [pytest.approx(1000 * t) for t in times]
    assert adapted_indices(lines)[:3] == [0, 3, 4]  # busy until 30 ms: the burst's 2nd and 3rd are predicted
    spec = ArrivalSpec(kind="constant", rate=8.0)  # 8 images/s, batches of 4: one every 0.5 s
    assert arrival_offsets(spec, [4, 4, 5]) == [0, Fraction(1, 2), Fraction(1)]
    with pytest.raises(ConfigError, match="holds 3 arrival times but the stream has 24 batches"):
        go(tmp_path, "stream.arrival.kind=trace", "stream.arrival.trace=[0, 1, 2]", name="short")


# ------------------------------------------------------------------------------------------------ update budgets


def test_update_every_adapts_one_batch_in_k_and_predicts_the_rest_with_the_latest_weights(tmp_path):
    summary, lines = go(tmp_path, "runtime.update_every=3")
    assert adapted_indices(lines) == list(range(0, N_BATCHES, 3)) and summary["n_updates"] == N_BATCHES // 3
    assert {r["why"] for r in lines if not r["adapted"]} == {"every"}
    assert outputs(lines) == _reference_predictions(cfg(), set(range(0, N_BATCHES, 3)))
    assert summary["protocol"] == "wait" and summary["time"]["cost_mode"] == "measured"


@pytest.mark.parametrize("stat", ["mean", "p95"])
def test_latency_budget_keeps_the_statistic_within_it(tmp_path, stat):
    """Updates cost 3 forwards (30 ms), predictions 1 (10 ms); a budget of 20 ms: the mean rule adapts as often as
    the mean allows (half the batches), the p95 rule only while at most 5% of the latencies exceed it."""
    over = [*FIXED, "runtime.cost_ratio=3", "runtime.latency_budget_ms=20", f"runtime.latency_budget_stat={stat}"]
    summary, lines = go(tmp_path, *over)
    latency = [r["t_ms"][2] - r["t_ms"][0] for r in lines]
    response = summary["time"]["response_ms"]
    if stat == "mean":
        assert response["mean"] <= 20.0 and summary["n_adapted_batches"] == N_BATCHES // 2
        assert sum(latency) / len(latency) == pytest.approx(20.0)
    else:
        assert response["p95"] <= 20.0 and 0 < summary["n_adapted_batches"] <= 2
        assert sum(x > 20 for x in latency) == summary["n_adapted_batches"]
    assert {r["why"] for r in lines if not r["adapted"]} == {"budget"}
    # without the budget every batch is adapted: the rule is what made the difference
    free, _ = go(tmp_path, *FIXED, "runtime.cost_ratio=3", name="free")
    assert free["n_adapted_batches"] == N_BATCHES and free["time"]["response_ms"]["mean"] == pytest.approx(30.0)


def test_amortised_overhead_budget_stops_adapting_when_spent(tmp_path):
    """Tempora's amortised budget: overhead per update = 30 ms - rho (10 ms, one forward) = 20 ms; a budget of 50 ms
    is reached after the third update, then the method only predicts."""
    summary, lines = go(tmp_path, *FIXED, "runtime.cost_ratio=3", "runtime.overhead_budget_ms=50")
    assert adapted_indices(lines) == [0, 1, 2]
    assert {r["why"] for r in lines[3:]} == {"overhead"}
    amortised = summary["time"]["utility"]["amortised"]
    assert amortised["batches_cleared"] == 3 and amortised["overhead_spent_ms"] == pytest.approx(60.0)
    assert amortised["utility"] == pytest.approx(1 - summary["online_error"] / 100)


# ------------------------------------------------------------------------------------------------ asynchronous


def test_async_fixed_predicts_every_batch_with_the_last_finished_update(tmp_path):
    """Simulated asynchronous adaptation: every batch is predicted at once, by the weights of the last update that
    finished before it arrived (not the one still running); the adapted batches are those of the realistic run."""
    summary, lines = go(tmp_path, *realistic(1, 2.28, "runtime.async_adapt=true"))
    adapted = set(adapted_indices(lines))
    assert sorted(adapted) == list(range(0, N_BATCHES, 3)) and summary["protocol"] == "realistic+async"
    assert all(r["t_ms"][2] - r["t_ms"][0] == pytest.approx(10.0) for r in lines)  # every prediction: one forward
    assert outputs(lines) == _reference_predictions(cfg(*realistic(1, 2.28)), adapted, deferred=True)
    _, sync = go(tmp_path, *realistic(1, 2.28), name="sync")
    assert outputs(lines) != outputs(sync)  # the two conventions differ on this stream


def _serves_only_complete_states(device: str) -> None:
    """While updates run in the background, every prediction equals the prediction of one complete published state
    (never a mix of two: a torn read would match none); the updates all happen."""
    from tta_surgical.pacing import AsyncAdapter

    built = build(cfg(f"runtime.device={device}"), source=source())
    method = built.method
    states: list[dict] = []
    adapter = AsyncAdapter(method, built.device)
    publish = adapter.publish

    def recording_publish() -> None:
        publish()
        states.append({k: v.clone() for k, v in adapter.serving.model.state_dict().items()})

    adapter.publish = recording_publish  # type: ignore[method-assign]
    adapter.publish()
    batches = [b.x for b in built.stream]
    served, during = [], []
    for i in range(5000):  # predict continuously while updates run, until several have finished
        if method.n_updates >= 4:
            break
        x = batches[i % len(batches)]
        if not adapter.busy():
            adapter.submit(x)
        during.append(adapter.busy())
        served.append((x, adapter.predict(x)))
    adapter.shutdown()
    assert method.n_updates >= 4 and len(states) == method.n_updates + 1
    assert sum(during) >= 4  # predictions were served while an update was running
    served = served[:: max(1, len(served) // 300)]  # a sample, to keep the check fast
    probe = build(cfg(f"runtime.device={device}"), source=source()).method
    for x, logits in served:
        matches = 0
        for state in states:
            probe.model.load_state_dict(state)
            matches += torch.equal(probe.predict(x), logits)
        assert matches >= 1


def test_async_thread_serves_only_complete_weight_states():
    _serves_only_complete_states("cpu")


@pytest.mark.gpu
def test_async_cuda_stream_serves_only_complete_weight_states():
    """The same on a GPU, where the update runs on its own CUDA stream."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _serves_only_complete_states("cuda")


def test_async_thread_run_is_consistent(tmp_path):
    summary, lines = go(tmp_path, "runtime.async_adapt=true")
    assert summary["protocol"] == "async" and summary["time"]["asynchronous"] == "thread"
    assert 1 <= summary["n_adapted_batches"] <= N_BATCHES and lines[0]["adapted"]
    assert summary["n_updates"] == summary["n_adapted_batches"]  # every submitted update finished (drained)


# ------------------------------------------------------------------------------------------------ the classic loop


def test_as_fast_as_possible_lines_are_unchanged_and_the_clock_changes_no_number(tmp_path):
    """The default run writes exactly the old results line; with the clock on (record_times) every old field of
    every line is identical, and the new fields say every batch was adapted with no wait."""
    off_sum, off = go(tmp_path, name="off")
    old_keys = {"batch_index", "domain", "severity", "correct", "count", "loss", "pred_entropy", "top_class",
                "top_class_share", "latency_ms", "n_skipped", "n_filtered", "method_reset", "reset", "segment_end",
                "finite", "warmup", "pred"}  # fmt: skip
    guard = {"ref_agree", "ref_flip", "ref_entropy", "ref_correct"}  # the drift guard's signals, on checked batches
    assert all(set(r) - guard == old_keys for r in off) and off_sum["time"] is None
    assert any(guard <= set(r) for r in off)  # the guard still runs beside the clock
    assert off_sum["n_adapted_batches"] == N_BATCHES and off_sum["protocol"] == "wait"
    on_sum, on = go(tmp_path, "runtime.record_times=true", name="on")
    assert stable(on, (*TIMING, "adapted", "t_ms")) == stable(off)
    assert all(r["adapted"] and r["t_ms"][0] == r["t_ms"][1] for r in on)
    assert on_sum["online_error"] == off_sum["online_error"] and on_sum["time"]["adapted_image_share"] == 1.0


# ------------------------------------------------------------------------------------------------ resume


class Crash(RuntimeError):
    pass


def _crash_at(k: int):
    def hook(batch_index: int, record: dict) -> None:
        if batch_index == k:
            raise Crash(k)

    return hook


@pytest.mark.parametrize(
    "extra",
    [
        realistic(1, 2.28),
        realistic(1, 2.28, "runtime.async_adapt=true"),  # an update in flight across the checkpoint
        [*FIXED, "runtime.cost_ratio=3", "runtime.latency_budget_ms=20"],
        [*FIXED, "runtime.cost_ratio=3", "runtime.overhead_budget_ms=50", "runtime.update_every=2"],
    ],
    ids=["realistic", "async", "budget", "amortised"],
)
def test_resume_mid_run_equals_an_uninterrupted_run(tmp_path, extra):
    whole_sum, whole = go(tmp_path, *extra, name="whole")
    folder = tmp_path / "crashed"
    with pytest.raises(Crash):
        run(cfg(*extra), folder, source=source(), record_predictions=True, on_batch=_crash_at(11), checkpoint_every=5)
    assert torch.load(folder / STATE_FILE, weights_only=True)["next_batch"] == 10
    resumed = run(cfg(*extra), folder, source=source(), record_predictions=True, resume=True, checkpoint_every=5)
    assert resumed["resumed_from_batch"] == 10
    assert stable(lines_of(folder)) == stable(whole)
    for key in ("online_error", "n_adapted_batches", "n_updates"):
        assert resumed[key] == whole_sum[key]
    drop = ("forward_ms_source",)
    assert {k: v for k, v in resumed["time"].items() if k not in drop} == {
        k: v for k, v in whole_sum["time"].items() if k not in drop
    }


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (["runtime.cost_mode=fixed"], "needs runtime.cost_ratio"),
        (["runtime.cost_ratio=2"], "only with runtime.cost_mode=fixed"),
        (["stream.arrival.speed=1"], "stream.arrival.speed is set but stream.arrival.kind is as_fast_as_possible"),
        (["stream.arrival.kind=constant"], "needs exactly one of stream.arrival.rate or stream.arrival.speed"),
        (["stream.arrival.kind=constant", "stream.arrival.speed=0"], "positive finite number"),
        (["stream.arrival.kind=trace", "stream.arrival.trace=[0, 2, 1]"], "times must not decrease"),
        (["stream.arrival.kind=constant", "stream.arrival.rate=100", "runtime.cost_mode=fixed",
          "runtime.cost_ratio=2"], "needs runtime.forward_ms"),  # fmt: skip
        (["stream.arrival.kind=constant", "stream.arrival.speed=1", "stream.arrival.protocol=queue",
          "runtime.async_adapt=true"], "never queues"),  # fmt: skip
        (["runtime.update_every=0"], "update_every must be an integer >= 1"),
        (["runtime.latency_budget_stat=p99"], "choose one of: mean, p95"),
        (["runtime.response_budget_ms=10", "runtime.decay_threshold_ms=5"], "must exceed runtime.response_budget_ms"),
        (["runtime.deadline_ms=-1"], "positive number of milliseconds"),
        (["stream.arrival.kind=sometimes"], "stream.arrival.kind"),
    ],
)
def test_bad_time_settings_are_one_clear_error(over, message):
    with pytest.raises(ConfigError, match=message):
        cfg(*over)


def test_cost_ratio_tables_by_method_label():
    table = {"tent": 2.28, "tent:block1": 2.46, "eta:block2/norm": 1.5, "*": 9}
    assert method_label(cfg().method) == "tent" and cost_ratio_for(table, cfg().method) == Fraction("2.28")
    block1 = cfg("method.blocks=[block1]", "method.kind=all").method
    assert method_label(block1) == "tent:block1" and cost_ratio_for(table, block1) == Fraction("2.46")
    eta = cfg("method.blocks=[block2]", "method.kind=norm", method="eta").method
    assert method_label(eta) == "eta:block2/norm" and cost_ratio_for(table, eta) == Fraction(3, 2)
    assert cost_ratio_for(table, cfg(method="sar").method) == 9
    with pytest.raises(ConfigError, match="no entry for 'sar'"):
        cost_ratio_for({"tent": 2}, cfg(method="sar").method)


# ------------------------------------------------------------------------------------------------ metrics


def test_continuous_utility_is_tempora_s_formula():
    acc, lat = [1.0, 0.5, 0.0], [40.0, 75.0, 150.0]  # rho 50, T 100: discounts 1, 1/1.5, 1/3
    u = continuous_utility(acc, lat, 50.0, 100.0)
    d = [1.0, 1 / 1.5, 1 / 3]
    assert u["timeliness"] == pytest.approx(sum(d) / 3)
    assert u["alignment"] == pytest.approx(np.cov(acc, d)[0, 1])
    assert u["utility"] == pytest.approx(0.5 * sum(d) / 3 + np.cov(acc, d)[0, 1])
    with pytest.raises(ValueError, match="must exceed"):
        continuous_utility(acc, lat, 50.0, 50.0)


def test_discrete_utility_deadline_and_shares_from_lines():
    """Three batches of 10: adapted (8 correct, 25 ms), busy-predicted (6 correct, 10 ms), every-skipped (5, 10 ms)."""
    meter = TimeMeter()
    for rec in (
        {"correct": 8, "count": 10, "adapted": True, "t_ms": [0, 0, 25]},
        {"correct": 6, "count": 10, "adapted": False, "why": "busy", "t_ms": [10, 10, 20]},
        {"correct": 5, "count": 10, "adapted": False, "why": "every", "t_ms": [20, 20, 30]},
    ):
        meter.update(rec)

    class Rt:
        deadline_ms, response_budget_ms, decay_threshold_ms, overhead_budget_ms = 20.0, None, None, None

    clock = {"forward_ms": 10.0, "compute_ms": 45.0, "compute_forwards": 4.5, "overhead_ms": 15.0}
    out = time_summary(meter, Rt, clock)
    assert out["n_adapted_batches"] == 1 and out["adapted_share"] == pytest.approx(1 / 3)
    t = out["time"]
    assert t["utility"]["discrete"] == {"utility": pytest.approx(13 / 30), "availability": pytest.approx(2 / 3),
                                        "served_accuracy": pytest.approx(13 / 20)}  # fmt: skip
    assert t["deadline"]["misses"] == 1 and t["deadline"]["error_within_deadline"] == pytest.approx(100 * (1 - 11 / 30))
    assert t["error_adapted_batches"] == pytest.approx(20.0) and t["error_predicted_batches"] == pytest.approx(45.0)
    assert t["response_ms"]["max"] == 25 and t["makespan_ms"] == 30 and t["compute_ms_per_image"] == 1.5
    assert t["utility"]["continuous"]["response_budget_ms"] == 10.0  # rho defaults to the plain forward
    assert math.isclose(t["utility"]["continuous"]["decay_threshold_ms"], 20.0)


def test_scheduler_measured_costs_follow_the_measured_times():
    """Measured mode: the realistic decision uses the measured update times (no fixed ratio)."""

    class Rt:
        cost_mode, update_every, async_adapt = "measured", 1, False
        latency_budget_ms = overhead_budget_ms = response_budget_ms = None
        latency_budget_stat = "mean"

    sched = Scheduler([4] * 6, ArrivalSpec(kind="constant", speed=1.0), Rt, forward_ms=10.0, step_units=None)
    decisions = []
    for i, cost in enumerate([25.0, 1, 1, 5.0, 12.0, 1]):  # update 25 ms: busy until 25 -> batches 1, 2 predicted
        slot = sched.plan(i)
        decisions.append(slot.adapt)
        sched.done(slot, cost)
    # batch 3 (30 ms) adapts in 5 ms, batch 4 (40 ms) in 12 ms -> busy at 50 ms (batch 5)
    assert decisions == [True, False, False, True, True, False]


def test_resume_keeps_the_measured_plain_forward_of_the_run(tmp_path):
    """Fixed costs without runtime.forward_ms: the plain forward is measured once; a resumed session keeps the
    checkpoint's value, so the whole run's times are on one clock (a fresh measurement would shift them)."""
    extra = [o for o in realistic(0.5, 2.28) if "forward_ms" not in o]
    folder = tmp_path / "crashed"
    with pytest.raises(Crash):
        run(cfg(*extra), folder, source=source(), on_batch=_crash_at(11), checkpoint_every=5)
    resumed = run(cfg(*extra), folder, source=source(), resume=True, checkpoint_every=5)
    forward = resumed["time"]["forward_ms"]
    arrivals = [r["t_ms"][0] for r in lines_of(folder)]
    assert arrivals == [pytest.approx(round(2 * forward * i, 4), abs=2e-4) for i in range(N_BATCHES)]


def test_summary_md_has_the_time_table_only_under_time_pressure(tmp_path):
    go(tmp_path, *realistic(1, 2.28, "runtime.deadline_ms=15", "runtime.overhead_budget_ms=1000"), name="timed")
    text = (tmp_path / "timed" / "summary.md").read_text()
    rows = ("#### Time", "| protocol | realistic |", "adapted batches | 8 of 24", "deadline 15.00 ms",
            "utility, discrete", "utility, continuous (rho 10.00 ms, T 20.00 ms)", "utility, amortised")  # fmt: skip
    for row in rows:
        assert row in text, row
    go(tmp_path, name="classic")
    assert "#### Time" not in (tmp_path / "classic" / "summary.md").read_text()


def test_the_overhead_study_times_the_bookkeeping_in_both_cost_modes():
    """benchmarks/studies/time_overhead.py (issue 22's overhead figure): the bookkeeping timer runs both clocks."""
    us = bookkeeping_us_per_batch(n_batches=50)
    assert set(us) == {"measured", "fixed"} and all(v > 0 for v in us.values())
