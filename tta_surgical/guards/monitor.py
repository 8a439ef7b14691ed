"""The guard: every detector over the results lines, its alarms, and their after-the-fact false-alarm judgement.

`Guard.observe(line)` feeds one results line to each detector (`collapse`: one class; `confident_drift` and
`uncertain_drift`: overruling a frozen reference, `guards.drift`) and returns the alarms it completes. The policy
(`runtime.on_collapse`: warn | reset | fallback | stop | off) acts on every alarm alike; the engine applies it. The
guard reads nothing but the lines, so `replay_alarms` over a finished results.jsonl gives the alarms the run raised,
and a resumed run rebuilds the guard exactly by replaying its kept lines.

**False alarms.** An alarm judged a set of batches (`first_batch`..`last_batch`). After the fact, with labels, it is
*false* when over the checked batches of that span (those with the reference's signals) the adapted model was not
worse than the reference: its error there at most the reference's. `Ledger` keeps what that needs (per checked
batch: the adapted and the reference's correct counts, from the lines' `correct` and `ref_correct`) and
`Ledger.judge` says it; an alarm whose span holds no checked batch (a run without a reference) is not judged
(`false_alarm: null`). Nothing here feeds labels back into a detector.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .collapse import CollapseMonitor
from .drift import DRIFT_KINDS, DriftMonitor

__all__ = ["DETECTORS", "POLICIES", "Alarm", "Guard", "Ledger", "describe_alarm", "guard_summary", "replay_alarms"]

POLICIES = ("warn", "reset", "fallback", "stop", "off")
DETECTORS = ("collapse", *DRIFT_KINDS)


@dataclass(frozen=True)
class Alarm:
    """One detector's alarm on one results line, and the batches it judged."""

    batch: int
    detector: str
    first_batch: int
    last_batch: int
    evidence: dict[str, Any]


@dataclass
class Guard:
    """The detectors side by side; `drift` is None without a reference (then only one-class collapse is watched)."""

    collapse: CollapseMonitor
    drift: DriftMonitor | None = None

    def observe(self, record: dict[str, Any]) -> list[Alarm]:
        """Add one results line to every detector; the alarms it completes (usually none)."""
        alarms = []
        i = int(record["batch_index"])
        if self.collapse.observe(record):
            f = dict(self.collapse.last_flag or {})
            alarms.append(Alarm(i, "collapse", int(f["first_batch"]), int(f["last_batch"]), f))
        kind = self.drift.observe(record) if self.drift is not None else None
        if kind is not None:
            f = dict(self.drift.last_flag or {})  # type: ignore[union-attr]
            alarms.append(Alarm(i, kind, int(f["first_batch"]), int(f["last_batch"]), f))
        return alarms


@dataclass
class Ledger:
    """Per checked batch (in batch order): the adapted and the reference's correct counts and the images, for
    judging alarms after the fact. Compact arrays: a million checked batches take 32 MB."""

    batches: array = field(default_factory=lambda: array("q"))
    correct: array = field(default_factory=lambda: array("q"))
    ref_correct: array = field(default_factory=lambda: array("q"))
    images: array = field(default_factory=lambda: array("q"))

    def add(self, record: dict[str, Any]) -> None:
        """Keep a checked line's counts (lines without `ref_correct` are not checked: nothing to keep)."""
        if record.get("ref_correct") is None:
            return
        self.batches.append(int(record["batch_index"]))
        # the adapted model's own count where the reference's predictions were served (`on_collapse: fallback`)
        self.correct.append(int(record.get("adapted_correct", record["correct"])))
        self.ref_correct.append(int(record["ref_correct"]))
        self.images.append(int(record["count"]))

    def judge(self, alarm: Alarm) -> dict[str, Any]:
        """The adapted and reference error (%) over the checked batches `alarm` judged, and whether it was false
        (the adapted model not worse); None for all three when it judged no checked batch."""
        lo = bisect.bisect_left(self.batches, alarm.first_batch)
        hi = bisect.bisect_right(self.batches, alarm.last_batch)
        n = sum(self.images[lo:hi])
        if n == 0:
            return {"adapted_error": None, "reference_error": None, "false_alarm": None}
        adapted = 100.0 * (1.0 - sum(self.correct[lo:hi]) / n)
        reference = 100.0 * (1.0 - sum(self.ref_correct[lo:hi]) / n)
        return {"adapted_error": adapted, "reference_error": reference, "false_alarm": adapted <= reference}


