"""The long soak's report reads a sweep folder's per-round errors, flags degradation, and plots."""

from __future__ import annotations

import json

from _extras import require

from tta_surgical.bench.soak import plot_soak, soak_markdown, soak_rows


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
