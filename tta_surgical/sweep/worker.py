"""A local sweep worker process: `python -m tta_surgical.sweep.worker`, fed task files on stdin.

Protocol: the parent writes the path of a cell's `task.json` on one line; the worker runs the cell with its
file descriptors 1 and 2 pointed at the cell's `cell.log` (so C-level output lands there too) and answers one
JSON line `{"id": ..., "status": "done" | "error", "error": ...}` on its original stdout. A worker that dies
mid-cell answers nothing: the parent sees end-of-file, and resubmits the cell to a fresh worker.
One long-lived process per slot keeps the cost of importing torch to once per slot, not once per cell.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .cell import LOG_FILE, execute_cell, resolve_runner


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
        try:
            execute_cell(task, resolve_runner(task["runner"]), log=False)
            reply = {"id": task["id"], "status": "done"}
        except Exception as err:  # reported to the parent; the traceback is in the cell's ERROR file and log
            reply = {"id": task["id"], "status": "error", "error": f"{type(err).__name__}: {err}"}
        finally:
            _restore_fds(saved)
        control.write(json.dumps(reply) + "\n")
        control.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