def replay_alarms(records: Iterable[dict[str, Any]], guard: Guard) -> list[Alarm]:
    """The alarms `guard` raises over finished results lines, as a run with on_collapse=warn reports them (lines
    written before results lines carried `segment_end` get it from the line after them, as `replay_collapses`)."""
    records = list(records)
    alarms: list[Alarm] = []
    for i, rec in enumerate(records):
        if "segment_end" not in rec:
            nxt = records[i + 1] if i + 1 < len(records) else None
            ends = nxt is None or bool(nxt.get("reset")) or nxt.get("domain") != rec.get("domain")
            rec = {**rec, "segment_end": ends}
        alarms += guard.observe(rec)
    return alarms


def describe_alarm(alarm: Alarm, reference: str | None = None) -> tuple[str, str]:
    """(what was suspected, what it rested on) in words, for the warning; `reference` names the reference."""
    f = alarm.evidence
    if alarm.detector == "collapse":
        scope = "the last" if f.get("over") == "window" else "this domain's"
        return "collapse", (
            f"over {scope} {f.get('batches')} batches ({f.get('images')} images) class {f.get('top_class')} leads "
            f"in {f.get('batches_with_top_class')} of them and the leading class takes {f.get('mean_share', 0.0):.0%} "
            f"of the predictions, prediction entropy {f.get('mean_entropy', 0.0):.3f} (first batch after the start "
            f"or last reset: {f.get('reference_entropy', 0.0):.3f})"
        )
    sure = "surer" if alarm.detector == "confident_drift" else "less sure"
    return alarm.detector.replace("_", " "), (
        f"over the last {f.get('checks')} checked batches ({f.get('images')} images, batches {alarm.first_batch}-"
        f"{alarm.last_batch}) the adapted model overruled {f.get('flip', 0.0):.0%} of the images on which the "
        f"reference ({reference or 'frozen'}) was confident, and is {sure} than it (prediction entropy "
        f"{f.get('mean_entropy', 0.0):.3f} vs {f.get('reference_entropy', 0.0):.3f})"
    )


# The alarms listed one by one in summary.json (the counts cover all of them).
MAX_LISTED_ALARMS = 1000


def guard_summary(alarms: list[Alarm], ledger: Ledger, reference: str | None, policy: str) -> dict[str, Any]:
    """The guard's part of summary.json: its reference (a name, or None), the alarms per detector (each judged after
    the fact: false when the adapted model was not worse than the reference over the checked batches it judged), and
    both models' error over all checked batches."""
    if policy == "off":
        return {"guard_reference": None, "n_guard_alarms": 0}
    judged = [{**_alarm_row(a), **ledger.judge(a)} for a in alarms]
    n = sum(ledger.images)
    checked = None
    if n:
        checked = {
            "adapted": 100.0 * (1.0 - sum(ledger.correct) / n),
            "reference": 100.0 * (1.0 - sum(ledger.ref_correct) / n),
            "images": n,
        }
    return {
        "guard_reference": reference,
        "n_guard_checks": len(ledger.batches),
        "guard_checked_errors": checked,
        "n_guard_alarms": len(judged),
        "guard_alarms_by_detector": {d: sum(a["detector"] == d for a in judged) for d in DETECTORS},
        "false_alarms_by_detector": {
            d: sum(a["detector"] == d and a["false_alarm"] is True for a in judged) for d in DETECTORS
        },
        "unjudged_alarms": sum(a["false_alarm"] is None for a in judged),
        "guard_alarms": judged[:MAX_LISTED_ALARMS],
    }


def _alarm_row(alarm: Alarm) -> dict[str, Any]:
    return {"batch": alarm.batch, "detector": alarm.detector, "first": alarm.first_batch, "last": alarm.last_batch}
