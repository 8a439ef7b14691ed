"""The output folder of a run: one writer at a time, the saved config, results as JSON lines, durable checkpoints.

Every command that writes a run folder (`run`, `compare`, `finetune`, `report`, sweep cells) goes through here:

- **One writer per folder** (`RunFolder.lock`): an exclusive `flock` on `<folder>/.lock`, held for the whole
  run and released by the operating system when the process ends (so `kill -9` leaves no stale lock). A second
  writer fails at once with `FolderInUseError`, naming the folder and the holder (pid, host, command, start).
  The lock is re-entrant within a process (a command may call another that locks the same folder).
- **The saved config** (`config.yaml`): a resumed run must have the same config, up to the keys that change only
  how it executes (`RESUME_IGNORED`).
- **Results as JSON lines** (`JsonlWriter`, `read_jsonl`): appended and flushed line by line; `sync()` puts them
  on disk, and the engine syncs them before every checkpoint that counts them, so a checkpoint never refers to
  lines a power loss could take away. A torn last line (a crash mid-write) is dropped when the file is read back.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .fileio import atomic_write_bytes, atomic_write_text
from .schema import load_yaml, to_dict

__all__ = [
    "CHECKPOINT_THREAD",
    "RESUME_IGNORED",
    "DamagedFileError",
    "FolderInUseError",
    "JsonlWriter",
    "RunFolder",
    "config_differences",
    "plain_config",
    "peek_jsonl",
    "read_jsonl",
]

LOCK_FILE = ".lock"
# The name of the thread that makes a background checkpoint durable (a crash test waits for it by this name).
CHECKPOINT_THREAD = "tta-surgical-checkpoint"

# Config keys that may differ between a run and its resumption: they change how the run executes, not what it
# computes (memory layout, compilation and optimiser kernels move results by floating-point rounding only).
RESUME_IGNORED = frozenset(
    {
        "runtime.progress",
        "runtime.channels_last",
        "runtime.compile",
        "runtime.compile_mode",
        "runtime.host_memory",
        "runtime.num_workers",
        "optim.implementation",
    }
)

try:  # POSIX advisory locks; on a platform without them runs are not protected against a second writer.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class DamagedFileError(OSError):
    """A file of the folder exists but cannot be read back (truncated, empty, overwritten, or crafted)."""


class FolderInUseError(OSError):
    """Another process is writing this run folder."""


# realpath -> [fd, depth] for the locks this process holds (re-entrancy).
_HELD: dict[str, list[int]] = {}


@contextmanager
def folder_lock(
    folder: str | os.PathLike,
    what: str = "run",
    *,
    wait_s: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the exclusive writer lock of `folder` (created if needed) for the duration of the block.

    wait_s: while another process holds it, retry for up to this many seconds (0: fail at once) before raising
        `FolderInUseError`; `on_wait(holder)` is called once, when the wait begins, with a description of the holder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _HELD or fcntl is None:
        if key in _HELD:
            _HELD[key][1] += 1
        try:
            yield
        finally:
            if key in _HELD:
                _HELD[key][1] -= 1
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, wait_s, on_wait)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
        raise FolderInUseError(
            f"{folder} is in use by another tta-surgical process ({holder}){waited}; wait for it to finish, or "
            "choose another --out"
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "what": what,
        "command": " ".join(sys.argv)[:500],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(fd: int, wait_s: float, on_wait: Callable[[str], None] | None) -> None:
    """flock `fd` exclusively, retrying every 0.2 s for up to `wait_s` seconds; raises OSError when still held."""
    deadline = time.monotonic() + max(wait_s, 0.0)
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            if not announced and on_wait is not None:
                on_wait(_read_holder(fd))
            announced = True
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return "holder unknown"
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, {info.get('what')} started {info.get('started')}: " + str(
        info.get("command", "")
    )


# ------------------------------------------------------------------------------------------------ configs


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: _normalise(d)}


def _normalise(v: Any) -> Any:
    """YAML round trips turn tuples into lists; compare them as such."""
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, dict):
        return {k: _normalise(x) for k, x in v.items()}
    return v


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], ignored: Iterable[str] = RESUME_IGNORED
) -> list[str]:
    """Dotted keys whose values differ between two config dicts (ignoring keys that change no number)."""
    a, b = _flatten(saved), _flatten(current)
    ignored = set(ignored)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in ignored:
            continue
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            diffs.append(f"{k}: saved {a.get(k, '<missing>')!r}, now {b.get(k, '<missing>')!r}")
    return diffs


def plain_config(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML types (what config.yaml holds after a round trip), for comparisons."""
    return yaml.safe_load(yaml.safe_dump(_normalise(to_dict(cfg)), sort_keys=False))


# ------------------------------------------------------------------------------------------------ JSON lines


