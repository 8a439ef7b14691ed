"""Run the cells of a sweep: in this process, in local worker subprocesses, or as Ray tasks; then merge.

Launchers differ only in where `execute_cell` runs:

- local, one slot (default without several GPUs): cells one after another in this process.
- local, N slots (`max_parallel=N`, or one per GPU when several exist): N long-lived worker subprocesses
  (`tta_surgical.sweep.worker`), each with `CUDA_VISIBLE_DEVICES` set to its GPU when there are GPUs and
  `OMP_NUM_THREADS` to the cell's CPU count. A worker that dies mid-cell (killed, out of memory, segfault) is
  replaced and the cell resubmitted, up to `retries` more times.
- ray: one Ray task per cell with the sweep's `num_cpus` / `num_gpus` and `max_retries=retries` (Ray re-runs a
  task whose worker died); Ray is imported only here.

A Python exception inside a cell is deterministic (a bug, a bad path): the cell fails at once, without retries,
as Ray does by default. Finished cells (a `DONE` file in `OUT/cells/<id>/`) are skipped with `resume`.

Local workers die with their driver (`worker.die_with_driver`). Every attempt at a cell holds the cell folder's
lock (`cell.execute_cell`); a cell whose folder another live process still holds waits for it (bounded,
`busy_wait_s`) and is then reported busy (`SweepResult.busy`): not run, nothing written, not failed.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.context import DataContext, DataLike
from ..fileio import atomic_write_text
from ..runfolder import folder_lock
from .cell import (
    BUSY_WAIT_S,
    DONE_FILE,
    LOG_FILE,
    CellBusyError,
    data_task,
    execute_cell,
    read_done,
    resolve_runner,
    run_cell,
    runner_path,
    runner_spec,
    write_result,
)
from .merge import CELLS_DIR, cell_dir, merge
from .spec import Cell, Sweep
from .worker import DRIVER_ENV

__all__ = ["LAUNCHERS", "Failure", "SweepResult", "cell_tasks", "gpu_ids", "run_sweep"]

LAUNCHERS = ("local", "ray")
RAY_HINT = "the ray launcher needs Ray: pip install 'tta-surgical[ray]' (or pip install 'ray>=2.9')"


@dataclass(frozen=True)
class Failure:
    """A cell that did not finish: why, and where its log is."""

    cell: Cell
    reason: str
    log: Path


@dataclass
class SweepResult:
    """What a sweep session did: cells run now, skipped as finished, failed; the merged lines."""

    out: Path
    n_cells: int
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    busy: list[Failure] = field(default_factory=list)  # not run: another live process held the cell's folder
    lines: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.busy


def gpu_ids() -> list[str]:
    """The GPUs a local launcher may hand out: `CUDA_VISIBLE_DEVICES` when set, else 0..count-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    try:
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA build, no driver: no GPUs to hand out
        return []


def cell_tasks(
    sweep: Sweep,
    out: Path,
    cells: Sequence[Cell],
    *,
    data: DataLike = None,
    busy_wait_s: float = BUSY_WAIT_S,
) -> list[dict[str, Any]]:
    """The plain-data task of each cell (what `execute_cell` takes), with absolute paths."""
    plain = data_task(DataContext.of(data))
    return [
        {
            "id": c.id,
            "index": c.index,
            "kind": sweep.kind,
            "config": c.config,
            "out_dir": str(cell_dir(out, c).resolve()),
            "data": plain,
            "threads": sweep.resources.threads,
            "busy_wait_s": float(busy_wait_s),
        }
        for c in cells
    ]


def _write_plan(sweep: Sweep, out: Path) -> None:
    """OUT/plan.json: the expanded cells (index, id, axis values), for people and tools reading the folder."""
    plan = {
        "name": sweep.name,
        "kind": sweep.kind,
        "source": str(sweep.source) if sweep.source else None,
        "base": str(sweep.base) if sweep.base else None,
        "stream": str(sweep.stream) if sweep.stream else None,
        "overrides": list(sweep.overrides),
        "axes": list(sweep.axis_keys),
        "resources": {"num_gpus": sweep.resources.num_gpus, "num_cpus": sweep.resources.num_cpus},
        "retries": sweep.retries,
        "cells": [{"cell": c.index, "id": c.id, "axes": c.axes} for c in sweep.cells],
    }
    atomic_write_text(out / "plan.json", json.dumps(plan, indent=1) + "\n")


