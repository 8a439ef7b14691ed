"""Contracts of the test suite itself: optional dependencies and missing data fail in CI instead of skipping.

A fidelity test that skips because OpenCV stopped importing, or a checksum test that passes because the data
root has no SHA256SUMS, would shrink the suite without anyone noticing. These tests pin the mechanisms that
prevent it: `_extras.require`, the `TTA_SURGICAL_DATA` / SHA256SUMS fixtures of conftest.py, and `.ci/run`.
"""

from __future__ import annotations

import re
from pathlib import Path

import conftest
import pytest
from _extras import PIP_NAMES, REQUIRE_ENV, require

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def test_require_skips_on_a_laptop_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"pip install scipy"):
        require("scipy.no_such_submodule")
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=rf"scipy\.no_such_submodule does not import.*{REQUIRE_ENV}"):
        require("scipy.no_such_submodule")
    with pytest.raises(pytest.fail.Exception, match=r"pip install opencv-python-headless"):
        require("cv2.no_such_submodule")
    with pytest.raises(ValueError, match="not an optional test dependency"):
        require("numpy")


def test_no_test_imports_an_optional_dependency_with_importorskip():
    offenders = [
        f"{path.name}:{n}"
        for path in sorted(TESTS.glob("*.py"))
        if path.name != Path(__file__).name
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if "importorskip(" in line
    ]
    assert not offenders, f"use _extras.require instead of pytest.importorskip: {offenders}"
    # every optional dependency the fidelity and Ray tests need is one `require` knows how to install
    assert set(PIP_NAMES) == {"cv2", "skimage", "scipy", "PIL", "imagecorruptions", "ray", "matplotlib", "timm"}


def test_ci_requires_the_extras_and_the_data():
    script = (REPO / ".ci" / "run").read_text()
    assert re.search(rf"^export {REQUIRE_ENV}=1$", script, re.M), "CI must make a missing extra a failure"
    assert re.search(r"^export TTA_SURGICAL_DATA=", script, re.M)
    args = [line.split("pytest", 1)[1].split() for line in script.splitlines() if "-m pytest" in line]
    assert len(args) == 1 and not {"-m", "-k"} & set(args[0]), "CI runs the default suite, unfiltered"
    # the extras whose tests `require` them are installed, so that requiring them cannot skip
    extras = re.search(r"pip install -q -e '\.\[([a-z,]+)\]'", script)
    assert extras and {"test", "bench", "ray", "plot", "timm"} <= set(extras.group(1).split(",")), script


def _fake_root(tmp_path: Path, *, sums: str | None) -> Path:
    root = tmp_path / "data"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"x")
    if sums is not None:
        (root / "SHA256SUMS").write_text(sums)
    return root


def test_data_root_from_the_environment_must_hold_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv(conftest.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(pytest.fail.Exception, match=r"nowhere holds no cifar-10-batches-py/test_batch"):
        conftest._shared_data()
    root = _fake_root(tmp_path, sums=None)
    monkeypatch.setenv(conftest.DATA_ENV, str(root))
    assert conftest._shared_data() == root


def test_missing_sha256sums_fails_and_the_file_is_parsed(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"SHA256SUMS is missing"):
        conftest.read_sha256sums(_fake_root(tmp_path / "a", sums=None))
    root = _fake_root(tmp_path / "b", sums="AB12  weights/x.th\ncd34 *frost/y.png\n\n")
    assert conftest.read_sha256sums(root) == {"weights/x.th": "ab12", "frost/y.png": "cd34"}
