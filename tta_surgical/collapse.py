"""Collapse detection for online runs: predictions concentrating on one class while confidence rises.

The failure mode of entropy minimisation over long streams (Tent at a large learning rate, or any method over
many rounds of a continual stream) is a model that predicts the same class for everything, ever more
confidently: its entropy objective keeps falling while its accuracy drops to chance. No label is needed to see
it. Every results line carries three statistics of the batch's predictions (`batch_prediction_stats`): the mean
prediction entropy, the most frequent predicted class and its share of the batch. A set of consecutive batches
is judged collapsed when all three hold:

1. the most frequent class takes at least `runtime.collapse_share` of the predictions (mean over the batches);
2. it is the same class in at least 80% of the batches (a label-shifted stream, whose batches are dominated by
   one class at a time, changes that class as it goes; a collapsed model does not);
3. the mean prediction entropy has fallen to at most `runtime.collapse_entropy_ratio` times the *reference*: the
   entropy of the first batch after the start or the last reset (the model before any update: the first
   prediction is made before the first update).

`CollapseMonitor` judges two sets of batches after every results line:

- the **run window**: the most recent `runtime.collapse_window` images (at least `min_batches` batches) since the
  start or the last reset, judged once it is full; it spans domain boundaries (a continual stream's collapse
  keeps its class from one domain to the next);
- the **segment**: the batches of the current domain since it began (or since the last reset), without the
  reference batch, at most `collapse_window` images, judged on what it holds when the segment ends (the results
  line says `segment_end`: the next batch starts another domain or is reset, or the stream ends), provided it
  holds at least `MIN_SEGMENT_BATCHES` batches and no flag fell in it already. This is what sees a collapse within
  a short domain of a reset-per-domain stream, where the run window never fills before the next reset.

A reset (the stream's policy or a collapse reset: `reset` on the results line) empties both and re-takes the
reference from the next batch; after a flag both start afresh, so one collapse is reported once. The monitor's
state is a function of the results lines alone, so replaying them on resume rebuilds it exactly.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["MIN_SEGMENT_BATCHES", "CollapseMonitor", "batch_prediction_stats", "replay_collapses"]

POLICIES = ("warn", "reset", "stop", "off")
SAME_CLASS_FRACTION = 0.8
# A segment judged on fewer batches would rest on one batch's statistics: too noisy to call a collapse.
MIN_SEGMENT_BATCHES = 2


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
class _Batches:
    """Consecutive batches' (entropy, top class, top share, images), at most `cap` images (but `keep` batches)."""

    items: deque = field(default_factory=deque)
    images: int = 0

    def add(self, item: tuple[float, int, float, int], cap: int, keep: int) -> None:
        self.items.append(item)
        self.images += item[3]
        while len(self.items) > keep and self.images - self.items[0][3] >= cap:
            self.images -= self.items.popleft()[3]

    def clear(self) -> None:
        self.items.clear()
        self.images = 0

    def verdict(self, share: float, entropy_ratio: float, reference: float) -> dict[str, Any] | None:
        """The collapse evidence of these batches (see the module doc), or None when they are not collapsed."""
        if not self.items:
            return None
        total = self.images
        mean_share = sum(s * n for _, _, s, n in self.items) / total
        mean_entropy = sum(e * n for e, _, _, n in self.items) / total
        top, modal = Counter(t for _, t, _, _ in self.items).most_common(1)[0]
        if (
            mean_share >= share
            and modal >= SAME_CLASS_FRACTION * len(self.items)
            and mean_entropy <= entropy_ratio * reference
        ):
            return {
                "batches": len(self.items),
                "images": total,
                "top_class": int(top),
                "batches_with_top_class": int(modal),
                "mean_share": mean_share,
                "mean_entropy": mean_entropy,
                "reference_entropy": reference,
            }
        return None


@dataclass
class CollapseMonitor:
    """Collapse detector over the per-batch statistics of the results lines (see the module doc)."""

    window_images: int = 1000
    share: float = 0.6
    entropy_ratio: float = 0.5
    min_batches: int = 5
    reference_entropy: float | None = None
    # What the last flag rested on (which batches, the class, the means): for the warning; not part of the state
    # a replay must rebuild.
    last_flag: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    _window: _Batches = field(default_factory=_Batches, repr=False)
    _segment: _Batches = field(default_factory=_Batches, repr=False)
    _segment_over: bool = field(default=False, repr=False)
    _segment_flagged: bool = field(default=False, repr=False)

    def observe(self, record: dict[str, Any]) -> bool:
        """Add one results line; True when it completes a collapsed window or segment (both then restart)."""
        if record.get("reset"):  # the model was restored: what came before judged another model
            self.reference_entropy = None
            self._window.clear()
        if record.get("reset") or self._segment_over:  # a new segment
            self._segment.clear()
            self._segment_flagged = False
        self._segment_over = bool(record.get("segment_end"))
        entropy, top, share = record.get("pred_entropy"), record.get("top_class"), record.get("top_class_share")
        if entropy is not None and top is not None and share is not None:  # a non-finite batch adds nothing
            item = (float(entropy), int(top), float(share), int(record.get("count", 1)))
            is_reference = self.reference_entropy is None
            if is_reference:
                self.reference_entropy = float(entropy)
            self._window.add(item, self.window_images, self.min_batches)
            if not is_reference:  # the segment holds only batches predicted after adaptation began
                self._segment.add(item, self.window_images, MIN_SEGMENT_BATCHES)
        flag = self._judge()
        if flag is None:
            return False
        self.last_flag = flag
        self._window.clear()
        self._segment.clear()
        self._segment_flagged = True
        return True

    def _judge(self) -> dict[str, Any] | None:
        reference = float(self.reference_entropy or 0.0)
        window = self._window
        if len(window.items) >= self.min_batches and window.images >= self.window_images:
            flag = window.verdict(self.share, self.entropy_ratio, reference)
            if flag is not None:
                return {**flag, "over": "window"}
        if self._segment_over and not self._segment_flagged and len(self._segment.items) >= MIN_SEGMENT_BATCHES:
            flag = self._segment.verdict(self.share, self.entropy_ratio, reference)
            if flag is not None:
                return {**flag, "over": "segment"}
        return None


def replay_collapses(records: Iterable[dict[str, Any]], monitor: CollapseMonitor) -> list[int]:
    """The batch indices `monitor` flags over finished results lines, as a run with on_collapse=warn reports them.

    The monitor reads nothing but the lines, so a folder measured with one window can be judged with another
    afterwards (benchmarks/collapse_replay.py) without rerunning the stream. Lines written before results lines
    carried `segment_end` get it from the line after them (another domain, a reset, or no line: the end).
    """
    records = list(records)
    flagged = []
    for i, rec in enumerate(records):
        if "segment_end" not in rec:
            nxt = records[i + 1] if i + 1 < len(records) else None
            ends = nxt is None or bool(nxt.get("reset")) or nxt.get("domain") != rec.get("domain")
            rec = {**rec, "segment_end": ends}
        if monitor.observe(rec):
            flagged.append(int(rec["batch_index"]))
    return flagged
