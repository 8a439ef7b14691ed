"""The provenance module: what a recorded figure depends on (git revision, versions, machine, device, time)."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime
from pathlib import Path

import torch

from tta_surgical import __version__, provenance
from tta_surgical.provenance import git_revision, git_state, machine, timestamp, versions

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def test_git_revision_is_this_checkout_or_none_outside_one():
    head = _git("rev-parse", "HEAD")
    if head is None:  # not a git checkout (an unpacked release): nothing to record
        assert git_revision() is None and git_state() is None
        return
    assert git_revision(short=False) == head and head.startswith(git_revision())
    state = git_state()
    assert state["commit"] == head and isinstance(state["dirty"], bool)


def test_git_outside_a_checkout_is_none(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "__file__", str(tmp_path / "provenance.py"))  # git runs in the module's folder
    assert git_revision() is None and git_state() is None


def test_versions_and_machine_on_the_cpu():
    v = versions("cpu")
    assert v["tta_surgical"] == __version__ and v["torch"] == torch.__version__
    assert v["python"] == platform.python_version() and v["torchvision"]
    assert v["cuda"] is None and v["cudnn"] is None  # only recorded for a CUDA device
    m = machine(torch.device("cpu"))
    assert m["device_name"] == "cpu" and m["cpu_count"] >= 1 and m["processor"]
    assert machine()["device_name"] is None  # no device given: not claimed to be the CPU
    assert m["load_avg_1m"] is None or m["load_avg_1m"] >= 0


def test_provenance_record_and_timestamp():
    rec = provenance.provenance("cpu")
    assert set(rec) == {"date", "machine", "versions", "git"}
    when = datetime.fromisoformat(rec["date"])
    assert when.utcoffset().total_seconds() == 0  # UTC, to the second
    assert datetime.fromisoformat(timestamp()) >= when
