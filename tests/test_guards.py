"""The guard's detectors as pure functions of results lines: drift against a frozen reference (confident, uncertain),
the guard that runs them beside the one-class collapse detector, the false-alarm ledger, and the reference's
per-batch signals. Engine runs of the guard are in tests/test_guard_runs.py."""

from __future__ import annotations

import math

import pytest
import torch

from tta_surgical.guards import (
    CONFIDENT,
    DETECTORS,
    Alarm,
    CollapseMonitor,
    DriftMonitor,
    Fallback,
    Guard,
    Ledger,
    describe_alarm,
    reference_stats,
    replay_alarms,
)


def line(i: int, flip: float | None, entropy: float, ref_entropy: float, *, n: int = 200, reset: bool = False,
         correct: int = 150, ref_correct: int = 150, top_share: float = 0.2) -> dict:  # fmt: skip
    """One results line; `flip=None` = a batch the reference did not check."""
    rec = {
        "batch_index": i, "domain": "fog", "count": n, "correct": correct, "pred_entropy": entropy,
        "top_class": i % 10, "top_class_share": top_share, "reset": reset, "segment_end": False,
    }  # fmt: skip
    if flip is not None:
        rec.update(ref_flip=flip, ref_entropy=ref_entropy, ref_agree=1.0 - flip, ref_correct=ref_correct)
    return rec


# ------------------------------------------------------------------------------------------------ drift


def test_confident_drift_is_flagged_once_the_window_is_full():
    """The surgical-all pattern: a quarter of the reference's confident predictions overruled, entropy far below the
    reference's, no class concentration. The window (600 images = 3 checks of 200) is judged from its third check."""
    mon = DriftMonitor(window_images=600, flip=0.1)
    kinds = [mon.observe(line(i, 0.25, 0.05, 0.3)) for i in range(7)]
    assert kinds == [None, None, "confident_drift", None, None, "confident_drift", None]  # then afresh
    assert mon.last_flag["first_batch"] == 3 and mon.last_flag["last_batch"] == 5
    assert mon.last_flag["flip"] == pytest.approx(0.25) and mon.last_flag["entropy_ratio"] == pytest.approx(1 / 6)


def test_uncertain_drift_is_flagged_when_the_adapted_model_is_less_sure():
    """The RoTTA pattern: overruling confident reference predictions while less sure than the reference."""
    mon = DriftMonitor(window_images=600, flip=0.1)
    kinds = [mon.observe(line(i, 0.2, 0.9, 0.3)) for i in range(3)]
    assert kinds == [None, None, "uncertain_drift"]
    assert mon.last_flag["entropy_ratio"] == pytest.approx(3.0)


@pytest.mark.parametrize(
    "flips",
    [
        [0.03, 0.04, 0.02, 0.04, 0.03, 0.01],  # healthy adaptation (Tent's worst window over 2 soak rounds: 0.022)
        [0.25, 0.0, 0.0, 0.25, 0.0, 0.0],  # one bad batch in three: a window mean of 0.083 < 0.1
    ],
    ids=["healthy", "isolated-batches"],
)
def test_drift_ignores_windows_below_the_flip_share(flips):
    mon = DriftMonitor(window_images=600, flip=0.1)
    assert not any(mon.observe(line(i, f, 0.05, 0.3)) for i, f in enumerate(flips))


def test_unchecked_lines_add_nothing_and_a_reset_empties_the_window():
    mon = DriftMonitor(window_images=600, flip=0.1)
    assert mon.observe(line(0, 0.3, 0.05, 0.3)) is None
    assert mon.observe(line(1, None, 0.05, 0.3)) is None  # not checked: the window still holds one check
    assert mon.observe(line(2, 0.3, 0.05, 0.3)) is None
    assert mon.observe(line(3, 0.3, 0.05, 0.3, reset=True)) is None  # restored model: the window restarts here
    assert mon.observe(line(4, 0.3, 0.05, 0.3)) is None
    assert mon.observe(line(5, 0.3, 0.05, 0.3)) == "confident_drift"
    assert mon.last_flag["first_batch"] == 3


