"""Atomic file writes: a temporary file in the same folder, fsync, then `os.replace`.

Every result file this package writes while a run may be interrupted (summaries, checkpoints, sweep cells,
CIFAR-10-C sidecars) goes through here, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(f)` on a temporary binary file beside `path`, then rename it to `path` (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
