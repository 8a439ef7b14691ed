"""Collapse detection for long online runs: predictions concentrating on one class while confidence rises.

The failure mode of entropy minimisation over long streams (Tent at a large learning rate, or any method over
many rounds of a continual stream) is a model that predicts the same class for everything, ever more
confidently: its entropy objective keeps falling while its accuracy drops to chance. No label is needed to see
it. Every results line carries three statistics of the batch's predictions (`batch_prediction_stats`): the mean
prediction entropy, the most frequent predicted class and its share of the batch. `CollapseMonitor` looks at a
sliding window of recent batches (`runtime.collapse_window` images) and flags a collapse when all three hold:

1. the most frequent class takes at least `runtime.collapse_share` of the predictions (mean over the window);
2. it is the same class in at least 80% of the window's batches (a label-shifted stream, whose batches are
   dominated by one class at a time, changes that class as it goes; a collapsed model does not);
3. the mean prediction entropy has fallen to at most `runtime.collapse_entropy_ratio` times that of the first
   batch (the model before any update: the first prediction is made before the first update).

After a flag the window starts afresh, so one collapse is reported once per window. The monitor's state is a
function of the results lines alone, so replaying them on resume rebuilds it exactly.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["CollapseMonitor", "batch_prediction_stats", "replay_collapses"]

POLICIES = ("warn", "reset", "stop", "off")
SAME_CLASS_FRACTION = 0.8


def batch_prediction_stats(logits: Tensor, y: Tensor) -> tuple[int, float, int, float]:
    """(correct, mean prediction entropy in nats, most frequent predicted class, its share) of one batch; one sync."""
    logits = logits.detach().float()
    logp = torch.log_softmax(logits, dim=1)
    pred = logits.argmax(dim=1)
    counts = torch.bincount(pred, minlength=logits.shape[1])
    top = counts.argmax()
    values = torch.stack(
        [
            (pred == y.to(pred.device)).sum().float(),
            -(logp.exp() * logp).sum(dim=1).mean(),
            top.float(),
            counts[top].float() / max(len(pred), 1),
        ]
    ).tolist()
    # A fully confident batch sums to -0.0 or a tiny negative; report it as the 0 it is (max(-0.0, 0.0) is -0.0).
    entropy = float(values[1]) if values[1] > 0.0 else 0.0
    return int(values[0]), entropy, int(values[2]), float(values[3])


@dataclass
class CollapseMonitor:
    """Sliding-window collapse detector over the per-batch statistics of the results lines (see the module doc)."""

    window_images: int = 1000
    share: float = 0.6
    entropy_ratio: float = 0.5
    min_batches: int = 5
    reference_entropy: float | None = None
    _window: deque = field(default_factory=deque, repr=False)
    _images: int = 0

    def observe(self, record: dict[str, Any]) -> bool:
        """Add one results line; True when this batch completes a collapsed window (the window then restarts)."""
        entropy, top, share = record.get("pred_entropy"), record.get("top_class"), record.get("top_class_share")
        if entropy is None or top is None or share is None:  # a non-finite batch says nothing about collapse
            return False
        if self.reference_entropy is None:
            self.reference_entropy = float(entropy)
        n = int(record.get("count", 1))
        self._window.append((float(entropy), int(top), float(share), n))
        self._images += n
        while len(self._window) > self.min_batches and self._images - self._window[0][3] >= self.window_images:
            self._images -= self._window.popleft()[3]
        if not self._collapsed():
            return False
        self._window.clear()
        self._images = 0
        return True

    def _collapsed(self) -> bool:
        if len(self._window) < self.min_batches or self._images < self.window_images:
            return False
        total = self._images
        mean_share = sum(s * n for _, _, s, n in self._window) / total
        mean_entropy = sum(e * n for e, _, _, n in self._window) / total
        _, modal_batches = Counter(t for _, t, _, _ in self._window).most_common(1)[0]
        return (
            mean_share >= self.share
            and modal_batches >= SAME_CLASS_FRACTION * len(self._window)
            and mean_entropy <= self.entropy_ratio * float(self.reference_entropy or 0.0)
        )


def replay_collapses(records: Iterable[dict[str, Any]], monitor: CollapseMonitor) -> list[int]:
    """The batch indices `monitor` flags over finished results lines, as a run with on_collapse=warn reports them.

    The monitor reads nothing but the lines, so a folder measured with one window can be judged with another
    afterwards (benchmarks/collapse_replay.py) without rerunning the stream.
    """
    return [int(r["batch_index"]) for r in records if monitor.observe(r)]

