"""Gathering the study's cells into one task's `report.json` entry: per option and corruption the means over seeds
(`gather`), per option the means over corruptions, the references, auto-RGN's weights and the verdict rows
(`task_report`); `run_study` runs both sides at the study's own stream length and does both."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..finetune.config import FinetuneConfig
from ..finetune.tasks import shift_level
from ..models import block_map, create_model_from_config
from .cells import Launch, ShiftStudy
from .verdict import top_block, verdict_rows

__all__ = ["Gathered", "gather", "mean_or_none", "model_blocks", "run_study", "task_report"]


@dataclass
class Gathered:
    """Numbers of one study, per option and corruption (means over seeds); see `gather`."""

    online_error: dict[str, dict[str, float]] = field(default_factory=dict)
    online_test: dict[str, dict[str, float]] = field(default_factory=dict)
    supervised_test: dict[str, dict[str, float]] = field(default_factory=dict)
    rgn_supervised: dict[str, dict[str, float]] = field(default_factory=dict)
    rgn_online: dict[str, dict[str, float]] = field(default_factory=dict)
    no_adaptation: dict[str, float] = field(default_factory=dict)
    n_online_images: dict[str, int] = field(default_factory=dict)


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of `values`, None when there are none."""
    return float(np.mean(values)) if len(values) else None


def gather(
    comp: ShiftStudy,
    supervised: Mapping[tuple, Mapping[str, Any]],
    online: Mapping[int, Mapping[tuple, Mapping[str, Any]]],
    budget: int | None = None,
    n_images: int | None = None,
) -> Gathered:
    """Per option and corruption, the means over seeds of one (labeled budget, online images) point."""
    g = Gathered()
    sec = comp.sec
    for c in sec.corruptions:
        summ = supervised[(c, None if budget is None or budget >= sec.n_train else budget)]
        for o in comp.options:
            acc = summ["accuracy"].get(o, {}).get(c)
            if acc is not None:
                g.supervised_test.setdefault(o, {})[c] = float(acc)
        if summ.get("source_accuracy", {}).get(c) is not None:
            g.no_adaptation[c] = float(summ["source_accuracy"][c])
        if summ.get("rgn_block_weights", {}).get(c):
            g.rgn_supervised[c] = dict(summ["rgn_block_weights"][c])
    options = comp.online_options + list(comp.online.references)
    for o in options:
        for c in sec.corruptions:
            recs = [
                rec
                for seed, by_key in online.items()
                for (opt, doms, count), rec in by_key.items()
                if opt == o and c in doms and count == comp.count(seed, n_images)
            ]
            if not recs:
                continue
            g.online_error.setdefault(o, {})[c] = float(np.mean([r["errors"][c] for r in recs]))
            g.online_test.setdefault(o, {})[c] = float(np.mean([r["accuracy_test"][c] for r in recs]))
            g.n_online_images[c] = int(recs[0]["n_images"] // len(recs[0]["errors"]))
            weights = [r["rgn_block_weights"] for r in recs if r.get("rgn_block_weights")]
            if o == "auto-rgn" and weights:
                g.rgn_online[c] = {b: float(np.mean([w[b] for w in weights])) for b in weights[0]}
    return g


def task_report(comp: ShiftStudy, g: Gathered, blocks: Sequence[str]) -> dict[str, Any]:
    """The report.json entry of one task: per option the four numbers (means over corruptions), per corruption
    the detail, the references, the auto-RGN weights and the verdict rows."""
    sec = comp.sec
    cs = list(sec.corruptions)

    def mean_over(table: Mapping[str, Mapping[str, float]], o: str) -> float | None:
        vals = [table.get(o, {}).get(c) for c in cs]
        return mean_or_none([v for v in vals if v is not None]) if all(v is not None for v in vals) else None

    options: dict[str, Any] = {}
    for o in comp.options:
        entry: dict[str, Any] = {
            "online_error_stream": mean_over(g.online_error, o),
            "online_accuracy_test": mean_over(g.online_test, o),
            "supervised_accuracy_test": mean_over(g.supervised_test, o),
            "rgn_top_block": None,
        }
        if o == "auto-rgn":
            entry["rgn_top_block"] = {
                "supervised": top_block([g.rgn_supervised[c] for c in cs if c in g.rgn_supervised]),
                "online": top_block([g.rgn_online[c] for c in cs if c in g.rgn_online]),
            }
        entry["per_corruption"] = {
            c: {
                "online_error_stream": g.online_error.get(o, {}).get(c),
                "online_accuracy_test": g.online_test.get(o, {}).get(c),
                "supervised_accuracy_test": g.supervised_test.get(o, {}).get(c),
            }
            for c in cs
        }
        options[o] = entry
    report: dict[str, Any] = {
        "task": sec.task,
        "model": comp.cfg.model.name,
        "severity": sec.severity,
        "seeds": list(sec.seeds),
        "corruptions": cs,
        "shift_levels": {c: shift_level(sec.task, c) for c in cs},
        "blocks": list(blocks),
        "options": options,
        "reference": {
            "no_adaptation_accuracy_test": {**g.no_adaptation, "mean": mean_or_none(list(g.no_adaptation.values()))},
            **{
                ref: {
                    "online_error_stream": g.online_error.get(ref, {}),
                    "online_accuracy_test": g.online_test.get(ref, {}),
                }
                for ref in comp.online.references
            },
        },
        "rgn_block_weights": {"supervised": g.rgn_supervised, "online": g.rgn_online},
        "online": {
            "method": comp.online.method,
            "mode": comp.online.mode,
            "images_per_corruption": g.n_online_images,
            "pool_includes_test": comp.online.include_test,
            "overrides": list(comp.online.overrides),
        },
        "supervised": {
            "n_train": sec.n_train,
            "n_val_per_class": sec.n_val_per_class,
            "n_test_per_class": sec.n_test_per_class,
            "lrs": list(sec.lrs),
            "epochs": sec.epochs,
        },
    }
    report["verdict"] = verdict_rows(report)
    return report


def model_blocks(cfg: FinetuneConfig) -> list[str]:
    """The block names of the study's model, in order (its shape only: no weights are loaded)."""
    shape = dataclasses.replace(cfg.model, pretrained=False, checkpoint=None, allow_random=True)
    return list(block_map(create_model_from_config(shape)[0]))


def run_study(comp: ShiftStudy, launch: Launch) -> dict[str, Any]:
    """Both sides of the study at its own stream length, scored and gathered: the task's report.json entry."""
    supervised = comp.supervised_results((None,), launch)
    online = {s: comp.online_results(s, (comp.online.n_images,), launch) for s in comp.sec.seeds}
    gathered = gather(comp, supervised, online, None, comp.online.n_images)
    return task_report(comp, gathered, model_blocks(comp.cfg))
