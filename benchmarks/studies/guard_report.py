"""The drift guard's report over finished run folders (issue 21, benchmarks/RESULTS.md section 16).

Per run folder: online error per round (`online_errors_by_round`), resets, the guard's alarms per detector and the
false ones (judged after the run with labels, `summary.json`), the guard's share of the step time
(`timing_this_session`: guard_s / step_s), and the profile of its signal: the image-weighted mean `ref_flip` over
every window of `window` consecutive checked images (sliding, cut at resets, as `guards.drift` forms its window) and
the entropy ratio (adapted over reference) of those windows. The profile says how far a configuration sits from the
flip threshold, whether it fired or not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tta_surgical.guards import DETECTORS
from tta_surgical.runfolder import peek_jsonl
from tta_surgical.tables import fmt, markdown_table

__all__ = ["flip_profile", "guard_markdown", "guard_rows"]


def flip_profile(records: Iterable[dict[str, Any]], window: int = 600, min_checks: int = 3) -> dict[str, Any]:
    """Window means of `ref_flip` and the entropy ratio over the checked lines (see the module doc); None values
    when no window filled."""
    flips, ratios, items = [], [], []
    for rec in records:
        if rec.get("reset"):
            items = []
        if rec.get("ref_flip") is None or rec.get("pred_entropy") is None:
            continue
        items.append((float(rec["ref_flip"]), float(rec["pred_entropy"]), float(rec["ref_entropy"]), int(rec["count"])))
        while len(items) > min_checks and sum(i[3] for i in items[1:]) >= window:
            items.pop(0)
        n = sum(i[3] for i in items)
        if len(items) >= min_checks and n >= window:
            flips.append(sum(f * c for f, _, _, c in items) / n)
            ref = sum(r * c for _, _, r, c in items) / n
            ratios.append(sum(e * c for _, e, _, c in items) / n / ref if ref > 0 else float("inf"))
    if not flips:
        return {"windows": 0, "max_flip": None, "median_flip": None, "min_ratio": None, "max_ratio": None}
    ordered = sorted(flips)
    return {
        "windows": len(flips),
        "max_flip": ordered[-1],
        "median_flip": ordered[len(ordered) // 2],
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }


def guard_rows(folders: Iterable[str | Path], window: int = 600) -> list[dict[str, Any]]:
    """One row per run folder with a summary.json (the folder's name is its label)."""
    rows = []
    for folder in map(Path, folders):
        s = json.loads((folder / "summary.json").read_text())
        rounds = s.get("online_errors_by_round") or [s["online_error"]]
        timing = s.get("timing_this_session") or {}
        step = float(timing.get("step_s") or 0.0)
        rows.append(
            {
                "label": folder.name,
                "rounds": rounds,
                "n_resets": int(s.get("n_resets", 0)),
                "alarms": dict(s.get("guard_alarms_by_detector") or {}),
                "false_alarms": dict(s.get("false_alarms_by_detector") or {}),
                "guard_share": float(timing.get("guard_s", 0.0)) / step if step else None,
                # `on_collapse: fallback`: batches whose served predictions were the reference's (None: another policy)
                "served_by_reference": s.get("n_batches_served_by_reference"),
                "n_batches": s.get("n_batches"),
                **flip_profile(peek_jsonl(folder / "results.jsonl"), window),
            }
        )
    return rows


def guard_markdown(rows: list[dict[str, Any]], reference: str = "norm") -> str:
    """Error per round (%), last round vs `reference`'s (the row whose label starts with it), resets, alarms per
    detector (c / cd / ud: collapse, confident drift, uncertain drift), false alarms, the batches the reference served
    (`on_collapse: fallback`), the guard's time share and its signal's profile."""
    n = max((len(r["rounds"]) for r in rows), default=0)
    ref = next((r["rounds"][-1] for r in rows if r["label"].startswith(reference)), None)
    header = [
        "run", *(f"r{i + 1}" for i in range(n)), f"last - {reference}", "resets", "alarms c / cd / ud",
        "false alarms", "served by reference", "guard s / step s", "windows", "median / max flip",
        "entropy ratio min-max",
    ]  # fmt: skip
    body = []
    for r in rows:
        last = r["rounds"][-1]
        body.append(
            [
                r["label"],
                *(fmt(v, 2) for v in r["rounds"]),
                *[""] * (n - len(r["rounds"])),
                "" if ref is None else f"{last - ref:+.2f}",
                str(r["n_resets"]),
                " / ".join(str(r["alarms"].get(d, 0)) for d in DETECTORS),
                str(sum(r["false_alarms"].values())),
                fmt(None) if r.get("served_by_reference") is None else f"{r['served_by_reference']} / {r['n_batches']}",
                fmt(r["guard_share"], 3),
                str(r["windows"]),
                f"{fmt(r['median_flip'], 3)} / {fmt(r['max_flip'], 3)}" if r["windows"] else fmt(None),
                f"{fmt(r['min_ratio'], 2)}-{fmt(r['max_ratio'], 2)}" if r["windows"] else fmt(None),
            ]
        )
    return markdown_table(header, body, right=n + 1)
