"""Drift against a frozen reference: the adapted model overrules predictions the reference is sure of.

Two slow failures of the 10-round soak (benchmarks/RESULTS.md section 10b) concentrate on no class, so the one-class
collapse detector (`guards.collapse`) never sees them: surgical entropy on all layers grows ever more confident
while its error rises (confident drift), RoTTA grows ever less confident (rising-uncertainty drift). Both show
against a frozen reference that judges the same batch: the source model with test-batch BatchNorm statistics
(`norm`, the baseline no configuration should end worse than), or the source model itself where the model has no
BatchNorm. On a checked batch the engine runs the reference too and writes to the results line (`reference_stats`):

- `ref_flip`: the share of the batch where the reference's top probability is at least `CONFIDENT` (0.9) and the
  adapted model predicts another class. Healthy adaptation changes the predictions the reference is unsure of;
  drift overrules the ones it is sure of. The mean over 600-image windows, 2 rounds of the soak's stream left
  alone (benchmarks/RESULTS.md section 16): surgical entropy on all layers median 0.19 (up to 0.28), RoTTA median
  0.17 (up to 0.58); Tent and ETA, which improve over the rounds, at most 0.022 and 0.020;
- `ref_entropy`: the reference's mean prediction entropy, next to the adapted model's `pred_entropy`;
- `ref_agree`: the share of the batch on which both predict the same class (reported, not judged: an adapted model
  that is much better than the reference must disagree with it);
- `ref_correct`: how many of the reference's predictions were right. Labels: used *after* the run to count false
  alarms (`guards.Ledger.judge`), never by a detector.

`DriftMonitor` judges the last `window_images` images of checked batches since the start or the last reset (at
least `min_checks` of them), once that many are there. A window whose mean flip share (image-weighted) reaches
`flip` is drift; the entropy ratio, adapted over reference, says which kind:

- at most 1: **confident drift** (the adapted model is surer than the reference while overruling it: surgical
  entropy on all layers, 0.22-0.86 over its windows; all 23 of its alarms);
- above 1: **uncertain drift** (it is less sure than the reference and still overrules it: RoTTA, 0.89-2.90 over
  its windows; 20 of its 21 alarms).

The two kinds share the window and its flip evidence (one episode is one alarm, of the kind its entropy ratio
says); after a flag or a reset the window starts afresh. Like the collapse detector it
reads nothing but the results lines: replaying them (`guards.replay_alarms`) rebuilds its state exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["CONFIDENT", "DRIFT_KINDS", "DriftMonitor", "reference_stats"]

# A reference prediction at least this sure counts as confident: on the soak's 15 corruptions `norm`'s predictions
# above 0.9 are right far more often than its average (a flip there is more often a new error than a fix).
CONFIDENT = 0.9
DRIFT_KINDS = ("confident_drift", "uncertain_drift")


def reference_stats(logits: Tensor, ref_logits: Tensor, y: Tensor) -> dict[str, Any]:
    """The reference's signals for one checked batch (see the module doc); one sync."""
    logits, ref_logits = logits.detach().float(), ref_logits.detach().float()
    ref_logp = torch.log_softmax(ref_logits, dim=1)
    ref_p = ref_logp.exp()
    conf, ref_pred = ref_p.max(dim=1)
    pred = logits.argmax(dim=1)
    differ = pred != ref_pred
    n = max(len(pred), 1)
    values = torch.stack(
        [
            (~differ).sum().float() / n,
            (differ & (conf >= CONFIDENT)).sum().float() / n,
            -(ref_p * ref_logp).sum(dim=1).mean(),
            (ref_pred == y.to(ref_pred.device)).sum().float(),
        ]
    ).tolist()
    return {
        "ref_agree": float(values[0]),
        "ref_flip": float(values[1]),
        "ref_entropy": max(float(values[2]), 0.0),  # a fully confident batch sums to -0.0
        "ref_correct": int(values[3]),
    }


@dataclass
class DriftMonitor:
    """Confident and uncertain drift over the checked batches' reference signals (see the module doc)."""

    window_images: int = 600
    min_checks: int = 3
    flip: float = 0.1
    # (flip share, adapted entropy, reference entropy, images, batch index) of the checked batches in the window
    _items: deque = field(default_factory=deque, repr=False)
    _images: int = field(default=0, repr=False)
    last_flag: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def observe(self, record: dict[str, Any]) -> str | None:
        """Add one results line; the kind of drift the window it completes shows (the window then restarts), or
        None."""
        if record.get("reset"):  # a restored model: what came before judged another one
            self._clear()
        flip, ref_entropy, entropy = record.get("ref_flip"), record.get("ref_entropy"), record.get("pred_entropy")
        if flip is None or ref_entropy is None or entropy is None:  # not checked, or a non-finite batch
            return None
        n, i = int(record.get("count", 1)), int(record["batch_index"])
        item = (float(flip), float(entropy), float(ref_entropy), n, i)
        self._items.append(item)
        self._images += item[3]
        while len(self._items) > self.min_checks and self._images - self._items[0][3] >= self.window_images:
            self._images -= self._items.popleft()[3]
        if len(self._items) < self.min_checks or self._images < self.window_images:
            return None
        flag = self._verdict()
        if flag is None:
            return None
        self.last_flag = flag
        self._clear()
        return str(flag["kind"])

    def window_flip(self) -> float | None:
        """The image-weighted mean flip share of the current window, once it is full (else None)."""
        if len(self._items) < self.min_checks or self._images < self.window_images:
            return None
        return self._mean_flip()

    def _mean_flip(self) -> float:
        return sum(f * n for f, _, _, n, _ in self._items) / self._images

    def _clear(self) -> None:
        self._items.clear()
        self._images = 0

    def _verdict(self) -> dict[str, Any] | None:
        total = self._images
        flip = self._mean_flip()
        entropy = sum(e * n for _, e, _, n, _ in self._items) / total
        ref_entropy = sum(r * n for _, _, r, n, _ in self._items) / total
        # A reference of zero entropy is fully sure: an adapted model with any entropy is less sure than it.
        ratio = entropy / ref_entropy if ref_entropy > 0 else (float("inf") if entropy > 0 else 1.0)
        if flip < self.flip:
            return None
        return {
            "kind": DRIFT_KINDS[0] if ratio <= 1.0 else DRIFT_KINDS[1],
            "checks": len(self._items),
            "images": total,
            "first_batch": int(self._items[0][4]),
            "last_batch": int(self._items[-1][4]),
            "flip": flip,
            "mean_entropy": entropy,
            "reference_entropy": ref_entropy,
            "entropy_ratio": ratio,
        }
