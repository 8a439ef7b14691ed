"""A killed sweep driver leaves nothing running, and a resumed sweep never fights a live holder of a cell.

Real processes throughout: a driver with two worker processes is killed with SIGKILL mid-cell; its workers must
be gone within seconds (Linux: parent-death signal; elsewhere: the worker's watchdog), so an immediate --resume
runs the cells to DONE, never to DONE and ERROR at once. A cell whose folder another live process holds is
waited for (bounded, reported), skipped when that process finished it, and reported busy (not failed, nothing
written) when the wait runs out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tta_surgical.sweep import cell_dir, load_sweep, run_sweep

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from _sweep_runners import locking_runner  # noqa: E402  (by module name, as worker processes import it)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process signals")


def write_sweep(folder: Path, seeds=(0, 1)) -> Path:
    data = {
        "name": "orphans",
        "kind": "run",
        "base": str(REPO / "configs" / "norm.yaml"),
        "stream": str(REPO / "streams" / "quickstart.yaml"),
        "overrides": ["stream.n_examples=32"],
        "axes": {"stream.seed": list(seeds)},
    }
    path = folder / "orphans.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent to reap it counts as gone: it runs nothing and holds no lock)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # no /proc (macOS): signal 0 reached it
    return state not in ("Z", "X")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def test_killed_driver_takes_its_workers_with_it_and_resume_gives_done_only(tmp_path):
    path = write_sweep(tmp_path)
    sweep = load_sweep(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "control.json").write_text(json.dumps({"sleep": 120}))
    driver = subprocess.Popen([sys.executable, str(TESTS / "_sweep_runners.py"), str(path), str(out), "2"], cwd=REPO)
    started = [cell_dir(out, c) / "started" for c in sweep.cells]
    workers: list[int] = []
    try:
        wait_for(lambda: all(s.is_file() and s.read_text().endswith("\n") for s in started), 120, "both cells")
        workers = [int(s.read_text()) for s in started]
        assert driver.pid not in workers and len(set(workers)) == 2  # one worker process per cell
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        t0 = time.monotonic()
        wait_for(lambda: not any(alive(p) for p in workers), 5, "the workers of the killed driver to end")
        print(f"workers gone {time.monotonic() - t0:.2f} s after the driver was killed")
    finally:
        for pid in workers:  # old code: the orphans would run on (and hold the cells) for two minutes
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()

    (out / "control.json").write_text("{}")
    result = run_sweep(sweep, out, runner=locking_runner, progress=False, resume=True)  # at once, in this process
    assert result.ok and sorted(result.ran) == sorted(c.id for c in sweep.cells)
    for c in sweep.cells:
        names = {p.name for p in cell_dir(out, c).iterdir()}
        assert "DONE" in names and "ERROR" not in names
    assert [json.loads(x)["status"] for x in (out / "sweep.jsonl").read_text().splitlines()] == ["done", "done"]


def _hold(folder: Path, seconds: float, finish: dict | None = None) -> subprocess.Popen:
    """Another process holding a cell folder's lock for `seconds`, then (with `finish`) writing its DONE, as a
    worker of an earlier session finishing the cell would."""
    code = (
        "import json, sys, time\n"
        "from tta_surgical.runfolder import folder_lock\n"
        "from tta_surgical.sweep.cell import write_result\n"
        f"with folder_lock({str(folder)!r}, 'earlier attempt'):\n"
        "    print('held', flush=True)\n"
        f"    time.sleep({seconds})\n"
        f"    finish = {finish!r}\n"
        "    if finish:\n"
        f"        write_result(__import__('pathlib').Path({str(folder)!r}), finish, {{'wall_s': 1.0}})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_resume_waits_for_a_live_holder_and_keeps_the_cell_it_finished(tmp_path, capsys):
    sweep = load_sweep(write_sweep(tmp_path, seeds=(0,)))
    out = tmp_path / "out"
    (cell := cell_dir(out, sweep.cells[0])).mkdir(parents=True)
    done = {"id": sweep.cells[0].id, "kind": "run", "metrics": {"mean_error": 7.0, "online_error": 7.0}}
    holder = _hold(cell, 2.0, finish=done)
    try:
        result = run_sweep(sweep, out, runner=locking_runner, progress=False, resume=True)  # waits up to 60 s
    finally:
        holder.wait(timeout=60)
    assert not (cell / "ERROR").exists()  # old code: a failed cell ("in use"), then the holder's DONE beside it
    assert result.ok and result.ran == [sweep.cells[0].id]
    assert not (out / "success.log").exists()  # not run again: the holder finished it while we waited
    assert {p.name for p in cell.iterdir()} >= {"DONE", "timing.json"} and not (cell / "ERROR").exists()
    assert json.loads((out / "sweep.jsonl").read_text())["metrics"]["mean_error"] == 7.0
    err = capsys.readouterr().err
    assert "held by a live process" in err and f"pid {holder.pid}" in err and "waiting up to 60 s" in err


def test_a_holder_that_stays_leaves_the_cell_busy_not_failed(tmp_path, capsys):
    """In a worker process: the wait is reported through the worker, the cell comes back busy, nothing is written
    into its folder, and a later resume (the holder gone) runs it."""
    sweep = load_sweep(write_sweep(tmp_path, seeds=(0,)))
    out = tmp_path / "out"
    (held := cell_dir(out, sweep.cells[0])).mkdir(parents=True)
    holder = _hold(held, 120)
    try:
        result = run_sweep(
            sweep, out, runner=locking_runner, max_parallel=2, progress=False, busy_wait_s=1, resume=True
        )
        assert result.ran == [] and not result.failed and not result.ok
        assert [f.cell.id for f in result.busy] == [sweep.cells[0].id]
        assert "still held after 1 s" in result.busy[0].reason and f"pid {holder.pid}" in result.busy[0].reason
        assert not {"DONE", "ERROR", "attempts"} & {p.name for p in held.iterdir()}
        assert json.loads((out / "sweep.jsonl").read_text())["status"] == "pending"
        assert "held by a live process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    result = run_sweep(sweep, out, runner=locking_runner, progress=False, resume=True, busy_wait_s=1)
    assert result.ok and result.ran == [sweep.cells[0].id]
    assert (held / "DONE").is_file() and not (held / "ERROR").exists()
