"""Data files are data: nothing in a CIFAR-10 batch or a checkpoint runs, damaged files are one clear line that loses
nothing, CIFAR-10-C labels must fit their images, and a run without --stream says what it streams."""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tta_surgical import cli
from tta_surgical.data.cifar import load_cifar10, load_cifar10c
from tta_surgical.hub import IntegrityError
from tta_surgical.streams import StreamSpec, build_stream

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates `marker` (plain pickle calls `open(marker, "w")`): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_the_payload_is_live(tmp_path):
    """The payload the tests below plant does create its marker when unpickled plainly (so its absence means
    nothing ran)."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps({b"data": _Payload(marker)}, protocol=2))[b"data"].close()
    assert marker.exists()


def _tiny_batch(n: int = 4) -> dict:
    rng = np.random.default_rng(0)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}


def _write_batch(root: Path, obj: object, name: str = "test_batch", protocol: int = 2) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return folder / name


# ------------------------------------------------------------------------------------------------ CIFAR-10 pickles


def _payloads(marker: Path) -> dict[str, object]:
    batch = _tiny_batch()
    return {
        "top-level": _Payload(marker),
        "as the data": {**batch, b"data": _Payload(marker)},
        "inside a label": {**batch, b"labels": [0, 1, _Payload(marker), 3]},
        "protocol 0": ("p0", {b"data": _Payload(marker)}),
    }


@pytest.mark.parametrize("case", ["top-level", "as the data", "inside a label", "protocol 0"])
@pytest.mark.parametrize("name", ["test_batch", "data_batch_1"])
def test_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path, case, name):
    marker = tmp_path / "marker"
    obj = _payloads(marker)[case]
    protocol = 2
    if isinstance(obj, tuple):
        protocol, obj = 0, obj[1]
    root = tmp_path / "data"
    for other in ("test_batch", *(f"data_batch_{i}" for i in range(1, 6))):
        _write_batch(root, _tiny_batch(), other)
    path = _write_batch(root, obj, name, protocol)
    with pytest.raises(OSError, match="not an official CIFAR-10 file") as err:
        load_cifar10(root, "test" if name == "test_batch" else "train")
    assert str(path) in str(err.value) and "asks for io.open" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_crafted_test_batch_through_the_cli_is_one_line_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "marker"
    root = tmp_path / "data"
    path = _write_batch(root, {**_tiny_batch(), b"data": _Payload(marker)})
    rc = cli.main(["run", "--config", str(REPO / "configs" / "norm.yaml"), "--stream", str(REPO / "streams" /
                   "quickstart.yaml"), "--data-root", str(root), "--out", str(tmp_path / "out"), "--no-progress",
                   "model.pretrained=false", "stream.n_examples=4", "stream.batch_size=2"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert len(err.strip().splitlines()) == 1 and f"{path} is not an official CIFAR-10 file" in err
    assert not (tmp_path / "out" / "results.jsonl").exists()


# numpy's own pickling calls _reconstruct(ndarray, (0,), b"b") and fills the array afterwards; this asks the call
# itself for 2**40 bytes (an allocation bomb), written by hand as numpy never writes it.
_BOMB = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n\x8a\x06\x00\x00\x00\x00\x00\x01"
         b"\x85U\x01b\x87R.")  # fmt: skip


@pytest.mark.parametrize("case", ["allocation-bomb", "array-subclass", "ndarray-called"])
def test_arrays_other_than_plain_ones_are_refused(tmp_path, case):
    """Only numpy's plain-array reconstruction is honoured: another class, a huge shape asked of the reconstruction
    call itself, or `numpy.ndarray` called directly is refused before it runs."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    if case == "allocation-bomb":
        raw = _BOMB
    elif case == "array-subclass":
        raw = pickle.dumps({b"data": np.ma.masked_array(np.zeros((1, 3072), np.uint8)), b"labels": [0]}, protocol=2)
    else:  # ndarray((2,)) via REDUCE
        raw = b"\x80\x02cnumpy\nndarray\nK\x02\x85\x85R."
    (folder / "test_batch").write_bytes(raw)
    with pytest.raises(OSError, match="not an official CIFAR-10 file"):
        load_cifar10(tmp_path / "data")


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_batches_read_under_every_pickle_protocol(tmp_path, protocol):
    batch = _tiny_batch(6)
    _write_batch(tmp_path, {**batch, b"batch_label": b"testing batch 1 of 1", b"filenames": [b"a.png"] * 6},
                 protocol=protocol)  # fmt: skip
    images, labels = load_cifar10(tmp_path)
    assert images.shape == (6, 32, 32, 3) and labels.tolist() == batch[b"labels"]
    assert np.array_equal(images, batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_official_test_batch_needs_only_the_allowed_globals(data_root):
    """The shared copy of the official file (numpy's array pickling, protocol 2) reads through the restricted
    unpickler: 10,000 images, 1,000 per class."""
    images, labels = load_cifar10(data_root)
    assert images.shape == (10000, 32, 32, 3) and np.bincount(labels).tolist() == [1000] * 10


def test_sha256sums_in_the_data_root_is_checked(tmp_path):
    path = _write_batch(tmp_path, _tiny_batch())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  cifar-10-batches-py/test_batch\n")
    assert load_cifar10(tmp_path)[0].shape == (4, 32, 32, 3)
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  cifar-10-batches-py/test_batch\n")
    os.utime(path, ns=(1, 1))  # a new (size, mtime): not the file verified above
    with pytest.raises(IntegrityError, match=f"{path} has SHA-256 {digest}, expected 0000"):
        load_cifar10(tmp_path)


def _call_name(node: ast.Call) -> str:
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    parts.append(f.id if isinstance(f, ast.Name) else "<expr>")  # copy.deepcopy(m).eval() is not eval
    return ".".join(reversed(parts))


def _kwarg(node: ast.Call, name: str) -> object:
    kw = next((k for k in node.keywords if k.arg == name), None)
    return kw.value.value if kw is not None and isinstance(kw.value, ast.Constant) else "missing"


def test_no_unrestricted_loader_in_the_package():
    """Every read of a pickle-based file in the package is restricted: no plain pickle.load(s) / Unpickler, torch.load
    only with weights_only=True, np.load only with allow_pickle=False, no eval/exec."""
    offenders = []
    for path in (REPO / "tta_surgical").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            bad = (
                name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "eval", "exec", "marshal.loads")
                or (name == "torch.load" and _kwarg(node, "weights_only") is not True)
                or (name in ("np.load", "numpy.load") and _kwarg(node, "allow_pickle") is not False)
            )
            if bad:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------ damaged state.pt


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, data_root) -> Path:
    """A run of two domains whose summary was never written (as after a kill at the end): --resume reads state.pt."""
    out = tmp_path_factory.mktemp("runs") / "r"
    rc = cli.main(["run", "--config", str(REPO / "configs" / "norm.yaml"), "--out", str(out), "--data-root",
                   str(data_root), "--no-progress", "stream.domains=[fog,contrast]", "stream.n_examples=20",
                   "stream.batch_size=10"])  # fmt: skip
    assert rc == 0
    for name in ("summary.json", "summary.md"):
        (out / name).unlink()
    return out


