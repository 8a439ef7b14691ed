"""Files from the internet, verified: cache folder, SHA-256 checks, atomic downloads.

Everything this package downloads (frost textures, pretrained weights, datasets) goes through
`fetch`, so there is one place that knows the cache layout and one check that a file is what its
publisher released. Offline users point at a local copy instead (`TTA_SURGICAL_DATA`, `--data-root`,
or an explicit path); `fetch` then only verifies.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

CACHE_ENV = "TTA_SURGICAL_CACHE"
DATA_ENV = "TTA_SURGICAL_DATA"


class IntegrityError(OSError):
    """A file exists but is not the one expected (truncated, corrupt, or a different release)."""


def cache_dir(sub: str = "") -> Path:
    """The cache folder: `$TTA_SURGICAL_CACHE`, else `$XDG_CACHE_HOME/tta-surgical`, else `~/.cache/tta-surgical`."""
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tta-surgical"
    return base / sub if sub else base


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: an explicit path, else `$TTA_SURGICAL_DATA`, else None."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(path: str | os.PathLike, sha256: str | None, hint: str = "") -> Path:
    """Check that `path` exists and (when `sha256` is given) has that digest; raise a clear error otherwise."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"missing file {p}" + (f"; {hint}" if hint else ""))
    if sha256:
        got = sha256_file(p)
        if got != sha256.lower():
            raise IntegrityError(
                f"{p} has SHA-256 {got}, expected {sha256} (truncated or corrupt download?)"
                + (f"; {hint}" if hint else "")
            )
    return p


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` atomically (temporary file, verify, rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        verify(tmp, sha256, hint=f"downloaded from {url}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def fetch(
    filename: str,
    url: str,
    sha256: str | None,
    *,
    folder: str | os.PathLike | None = None,
    cache_sub: str = "",
    offline_hint: str = "",
) -> Path:
    """Return a verified local copy of `filename`.

    Looks in `folder` when given (never downloads into a user's folder), else in the cache
    folder `cache_dir(cache_sub)`, downloading from `url` when the cached copy is missing.
    A file whose digest does not match is an error, never silently replaced.
    """
    if folder is not None:
        return verify(Path(folder) / filename, sha256, hint=offline_hint or f"it is published at {url}")
    dest = cache_dir(cache_sub) / filename
    if dest.is_file():
        return verify(dest, sha256, hint=f"delete it to download it again from {url}")
    try:
        return download(url, dest, sha256)
    except (OSError, ValueError) as err:
        if isinstance(err, IntegrityError):
            raise
        raise FileNotFoundError(
            f"could not download {url} to {dest} ({err}). "
            + (offline_hint or f"Download it by hand and place it at {dest}.")
        ) from err
