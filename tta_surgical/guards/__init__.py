"""Guards for long online runs: label-free detectors over the per-batch signals of the results lines.

- `collapse`: predictions concentrating on one class while the entropy falls (`guards.collapse`);
- `confident_drift` / `uncertain_drift`: the adapted model overruling the confident predictions of a frozen reference
  on the same batch, surer / less sure than the reference (`guards.drift`).

Each detector is a pure function of the results lines (replayable: `replay_alarms`, `replay_collapses`); the run's
policy `runtime.on_collapse` (warn | reset | fallback | stop | off) acts on every alarm alike (`guards.monitor`;
`fallback` also serves the reference's predictions until the adapted model earns trust again: `guards.fallback`).
Nothing here imports the rest of the package.
"""

from __future__ import annotations

from .collapse import MIN_SEGMENT_BATCHES, CollapseMonitor, batch_prediction_stats, replay_collapses
from .drift import CONFIDENT, DRIFT_KINDS, DriftMonitor, reference_stats
from .fallback import Fallback
from .monitor import DETECTORS, POLICIES, Alarm, Guard, Ledger, describe_alarm, guard_summary, replay_alarms

__all__ = [
    "CONFIDENT",
    "DETECTORS",
    "DRIFT_KINDS",
    "MIN_SEGMENT_BATCHES",
    "POLICIES",
    "Alarm",
    "CollapseMonitor",
    "DriftMonitor",
    "Fallback",
    "Guard",
    "Ledger",
    "batch_prediction_stats",
    "describe_alarm",
    "guard_summary",
    "reference_stats",
    "replay_alarms",
    "replay_collapses",
]
