"""The fixed step-cost table is the median ratio to inference over bench runs, and a run config accepts it."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks.step_costs import main
from benchmarks.studies.step_costs import read_bench, step_costs
from tta_surgical.bench.labels import method_settings
from tta_surgical.config import RuntimeConfig
from tta_surgical.schedule import cost_ratio_for


def _bench(folder, ratios, model="resnet20", load=0.5):
    folder.mkdir()
    cells = [{"model": model, "method": "inference", "ratio_to_inference": 1.0}]
    cells += [{"model": model, "method": k, "ratio_to_inference": r} for k, r in ratios.items()]
    cells.append({"model": model, "method": "reference_tent", "ratio_to_inference": 3.0})
    cells.append({"model": model, "method": "memo", "ratio_to_inference": None, "error": "out of memory"})
    meta = {"date": "2026-12-06", "device": "cpu", "threads": 1, "versions": {"torch": "2.14.1"},
            "machine": {"load_avg_1m": load}}  # fmt: skip
    (folder / "bench.json").write_text(json.dumps({"meta": meta, "cells": cells}))
    return folder


def test_median_over_runs_and_baselines_left_out(tmp_path):
    a = _bench(tmp_path / "a", {"tent": 2.0, "tent:block2": 1.5, "cotta": 40.0})
    b = _bench(tmp_path / "b", {"tent": 2.4, "tent:block2": 1.7})
    c = _bench(tmp_path / "c", {"tent": 2.3})
    table, seen = step_costs([read_bench(p)[1] for p in (a, b, c)])
    assert table == {"tent": 2.3, "tent:block2": 1.6, "cotta": 40.0}
    assert seen["tent"] == [2.0, 2.4, 2.3]


def test_the_written_table_is_a_runtime_config(tmp_path, capsys):
    a = _bench(tmp_path / "a", {"tent": 2.28, "tent:block1": 2.5})
    out = tmp_path / "costs.yaml"
    assert main([str(a), "--out", str(out)]) == 0
    text = out.read_text()
    assert str(a / "bench.json") in text and "load 0.5" in text
    rt = RuntimeConfig(**yaml.safe_load(text)["runtime"])
    assert rt.cost_mode == "fixed"
    assert rt.cost_ratio == {"tent": 2.28, "tent:block1": 2.5}
    # bench's labels are the run's: the method bench timed as `tent:block1` finds its own entry
    assert float(cost_ratio_for(rt.cost_ratio, method_settings("tent", ("block1",)))) == pytest.approx(2.5)
    assert float(cost_ratio_for(rt.cost_ratio, method_settings("tent"))) == pytest.approx(2.28)


def test_clear_errors(tmp_path, capsys):
    assert main([str(tmp_path / "absent")]) == 2
    assert "no bench.json" in capsys.readouterr().err
    a = _bench(tmp_path / "a", {"tent": 2.0})
    b = _bench(tmp_path / "b", {"tent": 2.0}, model="resnet56")
    assert main([str(a), str(b)]) == 2
    assert "several models (resnet20, resnet56)" in capsys.readouterr().err
    assert main([str(a), str(b), "--model", "resnet56"]) == 0


def test_shipped_resnet56_table_is_its_raw_benches():
    """configs/time/cpu_step_costs_resnet56.yaml is exactly what the tool writes from the committed bench outputs."""
    from pathlib import Path

    from benchmarks.studies.step_costs import cost_table_yaml

    repo = Path(__file__).resolve().parents[1]
    shipped = repo / "configs" / "time" / "cpu_step_costs_resnet56.yaml"
    header = [line for line in shipped.read_text().splitlines() if line.startswith("#   ") and ".json:" in line]
    files = [Path(line.split()[1].rstrip(":")) for line in header]
    assert [f.stem for f in files] == ["resnet56_a", "resnet56_b", "resnet56_cotta", "resnet56_memo"]
    runs = [read_bench(repo / f)[1] for f in files]
    written = yaml.safe_load(cost_table_yaml(files, runs, "resnet56"))
    assert written == yaml.safe_load(shipped.read_text())
    RuntimeConfig(**written["runtime"])  # a valid runtime section
