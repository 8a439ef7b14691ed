"""Atomic file writes: a temporary file in the same folder, fsync, then `os.replace`.

Every result file this package writes while a run may be interrupted (summaries, checkpoints, sweep cells,
CIFAR-10-C sidecars, bench and benchmark results) goes through here, so a reader never sees half a file, and a
file that was replaced is on disk (fsync) before its name points at it. The written file gets the permissions
a plain `open(path, "w")` would give it (0o666 less the umask: 0644 under the usual umask 022), not the 0600 of
`tempfile.mkstemp`, so results stay readable by the people and jobs that share the folder.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write_bytes", "atomic_write_text"]


def _create_temp_beside(path: Path) -> tuple[int, Path]:
    """A new, empty file next to `path` (a random name: concurrent writers never share one), mode 0o666 & ~umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp  # the kernel applies the umask, as for any new file
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(f)` on a temporary binary file beside `path`, fsync it, then rename it to `path` (creating the
    folder); on any error the temporary file is removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