def run_sweep(
    sweep: Sweep,
    out: str | os.PathLike,
    *,
    launcher: str = "local",
    max_parallel: int | None = None,
    address: str | None = None,
    resume: bool = False,
    data: DataLike = None,
    runner: Callable[..., Any] | None = None,
    progress: bool = True,
    busy_wait_s: float = BUSY_WAIT_S,
) -> SweepResult:
    """Run every unfinished cell of `sweep` into `out/cells/<id>/`, then merge into `out/sweep.jsonl` etc.

    launcher: `local` or `ray` (see the module docstring). max_parallel: local worker subprocesses (default:
    one per GPU when several exist, else 1 = in this process); for ray, the CPUs of a cluster started on demand
    and a cap on cells in flight. address: a running Ray cluster (`HEAD:6379` or `auto`).
    resume: skip finished cells; without it, an `out` that already holds cells is an error.
    data: where the data lives (`DataContext`; a folder = the data root), passed to every cell.
    runner: `runner(kind, config, out_dir, data=DataContext) -> summary` (default: `run_cell`, the real
    engine / finetune); the local subprocess launcher needs it importable by module path.
    busy_wait_s: how long a cell waits for another live process holding its folder (e.g. a worker of a killed
    earlier session still finishing it) before it is reported busy (`SweepResult.busy`) rather than run.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r} is not valid; choose one of: {', '.join(LAUNCHERS)}")
    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"--max-parallel must be >= 1, got {max_parallel}")
    out = Path(out)
    # One driver per sweep folder (each cell's run also locks its own folder, whichever worker or node runs it).
    with folder_lock(out, "sweep"):
        result, todo = _start(sweep, out, resume)
        tasks = cell_tasks(sweep, out, todo, data=data, busy_wait_s=busy_wait_s)
        by_id = {c.id: c for c in todo}
        bar = _progress(len(sweep.cells), len(result.skipped), sweep.name, progress)

        def finished(cell_id: str, error: str | None, busy: bool = False) -> None:
            if error is None:
                result.ran.append(cell_id)
            else:
                cell = by_id[cell_id]
                (result.busy if busy else result.failed).append(Failure(cell, error, cell_dir(out, cell) / LOG_FILE))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(failed=len(result.failed), refresh=False)

        def say(message: str) -> None:
            if bar is not None:
                bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        session: dict[str, Any] = {"launcher": launcher}
        try:
            if tasks:
                session.update(_dispatch(sweep, tasks, runner, launcher, address, max_parallel, out, finished, say))
        finally:
            if bar is not None:
                bar.close()
            result.wall_s = time.perf_counter() - t0
            session["wall_s"] = round(result.wall_s, 3)
            session["cells_run"] = len(result.ran)
            result.lines = merge(sweep, out, failed=[f.cell.id for f in result.failed], session=session)
    # Report failures in sweep order, whatever order they happened in.
    result.failed.sort(key=lambda f: f.cell.index)
    result.busy.sort(key=lambda f: f.cell.index)
    return result


def _start(sweep: Sweep, out: Path, resume: bool) -> tuple[SweepResult, list[Cell]]:
    """Check the folder, write the plan, and split the cells into finished (skipped) and to do."""
    cells_root = out / CELLS_DIR
    if not resume and cells_root.is_dir() and any(cells_root.iterdir()):
        raise FileExistsError(
            f"{out} already holds sweep cells; pass --resume to skip the finished ones and continue the others, "
            "or choose another --out"
        )
    _write_plan(sweep, out)
    result = SweepResult(out=out, n_cells=len(sweep.cells))
    todo = []
    for cell in sweep.cells:
        if read_done(cell_dir(out, cell)) is not None:
            result.skipped.append(cell.id)
        else:
            todo.append(cell)
    return result, todo


def _progress(total: int, initial: int, name: str, enabled: bool) -> Any:
    return tqdm(total=total, initial=initial, desc=name, unit="cell", disable=not enabled)


def _dispatch(
    sweep: Sweep,
    tasks: list[dict[str, Any]],
    runner: Callable[..., Any] | None,
    launcher: str,
    address: str | None,
    max_parallel: int | None,
    out: Path,
    finished: Callable,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Run the tasks with the chosen launcher; returns what the session record says about it."""
    if launcher == "ray":
        return _launch_ray(sweep, tasks, runner, address, max_parallel, finished)
    gpus = gpu_ids()
    n = max_parallel if max_parallel is not None else (len(gpus) if len(gpus) > 1 else 1)
    if n == 1 and len(gpus) <= 1:
        _launch_inline(tasks, runner, finished, say)
        return {"workers": n}
    _WorkerPool(tasks, runner, gpus, sweep.retries, out, say).run(n, finished)
    return {"workers": n, "gpus": gpus}


