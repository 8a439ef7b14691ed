"""Atomic writes (`tta_surgical.fileio`): whole files or the old file, fsync before the rename, the usual
permissions (umask), no temporary files left behind."""

from __future__ import annotations

import os
import stat

import pytest

from tta_surgical import fileio
from tta_surgical.fileio import atomic_write_bytes, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after it)."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def test_writes_text_creating_the_folder(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b" / "out.json", "héllo\n")
    assert path == tmp_path / "a" / "b" / "out.json" and path.read_bytes() == "héllo\n".encode()
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temporary file left


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permissions_follow_the_umask_like_a_plain_open(tmp_path, umask):
    umask(0o022)
    assert _mode(atomic_write_text(tmp_path / "usual.txt", "x")) == 0o644  # not tempfile's 0600
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(tmp_path / "usual.txt") == _mode(plain)
    umask(0o077)
    assert _mode(atomic_write_text(tmp_path / "private.txt", "x")) == 0o600
    umask(0o002)
    assert _mode(atomic_write_text(tmp_path / "usual.txt", "y")) == 0o664  # a replaced file gets them too


def test_the_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_bytes(tmp_path / "x.bin", lambda f: f.write(b"\x00\x01"))
    assert events == ["fsync", "replace"] and (tmp_path / "x.bin").read_bytes() == b"\x00\x01"


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = atomic_write_text(tmp_path / "keep.txt", "old")

    def broken(f):
        f.write(b"half a fi")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write_bytes(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