def test_window_is_counted_in_images_with_at_least_three_checks():
    """Batches of 64: 600 images take 10 checks; batches of 1,000: still 3 (one check is not a window)."""
    small = DriftMonitor(window_images=600, flip=0.1)
    assert [small.observe(line(i, 0.3, 0.05, 0.3, n=64)) for i in range(10)].index("confident_drift") == 9
    large = DriftMonitor(window_images=600, flip=0.1)
    assert [large.observe(line(i, 0.3, 0.05, 0.3, n=1000)) for i in range(3)] == [None, None, "confident_drift"]


def test_a_fully_sure_reference_makes_any_entropy_less_sure():
    mon = DriftMonitor(window_images=600, flip=0.1)
    kinds = [mon.observe(line(i, 0.5, 0.2, 0.0)) for i in range(3)]
    assert kinds[-1] == "uncertain_drift" and math.isinf(mon.last_flag["entropy_ratio"])


# ------------------------------------------------------------------------------------------------ the guard


def _collapsing(i: int) -> dict:
    """One class, zero entropy, after a sane first batch: what the one-class detector flags."""
    return line(i, 0.3, 0.4 if i == 0 else 0.0, 0.3, top_share=0.15 if i == 0 else 0.95) | {"top_class": 7}


def test_guard_runs_every_detector_and_names_the_one_that_fired():
    guard = Guard(CollapseMonitor(window_images=1000), DriftMonitor(window_images=600, flip=0.1))
    alarms = [a for i in range(5) for a in guard.observe(_collapsing(i))]
    # drift judges its 600-image window first (batch 2); the one-class window of 1,000 images fills at batch 4
    assert [(a.batch, a.detector) for a in alarms] == [(2, "confident_drift"), (4, "collapse")]
    assert alarms[1].first_batch == 0 and alarms[1].last_batch == 4
    assert set(DETECTORS) == {"collapse", "confident_drift", "uncertain_drift"}
    no_reference = Guard(CollapseMonitor(window_images=1000))
    assert [a.detector for i in range(5) for a in no_reference.observe(_collapsing(i))] == ["collapse"]


def test_replay_gives_the_alarms_a_live_guard_raised():
    records = [line(i, 0.25 if 10 <= i < 20 else 0.02, 0.05, 0.3) for i in range(30)]
    records[14]["reset"] = True
    live = Guard(CollapseMonitor(window_images=1000), DriftMonitor(window_images=600, flip=0.1))
    raised = [a for r in records for a in live.observe(r)]
    # 9-11: (0.02 + 0.25 + 0.25) / 3 >= 0.1; then afresh from 12, cut by the reset at 14: 14-16, 17-19
    assert [a.batch for a in raised] == [11, 16, 19]
    replayed = replay_alarms(records, Guard(CollapseMonitor(window_images=1000), DriftMonitor(600, flip=0.1)))
    assert replayed == raised


def test_ledger_judges_an_alarm_by_both_models_on_the_batches_it_judged():
    ledger = Ledger()
    for i in range(6):  # the adapted model is worse on batches 2-3, better elsewhere; batch 4 was not checked
        worse = i in (2, 3)
        rec = line(i, 0.2, 0.1, 0.3, correct=100 if worse else 190, ref_correct=150)
        ledger.add(rec if i != 4 else {**rec, "ref_correct": None})
    true_alarm = ledger.judge(Alarm(3, "confident_drift", 2, 3, {}))
    assert true_alarm == {"adapted_error": 50.0, "reference_error": 25.0, "false_alarm": False}
    false_alarm = ledger.judge(Alarm(5, "uncertain_drift", 4, 5, {}))  # only batch 5 is checked in 4-5
    assert false_alarm["false_alarm"] is True and false_alarm["adapted_error"] == pytest.approx(5.0)
    assert ledger.judge(Alarm(9, "collapse", 7, 9, {}))["false_alarm"] is None  # no checked batch: not judged


