"""Tables and plots of run summaries: one run as Markdown (`tta-surgical run`), several side by side
(`tta-surgical compare`), an optional error plot.

Formatting (numbers, Markdown tables, the bold best value) comes from `tta_surgical.tables`; `pyplot` and
`save_figure` are the one way this package opens and saves a matplotlib figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
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
    if summary.get("stopped_on_collapse_at_batch") is not None:
        title += (
            f"\n\n**Stopped on collapse at batch {summary['stopped_on_collapse_at_batch']} (runtime.on_collapse=stop): "
            f"{_batches_run(summary)} batches ran; the errors cover those only.**"
        )
    else:
        if summary.get("n_collapse_warnings"):
            n = int(summary["n_collapse_warnings"])
            title += (
                f"\n\n**Warning: collapse suspected {n} time{'s' if n > 1 else ''} ({_flagged_batches(summary)}; "
                f"runtime.on_collapse={summary.get('on_collapse')}): see results.jsonl.**"
            )
        drift = _drift_alarms(summary)
        if drift:
            title += (
                f"\n\n**Warning: drift from the reference ({summary.get('guard_reference')}) suspected: {drift} "
                f"(runtime.on_collapse={summary.get('on_collapse')}): see results.jsonl.**"
            )
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
        *_selection_rows(summary),
        ["collapse warnings", _collapses(summary)],
        *_guard_rows(summary),
        ["batches", _batches_run(summary)],
        ["images", fmt(summary.get("n_images"))],
        ["device", fmt(summary.get("device"))],
    ]
    parts = [title, errors, markdown_table(["metric", "value"], stats), ERROR_NOTE]
    if summary.get("time"):
        parts.append(time_markdown(summary))
    return "\n\n".join(parts) + "\n"


def time_markdown(summary: Mapping[str, Any]) -> str:
    """The end-of-run table of a run under time pressure: the protocol, what was adapted, how late predictions came,
    the deadline and Tempora's utilities (README, "Time pressure")."""
    t = summary["time"]
    resp, wait, deadline = t.get("response_ms") or {}, t.get("queue_delay_ms") or {}, t.get("deadline")
    util = t.get("utility") or {}
    disc, cont, amort = util.get("discrete") or {}, util.get("continuous") or {}, util.get("amortised")
    cost = t.get("update_cost_forwards")
    rows = [
        ["protocol", fmt(summary.get("protocol"))],
        ["clock", f"{t.get('cost_mode')} costs" + (f", an update = {cost:g} plain forwards" if cost else "")
         + f", plain forward {fmt(t.get('forward_ms'))} ms ({t.get('forward_ms_source')})"],
        ["adapted batches", f"{summary.get('n_adapted_batches')} of {summary.get('n_batches')} "
         f"({fmt(100 * (summary.get('adapted_share') or 0), 1)}%)"],
        ["error % on adapted / predicted-only batches",
         f"{fmt(t.get('error_adapted_batches'))} / {fmt(t.get('error_predicted_batches'))}"],
        ["response ms p50 / p95 / max", " / ".join(fmt(resp.get(k)) for k in ("p50", "p95", "max"))],
        ["queueing delay ms mean / max", f"{fmt(wait.get('mean'))} / {fmt(wait.get('max'))}"],
        ["compute per image: ms, x plain inference",
         f"{fmt(t.get('compute_ms_per_image'), 3)}, {fmt(t.get('compute_forwards_per_batch'))}"],
    ]  # fmt: skip
    if deadline:
        misses = f"{deadline['misses']} ({fmt(100 * deadline['miss_share'], 1)}%)"
        rows.append(
            [f"deadline {fmt(deadline['deadline_ms'])} ms: misses, error % counting late as wrong",
             f"{misses}, {fmt(deadline['error_within_deadline'])}"]
        )  # fmt: skip
    availability = fmt(disc.get("availability"), 3)
    rows.append(["utility, discrete (availability)", f"{fmt(disc.get('utility'), 4)} ({availability})"])
    if cont:
        rows.append(
            [f"utility, continuous (rho {fmt(cont['response_budget_ms'])} ms, T {fmt(cont['decay_threshold_ms'])} ms)",
             f"{fmt(cont['utility'], 4)} (timeliness {fmt(cont['timeliness'], 3)})"]
        )  # fmt: skip
    if amort:
        rows.append(
            [f"utility, amortised (budget {fmt(amort['overhead_budget_ms'])} ms)",
             f"{fmt(amort['utility'], 4)} ({amort['batches_cleared']} batches cleared)"]
        )  # fmt: skip
    return "#### Time\n\n" + markdown_table(["metric", "value"], rows)


