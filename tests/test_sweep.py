"""Contracts of sweeps: cell expansion and ids, validation before running, resume, deterministic merging,
retries of dead workers (local worker processes and Ray), and one real engine cell end to end.

Most tests use `fake_runner`, a module-level runner (importable by worker processes and Ray workers) whose
behaviour is read from `OUT/control.json` and whose calls are counted in files under OUT, so the counts
survive process boundaries. Its metrics are a hash of the config, so identity across launchers and retries holds
by construction there; the real-engine tests (`real_sweep`, `dying_engine_runner`) check it where it can fail:
real cells in worker processes, one killed mid-cell and resumed from its checkpoint by the retry.
Torch runs single-threaded (a shared 2-core machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import pytest
import yaml
from _extras import require

from tta_surgical.config import ConfigError
from tta_surgical.sweep import (
    cell_dir,
    load_sweep,
    merge,
    run_sweep,
)
from tta_surgical.sweep.cell import write_result

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "configs" / "surgical_block1.yaml")
STREAM = str(REPO / "streams" / "cifar10c_reset.yaml")


# ------------------------------------------------------------------------------------------------ helpers


def fake_runner(kind, config, out_dir, *, data=None):
    """A deterministic stand-in for the engine: metrics derived from the config; behaviour from control.json."""
    out_dir = Path(out_dir)
    root = out_dir.parents[1]  # OUT/cells/<id> -> OUT
    control = json.loads((root / "control.json").read_text()) if (root / "control.json").is_file() else {}
    cid = out_dir.name
    with open(root / "calls.log", "a") as f:
        f.write(cid + "\n")
    print(f"fake runner on {cid}")
    if cid in control.get("die_always", ()) or (control.get("die_first") and not (out_dir / "died_once").exists()):
        (out_dir / "died_once").write_text("x")
        os._exit(3)  # a killed worker: no exception, no cleanup
    if cid in control.get("raise_on", ()):
        raise RuntimeError(f"planned failure of {cid}")
    h = int(hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8], 16)
    err = round(10 + (h % 8000) / 100, 2)
    domain = config["stream"]["domains"][0]
    with open(root / "success.log", "a") as f:
        f.write(cid + "\n")
    return {
        "mean_error": err,
        "online_error": err + 0.5,
        "errors": {domain: err},
        "n_images": 32,
        "images_per_s": random.random(),  # varies: must not reach the merged files
        "device": f"pid {os.getpid()}",
    }


def write_sweep(folder: Path, axes=None, cells=None, name="s", **extra) -> Path:
    data = {"name": name, "kind": "run", "base": BASE, "stream": STREAM, "overrides": ["stream.n_examples=32"]}
    if axes is not None:
        data["axes"] = axes
    if cells is not None:
        data["cells"] = cells
    data.update(extra)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


AXES = {
    "stream.domains": ["gaussian_noise", "fog"],
    "method.blocks": [["block1"], ["block3"]],
    "stream.seed": [0, 1],
}


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


# ------------------------------------------------------------------------------------------------ expansion


def test_expansion_order_and_stable_ids(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, AXES))
    assert [c.index for c in sweep.cells] == list(range(8))
    # the Cartesian product in the listed order, the last axis fastest
    assert [tuple(c.axes.values()) for c in sweep.cells[:3]] == [
        ("gaussian_noise", ["block1"], 0),
        ("gaussian_noise", ["block1"], 1),
        ("gaussian_noise", ["block3"], 0),
    ]
    assert sweep.cells[4].axes == {"stream.domains": "fog", "method.blocks": ["block1"], "stream.seed": 0}
    # each cell's resolved config carries its values (and every cell's shared override)
    c = sweep.cells[3]
    assert c.config["stream"]["domains"] == ["gaussian_noise"]
    assert c.config["method"]["blocks"] == ["block3"] and c.config["stream"]["seed"] == 1
    assert c.config["stream"]["n_examples"] == 32
    ids = [c.id for c in sweep.cells]
    assert len(set(ids)) == 8 and all(len(i) == 12 and int(i, 16) >= 0 for i in ids)
    # the same file -> the same ids
    assert [c.id for c in load_sweep(write_sweep(tmp_path, AXES, name="again")).cells] == ids
    # a changed value changes exactly the cells that hold it
    axes2 = {**AXES, "method.blocks": [["block1"], ["block2"]]}
    ids2 = [c.id for c in load_sweep(write_sweep(tmp_path, axes2, name="changed")).cells]
    assert [a == b for a, b in zip(ids, ids2)] == [True, True, False, False, True, True, False, False]
    # a shared override changes every id
    ids3 = [c.id for c in load_sweep(write_sweep(tmp_path, AXES, name="o"), overrides=["optim.lr=1e-4"]).cells]
    assert not set(ids3) & set(ids)


def test_explicit_cells_and_section_values(tmp_path):
    cells = [
        {"method.blocks": ["input"]},
        {"method": {"name": "tent", "blocks": ["all"], "kind": "norm"}},
        {"method.blocks": ["all"], "method.weighting": "auto-rgn", "optim.lr": 1e-4},
    ]
    sweep = load_sweep(write_sweep(tmp_path, cells=cells))
    assert sweep.axis_keys == ("method.blocks", "method", "method.weighting", "optim.lr")
    assert sweep.cells[1].config["method"]["name"] == "tent"
    assert sweep.cells[1].config["method"]["kind"] == "norm"
    assert sweep.cells[2].config["optim"]["lr"] == pytest.approx(1e-4)
    assert sweep.cells[2].config["method"]["weighting"] == "auto-rgn"


def test_shipped_sweeps_are_valid():
    small = load_sweep(REPO / "configs" / "sweeps" / "online_blocks_small.yaml")
    assert len(small.cells) == 3 * 3 * 2
    assert {c.config["model"]["name"] for c in small.cells} == {"resnet20"}
    full = load_sweep(REPO / "configs" / "sweeps" / "online_blocks_full.yaml", check_models=False)
    assert len(full.cells) == 15 * 8 * 3
    ft = load_sweep(REPO / "configs" / "sweeps" / "finetune_blocks_small.yaml")
    assert ft.kind == "finetune" and len(ft.cells) == 4


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "change, expect",
    [
        ({"axes": {"method.blockz": [["block1"]]}}, "method.blockz"),
        ({"axes": {"method.blocks": []}}, "axes.method.blocks: the axis is empty"),
        ({"axes": {"optim.lr": [1e-3, "fast"]}}, "cell 1 (optim.lr=fast): optim.lr: expected a number"),
        ({"axes": {"method.blocks": "block1"}}, "expected a list of values"),
        ({"axes": {"method.blocks": [["block9"]]}}, "cell 0 (method.blocks=block9)"),
        ({"axes": {"stream.domains": ["fog", "fogg"]}}, "cell 1 (stream.domains=fogg)"),
        ({"axes": {"stream.seed": [0, 0]}}, "resolve to the same config"),
        ({"cells": [{"optim.lr": 1e-3}, {"optim.betas": 3}]}, "cell 1 (optim.betas=3): optim.betas"),
        ({"axes": {"stream.seed": [0]}, "cells": [{}]}, "exactly one of 'axes:'"),
        ({"axes": {"stream.seed": [0]}, "colour": "red"}, "unknown sweep key 'colour'"),
        ({"axes": {"stream.seed": [0]}, "resources": {"gpus": 1}}, "unknown key resources.gpus"),
        ({"axes": {"stream.seed": [0]}, "retries": -1}, "retries: expected an integer >= 0"),
        ({"axes": {"stream.seed": [0]}, "kind": "train"}, "kind='train' is not valid"),
        ({"axes": {"stream.seed": [0]}, "base": "configs/nope.yaml"}, "base: 'configs/nope.yaml' not found"),
    ],
)
def test_invalid_sweeps_fail_before_anything_runs(tmp_path, monkeypatch, capsys, change, expect):
    axes, cells = change.pop("axes", None), change.pop("cells", None)
    path = write_sweep(tmp_path, axes, cells, **change)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert expect in str(info.value)
    # through the command: a one-line error, exit code 2, and no cell ran (nothing was written)
    import tta_surgical.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "sweep", "tta_surgical.commands.sweep")
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--out", str(out)]) == 2
    assert expect in capsys.readouterr().err
    assert not out.exists()


def test_cli_override_may_not_set_an_axis_key(tmp_path):
    with pytest.raises(ConfigError, match="sets a key the sweep varies"):
        load_sweep(write_sweep(tmp_path, AXES), overrides=["stream.seed=3"])


# ------------------------------------------------------------------------------------------------ running


def test_resume_skips_finished_cells_and_failures_are_reported(tmp_path, monkeypatch, capsys):
    sweep = load_sweep(write_sweep(tmp_path, {"stream.domains": ["fog"], "stream.seed": [0, 1, 2, 3]}))
    out = tmp_path / "out"
    out.mkdir()
    bad = sweep.cells[2].id
    (out / "control.json").write_text(json.dumps({"raise_on": [bad]}))
    result = run_sweep(sweep, out, runner=fake_runner, progress=False)
    assert sorted(result.ran) == sorted(c.id for c in sweep.cells if c.id != bad)
    assert [f.cell.id for f in result.failed] == [bad]
    assert "planned failure" in result.failed[0].reason
    log = result.failed[0].log
    assert log == cell_dir(out, sweep.cells[2]) / "cell.log" and "planned failure" in log.read_text()
    assert "fake runner on" in log.read_text()  # the cell's own output went to its log
    assert len(lines_of(out / "calls.log")) == 4  # an exception is not retried
    merged = [json.loads(x) for x in lines_of(out / "sweep.jsonl")]
    assert [m["status"] for m in merged] == ["done", "done", "failed", "done"]

    # without --resume an existing sweep folder is refused
    with pytest.raises(FileExistsError, match="--resume"):
        run_sweep(sweep, out, runner=fake_runner, progress=False)
    # --resume runs only the unfinished cell
    (out / "control.json").write_text("{}")
    result = run_sweep(sweep, out, runner=fake_runner, progress=False, resume=True)
    assert result.ran == [bad] and len(result.skipped) == 3 and result.ok
    assert lines_of(out / "calls.log")[4:] == [bad]
    assert [json.loads(x)["status"] for x in lines_of(out / "sweep.jsonl")] == ["done"] * 4
    # and again: nothing left to run
    result = run_sweep(sweep, out, runner=fake_runner, progress=False, resume=True)
    assert result.ran == [] and len(lines_of(out / "calls.log")) == 5
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings["cells"]) == {c.id for c in sweep.cells}


def test_cli_exit_code_and_failed_cell_log(tmp_path, monkeypatch, capsys):
    import tta_surgical.cli as cli
    import tta_surgical.sweep.cell as cellmod

    def runner(kind, config, out_dir, **kw):
        if config["stream"]["seed"] == 1:
            raise ValueError("seed 1 is cursed")
        return {"mean_error": 1.0, "online_error": 2.0}

    monkeypatch.setattr(cellmod, "run_cell", runner)
    monkeypatch.setitem(cli.COMMANDS, "sweep", "tta_surgical.commands.sweep")
    path = write_sweep(tmp_path, {"stream.seed": [0, 1]})
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cell 1" in err and "seed 1 is cursed" in err and str(out / "cells") in err and "cell.log" in err
    assert "Traceback" in (out / "cells" / load_sweep(path).cells[1].id / "cell.log").read_text()


def test_merge_is_independent_of_completion_order(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, AXES))
    outputs = []
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        order = list(sweep.cells)
        random.Random(trial).shuffle(order)
        for cell in order:
            metrics = fake_runner_metrics(cell)
            write_result(cell_dir(out, cell), {"id": cell.id, "kind": "run", "metrics": metrics}, {"wall_s": trial})
            time.sleep(0.001)
        merge(sweep, out, session={"launcher": f"trial {trial}"})
        outputs.append(((out / "sweep.jsonl").read_bytes(), (out / "summary.md").read_bytes()))
    assert outputs[0] == outputs[1] == outputs[2]
    lines = [json.loads(x) for x in outputs[0][0].decode().splitlines()]
    assert [x["cell"] for x in lines] == list(range(8)) and [x["id"] for x in lines] == [c.id for c in sweep.cells]
    md = outputs[0][1].decode()
    assert "mean error % over stream.seed" in md and "stream.domains (rows) x method.blocks (columns)" in md


def test_finetune_sweep_merges_per_option_accuracy(tmp_path):
    sweep = load_sweep(REPO / "configs" / "sweeps" / "finetune_blocks_small.yaml")
    assert sweep.seed_axes == ("finetune.seeds",)
    assert sweep.cells[1].config["finetune"]["corruptions"] == ["gaussian_noise"]
    assert sweep.cells[1].config["finetune"]["seeds"] == [1]
    for cell in sweep.cells:
        acc = {"input": 50.0 + cell.index, "all": 60.0 - cell.index}
        write_result(
            cell_dir(tmp_path, cell), {"id": cell.id, "kind": "finetune", "metrics": {"mean_accuracy": acc}}, {}
        )
    merge(sweep, tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "| acc % input | acc % all |" in md
    assert "acc % input over finetune.seeds" in md
    assert "| gaussian_noise | 50.50 | 0.71 | 2 |" in md  # cells 0 and 1: 50 and 51


def fake_runner_metrics(cell) -> dict:
    h = int(cell.id[:6], 16)
    return {"mean_error": h % 100 / 3, "online_error": 1.0, "errors": {"x": 1.0}}


def test_killed_worker_is_retried_local_parallel(tmp_path):
    """Two worker processes; both cells' workers die on the first attempt; one cell dies every time.

    retries=1: the first cell succeeds on its second attempt, the other fails after two; --resume (in this
    process) then finishes it, and the merged files equal an in-process run's byte for byte.
    """
    sweep = load_sweep(write_sweep(tmp_path, {"stream.seed": [0, 1]}, retries=1))
    ok, doomed = (c.id for c in sweep.cells)
    out = tmp_path / "out"
    out.mkdir()
    (out / "control.json").write_text(json.dumps({"die_first": True, "die_always": [doomed]}))
    result = run_sweep(sweep, out, runner=fake_runner, max_parallel=2, progress=False)
    assert result.ran == [ok]
    assert [f.cell.id for f in result.failed] == [doomed]
    assert "worker died (exit code 3) on all 2 attempts" in result.failed[0].reason
    assert sorted(lines_of(out / "calls.log")) == sorted([ok, ok, doomed, doomed])  # each retried once
    assert lines_of(out / "success.log") == [ok]  # the retried cell ran to the end exactly once
    assert json.loads((cell_dir(out, sweep.cells[0]) / "timing.json").read_text())["attempts"] == 2
    assert [json.loads(x)["status"] for x in lines_of(out / "sweep.jsonl")] == ["done", "failed"]

    (out / "control.json").write_text("{}")
    result = run_sweep(sweep, out, runner=fake_runner, progress=False, resume=True)
    assert result.ran == [doomed] and result.skipped == [ok] and result.ok
    inline = tmp_path / "inline"
    run_sweep(sweep, inline, runner=fake_runner, progress=False)
    assert (out / "sweep.jsonl").read_bytes() == (inline / "sweep.jsonl").read_bytes()
    assert (out / "summary.md").read_bytes() == (inline / "summary.md").read_bytes()


# ------------------------------------------------------------------------------------------------ a real cell


def test_real_engine_cell_end_to_end(tmp_path, data_root):
    path = write_sweep(
        tmp_path,
        {"method.blocks": [["block1"]]},
        overrides=["stream.domains=[gaussian_noise]", "stream.n_examples=32", "stream.batch_size=16"],
    )
    sweep = load_sweep(path, overrides=["runtime.device=cpu"])
    out = tmp_path / "out"
    result = run_sweep(sweep, out, data=data_root, progress=False)
    assert result.ok, [f.log.read_text() for f in result.failed]
    folder = cell_dir(out, sweep.cells[0])
    summary = json.loads((folder / "summary.json").read_text())
    line = json.loads((out / "sweep.jsonl").read_text())
    assert line["metrics"]["mean_error"] == summary["mean_error"] and summary["n_images"] == 32
    assert line["axes"] == {"method.blocks": ["block1"]}
    assert (folder / "results.jsonl").is_file() and (folder / "config.yaml").is_file()
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["method"]["blocks"] == ["block1"] and saved["stream"]["n_examples"] == 32
    assert "images_per_s" not in (out / "sweep.jsonl").read_text()
    assert "images_per_s" in (out / "timings.json").read_text()


# ------------------------------------------------------------------------------------------------ real launchers

REAL_KILL_AFTER = 2  # batch after which the first attempt of the doomed real cell kills its worker
_TIMING = re.compile(rb'"(latency_ms|warmup)": [^,}]*')


def dying_engine_runner(kind, config, out_dir, *, data=None):
    """The real runner (`run_cell`: engine.run with resume=True), except that the first attempt of the cell with
    stream.seed 1 kills its worker process right after batch 2, one batch past the checkpoint at the domain
    boundary. Module-level, so worker processes can import it."""
    import tta_surgical.engine as engine
    from tta_surgical.sweep.cell import run_cell

    marker = Path(out_dir) / "killed_once"
    if config["stream"]["seed"] == 1 and not marker.exists():
        real = engine.run

        def die(batch_index, record):
            if batch_index == REAL_KILL_AFTER:
                marker.write_text(f"killed after batch {batch_index}\n")
                os._exit(9)

        engine.run = lambda *a, **kw: real(*a, on_batch=die, **kw)  # this process dies inside it
    return run_cell(kind, config, out_dir, data=data)


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory, data_root):
    """Two real engine cells (continual surgical block1, 2 domains x 2 batches of 16) and their in-process result."""
    folder = tmp_path_factory.mktemp("real_sweep")
    overrides = ["stream.domains=[gaussian_noise,brightness]", "stream.n_examples=32", "stream.batch_size=16",
                 "stream.reset=never"]  # fmt: skip
    path = write_sweep(folder, {"stream.seed": [0, 1]}, overrides=overrides)
    sweep = load_sweep(path, overrides=["runtime.device=cpu"])
    inline = folder / "inline"
    result = run_sweep(sweep, inline, data=data_root, progress=False)
    assert result.ok and result.ran == [c.id for c in sweep.cells], result.failed
    return sweep, inline


def _masked_results(out: Path, cell) -> bytes:
    return _TIMING.sub(rb'"\1": _', (cell_dir(out, cell) / "results.jsonl").read_bytes())


def test_real_sweep_in_worker_processes_with_a_killed_cell_equals_in_process(real_sweep, tmp_path, data_root):
    """Two real cells in two worker processes; the worker of cell 1 dies inside it after batch 2. The retry (a
    fresh worker) continues from the cell's checkpoint, and the merged files equal the in-process sweep's."""
    sweep, inline = real_sweep
    out = tmp_path / "pool"
    result = run_sweep(sweep, out, data=data_root, runner=dying_engine_runner, max_parallel=2, progress=False)
    assert result.ok, [f.log.read_text() for f in result.failed]
    timing = [json.loads((cell_dir(out, c) / "timing.json").read_text()) for c in sweep.cells]
    assert os.getpid() not in {t["pid"] for t in timing}  # both cells ran in worker processes
    assert [t["attempts"] for t in timing] == [1, 2]
    doomed = cell_dir(out, sweep.cells[1])
    assert (doomed / "killed_once").read_text() == f"killed after batch {REAL_KILL_AFTER}\n"
    # The retry resumed at the domain boundary (batch 2), not from scratch ...
    assert json.loads((doomed / "summary.json").read_text())["resumed_from_batch"] == REAL_KILL_AFTER
    assert json.loads((cell_dir(out, sweep.cells[0]) / "summary.json").read_text())["resumed_from_batch"] is None
    # ... and every cell's lines and the merged files are those of the uninterrupted in-process sweep.
    for cell in sweep.cells:
        assert _masked_results(out, cell) == _masked_results(inline, cell), cell.index
    for name in ("sweep.jsonl", "summary.md"):
        assert (out / name).read_bytes() == (inline / name).read_bytes(), name
    assert [json.loads(x)["status"] for x in lines_of(out / "sweep.jsonl")] == ["done", "done"]


def test_command_runs_a_sweep(tmp_path, monkeypatch, capsys):
    import tta_surgical.cli as cli
    import tta_surgical.sweep.cell as cellmod

    monkeypatch.setattr(cellmod, "run_cell", lambda kind, config, out_dir, **kw: {"mean_error": 5.0})
    monkeypatch.setitem(cli.COMMANDS, "sweep", "tta_surgical.commands.sweep")
    path = write_sweep(tmp_path, {"stream.seed": [0, 1]})
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    assert "2 to run" in capsys.readouterr().out and not out.exists()
    assert cli.main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "2 run now" in capsys.readouterr().out
    assert cli.main(["sweep", str(path), "--out", str(out), "--no-progress", "--resume"]) == 0
    assert "2 already finished" in capsys.readouterr().out


def test_ray_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    sweep = load_sweep(write_sweep(tmp_path, {"stream.seed": [0]}))
    with pytest.raises(ImportError, match=r"pip install 'tta-surgical\[ray\]'"):
        run_sweep(sweep, tmp_path / "out", launcher="ray", runner=fake_runner, progress=False)


# ------------------------------------------------------------------------------------------------ Ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = require("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_results_equal_local_byte_for_byte(tmp_path, ray_cluster):
    sweep = load_sweep(write_sweep(tmp_path, {"stream.domains": ["fog", "contrast"], "stream.seed": [0, 1]}))
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert run_sweep(sweep, local, runner=fake_runner, progress=False).ok
    result = run_sweep(sweep, remote, launcher="ray", runner=fake_runner, progress=False)
    assert result.ok, result.failed
    for name in ("sweep.jsonl", "summary.md"):
        assert (local / name).read_bytes() == (remote / name).read_bytes()
    pids = {json.loads((cell_dir(remote, c) / "timing.json").read_text())["pid"] for c in sweep.cells}
    assert os.getpid() not in pids  # the cells really ran in Ray workers


def test_ray_killed_worker_is_retried(tmp_path, ray_cluster):
    sweep = load_sweep(write_sweep(tmp_path, {"stream.seed": [0, 1, 2]}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "control.json").write_text(json.dumps({"die_first": True}))
    result = run_sweep(sweep, out, launcher="ray", runner=fake_runner, progress=False)
    assert result.ok, result.failed
    assert sorted(lines_of(out / "calls.log")) == sorted([c.id for c in sweep.cells] * 2)
    assert sorted(lines_of(out / "success.log")) == sorted(c.id for c in sweep.cells)
    assert [json.loads(x)["status"] for x in lines_of(out / "sweep.jsonl")] == ["done"] * 3


@pytest.mark.slow
def test_ray_real_engine_cells_equal_local(tmp_path, ray_cluster, data_root):
    path = write_sweep(
        tmp_path,
        {"method.blocks": [["block1"], ["all"]]},
        overrides=["stream.domains=[gaussian_noise]", "stream.n_examples=32", "stream.batch_size=16"],
    )
    sweep = load_sweep(path, overrides=["runtime.device=cpu"])
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert run_sweep(sweep, local, data=data_root, progress=False).ok
    assert run_sweep(sweep, remote, launcher="ray", data=data_root, progress=False).ok
    for name in ("sweep.jsonl", "summary.md"):
        assert (local / name).read_bytes() == (remote / name).read_bytes()
