"""The long soak's report: error per round of a stream repeated N times (`stream.rounds`), per sweep cell.

Reads a finished sweep folder (`plan.json` for the cells' labels, each cell's `summary.json` for
`online_errors_by_round`, the collapse warnings and the resets) and returns rows, a Markdown table and a plot:
which configurations degrade from round to round (slow collapse), which stay put, and whether the collapse
policy caught it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tta_surgical.tables import fmt, markdown_table

from .sweep_cells import finished_cells

__all__ = ["plot_soak", "soak_markdown", "soak_rows"]


def _label(cell: dict[str, Any]) -> str:
    values = dict(cell.get("axes") or {})
    base = Path(str(values.pop("base", "config"))).stem
    rest = " ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())
    return f"{base} {rest}".strip()


def soak_rows(sweep_out: str | Path) -> list[dict[str, Any]]:
    """One row per finished cell: label, online error per round, collapse warnings, resets."""
    rows = []
    for cell, s in finished_cells(sweep_out):
        rounds = s.get("online_errors_by_round") or [s["online_error"]]
        rows.append(
            {
                "label": _label(cell),
                "method": s["method"],
                "rounds": rounds,
                "first": rounds[0],
                "last": rounds[-1],
                "best": min(rounds),
                "n_collapse_warnings": s.get("n_collapse_warnings", 0),
                "n_resets": s.get("n_resets", 0),
                "n_method_resets": s.get("n_method_resets", 0),
                "on_collapse": s.get("on_collapse"),
                "n_images": s["n_images"],
            }
        )
    return rows


def soak_markdown(rows: list[dict[str, Any]], reference: str = "norm") -> str:
    """Error per round (%), last minus first round, and whether the last round is worse than `reference`'s."""
    n = max((len(r["rounds"]) for r in rows), default=0)
    ref = next((r["last"] for r in rows if r["label"].split()[0] == reference), None)
    header = [
        "config",
        *(f"r{i + 1}" for i in range(n)),
        "last - first",
        f"last worse than {reference}",
        "collapse warnings",
        "method resets",
    ]
    body = []
    for r in rows:
        worse = "" if ref is None else ("yes" if r["last"] > ref else "no")
        body.append(
            [
                r["label"],
                *(fmt(v, 1) for v in r["rounds"]),
                *[""] * (n - len(r["rounds"])),
                f"{r['last'] - r['first']:+.1f}",
                worse,
                str(r["n_collapse_warnings"]),
                str(r["n_method_resets"]),
            ]
        )
    return markdown_table(header, body, right=n + 1)


def plot_soak(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Online error per round, one line per configuration (needs matplotlib)."""
    from tta_surgical.render import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    # More configurations than the default colour cycle has colours: 20 colours, and a second marker after them.
    colours = plt.get_cmap("tab20").colors
    for i, r in enumerate(rows):
        ax.plot(range(1, len(r["rounds"]) + 1), r["rounds"], marker="os"[i // 20 % 2], ms=3, label=r["label"],
                color=colours[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20])
    ax.set_xlabel("round of the continual stream")
    ax.set_ylabel("online error (%)")
    ax.set_title("Long soak: 15 corruptions x 1,000 images, repeated")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