# ---------------------------------------------------------------------------------------------- local, inline


def _launch_inline(
    tasks: list[dict[str, Any]], runner: Callable[..., Any] | None, finished: Callable, say: Callable[[str], None]
) -> None:
    for task in tasks:
        try:
            execute_cell(task, runner, on_wait=say)
        except CellBusyError as err:
            finished(task["id"], str(err), busy=True)
        except Exception as err:  # one failed cell must not stop the others; its traceback is in its log
            finished(task["id"], f"{type(err).__name__}: {err}")
        else:
            finished(task["id"], None)


# ---------------------------------------------------------------------------------------------- local, workers


def _worker_env(gpu: str | None, threads: int, extra_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env[DRIVER_ENV] = str(os.getpid())  # the worker dies with this process (worker.die_with_driver)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in (extra_path, package_root, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class _WorkerPool:
    """N slots, each a thread driving one worker subprocess (`tta_surgical.sweep.worker`); dead workers are
    replaced and their cell resubmitted. The slots share the queue of (task, attempt), the results, the workers.
    Workers die with this process (parent-death signal and watchdog in the worker), so a killed driver leaves no
    cell running behind it."""

    def __init__(
        self,
        tasks: list[dict[str, Any]],
        runner: Callable[..., Any] | None,
        gpus: list[str],
        retries: int,
        out: Path,
        say: Callable[[str], None],
    ) -> None:
        runner = runner or run_cell
        self.spec, self.extra_path = runner_spec(runner), runner_path(runner)
        self.tasks, self.gpus, self.retries, self.say = tasks, gpus, retries, say
        self.pending: deque[tuple[dict[str, Any], int]] = deque((t, 1) for t in tasks)
        self.events: queue.Queue[tuple[str, str | None, bool]] = queue.Queue()
        self.cond = threading.Condition()
        self.left = len(tasks)
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs_dir = out / "workers"
        self.logs_dir.mkdir(parents=True, exist_ok=True)

    def spawn(self, slot: int, threads: int) -> subprocess.Popen:
        gpu = self.gpus[slot % len(self.gpus)] if self.gpus else None
        log = open(self.logs_dir / f"worker{slot}.log", "ab")  # noqa: SIM115 (the child owns it; closed below)
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "tta_surgical.sweep.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=_worker_env(gpu, threads, self.extra_path),
                text=True,
                bufsize=1,
            )
        finally:
            log.close()

    def next_task(self) -> tuple[dict[str, Any], int] | None:
        """The next (task, attempt), waiting while retries may still arrive; None when everything is done."""
        with self.cond:
            while not self.pending and self.left > 0:
                self.cond.wait()
            return self.pending.popleft() if self.pending else None

    def done_one(self) -> None:
        with self.cond:
            self.left -= 1
            self.cond.notify_all()

    def send(self, proc: subprocess.Popen, task_path: Path) -> str:
        """Hand a task file to a worker and wait for its one-line reply ("" when the worker died mid-cell); the
        "waiting" lines a worker sends before it (its cell's folder is held by another process) are passed on."""
        try:
            proc.stdin.write(str(task_path) + "\n")
            proc.stdin.flush()
            while True:
                line = proc.stdout.readline()
                if not line or json.loads(line).get("status") != "waiting":
                    return line
                self.say(json.loads(line).get("message", ""))
        except (BrokenPipeError, OSError):
            return ""

    def slot_loop(self, slot: int) -> None:
        proc: subprocess.Popen | None = None
        try:
            while (item := self.next_task()) is not None:
                task, attempt = item
                task = {
                    **task,
                    "runner": self.spec,
                    "sys_path": [p for p in (self.extra_path,) if p],
                    "attempt": attempt,
                }
                task_path = Path(task["out_dir"]) / "task.json"
                atomic_write_text(task_path, json.dumps(task) + "\n")
                if proc is None or proc.poll() is not None:
                    proc = self.procs[slot] = self.spawn(slot, int(task["threads"]))
                line = self.send(proc, task_path)
                if not line:  # the worker died mid-cell: a fresh one retries the cell (it resumes its checkpoint)
                    code, proc = proc.wait(), None
                    if attempt <= self.retries:
                        with self.cond:
                            self.pending.append((task, attempt + 1))
                            self.cond.notify_all()
                        continue
                    self.events.put((task["id"], f"worker died (exit code {code}) on all {attempt} attempts", False))
                else:
                    reply = json.loads(line)
                    status = reply.get("status")
                    error = None if status == "done" else reply.get("error", "failed")
                    self.events.put((task["id"], error, status == "busy"))
                self.done_one()
        except BaseException as err:  # never leave the main loop waiting on a dead slot thread
            with self.cond:
                self.left = 0
                self.cond.notify_all()
            self.events.put(("", f"slot {slot} crashed: {err!r}", False))
        finally:
            if proc is not None and proc.poll() is None:
                proc.stdin.close()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def run(self, n_workers: int, finished: Callable) -> None:
        threads = [
            threading.Thread(target=self.slot_loop, args=(i,), daemon=True)
            for i in range(min(n_workers, len(self.tasks)))
        ]
        for t in threads:
            t.start()
        try:
            for _ in range(len(self.tasks)):
                cell_id, error, busy = self.events.get()
                if not cell_id:
                    raise RuntimeError(error)
                finished(cell_id, error, busy)
        finally:
            with self.cond:
                if self.left > 0:  # interrupted: stop the workers, the cells stay resumable
                    self.pending.clear()
                    self.left = 0
                    for proc in self.procs.values():
                        if proc.poll() is None:
                            proc.kill()
                self.cond.notify_all()
            for t in threads:
                t.join(timeout=60)