def test_ledger_judges_the_adapted_model_where_the_reference_was_served():
    """Under `on_collapse: fallback` `correct` is the served (reference's) count: the ledger must judge the adapted
    model by `adapted_correct`, or every alarm in an untrusted stretch would look false (both counts equal)."""
    ledger = Ledger()
    ledger.add({**line(0, 0.3, 0.1, 0.3, correct=150, ref_correct=150), "adapted_correct": 80, "served": "reference"})
    assert ledger.judge(Alarm(0, "confident_drift", 0, 0, {}))["adapted_error"] == pytest.approx(60.0)


# ------------------------------------------------------------------------------------------------ fallback


def test_fallback_turns_untrusted_at_an_alarm_and_trust_returns_below_half_the_threshold():
    """Pure function of the lines: an alarm makes the next batches served by the reference; trust returns only once a
    full window (600 images, 3 checks since the reset) overrules less than a quarter of the alarm threshold (0.025)."""
    guard = Guard(CollapseMonitor(), DriftMonitor(window_images=600, flip=0.1))
    fb = Fallback(guard.drift)
    served = []
    flips = [0.3, 0.3, 0.3, 0.0, 0.03, 0.03, 0.03, 0.02, 0.02, 0.02, 0.0]
    for i, f in enumerate(flips):
        served.append(fb.active)
        rec = line(i, f, 0.1, 0.3, reset=i == 3)  # the policy resets the batch after the alarm
        if fb.active:
            rec["served"] = "reference"
        fb.observe(rec, bool(guard.observe(rec)))
    # alarm at batch 2; untrusted from 3; window 3-5 (mean 0.02 < 0.025) returns trust after batch 5
    assert served == [False] * 3 + [True] * 3 + [False] * 5
    assert (fb.entries, fb.returns, fb.served) == (1, 1, 3)
    hovering = Fallback(DriftMonitor(window_images=600, flip=0.1))  # at 0.03-0.06: no alarm, and no return either
    hovering.active = True
    for i in range(9):
        rec = line(i, 0.03 + 0.01 * (i % 4), 0.1, 0.3)
        hovering.drift.observe(rec)
        hovering.observe(rec, False)
    assert hovering.active and hovering.returns == 0
    assert Fallback(guard.drift).summary() == {
        "n_fallbacks": 0, "n_trust_returns": 0, "n_batches_served_by_reference": 0, "serving_reference_at_end": False,
    }  # fmt: skip


def test_alarm_in_words_names_the_evidence():
    what, why = describe_alarm(Alarm(5, "confident_drift", 0, 4, {"checks": 3, "images": 600, "flip": 0.24,
                                                                  "mean_entropy": 0.05, "reference_entropy": 0.3}),
                               "norm")  # fmt: skip
    assert what == "confident drift"
    assert "overruled 24% of the images on which the reference (norm) was confident" in why and "surer" in why


# ------------------------------------------------------------------------------------------------ signals


def test_reference_stats_count_confident_overrules_only():
    """Four images: the reference is sure of 0 and 1 (p > 0.9) and unsure of 2 and 3; the adapted model overrules
    image 1 (confident: a flip) and image 3 (unsure: no flip)."""
    ref = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0.2, 0, 0], [0, 0.2, 0]])
    adapted = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [1.0, 0, 0], [0, 0, 1.0]])
    confidence = torch.softmax(ref, 1).max(1).values
    assert bool((confidence[:2] > CONFIDENT).all()) and bool((confidence[2:] < CONFIDENT).all())
    stats = reference_stats(adapted, ref, torch.tensor([0, 1, 0, 1]))
    assert stats["ref_agree"] == 0.5 and stats["ref_flip"] == 0.25 and stats["ref_correct"] == 4
    expected = -(torch.softmax(ref, 1) * torch.log_softmax(ref, 1)).sum(1).mean()
    assert stats["ref_entropy"] == pytest.approx(float(expected))
