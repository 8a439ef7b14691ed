"""A local sweep worker process: `python -m tta_surgical.sweep.worker`, fed task files on stdin.

Protocol: the parent writes the path of a cell's `task.json` on one line; the worker runs the cell with its
file descriptors 1 and 2 pointed at the cell's `cell.log` (so C-level output lands there too) and answers one
JSON line `{"id": ..., "status": "done" | "error" | "busy", "error": ...}` on its original stdout ("busy": the
cell's folder stayed held by another live process, so it was not run), preceded by any number of
`{"status": "waiting", "message": ...}` lines while it waits for such a holder. A worker that dies mid-cell
answers nothing: the parent sees end-of-file, and resubmits the cell to a fresh worker.
One long-lived process per slot keeps the cost of importing torch to once per slot, not once per cell.

A worker never outlives its driver (the process named by `TTA_SURGICAL_SWEEP_DRIVER`): on Linux the kernel kills
it when the driver dies (`prctl(PR_SET_PDEATHSIG, SIGKILL)`), and everywhere a watchdog thread kills it within
about a second of its parent changing. An orphan would otherwise keep a cell's folder locked and write its DONE
while a resumed sweep is already running that cell.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .cell import LOG_FILE, CellBusyError, execute_cell, resolve_runner

DRIVER_ENV = "TTA_SURGICAL_SWEEP_DRIVER"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_EVERY_S = 0.5


def die_with_driver() -> None:
    """Make this process end when its driver does (see the module doc); a no-op outside a sweep driver."""
    driver = os.environ.get(DRIVER_ENV)
    if not driver or not driver.isdigit():
        return
    driver_pid = int(driver)
    if sys.platform.startswith("linux"):
        try:  # the signal comes when the driver's thread that started us ends: the slot thread outlives its worker
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog below still does it
            pass
    if os.getppid() != driver_pid:  # the driver died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch, args=(driver_pid,), name="driver-watch", daemon=True).start()


def _watch(driver_pid: int) -> None:
    while os.getppid() == driver_pid:
        time.sleep(WATCH_EVERY_S)
    os.kill(os.getpid(), signal.SIGKILL)  # orphaned: stop at once, whatever the cell is doing


def _redirect_fds(path: Path) -> tuple[int, int]:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return saved


def _restore_fds(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])


def serve() -> int:
    """Run tasks named on stdin until it closes."""
    die_with_driver()
    control = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray output between cells must not corrupt the control channel
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        task = json.loads(Path(path).read_text(encoding="utf-8"))
        for extra in task.get("sys_path") or ():
            if extra not in sys.path:
                sys.path.insert(0, extra)
        out = Path(task["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        saved = _redirect_fds(out / LOG_FILE)

        def waiting(message: str, cell_id: str = task["id"]) -> None:
            control.write(json.dumps({"id": cell_id, "status": "waiting", "message": message}) + "\n")
            control.flush()

        try:
            execute_cell(task, resolve_runner(task["runner"]), log=False, on_wait=waiting)
            reply = {"id": task["id"], "status": "done"}
        except CellBusyError as err:  # not run, nothing written: another process holds the cell
            reply = {"id": task["id"], "status": "busy", "error": str(err)}
        except Exception as err:  # reported to the parent; the traceback is in the cell's ERROR file and log
            reply = {"id": task["id"], "status": "error", "error": f"{type(err).__name__}: {err}"}
        finally:
            _restore_fds(saved)
        control.write(json.dumps(reply) + "\n")
        control.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
