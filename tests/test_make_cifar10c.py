"""make-cifar10c writes the official CIFAR-10-C layout, atomically, resumably; the readers check what they read."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from tta_surgical.cli import main
from tta_surgical.data.cifar import load_cifar10, load_cifar10c
from tta_surgical.data.make_cifar10c import make_cifar10c


@pytest.fixture
def tiny_cifar(tmp_path):
    """A 20-image CIFAR-10 test batch in the official pickle layout."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
    labels = [int(i % 10) for i in range(20)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f)
    return tmp_path / "data", data, labels


def test_layout_reads_back_with_plain_numpy(tiny_cifar, tmp_path) -> None:
    root, data, labels = tiny_cifar
    out = tmp_path / "c"
    assert main(["make-cifar10c", "--data-root", str(root), "--out", str(out), "--corruptions",
                 "gaussian_noise,contrast", "--device", "cpu", "--no-progress", "--batch-size", "8"]) == 0
    for name in ("gaussian_noise", "contrast"):
        arr = np.load(out / f"{name}.npy")
        assert arr.dtype == np.uint8 and arr.shape == (5 * 20, 32, 32, 3)
        meta = json.loads((out / f"{name}.json").read_text())
        assert meta["complete"] and meta["rows"]["3"] == [40, 60]
    lab = np.load(out / "labels.npy")
    assert lab.dtype == np.uint8 and lab.shape == (100,) and list(lab[20:40]) == labels
    # Severity blocks are in test-set order: contrast is deterministic, so block s is a function of image i only.
    clean = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float64)
    arr = np.load(out / "contrast.npy").astype(np.float64)
    for s in range(5):
        block = arr[s * 20 : (s + 1) * 20]
        corr = [np.corrcoef(block[i].ravel(), clean[i].ravel())[0, 1] for i in range(20)]
        assert min(corr) > 0.95
    # Distortion grows with severity (contrast shrinks the spread around the mean).
    stds = [arr[s * 20 : (s + 1) * 20].std() for s in range(5)]
    assert stds == sorted(stds, reverse=True)
    img, lab2 = load_cifar10c(out, "contrast", 2)
    assert img.shape == (20, 32, 32, 3) and list(lab2) == labels


def test_seeded_and_independent_of_what_else_is_generated(tiny_cifar, tmp_path) -> None:
    root, _, _ = tiny_cifar
    make_cifar10c(root, tmp_path / "a", corruptions=["gaussian_noise", "shot_noise"], seed=3, progress=False)
    make_cifar10c(root, tmp_path / "b", corruptions=["gaussian_noise"], seed=3, progress=False)
    make_cifar10c(root, tmp_path / "c", corruptions=["gaussian_noise"], seed=4, progress=False)
    a, b, c = (np.load(tmp_path / d / "gaussian_noise.npy") for d in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rerun_skips_complete_and_redoes_partial(tiny_cifar, tmp_path) -> None:
    root, _, _ = tiny_cifar
    out = tmp_path / "c"
    first = make_cifar10c(root, out, corruptions=["gaussian_noise", "brightness"], progress=False)
    assert set(first.values()) == {"written"}
    mtime = (out / "gaussian_noise.npy").stat().st_mtime_ns
    # An interrupted run leaves a temporary file and no final file for the corruption it was on.
    (out / "brightness.npy").unlink()
    (out / "brightness.npy.tmp999").write_bytes(b"partial")
    second = make_cifar10c(root, out, corruptions=["gaussian_noise", "brightness"], progress=False)
    assert second == {"gaussian_noise": "skipped", "brightness": "written"}
    assert (out / "gaussian_noise.npy").stat().st_mtime_ns == mtime
    assert not list(out.glob("*.tmp*"))
    # A final file whose sidecar does not match (e.g. another seed) is redone, not trusted.
    third = make_cifar10c(root, out, corruptions=["gaussian_noise"], seed=9, progress=False)
    assert third == {"gaussian_noise": "written"}


def test_some_severities_are_declared_in_the_sidecar(tiny_cifar, tmp_path) -> None:
    root, _, _ = tiny_cifar
    out = tmp_path / "c"
    make_cifar10c(root, out, corruptions=["fog"], severities=[5, 2], limit=10, progress=False)
    arr = np.load(out / "fog.npy")
    meta = json.loads((out / "fog.json").read_text())
    assert arr.shape == (20, 32, 32, 3)
    assert meta["severities"] == [2, 5] and meta["rows"] == {"2": [0, 10], "5": [10, 20]}
    img5, _ = load_cifar10c(out, "fog", 5)
    assert np.array_equal(img5, arr[10:20])
    with pytest.raises(ValueError, match="holds severities"):
        load_cifar10c(out, "fog", 3)


def test_readers_reject_truncated_and_missing_files(tiny_cifar, tmp_path) -> None:
    root, _, _ = tiny_cifar
    out = tmp_path / "c"
    make_cifar10c(root, out, corruptions=["contrast"], progress=False)
    (out / "contrast.json").unlink()  # as a Zenodo download: no sidecar
    raw = (out / "contrast.npy").read_bytes()
    (out / "contrast.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(OSError, match="truncated"):
        load_cifar10c(out, "contrast", 1)
    with pytest.raises(FileNotFoundError, match="make-cifar10c"):
        load_cifar10c(out, "fog", 1)
    bad = tmp_path / "bad" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    (bad / "test_batch").write_bytes((root / "cifar-10-batches-py" / "test_batch").read_bytes()[:1000])
    with pytest.raises(OSError, match="truncated or corrupt"):
        load_cifar10(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "nothing")


def test_cli_errors_are_one_clear_line(tiny_cifar, tmp_path, capsys) -> None:
    root, _, _ = tiny_cifar
    rc = main(["make-cifar10c", "--data-root", str(root), "--out", str(tmp_path / "o"), "--corruptions", "fogg",
               "--no-progress"])
    assert rc == 2 and "fog" in capsys.readouterr().err
    rc = main(["make-cifar10c", "--data-root", str(root), "--out", str(tmp_path / "o"), "--severities", "0,6",
               "--no-progress"])
    assert rc == 2 and "severity" in capsys.readouterr().err


def test_real_cifar10_test_set(data_root) -> None:
    images, labels = load_cifar10(data_root)
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
