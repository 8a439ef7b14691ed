"""Summaries of finetune results: mean test accuracy per option and corruption, standard errors, average ranks,
Markdown tables and an optional plot of the auto-RGN per-block weights (formatting and the standard error come
from `tta_surgical.tables`; `standard_error` stays importable from here)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..render import pyplot, save_figure
from ..tables import bold_best, fmt, fmt_mean_se, markdown_table, standard_error

__all__ = ["average_ranks", "plot_rgn_weights", "rank_row", "standard_error", "summarize", "summary_markdown"]


def rank_row(values: Mapping[str, float]) -> dict[str, float]:
    """Ranks of the keys by value, highest = 1; tied values share the average of the ranks they span."""
    items = sorted(values.items(), key=lambda kv: -kv[1])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1][1] == items[i][1]:
            j += 1
        for k in range(i, j + 1):
            ranks[items[k][0]] = (i + j) / 2 + 1  # positions i..j hold ranks i+1..j+1: their mean
        i = j + 1
    return ranks


def average_ranks(accuracy: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """option -> mean over corruptions of its rank among the options (1 = best accuracy; ties averaged).

    Only corruptions where every option has a value are ranked (so ranks compare like with like).
    """
    options = list(accuracy)
    corruptions = [
        c
        for c in dict.fromkeys(c for o in options for c in accuracy[o])
        if all(accuracy[o].get(c) is not None for o in options)
    ]
    if not options or not corruptions:
        return {o: math.nan for o in options}
    total = dict.fromkeys(options, 0.0)
    for c in corruptions:
        for o, r in rank_row({o: float(accuracy[o][c]) for o in options}).items():
            total[o] += r
    return {o: total[o] / len(corruptions) for o in options}


def summarize(
    records: Iterable[Mapping[str, Any]],
    options: Sequence[str],
    corruptions: Sequence[str],
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Aggregate cell records into the summary: means over seeds, standard errors, ranks, auto-RGN weights.

    accuracy[option][corruption]: mean test accuracy % over seeds; accuracy_se: its standard error over seeds.
    mean_accuracy[option]: mean over corruptions; mean_accuracy_se: the standard error over seeds of the
    per-seed corruption means (seeds missing a corruption are left out of it). rank[option]: average rank.
    source_accuracy: the pretrained model on the same test images (no fine-tuning), for reference.
    """
    records = list(records)
    by: dict[tuple[str, str], dict[int, Mapping[str, Any]]] = {}
    for r in records:
        by.setdefault((r["option"], r["corruption"]), {})[int(r["seed"])] = r
    acc: dict[str, dict[str, float]] = {}
    se: dict[str, dict[str, float | None]] = {}
    lr: dict[str, dict[str, list[float]]] = {}
    epoch: dict[str, dict[str, list[int]]] = {}
    mean_acc: dict[str, float | None] = {}
    mean_se: dict[str, float | None] = {}
    for o in options:
        acc[o], se[o], lr[o], epoch[o] = {}, {}, {}, {}
        for c in corruptions:
            cell = by.get((o, c), {})
            if not cell:
                continue
            vals = [float(cell[s]["test_acc"]) for s in sorted(cell)]
            acc[o][c] = float(np.mean(vals))
            se[o][c] = standard_error(vals)
            lr[o][c] = [cell[s]["lr"] for s in sorted(cell)]
            epoch[o][c] = [cell[s]["best_epoch"] for s in sorted(cell)]
        mean_acc[o] = float(np.mean(list(acc[o].values()))) if acc[o] else None
        seed_list = sorted({int(r["seed"]) for r in records}) if seeds is None else list(seeds)
        per_seed = []
        for s in seed_list:
            vals = [by.get((o, c), {}).get(s) for c in corruptions]
            if all(v is not None for v in vals):
                per_seed.append(float(np.mean([v["test_acc"] for v in vals])))
        mean_se[o] = standard_error(per_seed)
    src: dict[str, float] = {}
    for c in corruptions:
        vals = {
            int(r["seed"]): r["source_test_acc"]
            for r in records
            if r["corruption"] == c and r.get("source_test_acc") is not None
        }
        if vals:
            src[c] = float(np.mean(list(vals.values())))
    summary: dict[str, Any] = {
        "options": list(options),
        "corruptions": list(corruptions),
        "n_cells": len(records),
        "accuracy": acc,
        "accuracy_se": se,
        "mean_accuracy": mean_acc,
        "mean_accuracy_se": mean_se,
        "rank": average_ranks({o: acc[o] for o in options if acc[o]}),
        "source_accuracy": src,
        "source_mean_accuracy": float(np.mean(list(src.values()))) if src else None,
        "chosen_lr": lr,
        "best_epoch": epoch,
        "n_skipped_steps": int(sum(int(r.get("n_skipped", 0)) for r in records)),
        "wall_s": float(sum(float(r.get("wall_s", 0.0)) for r in records)),
    }
    rgn = [r for r in records if r["option"] == "auto-rgn" and r.get("rgn_block_weights")]
    if rgn:
        table: dict[str, dict[str, float]] = {}
        for c in corruptions:
            rows = [r["rgn_block_weights"] for r in rgn if r["corruption"] == c]
            if rows:
                table[c] = {b: float(np.mean([row[b] for row in rows])) for b in rows[0]}
        blocks = list(next(iter(table.values())))
        table["mean"] = {b: float(np.mean([table[c][b] for c in table])) for b in blocks}
        summary["rgn_block_weights"] = table
    return summary


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """Options as columns, corruptions as rows ("mean ± s.e." over seeds), a mean row and a rank row; the best
    accuracy of each row in bold; then the auto-RGN per-block weights when auto-rgn ran."""
    options = list(summary["options"])
    acc, se = summary["accuracy"], summary["accuracy_se"]
    src = summary.get("source_accuracy", {})
    header = ["corruption", *options, "no tuning"]
    rows = []
    for c in summary["corruptions"]:
        vals = [acc.get(o, {}).get(c) for o in options]
        texts = [fmt_mean_se(v, se.get(o, {}).get(c)) for o, v in zip(options, vals)]
        rows.append([c, *bold_best(vals, texts, lower=False), fmt(src.get(c), 1)])
    rows.append(
        [
            "**mean**",
            *(fmt_mean_se(summary["mean_accuracy"].get(o), summary["mean_accuracy_se"].get(o)) for o in options),
            fmt(summary.get("source_mean_accuracy"), 1),
        ]
    )
    rows.append(["**rank**", *(fmt(summary["rank"].get(o), 2) for o in options), ""])
    task = summary.get("task", "corruption")
    budget = summary.get("train_budget")
    title = (
        f"### Supervised few-shot fine-tuning: {summary.get('model', '?')}, {summary.get('source', '?')} severity "
        f"{summary.get('severity', '?')}{'' if task == 'corruption' else f', task {task}'}"
        f"{'' if budget is None else f', {budget} labeled images'}, test accuracy % (mean ± s.e. over seeds)"
    )
    if summary.get("model_pretrained") is False:
        title += "\n\n**Warning: randomly initialised weights; these accuracies say nothing about the method.**"
    parts = [title, markdown_table(header, rows)]
    notes = (
        "Each cell: the test accuracy at the (learning rate, epoch) with the best validation accuracy (ties: lower "
        "lr, then earlier epoch). Rank: average over corruptions of each option's rank (1 = best; ties averaged). "
        "'no tuning': the pretrained model on the same test images."
    )
    parts.append(notes)
    table = summary.get("rgn_block_weights")
    if table:
        blocks = list(table["mean"])
        rgn_rows = [[c, *(fmt(w[b], 3) for b in blocks)] for c, w in table.items()]
        parts.append(
            "#### auto-RGN per-block weights (mean over the tensors of a block and over the epochs of the "
            "chosen learning rate; mean over seeds)"
        )
        parts.append(markdown_table(["corruption", *blocks], rgn_rows))
    return "\n\n".join(parts) + "\n"


def plot_rgn_weights(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Save a bar chart of the mean auto-RGN weight per block (matplotlib is optional, imported only here)."""
    plt = pyplot()
    table = summary.get("rgn_block_weights")
    if not table:
        raise ValueError("no auto-RGN weights in this summary (run the auto-rgn option to get them)")
    mean = table["mean"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(mean) + 2), 3.5))
    ax.bar(list(mean), list(mean.values()))
    ax.set_ylabel("mean RGN weight")
    ax.set_title(f"auto-RGN weights per block ({summary.get('model', '?')})")
    return save_figure(fig, path)
