"""The verdict of the online-vs-supervised study: the paper's Table 1 in our setting, per corruption and per shift
level (which single block is best online and supervised, whether auto-RGN's top block is the oracle's, whether the
paper's ordering holds)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..finetune.tasks import get_task

__all__ = ["EARLY_BLOCKS", "top_block", "verdict_rows"]


def top_block(tables: Sequence[Mapping[str, float]]) -> str | None:
    """The block with the largest mean weight over `tables` (block -> weight), or None without tables."""
    if not tables:
        return None
    blocks = list(tables[0])
    means = {b: float(np.mean([t[b] for t in tables])) for b in blocks}
    return max(blocks, key=lambda b: means[b])


EARLY_BLOCKS = ("input", "block1")  # "an early block" of the paper's input-level claim


def _ordering(level: str, score: Mapping[str, float], blocks: Sequence[str]) -> bool | None:
    """Whether `score` (higher = better) shows the paper's ordering for a shift level; None when the options
    needed are missing or the paper makes no claim for the level.

    input: an early block (input or block1) beats tuning all layers, and the head is the worst of the single
    blocks and all. label: the head beats every other single block and all layers.
    """
    singles = [b for b in blocks if b in score]
    if "all" not in score or "head" not in score or len(singles) < 2:
        return None
    if level == "input":
        early = [score[b] for b in EARLY_BLOCKS if b in score]
        if not early:
            return None
        worst = min(score[b] for b in [*singles, "all"])
        return max(early) > score["all"] and score["head"] == worst and score["head"] < max(early)
    if level == "label":
        return all(score["head"] > score[b] for b in [*singles, "all"] if b != "head")
    return None


def _verdict_row(report: Mapping[str, Any], label: str, level: str, cs: Sequence[str]) -> dict[str, Any]:
    blocks = report["blocks"]
    opts = report["options"]

    def score(metric: str, sign: float) -> dict[str, float]:
        out = {}
        for o, e in opts.items():
            vals = [e["per_corruption"][c][metric] for c in cs]
            if all(v is not None for v in vals):
                out[o] = sign * float(np.mean(vals))
        return out

    def best(scores: Mapping[str, float]) -> str | None:
        singles = {b: v for b, v in scores.items() if b in blocks}
        return max(singles, key=singles.get) if singles else None

    def same(a: str | None, b: str | None) -> bool | None:
        return None if a is None or b is None else a == b

    online = score("online_error_stream", -1.0)  # lower error = better
    sup = score("supervised_accuracy_test", 1.0)
    # On the test split the online models answer in the source's labels: meaningless for a relabelling task.
    online_test = {} if get_task(report["task"]).relabels else score("online_accuracy_test", 1.0)
    weights = report["rgn_block_weights"]
    rgn_sup = top_block([weights["supervised"][c] for c in cs if c in weights["supervised"]])
    rgn_on = top_block([weights["online"][c] for c in cs if c in weights["online"]])
    best_on, best_on_test, best_sup = best(online), best(online_test), best(sup)
    return {
        "task": report["task"],
        "shift": level,
        "label": label,
        "corruptions": list(cs),
        "best_block_online": best_on,
        "best_block_online_test": best_on_test,
        "best_block_supervised": best_sup,
        "rgn_top_supervised": rgn_sup,
        "rgn_top_online": rgn_on,
        "rgn_matches_oracle_supervised": same(rgn_sup, best_sup),
        "rgn_matches_oracle_online": same(rgn_on, best_on),
        "rgn_matches_oracle_online_test": same(rgn_on, best_on_test),
        "paper_ordering_supervised": _ordering(level, sup, blocks),
        "paper_ordering_online": _ordering(level, online, blocks),
    }


def verdict_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper's Table 1 in our setting: per corruption and per shift level (mean over its corruptions), the
    best single block online (lowest error on its stream; and highest accuracy of the adapted model on the test
    split, for tasks that keep the source's labels) and supervised (highest test accuracy), auto-RGN's top-weighted
    block on each side and whether it is the oracle's, and whether the paper's ordering holds."""
    levels: dict[str, list[str]] = {}
    for c, level in report["shift_levels"].items():
        levels.setdefault(level, []).append(c)
    rows = []
    for level, cs in levels.items():
        rows += [_verdict_row(report, c, level, [c]) for c in cs]
        if len(cs) > 1:
            rows.append(_verdict_row(report, f"mean of {len(cs)}", level, cs))
    return rows
