"""Budget curves of the online-vs-supervised study: test accuracy vs the number of target images used, labeled
(supervised) and unlabeled (online), per option; every point is a sweep cell (`tta-surgical report --budgets`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .cells import Launch, ShiftStudy
from .gather import gather, mean_or_none

__all__ = ["run_budgets"]


def run_budgets(
    comp: ShiftStudy, labeled: Sequence[int], unlabeled: Sequence[int | None], launch: Launch
) -> dict[str, Any]:
    """Accuracy on the supervised test split vs the number of target images used, per option: labeled training
    images (supervised; nested class-balanced subsets of the training split) and unlabeled streamed images
    (online; seeded subsets of the pool). Each point is a sweep cell; the result is budgets.json's content."""
    sec = comp.sec
    for b in labeled:
        if b < comp.target.n_classes or b % comp.target.n_classes or b > sec.n_train:
            raise ValueError(
                f"labeled budget {b} must be a multiple of the {comp.target.n_classes} classes in "
                f"{comp.target.n_classes}..{sec.n_train} (finetune.n_train)"
            )
    supervised = comp.supervised_results(list(labeled), launch)
    online = {s: comp.online_results(s, list(unlabeled), launch) for s in sec.seeds}
    out: dict[str, Any] = {
        "task": sec.task,
        "model": comp.cfg.model.name,
        "corruptions": list(sec.corruptions),
        "seeds": list(sec.seeds),
        "labeled": [int(b) for b in labeled],
        "unlabeled": [],
        "supervised": {o: {} for o in comp.options},
        "online": {o: {} for o in comp.online_options},
        "supervised_per_corruption": {o: {} for o in comp.options},
        "online_per_corruption": {o: {} for o in comp.online_options},
    }
    for b in labeled:
        g = gather(comp, supervised, online, b, None)
        for o in comp.options:
            vals = g.supervised_test.get(o, {})
            out["supervised"][o][str(b)] = (
                mean_or_none(list(vals.values())) if len(vals) == len(sec.corruptions) else None
            )
            out["supervised_per_corruption"][o][str(b)] = dict(vals)
        out["no_adaptation"] = mean_or_none(list(g.no_adaptation.values()))
    for n in unlabeled:
        g = gather(comp, supervised, online, labeled[-1], n)
        size = int(np.mean(list(g.n_online_images.values()))) if g.n_online_images else n
        out["unlabeled"].append(size)
        for o in comp.online_options:
            vals = g.online_test.get(o, {})
            full = len(vals) == len(sec.corruptions)
            out["online"][o][str(size)] = mean_or_none(list(vals.values())) if full else None
            out["online_per_corruption"][o][str(size)] = dict(vals)
    return out