def _damage(kind: str, good: bytes, marker: Path) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "random bytes":
        return np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    if kind == "malicious pickle":
        return pickle.dumps({"version": 2, "method": _Payload(marker)}, protocol=2)
    if kind == "malicious checkpoint":
        buf = io.BytesIO()
        torch.save({"version": 2, "method": _Payload(marker)}, buf)  # a torch zip archive with the payload inside
        return buf.getvalue()
    if kind == "not a dict":
        buf = io.BytesIO()
        torch.save(torch.zeros(3), buf)
        return buf.getvalue()
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["empty", "truncated", "random bytes", "malicious pickle", "malicious checkpoint", "not a dict"]
)
def test_damaged_state_on_resume_is_one_line_exit_2_and_loses_nothing(tmp_path, interrupted_run, data_root,
                                                                      kind, capsys):  # fmt: skip
    out = tmp_path / "r"
    shutil.copytree(interrupted_run, out)
    marker = tmp_path / "marker"
    state = out / "state.pt"
    state.write_bytes(_damage(kind, state.read_bytes(), marker))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    rc = cli.main(["run", "--config", str(REPO / "configs" / "norm.yaml"), "--out", str(out), "--data-root",
                   str(data_root), "--no-progress", "--resume", "stream.domains=[fog,contrast]",
                   "stream.n_examples=20", "stream.batch_size=10"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{state} is damaged" in err and "--overwrite" in err and "restore the file" in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # results.jsonl, config.yaml, state.pt byte-identical; no summary written
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ CIFAR-10-C folders


def _cifar10c(root: Path, n: int = 10, labels: np.ndarray | None = None, rows: int | None = None) -> Path:
    """A CIFAR-10-C folder with fog.npy (`rows`, default 5 n) and labels.npy (default: n labels repeated 5 times)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = 5 * n if rows is None else rows
    np.save(root / "fog.npy", np.random.default_rng(0).integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8))
    if labels is None:
        labels = np.tile(np.arange(n) % 10, 5).astype(np.uint8)
    np.save(root / "labels.npy", labels)
    return root


def test_short_labels_are_an_error_naming_both_lengths(tmp_path):
    """5 x 10 images, 25 labels: severity 5 used to get 10 images and a stream of them silently cut short."""
    root = _cifar10c(tmp_path / "c", labels=np.arange(25) % 10)
    with pytest.raises(OSError, match=r"has 25 labels but .*fog\.npy has 50 images"):
        load_cifar10c(root, "fog", 5)
    with pytest.raises(OSError, match="has 25 labels"):
        build_stream(StreamSpec(source="cifar10c", path=str(root), domains=("fog",), severities=(5,)))


def test_labels_must_match_the_rows_a_sidecar_names(tmp_path):
    root = _cifar10c(tmp_path / "c", rows=10, labels=np.arange(7) % 10)
    (root / "fog.json").write_text(json.dumps({"rows": {"3": [0, 10]}}))
    with pytest.raises(OSError, match=r"has 7 labels but .*fog\.npy has 10 images"):
        load_cifar10c(root, "fog", 3)
    np.save(root / "labels.npy", np.arange(10) % 10)
    images, labels = load_cifar10c(root, "fog", 3)
    assert len(images) == len(labels) == 10


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.r_[np.tile(np.arange(10), 5)[:-3], [10, 12, 250]].astype(np.uint8),
         r"3 labels outside 0\.\.9 \(e\.g\. 10 at row 47\)"),
        (np.tile(np.arange(10), 5) - 1, r"5 labels outside 0\.\.9 \(e\.g\. -1 at row 0\)"),
        (np.tile(np.arange(10), 5).astype(np.float32), "not a 1-D array of integer class labels"),
    ],
    ids=["too-large", "negative", "float"],
)  # fmt: skip
def test_cifar10c_labels_must_be_classes(tmp_path, labels, match):
    root = _cifar10c(tmp_path / "c", labels=labels)
    with pytest.raises(OSError, match=match):
        load_cifar10c(root, "fog", 1)


def test_bad_labels_stop_a_run_in_one_line(tmp_path, capsys):
    root = _cifar10c(tmp_path / "c", labels=np.r_[np.tile(np.arange(10), 5)[:-1], [13]].astype(np.uint8))
    rc = cli.main(["run", "--config", str(REPO / "configs" / "norm.yaml"), "--stream", str(REPO / "streams" /
                   "quickstart.yaml"), "--out", str(tmp_path / "out"), "--no-progress", "model.pretrained=false",
                   "stream.source=cifar10c", f"stream.path={root}", "stream.domains=[fog]", "stream.n_examples=all",
                   "stream.batch_size=5"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "labels outside 0..9" in err


def test_a_file_of_one_severity_is_not_read_as_five(tmp_path):
    """50 rows of one severity (labels 0..49 % 10, not repeating every 10 rows) and no sidecar: refused, saying
    which layout was expected and how to declare another one."""
    root = _cifar10c(tmp_path / "c", rows=50, labels=(np.arange(50) // 3) % 10)
    with pytest.raises(OSError, match=r"official layout.*50,000 rows = 5 x 10,000.*sidecar fog\.json") as err:
        load_cifar10c(root, "fog", 1)
    assert "\n" not in str(err.value)
    (root / "fog.json").write_text(json.dumps({"rows": {"5": [0, 50]}}))
    images, labels = load_cifar10c(root, "fog", 5)
    assert len(images) == 50 and labels.tolist() == ((np.arange(50) // 3) % 10).tolist()


def test_the_official_layout_reads_without_a_sidecar(tmp_path):
    root = _cifar10c(tmp_path / "c", n=10)
    for s in range(1, 6):
        images, labels = load_cifar10c(root, "fog", s)
        assert len(images) == 10 and labels.tolist() == list(range(10))


def test_a_broken_sidecar_is_one_clear_line(tmp_path):
    root = _cifar10c(tmp_path / "c")
    (root / "fog.json").write_text('{"rows": {"5": [0]}}')
    with pytest.raises(OSError, match=r"fog\.json is not a valid CIFAR-10-C sidecar"):
        load_cifar10c(root, "fog", 5)


# ------------------------------------------------------------------------------------------------ which stream


def test_run_without_stream_says_which_stream_and_its_size(tmp_path, data_root, capsys):
    base = ["run", "--config", str(REPO / "configs" / "norm.yaml"), "--data-root", str(data_root), "--no-progress",
            "stream.domains=[fog,contrast]", "stream.n_examples=20", "stream.batch_size=10"]  # fmt: skip
    assert cli.main([*base, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "no --stream given: using the built-in default stream with your stream.* overrides" in err
    assert "2 domains x 20 images = 40 images in 4 batches" in err and "--stream FILE" in err
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--stream", str(REPO / "streams" / "quickstart.yaml")]) == 0
    assert "no --stream given" not in capsys.readouterr().err
