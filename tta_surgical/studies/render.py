"""The online-vs-supervised study's Markdown tables and plots (`tta-surgical report`): online vs supervised per
option, per corruption, the verdict per shift type, the budget curves. Formatting comes from `tta_surgical.tables`,
figures from `tta_surgical.render.pyplot` / `save_figure`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..render import pyplot, save_figure
from ..tables import MISSING, bold_best, fmt, markdown_table

__all__ = [
    "budgets_markdown",
    "per_corruption_markdown",
    "plot_budgets",
    "plot_study",
    "study_markdown",
    "verdict_markdown",
]


def _yes_no(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def study_markdown(task: Mapping[str, Any]) -> str:
    """One task of `tta-surgical report`: per option the online error on its stream, the online-adapted model's
    accuracy on the supervised test split and the supervised accuracy there (means over corruptions and seeds),
    then the same per corruption."""
    opts = task["options"]
    names = list(opts)
    err = [opts[o]["online_error_stream"] for o in names]
    on = [opts[o]["online_accuracy_test"] for o in names]
    sup = [opts[o]["supervised_accuracy_test"] for o in names]
    rows = [
        [o, e, a, s]
        for o, e, a, s in zip(
            names,
            bold_best(err, [fmt(v, 1) for v in err], lower=True),
            bold_best(on, [fmt(v, 1) for v in on], lower=False),
            bold_best(sup, [fmt(v, 1) for v in sup], lower=False),
        )
    ]
    ref = task.get("reference", {})
    for name, block in ref.items():
        if name == "no_adaptation_accuracy_test":
            rows.append(["no adaptation (source model)", MISSING, MISSING, fmt(block.get("mean"), 1)])
        elif isinstance(block, Mapping) and block.get("online_error_stream"):
            e = list(block["online_error_stream"].values())
            a = list(block.get("online_accuracy_test", {}).values())
            rows.append(
                [f"{name} (reference, no update)", fmt(sum(e) / len(e), 1), fmt(sum(a) / len(a) if a else None, 1), ""]
            )
    header = ["option", "online error % (stream)", "online-adapted acc % (test split)", "supervised acc % (test split)"]
    onl = task.get("online", {})
    title = (
        f"### Online vs supervised surgical adaptation: {task.get('model', '?')}, task {task['task']}, severity "
        f"{task.get('severity', '?')}, {len(task['corruptions'])} corruption(s), seeds {task.get('seeds')}"
    )
    sizes = sorted(set(onl.get("images_per_corruption", {}).values()))
    note = (
        f"Online: `{onl.get('method')}` ({onl.get('mode')}) over {', '.join(map(str, sizes)) or '?'} unlabeled images "
        "per corruption from outside the supervised train/val split; both accuracy columns are measured on exactly "
        "the supervised test split, with the task's labels. Per corruption and auto-RGN's weights: report.json."
    )
    parts = [title, markdown_table(header, rows), note, per_corruption_markdown(task)]
    return "\n\n".join(parts) + "\n"


def per_corruption_markdown(task: Mapping[str, Any]) -> str:
    """Corruptions as rows, options as columns: 'online acc / supervised acc' on the test split."""
    opts = task["options"]
    rows = []
    for c in task["corruptions"]:
        cells = []
        for o in opts:
            d = opts[o]["per_corruption"][c]
            cells.append(f"{fmt(d['online_accuracy_test'], 1)} / {fmt(d['supervised_accuracy_test'], 1)}")
        rows.append([c, fmt(task["reference"]["no_adaptation_accuracy_test"].get(c), 1), *cells])
    header = ["corruption", "no adaptation", *(f"{o} on / sup" for o in opts)]
    return markdown_table(header, rows)


VERDICT_HEADER = [
    "shift",
    "task",
    "corruption(s)",
    "best block online (stream err / test acc)",
    "best block supervised",
    "auto-RGN top (sup / online)",
    "RGN = oracle (sup / online stream / online test)",
    "paper's ordering (sup / online)",
]


def verdict_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paper's Table 1 in our setting, one line per corruption and per shift level (see `studies.verdict`)."""
    body = [
        [
            r["shift"],
            r["task"],
            r["label"],
            f"{fmt(r['best_block_online'])} / {fmt(r.get('best_block_online_test'))}",
            fmt(r["best_block_supervised"]),
            f"{fmt(r['rgn_top_supervised'])} / {fmt(r['rgn_top_online'])}",
            " / ".join(
                _yes_no(r.get(k))
                for k in (
                    "rgn_matches_oracle_supervised",
                    "rgn_matches_oracle_online",
                    "rgn_matches_oracle_online_test",
                )
            ),
            f"{_yes_no(r['paper_ordering_supervised'])} / {_yes_no(r['paper_ordering_online'])}",
        ]
        for r in rows
    ]
    note = (
        "Best block: among single blocks of the block map, online the lowest error on its stream / the highest "
        "accuracy of the adapted model on the supervised test split (– for a relabelling task: the online model "
        "answers in the source's labels), supervised the highest test accuracy. Paper's ordering: input-level = an "
        "early block (input or block1) beats all layers and the head is the worst; label-level = the head beats every "
        "other block and all layers (online: the same test on the stream error); – = no claim or missing options."
    )
    return markdown_table(VERDICT_HEADER, body) + "\n\n" + note + "\n"


