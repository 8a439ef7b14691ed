"""Tables and plots of run summaries: one run as Markdown, several side by side, an optional error plot; and those of
`tta-surgical report` (online vs supervised per option, the verdict per shift type, budget curves).

Formatting (numbers, Markdown tables, the bold best value) comes from `tta_surgical.tables`; `pyplot` and
`save_figure` are the one way this package opens and saves a matplotlib figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .tables import MISSING, bold_best, fmt, markdown_table

# Printed under every error table: the two stream-level errors are computed differently and can differ.
ERROR_NOTE = (
    "mean = the unweighted mean of the per-domain errors (the number papers report); online error = the errors "
    "over all images of the stream. They are equal (up to rounding in the last digit) when every domain has the "
    "same number of images, and differ when the domains differ in size (a mixed stream, a run stopped early)."
)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """One run: error per domain and their mean, then online error, latency, throughput and memory."""
    title = f"### {summary.get('method', '?')} on {summary.get('model', '?')}"
    stream = summary.get("stream")
    if stream:
        title += f" ({stream})"
    if summary.get("model_pretrained") is False:
        title += "\n\n**Warning: randomly initialised weights; these errors say nothing about the method.**"
    rows = [[d, fmt(e)] for d, e in summary.get("errors", {}).items()]
    rows.append(["**mean**", f"**{fmt(summary.get('mean_error'))}**"])
    errors = markdown_table(["domain", "error %"], rows)
    lat = summary.get("latency_ms", {})
    by_round = summary.get("errors_by_round") or []
    stats = [
        ["online error %", fmt(summary.get("online_error"))],
        *([["mean error % by round", " / ".join(fmt(e) for e in by_round)]] if len(by_round) > 1 else []),
        ["latency p50 / p95 / p99 (ms/batch)", " / ".join(fmt(lat.get(k)) for k in ("p50", "p95", "p99"))],
        ["images / s", fmt(summary.get("images_per_s"), 1)],
        [f"peak memory MiB ({summary.get('peak_memory_kind', '?')})", fmt(summary.get("peak_memory_mb"), 1)],
        ["skipped updates", fmt(summary.get("n_skipped_updates"))],
        *([["auto: batches per choice", _choices(summary["selection_counts"])]] if summary.get("selection_counts") else []),
        ["images", fmt(summary.get("n_images"))],
        ["device", fmt(summary.get("device"))],
    ]
    return "\n\n".join([title, errors, markdown_table(["metric", "value"], stats), ERROR_NOTE]) + "\n"


def _choices(counts: Mapping[str, int]) -> str:
    """`blocks: auto`'s choices, most frequent first: "block1-2, batch: 140; none, source: 10"."""
    return "; ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def compare_markdown(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Several runs over the same stream: domains as rows, runs (named by the mapping's keys) as columns.

    The mean row is the unweighted mean over domains; the best (lowest) error of each row is bold.
    Online error, p50 latency, throughput and memory follow as extra rows.
    """
    names = list(summaries)
    domains: list[str] = []
    for s in summaries.values():
        for d in s.get("errors", {}):
            if d not in domains:
                domains.append(d)

    def row(label: str, values: list[float | None], lower_is_better: bool = True, digits: int = 2) -> list[str]:
        return [label, *bold_best(values, [fmt(v, digits) for v in values], lower=lower_is_better)]

    rows = [row(d, [s.get("errors", {}).get(d) for s in summaries.values()]) for d in domains]
    rows.append(row("**mean**", [s.get("mean_error") for s in summaries.values()]))
    rows.append(row("online error", [s.get("online_error") for s in summaries.values()]))
    rows.append(row("latency p50 (ms)", [s.get("latency_ms", {}).get("p50") for s in summaries.values()]))
    rows.append(row("images / s", [s.get("images_per_s") for s in summaries.values()], lower_is_better=False, digits=1))
    rows.append(row("peak memory (MiB)", [s.get("peak_memory_mb") for s in summaries.values()], digits=1))
    return markdown_table(["error %", *names], rows) + "\n\n" + ERROR_NOTE + "\n"


def plot_errors(summaries: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Save a grouped bar chart of error per domain (one bar per run) to `path` (PNG/PDF/SVG by suffix)."""
    plt = pyplot()
    names = list(summaries)
    domains: list[str] = []
    for s in summaries.values():
        domains += [d for d in s.get("errors", {}) if d not in domains]
    domains.append("mean")
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(domains) * max(len(names), 1) + 2), 4))
    for i, name in enumerate(names):
        s = summaries[name]
        vals = [s.get("errors", {}).get(d, math.nan) for d in domains[:-1]] + [s.get("mean_error", math.nan)]
        ax.bar([j + i * width for j in range(len(domains))], vals, width=width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(domains))])
    ax.set_xticklabels(domains, rotation=45, ha="right")
    ax.set_ylabel("error (%)")
    ax.legend()
    return save_figure(fig, path)


def pyplot() -> Any:
    """`matplotlib.pyplot` on the file-only Agg backend (never needs a display). matplotlib is an optional
    dependency (`pip install tta-surgical[plot]`): without it, an ImportError that says how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'tta-surgical[plot]' "
            "(or pip install matplotlib); the tables were written without it"
        ) from None
    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, save (creating the folder) and close a matplotlib figure; return the path."""
    plt = pyplot()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------ online vs supervised (report)


def _yes_no(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def comparison_markdown(task: Mapping[str, Any]) -> str:
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
    """The paper's Table 1 in our setting, one line per corruption and per shift level (see `finetune.compare`)."""
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


def plot_comparison(task: Mapping[str, Any], path: str | os.PathLike) -> Path:
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


# ------------------------------------------------------------------------------------------------ budget curves


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
