"""`runtime.on_collapse: fallback` — after an alarm, serve the frozen reference until the adapted model earns trust.

`reset` restores the method's source state at an alarm, which rescues a configuration whose *adapted state* went
wrong (surgical entropy on all layers: a reset model is `norm` itself). It cannot rescue one whose *restored* state is
already worse than the reference: RoTTA restarts from the source BatchNorm statistics (48.4% on the soak's stream
against `norm`'s 30.3%) and moves 5% per update towards the stream's, so with `reset` alone it stays 11 points worse
than `norm` (benchmarks/RESULTS.md section 16b). A deployed model wants the better of the two *predictions*, and the
guard already computes the reference's on the same batch.

The rule, a pure function of the results lines (a resumed run rebuilds it by replaying them):

- trusted (the start): the adapted model's predictions are served, as under `reset`;
- an alarm of any detector: the method is reset before the next batch (as `reset`) and the run turns *untrusted*;
- untrusted: the reference predicts every batch and its predictions are served (`served: "reference"` on the line,
  `correct` is theirs, `adapted_correct` the adapted model's); the adapted model keeps stepping in the shadow and the
  detectors keep judging *it* (its entropy, its class shares, its overruling of the reference), so further alarms
  reset it again;
- trust returns when a full drift window (`runtime.guard_window` images of checked batches since the last reset or
  alarm, at least 3 checks) overrules less than a quarter of the alarm threshold (`runtime.guard_flip` / 4, 0.025
  by default) of the reference's confident predictions: the level of the healthy configurations (Tent's and ETA's
  largest window over 30,000 images of the soak's stream: 0.022 and 0.020, section 16b), far enough below the
  threshold that a model hovering near it does not flap.

A stable configuration never alarms, so `fallback` leaves its run bit-identical to `reset` (and to `warn`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .drift import DriftMonitor

__all__ = ["EXIT_SHARE", "Fallback"]

# Trust returns below this share of the alarm threshold (`guard_flip`). A reset surgical model is `norm` itself (window
# flip ~0) and returns after one window. At half the threshold (0.05) RoTTA's shadow won trust back 4 times in the
# first 150 batches of the soak, with windows at 0.040-0.047, and each time served 2-4 batches at 29-75% error against
# norm's ~30% (its errors fall on images the reference is unsure of, which the flip share does not see).
EXIT_SHARE = 0.25


@dataclass
class Fallback:
    """Whether the next batch is served by the reference, and the counts for summary.json."""

    drift: DriftMonitor | None
    active: bool = False
    entries: int = 0  # times the run turned untrusted
    served: int = 0  # batches whose served predictions were the reference's
    returns: int = 0  # times trust returned

    def observe(self, record: dict[str, Any], alarmed: bool) -> None:
        """Add one results line (after the guard judged it); `alarmed`: it raised an alarm."""
        self.served += record.get("served") == "reference"
        if alarmed:
            self.entries += not self.active
            self.active = True
            return
        if self.active and self.drift is not None:
            flip = self.drift.window_flip()
            if flip is not None and flip < EXIT_SHARE * self.drift.flip:
                self.active = False
                self.returns += 1

    def summary(self) -> dict[str, Any]:
        """The fallback's part of summary.json."""
        return {
            "n_fallbacks": self.entries,
            "n_trust_returns": self.returns,
            "n_batches_served_by_reference": self.served,
            "serving_reference_at_end": self.active,
        }