def peek_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of a JSON-lines file, read only: unlike `read_jsonl` it never cuts the file, so it is
    safe on a run that is still writing (its torn last line is simply not returned)."""
    return _complete_records(Path(path).read_bytes(), path)[0]


def _complete_records(raw: bytes, path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The records of the complete lines of `raw` and the byte length they fill. The part after the last newline,
    or a last line that is not valid JSON, is torn (a crash mid-write) and left out; an invalid line before the last
    means the file is corrupt."""
    records: list[dict[str, Any]] = []
    good = 0  # bytes of complete, valid lines
    for number, line in enumerate(raw.split(b"\n")[:-1], start=1):
        end = good + len(line) + 1
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if raw[end:].strip():
                    raise OSError(f"{path}: line {number} is not valid JSON (the file is corrupt)") from None
                break  # the last line, torn by a crash: dropped
        good = end
    return records, good


def read_jsonl(path: str | os.PathLike, keep: int | None = None) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A torn last line (no newline, or not valid JSON) is dropped and cut off
    the file; with `keep`, only the first `keep` records stay (the file is cut there too) and fewer is an error.
    A missing file reads as empty (and with `keep` > 0 is an error)."""
    path = Path(path)
    if keep and not path.is_file():
        raise OSError(
            f"{path} is missing but the checkpoint expects {keep} result lines: start a new run (--overwrite, or "
            "another --out)"
        )
    raw = path.read_bytes() if path.is_file() else b""
    records, good = _complete_records(raw, path)
    if keep is not None:
        if len(records) < keep:
            raise OSError(
                f"{path} holds {len(records)} complete lines but the checkpoint expects {keep}; the results were "
                "lost or truncated: start a new run (--overwrite, or another --out)"
            )
        if len(records) > keep:
            good = _offset_after(raw, keep)
            records = records[:keep]
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return records


def _offset_after(raw: bytes, n_records: int) -> int:
    """Byte offset just past the `n_records`-th non-empty line."""
    seen = pos = 0
    while seen < n_records:
        end = raw.index(b"\n", pos)
        if raw[pos:end].strip():
            seen += 1
        pos = end + 1
    return pos


class _Pending:
    """One piece of disk work running on its own thread; `wait` joins it and re-raises what it raised."""

    def __init__(self, work: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), name=CHECKPOINT_THREAD)
        self.thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            self.error = err

    def wait(self, raise_error: bool = True) -> None:
        self.thread.join()
        if self.error is not None and raise_error:
            raise self.error


class JsonlWriter:
    """Append-only JSON lines: each `write` is flushed to the OS at once; `sync` makes the lines durable."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=False) + "\n")
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def flush(self) -> None:
        self._f.flush()

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ the folder


def _unreadable(path: Path, err: Exception) -> str:
    """Why `torch.load` could not read `path`, in a few words (torch's own messages run to paragraphs)."""
    msg = str(err).strip()
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, pickle.UnpicklingError) and "weights only" in msg.lower():
        asked = re.search(r"GLOBAL ([\w.]+)", msg)
        if asked:
            return f"it asks for {asked.group(1)}, which a checkpoint never holds; nothing in it was run"
        return "its content is not a checkpoint's, garbled or overwritten?"
    if "zip archive" in msg or "PytorchStreamReader" in msg:
        return "not a complete checkpoint archive, truncated or overwritten?"
    first = msg.splitlines()[0][:120] if msg else ""
    return f"unreadable ({type(err).__name__}: {first})" if first else f"unreadable ({type(err).__name__})"