def plot_study(task: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bars per option: the online-adapted and the supervised accuracy on the test split."""
    plt = pyplot()
    opts = list(task["options"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(opts) + 2), 3.8))
    series = (("online_accuracy_test", "online (unlabeled)"), ("supervised_accuracy_test", "supervised few-shot"))
    for k, (key, label) in enumerate(series):
        vals = [task["options"][o][key] if task["options"][o][key] is not None else math.nan for o in opts]
        ax.bar([i + (k - 0.5) * 0.4 for i in range(len(opts))], vals, width=0.4, label=label)
    na = task.get("reference", {}).get("no_adaptation_accuracy_test", {}).get("mean")
    if na is not None:
        ax.axhline(na, color="gray", linestyle="--", label="no adaptation")
    ax.set_xticks(range(len(opts)))
    ax.set_xticklabels(opts)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task.get('model', '?')}, task {task['task']}")
    # Below the axes: inside, it would cover the first bars (accuracies fill the whole height).
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    return save_figure(fig, path)


def budgets_markdown(b: Mapping[str, Any]) -> str:
    """Two tables: supervised accuracy vs labeled images, online accuracy vs unlabeled images, per option."""
    sup_cols = [str(n) for n in b["labeled"]]
    onl_cols = [str(n) for n in b["unlabeled"]]
    sup_rows = [[o, *(fmt(b["supervised"][o].get(k), 1) for k in sup_cols)] for o in b["supervised"]]
    onl_rows = [[o, *(fmt(b["online"][o].get(k), 1) for k in onl_cols)] for o in b["online"]]
    title = (
        f"### Budget curves: {b.get('model', '?')}, task {b['task']}, {', '.join(b['corruptions'])} (test accuracy %, "
        f"mean over corruptions and seeds {b.get('seeds')}; no adaptation {fmt(b.get('no_adaptation'), 1)})"
    )
    return (
        "\n\n".join(
            [
                title,
                "Supervised, by labeled training images:",
                markdown_table(["option", *sup_cols], sup_rows),
                "Online, by unlabeled images streamed (then the adapted model on the same test split):",
                markdown_table(["option", *onl_cols], onl_rows),
            ]
        )
        + "\n"
    )


def plot_budgets(b: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Two panels, a line per option: accuracy vs labeled images (supervised), vs unlabeled images (online)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, xs, xlabel in (
        (axes[0], "supervised", b["labeled"], "labeled target images (supervised)"),
        (axes[1], "online", b["unlabeled"], "unlabeled target images (online)"),
    ):
        for o, curve in b[key].items():
            ys = [curve.get(str(x)) for x in xs]
            ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", label=o)
        if b.get("no_adaptation") is not None:
            ax.axhline(b["no_adaptation"], color="gray", linestyle="--", label="no adaptation")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{b.get('model', '?')}, task {b['task']}: {', '.join(b['corruptions'])}")
    return save_figure(fig, path)
