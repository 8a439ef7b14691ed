"""One sweep cell: the runner (engine.run / run_finetune with resume), and the wrapper every launcher calls.

`execute_cell(task, runner)` is the unit of work of all launchers (in this process, in a local worker
subprocess, in a Ray task): it sets the thread count, sends the cell's output to `cell.log` in its folder, calls
`runner(kind, config, out_dir, data=)`, and writes the cell's result to `DONE` and its wall
time to `timing.json`, both atomically. The runner resumes a cell whose earlier attempt died (the engine
checkpoints at every domain boundary; finetune skips its finished inner cells), so a retry continues.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import engine
from ..config import Config, from_dict
from ..data.context import DataContext
from ..fileio import atomic_write_text
from ..finetune import FinetuneConfig, run_finetune
from ..runfolder import FolderInUseError, folder_lock

__all__ = [
    "BUSY_WAIT_S",
    "DONE_FILE",
    "CellBusyError",
    "ERROR_FILE",
    "LOG_FILE",
    "TIMING_FILE",
    "Runner",
    "atomic_write_text",
    "execute_cell",
    "key_metrics",
    "read_done",
    "run_cell",
    "runner_spec",
    "resolve_runner",
    "timing_metrics",
]

DONE_FILE = "DONE"  # the cell's result record (JSON); its presence means the cell finished
ERROR_FILE = "ERROR"  # the traceback of the last attempt that raised
LOG_FILE = "cell.log"  # stdout and stderr of every attempt, appended
TIMING_FILE = "timing.json"  # wall time and attempts: kept out of the merged results (they vary run to run)
ATTEMPTS_FILE = "attempts"
# How long a cell waits for another live process that holds its folder (an attempt of an earlier, killed sweep
# session that is still finishing) before it is reported busy; `sweep --busy-wait` sets it.
BUSY_WAIT_S = 60.0


class CellBusyError(FolderInUseError):
    """A cell's folder stayed held by another live process: the cell was not run (and is not failed)."""

# Summary keys that go into the merged sweep.jsonl: numbers that a seed reproduces exactly on one machine.
RUN_METRICS = (
    "mean_error",
    "online_error",
    "errors",
    "n_images",
    "adapted_tensors",
    "adapted_numel",
    "n_skipped_updates",
    "n_nonfinite_batches",
    "model_pretrained",
)
FINETUNE_METRICS = (
    "mean_accuracy",
    "mean_accuracy_se",
    "accuracy",
    "rank",
    "source_accuracy",
    "n_cells",
    "model_pretrained",
)
# Summary keys that vary with the machine and its load: they go to timings.json only.
TIMING_METRICS = ("images_per_s", "latency_ms", "peak_memory_mb", "peak_memory_kind", "device")


class Runner(Protocol):
    """Runs one cell to completion in `out_dir` (resuming what is there) and returns its summary dict."""

    def __call__(
        self,
        kind: str,
        config: Mapping[str, Any],
        out_dir: Path,
        *,
        data: DataContext | None = None,
    ) -> Mapping[str, Any]: ...


def run_cell(
    kind: str,
    config: Mapping[str, Any],
    out_dir: Path,
    *,
    data: DataContext | None = None,
) -> dict[str, Any]:
    """The real runner: rebuild the frozen config from its dict and run `engine.run` or `run_finetune`.

    Always `resume=True`: a fresh folder starts from scratch, a folder left by a dead attempt continues from
    its last checkpoint (the config must be the same, which the cell id guarantees).
    """
    if kind == "run":  # `engine.run` is looked up when called, so a wrapper set on the module takes effect
        return engine.run(from_dict(Config, config), out_dir, data=data, resume=True)
    if kind == "finetune":
        cfg = from_dict(FinetuneConfig, config)
        return run_finetune(cfg, out_dir, data=data, resume=True)
    raise ValueError(f"unknown sweep kind {kind!r}; expected run or finetune")


def data_task(data: DataContext) -> dict[str, Any]:
    """The plain (JSON) form of a data context for a cell's task, with absolute paths (workers may run elsewhere)."""
    return {
        "root": str(data.root.resolve()) if data.root else None,
        "frost_dir": str(data.frost_dir.resolve()) if data.frost_dir else None,
        "num_workers": data.num_workers,
    }


def data_from_task(plain: Mapping[str, Any] | None) -> DataContext:
    """The data context `data_task` wrote (None: the environment's, resolved in the worker)."""
    if not plain:
        return DataContext.resolve()
    root, frost = plain.get("root"), plain.get("frost_dir")
    return DataContext(Path(root) if root else None, Path(frost) if frost else None, plain.get("num_workers"))


def key_metrics(kind: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """The reproducible numbers of a cell's summary (what sweep.jsonl holds), in a fixed key order."""
    keys = RUN_METRICS if kind == "run" else FINETUNE_METRICS
    return {k: summary[k] for k in keys if k in summary}


def timing_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in TIMING_METRICS if k in summary}


