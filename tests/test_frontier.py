"""`tta-surgical frontier`: budgets and selections as data, the Pareto front, schedule twins, and one tiny end-to-end
frontier (the toy CNN of `tests/_toy_methods.py` on 2 corrupted CIFAR-10 domains x 32 images, batches of 8, fixed
costs) through the command line."""

from __future__ import annotations

import json

import pytest

from tta_surgical.cli import main
from tta_surgical.config import load_config, to_dict
from tta_surgical.studies.frontier import pareto_front, parse_budget, parse_selection, planned_adaptations


def test_budgets_and_selections_are_overrides():
    assert parse_budget("wait") == ("wait", [])
    assert parse_budget("every:4") == ("every 4", ["runtime.update_every=4"])
    label, over = parse_budget("speed:0.5+async")
    assert label == "speed 0.5x async" and "stream.arrival.speed=0.5" in over and "runtime.async_adapt=true" in over
    assert "stream.arrival.protocol=queue" in parse_budget("queue:1")[1]
    assert parse_budget("latency:50") == ("latency 50 ms", ["runtime.latency_budget_ms=50"])
    assert parse_budget("overhead:1000")[1] == ["runtime.overhead_budget_ms=1000"]
    for bad in ("speed", "speed:0", "every:1.5", "fast", "wait:2"):
        with pytest.raises(ValueError, match="is not valid; write one of"):
            parse_budget(bad)
    assert parse_selection("default") == []
    assert parse_selection("block1+head") == ["method.blocks=[block1,head]", "method.kind=all"]
    assert parse_selection("auto") == ["method.blocks=auto"]


def test_pareto_front():
    # (cost, error): b beats a (cheaper, same error), d is dominated by c, e has no cost
    points = [(2.0, 30.0), (1.0, 30.0), (3.0, 20.0), (4.0, 25.0), (None, 10.0), (1.0, 40.0)]
    assert pareto_front(points) == [False, True, True, False, False, False]


def test_planned_adaptations_of_a_fixed_cost_run():
    cfg = load_config(overrides=["stream.arrival.kind=constant", "stream.arrival.speed=1", "runtime.cost_mode=fixed",
                                 "runtime.cost_ratio=2.28"])  # fmt: skip
    assert planned_adaptations(to_dict(cfg), [200] * 10) == (0, 3, 6, 9)
    measured = load_config(overrides=["stream.arrival.kind=constant", "stream.arrival.speed=1"])
    assert planned_adaptations(to_dict(measured), [200] * 10) is None


def test_frontier_command_end_to_end(tmp_path, data_root, capsys):
    out = tmp_path / "frontier"
    argv = [
        "frontier", "--methods", "norm,tent", "--blocks", "default,block1,auto", "--budgets", "wait,speed:1,speed:0.25",
        "--out", str(out), "--data-root", str(data_root),
        "model.name=module:_toy_methods:TinyNet", "stream.domains=[fog,contrast]", "stream.n_examples=32",
        "stream.batch_size=8", "stream.reset=never", "runtime.device=cpu", "runtime.channels_last=false",
        "runtime.cost_mode=fixed", "runtime.cost_ratio={tent: 2.28, 'tent:block1': 2.46, norm: 0.92}",
        "runtime.forward_ms=5",
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "tent:auto (blocks auto is not available" in captured.err or "auto" not in captured.err
    result = json.loads((out / "frontier.json").read_text())
    points = {p["label"]: p for p in result["points"]}
    budgets = ("wait", "speed 1x", "speed 0.25x")
    assert set(points) == {f"{m} @ {b}" for m in ("norm", "tent", "tent:block1") for b in budgets}
    # Twins: at speed 0.25 Tent's update (2.28 forwards) fits in the gap (4): every batch adapted, as when waiting;
    # norm (0.92) fits at every speed. Their numbers are the twin's; the realistic 1x points were run.
    assert points["tent @ speed 0.25x"]["same_schedule_as"] == points["tent @ wait"]["cell"]
    assert points["norm @ speed 1x"]["same_schedule_as"] == points["norm @ wait"]["cell"]
    assert points["tent @ speed 1x"]["same_schedule_as"] is None
    assert points["tent @ speed 0.25x"]["online_error"] == points["tent @ wait"]["online_error"]
    # 8 batches: at 1x Tent adapts batches 0, 3, 6; cost per batch = (3 x 2.28 + 5 x 1) / 8 forwards
    assert points["tent @ speed 1x"]["adapted_share"] == pytest.approx(3 / 8)
    assert points["tent @ speed 1x"]["cost_x_inference"] == pytest.approx((3 * 2.28 + 5) / 8)
    assert points["tent @ wait"]["cost_x_inference"] == pytest.approx(2.28)
    assert points["norm @ wait"]["pareto"]  # the cheapest point is always on the front
    front = [p for p in result["points"] if p["pareto"]]
    for p in front:  # no point is both cheaper (or equal) and better
        assert not any(
            q["cost_x_inference"] <= p["cost_x_inference"] and q["online_error"] < p["online_error"]
            for q in result["points"]
        )
    text = (out / "frontier.md").read_text()
    assert "Pareto" in text and "Online error % (rank) by budget" in text and "Gain over norm that survives" in text
    assert len(list((out / "cells").iterdir())) == 5  # 9 points, 4 twins not run (norm twice, the 0.25x ones)