# ---------------------------------------------------------------------------------------------- ray


def _ray_execute(task: dict[str, Any], runner: Callable[..., Any] | dict[str, Any] | None) -> dict[str, Any]:
    """The body of a Ray task: the same `execute_cell` as the local launchers.

    runner: None (the real `run_cell`), a callable Ray shipped by value, or {"spec": "module:name", "path": dir}
    for a module-level runner outside this package (imported here; Ray would pickle it by module name, which a
    worker can import only when the module is on its path).
    """
    if isinstance(runner, dict):
        if runner.get("path") and runner["path"] not in sys.path:
            sys.path.insert(0, runner["path"])
        runner = resolve_runner(runner["spec"])
    return execute_cell(task, runner)


def _ray_runner(runner: Callable[..., Any] | None) -> Callable[..., Any] | dict[str, Any] | None:
    if runner is None:
        return None
    try:
        spec = runner_spec(runner)
    except ValueError:  # defined in __main__ or a closure: cloudpickle ships the function itself
        return runner
    path = runner_path(runner)
    return {"spec": spec, "path": path} if path else runner


def _launch_ray(
    sweep: Sweep,
    tasks: list[dict[str, Any]],
    runner: Callable[..., Any] | None,
    address: str | None,
    max_parallel: int | None,
    finished: Callable,
) -> dict[str, Any]:
    try:
        import ray
    except ImportError as err:
        raise ImportError(RAY_HINT) from err
    res = sweep.resources
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max_parallel or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        total = ray.cluster_resources()
        if res.num_gpus > total.get("GPU", 0):
            raise ValueError(
                f"each cell asks for {res.num_gpus:g} GPU(s) (resources.num_gpus) but the Ray cluster has "
                f"{total.get('GPU', 0):g}; add GPU workers (ray start --address=... --num-gpus=N) or set "
                "resources.num_gpus=0"
            )
        if res.num_cpus > total.get("CPU", 0):
            raise ValueError(
                f"each cell asks for {res.num_cpus:g} CPUs (resources.num_cpus) but the Ray cluster has "
                f"{total.get('CPU', 0):g}; lower resources.num_cpus or add workers"
            )
        remote = ray.remote(_ray_execute).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=sweep.retries, retry_exceptions=False
        )
        shipped = _ray_runner(runner)
        waiting = deque(tasks)
        limit = max_parallel if (max_parallel and address) else len(tasks)
        running: dict[Any, dict[str, Any]] = {}
        while waiting or running:
            while waiting and len(running) < limit:
                task = waiting.popleft()
                running[remote.remote(task, shipped)] = task
            ready, _ = ray.wait(list(running), num_returns=1)
            task = running.pop(ready[0])
            try:
                value = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, CellBusyError):
                    finished(task["id"], str(cause).splitlines()[0][:500], busy=True)
                    continue
                text = f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(err).__name__}"
                finished(task["id"], text.splitlines()[0][:500])
                continue
            # Without a shared filesystem the task wrote DONE on its node; record it here too.
            folder = Path(task["out_dir"])
            if not (folder / DONE_FILE).is_file():
                write_result(folder, value["done"], value["timing"])
            finished(task["id"], None)
        return {"ray_address": "on-demand" if started and not address else "cluster" if address else "existing"}
    finally:
        if started:
            ray.shutdown()