def _selection_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """`blocks: auto`'s choices, most frequent first ("block1, batch: 140; none, source: 10"); none for fixed ones."""
    counts = summary.get("selection_counts") or {}
    if not counts:
        return []
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [["auto: batches per choice", "; ".join(f"{k}: {v}" for k, v in ranked)]]


def _flagged_batches(summary: Mapping[str, Any], show: int = 10) -> str:
    """The batches of the collapse warnings as words: `batch 4`, `batches 4, 9, ...` (the first `show`)."""
    batches = list(summary.get("collapse_batches") or [])
    listed = ", ".join(str(b) for b in batches[:show]) + (", ..." if len(batches) > show else "")
    return f"batch{'es' if len(batches) > 1 else ''} {listed}"


def _collapses(summary: Mapping[str, Any]) -> str:
    """The collapse warnings for the table: none, or their count and first batches; not monitored when off."""
    if summary.get("on_collapse") == "off":
        return "not monitored (runtime.on_collapse=off)"
    n = len(summary.get("collapse_batches") or [])
    return f"{n} ({_flagged_batches(summary)})" if n else "none"


def _drift_alarms(summary: Mapping[str, Any]) -> str:
    """The drift alarms in words ("confident drift 3 (batches 5, 9, 14), uncertain drift 0"), or "" when none."""
    by = summary.get("guard_alarms_by_detector") or {}
    if not any(by.get(k) for k in ("confident_drift", "uncertain_drift")):
        return ""
    parts = []
    for kind in ("confident_drift", "uncertain_drift"):
        batches = [a["batch"] for a in summary.get("guard_alarms") or [] if a.get("detector") == kind]
        listed = ", ".join(str(b) for b in batches[:10]) + (", ..." if len(batches) > 10 else "")
        parts.append(f"{kind.replace('_', ' ')} {by.get(kind, 0)}" + (f" (batches {listed})" if batches else ""))
    return ", ".join(parts)


def _guard_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """The guard's rows of the summary table: its reference and checks, drift alarms, false alarms."""
    reference = summary.get("guard_reference")
    if not reference:
        return []
    checked = summary.get("guard_checked_errors") or {}
    rows = [
        [
            "guard reference",
            f"{reference}, {fmt(summary.get('n_guard_checks'))} checked batches: error {fmt(checked.get('adapted'))}% "
            f"adapted vs {fmt(checked.get('reference'))}% reference",
        ],
        ["drift alarms", _drift_alarms(summary) or "none"],
    ]
    n = int(summary.get("n_guard_alarms") or 0)
    if n:
        false = sum((summary.get("false_alarms_by_detector") or {}).values())
        unjudged = int(summary.get("unjudged_alarms") or 0)
        rows.append(
            [
                "false alarms (after the fact, with labels)",
                f"{false} of {n} (the adapted model was not worse than the reference on the checked batches the "
                f"alarm judged)" + (f"; {unjudged} not judged (no checked batch)" if unjudged else ""),
            ]
        )
    if summary.get("n_fallbacks") is not None:  # runtime.on_collapse=fallback
        end = "; still served by it at the end" if summary.get("serving_reference_at_end") else ""
        rows.append(
            [
                "fallback",
                f"{fmt(summary.get('n_batches_served_by_reference'))} of {fmt(summary.get('n_batches'))} batches "
                f"served by the reference ({fmt(summary.get('n_fallbacks'))} fallbacks, trust returned "
                f"{fmt(summary.get('n_trust_returns'))} times{end})",
            ]
        )
    return rows


def _batches_run(summary: Mapping[str, Any]) -> str:
    """Batches run, and of how many planned when the run stopped early ("12 of 20")."""
    ran, planned = summary.get("n_batches"), summary.get("n_batches_planned")
    if ran is None:
        return MISSING
    return f"{ran} of {planned}" if planned is not None and planned != ran else str(ran)


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
