"""The long soak's report reads a sweep folder's per-round errors, flags degradation, and plots."""

from __future__ import annotations

import json

import pytest
from _extras import require

from benchmarks.studies.grid import grid_rows
from benchmarks.studies.guard_report import flip_profile, guard_markdown, guard_rows
from benchmarks.studies.soak import plot_soak, soak_markdown, soak_rows
from benchmarks.studies.sweep_cells import finished_cells


def _sweep(tmp_path, cells):
    plan = {"cells": [{"id": f"c{i}", "axes": {"base": f"configs/{name}.yaml"}} for i, (name, _) in enumerate(cells)]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    for i, (name, rounds) in enumerate(cells):
        folder = tmp_path / "cells" / f"c{i}"
        folder.mkdir(parents=True)
        summary = {"method": name, "online_error": sum(rounds) / len(rounds), "online_errors_by_round": rounds,
                   "n_collapse_warnings": 2 if name == "tent" else 0, "n_images": 1000 * len(rounds)}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def test_soak_rows_and_table(tmp_path):
    out = _sweep(tmp_path, [("norm", [30.0, 30.1, 30.0]), ("tent", [28.0, 40.0, 60.0]), ("eta", [27.0, 26.5, 26.0])])
    (out / "cells" / "c3").mkdir()  # an unfinished cell has no summary: left out
    rows = soak_rows(out)
    assert [r["label"] for r in rows] == ["norm", "tent", "eta"]
    assert rows[1]["last"] == 60.0 and rows[1]["n_collapse_warnings"] == 2
    table = soak_markdown(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| config | r1 | r2 | r3 | last - first | last worse than norm")
    tent = next(line for line in lines if line.startswith("| tent"))
    assert "+32.0" in tent and "| yes |" in tent
    eta = next(line for line in lines if line.startswith("| eta"))
    assert "-1.0" in eta and "| no |" in eta


def test_soak_plot(tmp_path):
    require("matplotlib")
    out = _sweep(tmp_path, [("norm", [30.0, 30.1]), ("tent", [28.0, 40.0])])
    assert plot_soak(soak_rows(out), tmp_path / "soak.png").stat().st_size > 1000


def test_finished_cells_in_plan_order_and_grid_rows(tmp_path):
    """Both sweep reports read the same cells: those of plan.json with a summary, in plan order."""
    out = _sweep(tmp_path, [("tent", [20.0]), ("norm", [30.0]), ("eta", [25.0])])
    plan = json.loads((out / "plan.json").read_text())
    plan["cells"][0]["axes"].update({"stream.reset": "per_domain", "method.blocks": ["block1", "block2"]})
    plan["cells"].append({"id": "c3", "axes": {"base": "configs/sar.yaml"}})  # planned, not finished
    (out / "plan.json").write_text(json.dumps(plan))
    (out / "cells" / "c1" / "summary.json").unlink()  # started, not finished
    assert [(cell["id"], s["method"]) for cell, s in finished_cells(out)] == [("c0", "tent"), ("c2", "eta")]
    for s in (out / "cells" / c / "summary.json" for c in ("c0", "c2")):
        s.write_text(json.dumps({**json.loads(s.read_text()), "mean_error": 1.0}))
    rows = grid_rows(out)
    assert [(r["method"], r["protocol"], r["selection"]) for r in rows] == [
        ("tent", "reset", "block1+block2"),
        ("eta", "continual", "default"),
    ]
    assert [r["label"] for r in soak_rows(out)] == ["tent reset=per_domain blocks=['block1', 'block2']", "eta"]


def test_guard_report_rows_and_flip_profile(tmp_path):
    """benchmarks/guard_report.py: the window profile of `ref_flip` is cut at resets and image-weighted; the table
    puts each run's last round against norm's."""
    def rec(i, flip, reset=False):
        return {"batch_index": i, "count": 200, "reset": reset, "pred_entropy": 0.1, "ref_entropy": 0.2,
                "ref_flip": flip}  # fmt: skip

    lines = [rec(0, 0.3), rec(1, 0.0), rec(2, 0.0), rec(3, 0.3), rec(4, 0.3, reset=True), rec(5, 0.0), rec(6, 0.3)]
    prof = flip_profile(lines, window=600)
    # windows 0-2 (0.1), 1-3 (0.1); the reset at 4 cuts: 4-6 (0.2)
    assert prof["windows"] == 3 and prof["max_flip"] == pytest.approx(0.2) and prof["min_ratio"] == 0.5
    assert flip_profile(lines[:2])["windows"] == 0
    for name, rounds, alarms in (("norm", [30.0], {}), ("sall_reset", [31.0], {"confident_drift": 2})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps({
            "online_error": rounds[-1], "online_errors_by_round": rounds, "n_resets": 2,
            "guard_alarms_by_detector": alarms, "false_alarms_by_detector": {"confident_drift": 1} if alarms else {},
            "timing_this_session": {"step_s": 10.0, "guard_s": 1.5},
        }))  # fmt: skip
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = guard_rows([tmp_path / "norm", tmp_path / "sall_reset"])
    assert rows[1]["guard_share"] == pytest.approx(0.15) and rows[1]["alarms"]["confident_drift"] == 2
    table = guard_markdown(rows)
    assert "| sall_reset | 31.00 | +1.00 | 2 | 0 / 2 / 0 | 1 | – | 0.150 | 3 | 0.100 / 0.200 | 0.50-0.50 |" in table