class RunFolder:
    """The files of one run folder and the rules for starting, resuming and finishing it."""

    CONFIG = "config.yaml"
    RESULTS = "results.jsonl"
    STATE = "state.pt"
    SUMMARY = "summary.json"
    SUMMARY_MD = "summary.md"

    def __init__(self, path: str | os.PathLike, what: str = "run") -> None:
        self.path = Path(path)
        self.what = what
        self._pending: _Pending | None = None  # a checkpoint still being written (save_checkpoint background=True)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def results(self) -> Path:
        return self.path / self.RESULTS

    def lock(self) -> Any:
        """The exclusive writer lock of this folder (a context manager)."""
        return folder_lock(self.path, self.what)

    def holds_run(self, names: Iterable[str] | None = None) -> bool:
        names = (self.RESULTS, self.STATE, self.SUMMARY) if names is None else names
        return any((self.path / n).exists() for n in names)

    def refuse_existing(self, resume: bool, overwrite: bool, names: Iterable[str] | None = None) -> None:
        """Without --resume or --overwrite, a folder that already holds a run is an error naming both flags."""
        if not resume and not overwrite and self.holds_run(names):
            raise FileExistsError(
                f"{self.path} already holds a {self.what}; pass --resume to continue it, --overwrite to replace "
                "it, or choose another --out"
            )

    def check_config(self, cfg: Any, ignored: Iterable[str] = RESUME_IGNORED) -> None:
        """A resumed run must have the saved config (up to `ignored` keys); a clear error listing differences."""
        path = self.path / self.CONFIG
        if not path.is_file():
            return
        saved = load_yaml(path, "saved config")
        diffs = config_differences(saved, plain_config(cfg), ignored)
        if diffs:
            raise ValueError(
                f"cannot resume {self.path}: the config differs from the saved {path}:\n  "
                + "\n  ".join(diffs)
                + "\nrun with the saved config, or choose another --out to start a new run"
            )

    def write_config(self, cfg: Any) -> None:
            atomic_write_text(
            self.path / self.CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
        )

    def clear(self, names: Iterable[str]) -> None:
        for name in names:
            (self.path / name).unlink(missing_ok=True)

    def save_checkpoint(
        self, state: dict[str, Any], writer: JsonlWriter | None = None, *, background: bool = False
    ) -> None:
        """Write `state.pt` atomically, after making the results lines it counts durable.

        background: serialise `state` now (later changes to its tensors cannot reach the file) and leave the disk
        work (fsync of the lines, then the atomic write of the checkpoint, in that order) to a thread, so the next
        batch need not wait for the disk; the next `save_checkpoint` or `wait_checkpoint` waits for it and raises its
        error. A crash meanwhile leaves the previous checkpoint and every line it counts intact.
        """
        import torch  # only the checkpoint needs torch: reading a run folder (jsonl, locks, config) stays light

        self.wait_checkpoint()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        lines_fd = None
        if writer is not None:
            writer.flush()
            lines_fd = os.dup(writer.fileno())  # the thread's own handle: the writer may close its own meanwhile

        def make_durable() -> None:
            if lines_fd is not None:
                try:
                    os.fsync(lines_fd)
                finally:
                    os.close(lines_fd)
            atomic_write_bytes(self.path / self.STATE, lambda f: f.write(data))

        if background:
            self._pending = _Pending(make_durable)
        else:
            make_durable()

    def wait_checkpoint(self, raise_error: bool = True) -> None:
        """Wait for a checkpoint written in the background (`save_checkpoint(background=True)`); raise its error."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None:
            pending.wait(raise_error)

    def load_checkpoint(self, required: Iterable[str] = ()) -> dict[str, Any] | None:
        """The checkpoint in `state.pt` (None when there is none), read with `weights_only=True` so nothing in it
        runs; a file that cannot be read, or is not a dict holding the `required` keys, is a `DamagedFileError`."""
        import torch  # only the checkpoint needs torch: reading a run folder (jsonl, locks, config) stays light

        path = self.path / self.STATE
        if not path.is_file():
            return None
        try:
            with warnings.catch_warnings():  # torch's notes on odd pickle protocols would break the one-line error
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to read it means the file is damaged
            raise DamagedFileError(self._damaged(path, _unreadable(path, err))) from None
        if not isinstance(state, dict):
            raise DamagedFileError(self._damaged(path, f"it holds a {type(state).__name__}, not a checkpoint dict"))
        missing = [k for k in required if k not in state]
        if missing:
            raise DamagedFileError(self._damaged(path, f"the checkpoint lacks {', '.join(missing)}"))
        return state

    def _damaged(self, path: Path, reason: str) -> str:
        return (
            f"{path} is damaged, cannot resume from it: {reason}; start the {self.what} over with --overwrite "
            "(or another --out), or restore the file from a copy"
        )

    def write_summary(self, summary: dict[str, Any], markdown: str) -> None:
        atomic_write_text(self.path / self.SUMMARY, json.dumps(summary, indent=2, allow_nan=False) + "\n")
        atomic_write_text(self.path / self.SUMMARY_MD, markdown)

    def read_summary(self) -> dict[str, Any]:
        path = self.path / self.SUMMARY
        if not path.is_file():
            raise FileNotFoundError(
                f"no {self.SUMMARY} in {self.path}: the run has not finished (resume it with --resume)"
            )
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def final_summary(self) -> dict[str, Any] | None:
        """`summary.json` of a run that has ended (it is written last, at the end or at a collapse stop; a resumed
        session removes it until it ends again), or None while the run has not ended."""
        path = self.path / self.SUMMARY
        if not path.is_file():
            return None
        try:
            return self.read_summary()
        except ValueError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); restore it, or start the run over with --overwrite"
            ) from None

    def finished_with(self, cfg: Any) -> dict[str, Any] | None:
        """The summary of a finished run made with exactly `cfg`, else None."""
        if not ((self.path / self.SUMMARY).is_file() and (self.path / self.CONFIG).is_file()):
            return None
        try:
            self.check_config(cfg)
        except ValueError:
            return None
        return self.read_summary()
