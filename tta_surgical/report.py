"""Tables and plots of run summaries: one run as Markdown, several side by side, an optional error plot."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> str:
    """A GitHub Markdown table; numeric columns right-aligned."""
    sep = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """One run: error per domain and their mean, then online error, latency, throughput and memory."""
    title = f"### {summary.get('method', '?')} on {summary.get('model', '?')}"
    stream = summary.get("stream")
    if stream:
        title += f" ({stream})"
    if summary.get("model_pretrained") is False:
        title += "\n\n**Warning: randomly initialised weights; these errors say nothing about the method.**"
    rows = [[d, _fmt(e)] for d, e in summary.get("errors", {}).items()]
    rows.append(["**mean**", f"**{_fmt(summary.get('mean_error'))}**"])
    errors = _table(["domain", "error %"], rows)
    lat = summary.get("latency_ms", {})
    stats = [
        ["online error %", _fmt(summary.get("online_error"))],
        ["latency p50 / p95 / p99 (ms/batch)", " / ".join(_fmt(lat.get(k)) for k in ("p50", "p95", "p99"))],
        ["images / s", _fmt(summary.get("images_per_s"), 1)],
        [f"peak memory MiB ({summary.get('peak_memory_kind', '?')})", _fmt(summary.get("peak_memory_mb"), 1)],
        ["skipped updates", _fmt(summary.get("n_skipped_updates"))],
        ["images", _fmt(summary.get("n_images"))],
        ["device", _fmt(summary.get("device"))],
    ]
    return "\n\n".join([title, errors, _table(["metric", "value"], stats)]) + "\n"


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
        finite = [v for v in values if v is not None and not math.isnan(v)]
        best = (min(finite) if lower_is_better else max(finite)) if len(finite) > 1 else None
        cells = [f"**{_fmt(v, digits)}**" if best is not None and v == best else _fmt(v, digits) for v in values]
        return [label, *cells]

    rows = [row(d, [s.get("errors", {}).get(d) for s in summaries.values()]) for d in domains]
    rows.append(row("**mean**", [s.get("mean_error") for s in summaries.values()]))
    rows.append(row("online error", [s.get("online_error") for s in summaries.values()]))
    rows.append(row("latency p50 (ms)", [s.get("latency_ms", {}).get("p50") for s in summaries.values()]))
    rows.append(row("images / s", [s.get("images_per_s") for s in summaries.values()], lower_is_better=False, digits=1))
    rows.append(row("peak memory (MiB)", [s.get("peak_memory_mb") for s in summaries.values()], digits=1))
    return _table(["error %", *names], rows) + "\n"


def plot_errors(summaries: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Save a grouped bar chart of error per domain (one bar per run) to `path` (PNG/PDF/SVG by suffix).

    matplotlib is an optional dependency (`pip install tta-surgical[plot]`), imported only here.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'tta-surgical[plot]' "
            "(or pip install matplotlib); the tables were written without it"
        ) from None
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


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, save (creating the folder) and close a matplotlib figure; return the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