def read_done(folder: Path) -> dict[str, Any] | None:
    """The result record of a finished cell, or None when its folder has no (readable) DONE file."""
    path = folder / DONE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def runner_spec(runner: Callable[..., Any]) -> str:
    """`module:qualname` of an importable runner, for worker subprocesses."""
    module, name = getattr(runner, "__module__", None), getattr(runner, "__qualname__", None)
    if not module or not name or module == "__main__" or "<" in name:
        raise ValueError(
            f"the runner {runner!r} must be a module-level function importable by worker processes "
            "(not defined in __main__, a lambda or a closure)"
        )
    return f"{module}:{name}"


def runner_path(runner: Callable[..., Any]) -> str | None:
    """The folder to put on sys.path so a worker can import the runner's module (None for this package)."""
    module = sys.modules.get(getattr(runner, "__module__", ""))
    file = getattr(module, "__file__", None)
    if module is None or file is None or module.__name__.split(".")[0] == "tta_surgical":
        return None
    root = Path(file).resolve().parent
    for _ in range(module.__name__.count(".") + (Path(file).name == "__init__.py")):
        root = root.parent
    return str(root)


def resolve_runner(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send Python-level stdout/stderr to `path` (appending) for the duration."""
    with open(path, "a", encoding="utf-8", buffering=1) as log, contextlib.redirect_stdout(log):
        with contextlib.redirect_stderr(log):
            yield


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with `n` torch threads (the cell's num_cpus), restoring the caller's setting afterwards."""
    if not n:
        yield
        return

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute_cell(
    task: Mapping[str, Any],
    runner: Callable[..., Any] | None = None,
    *,
    log: bool = True,
    on_wait: Callable[[str], None] | None = None,
) -> dict:
    """Run one cell as `task` describes it and record it; returns {"done": record, "timing": timing}.

    task: {"kind", "config", "out_dir", "id", "data", "threads"}, optionally "busy_wait_s"; "data" is the plain form
    of a `DataContext` (`data_task`), so a task crosses process and machine boundaries as JSON.
    log: redirect Python's stdout/stderr into the cell's `cell.log` (a worker subprocess redirects at the
    file-descriptor level itself and passes False).
    The whole attempt holds the cell folder's writer lock, so DONE and ERROR are never written by two processes.
    When another live process holds it (an attempt of an earlier session still running), the cell waits for it up
    to `busy_wait_s` seconds (`BUSY_WAIT_S`), saying so through `on_wait(message)` (default: stderr); a cell that
    holder finished is then not run again, and one still held raises `CellBusyError` without touching the folder.
    Raises what the runner raises, after writing its traceback to `ERROR` and the log.
    """
    runner = runner or run_cell
    out = Path(task["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    wait_s = float(task.get("busy_wait_s", BUSY_WAIT_S))

    def waiting(holder: str) -> None:
        (on_wait or _to_stderr)(
            f"cell {task['id']}: its folder is held by a live process ({holder}); waiting up to {wait_s:g} s for it"
        )

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(out, "sweep cell", wait_s=wait_s, on_wait=waiting))
        except FolderInUseError as err:
            raise CellBusyError(
                f"not run, still held after {wait_s:g} s by another live process: {err}; rerun with --resume once "
                "it has ended"
            ) from None
        done = read_done(out)
        if done is not None:  # the process we waited for finished the cell
            return {"done": done, "timing": _read_json(out / TIMING_FILE)}
        return _attempt(task, runner, out, log)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _attempt(task: Mapping[str, Any], runner: Callable[..., Any], out: Path, log: bool) -> dict:
    """One attempt at a cell whose folder lock this process holds: count it, run it, record DONE or ERROR."""
    attempts_path = out / ATTEMPTS_FILE
    try:
        attempts = int(attempts_path.read_text().strip() or 0) + 1
    except (OSError, ValueError):
        attempts = 1
    atomic_write_text(attempts_path, f"{attempts}\n")
    (out / ERROR_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    ctx = _log_to(out / LOG_FILE) if log else contextlib.nullcontext()
    with ctx:
        print(f"--- cell {task['id']} attempt {attempts} (pid {os.getpid()})", flush=True)
        try:
            with _threads(task.get("threads")):
                summary = runner(task["kind"], task["config"], out, data=data_from_task(task.get("data")))
        except Exception:
            text = traceback.format_exc()
            print(text, file=sys.stderr, flush=True)
            atomic_write_text(out / ERROR_FILE, text)
            raise
    wall = time.perf_counter() - t0
    done = {"id": task["id"], "kind": task["kind"], "metrics": key_metrics(task["kind"], summary)}
    timing = {"wall_s": round(wall, 3), "attempts": attempts, "pid": os.getpid(), **timing_metrics(summary)}
    write_result(out, done, timing)
    return {"done": done, "timing": timing}


def write_result(out: Path, done: Mapping[str, Any], timing: Mapping[str, Any]) -> None:
    """timing.json first, DONE last: a folder with DONE is complete (and an ERROR of an earlier attempt goes)."""
    atomic_write_text(out / TIMING_FILE, json.dumps(timing, indent=1, allow_nan=False) + "\n")
    atomic_write_text(out / DONE_FILE, json.dumps(done, indent=1, allow_nan=False) + "\n")
    (out / ERROR_FILE).unlink(missing_ok=True)
