"""CIFAR-10 (official python batches) and CIFAR-10-C (official .npy layout) readers.

Layouts (REFERENCE.md §4):
- CIFAR-10: `cifar-10-batches-py/test_batch`, a pickle dict with `data` uint8 (10000, 3072), each row the
  R, G, B planes of a 32x32 image, and `labels` (list of int).
- CIFAR-10-C: `<corruption>.npy` uint8 (5*N, 32, 32, 3), severities 1..5 stacked (rows (s-1)*N .. s*N-1 are
  severity s, each block in test-set order) and `labels.npy` (5*N,). Files written by `make-cifar10c` with
  only some severities carry a sidecar `<corruption>.json` saying which rows hold which severity.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

from .. import hub
from .cifar_pickle import read_cifar_pickle

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TAR_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10C_URL = "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar"
TEST_BATCH_SHA256 = "865a01f6b16fe1517068d9a06e79bb38203bf279b62a39951b353b692aa5cabc"
_HOW_TO_GET = (
    f"download {CIFAR10_URL}, unpack it and pass the folder holding cifar-10-batches-py/ "
    "(--data-root or TTA_SURGICAL_DATA), or call tta_surgical.data.cifar.download_cifar10()"
)


def cifar10_dir(root: str | Path) -> Path:
    """The `cifar-10-batches-py` folder under `root` (or `root` itself when it is that folder)."""
    root = Path(root)
    return (
        root if root.name == "cifar-10-batches-py" or (root / "test_batch").exists() else root / "cifar-10-batches-py"
    )


SUMS_FILE = "SHA256SUMS"
_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime) already checked in this process


def check_listed_digest(path: Path) -> None:
    """Check `path` against a `SHA256SUMS` file (sha256sum format) in its folder or the one above, when one lists it
    (the data root's own list, as in the shared data folder); a mismatch is an `hub.IntegrityError`. Unlisted files
    are read as they are: the restricted unpickler, not the digest, is what keeps a crafted file harmless."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _verified:
        return
    for base in (path.parent, path.parent.parent):
        sums = base / SUMS_FILE
        rel = path.relative_to(base).as_posix()
        expected = _listed(sums, rel) if sums.is_file() else None
        if expected is not None:
            hub.verify(path, expected, hint=f"{sums} lists {expected} for it; {_HOW_TO_GET}")
            break
    _verified.add(key)


def _listed(sums: Path, rel: str) -> str | None:
    for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[1].strip().lstrip("*") == rel:
            return parts[0].lower()
    return None


def load_cifar10(root: str | Path, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 from the official python layout: images uint8 (N, 32, 32, 3) RGB, labels int64 (N,)."""
    folder = cifar10_dir(root)
    names = {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]}
    if split not in names:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; valid: test, train")
    images, labels = [], []
    for name in names[split]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 file not found: {path}; {_HOW_TO_GET}")
        check_listed_digest(path)
        d = read_cifar_pickle(path, "CIFAR-10 file", _HOW_TO_GET)
        try:
            data = np.asarray(d["data"], dtype=np.uint8)
            lab = np.asarray(d["labels"], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as err:
            raise OSError(f"CIFAR-10 file {path} is truncated or corrupt ({err!r}); {_HOW_TO_GET}") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise OSError(
                f"CIFAR-10 file {path} has unexpected content: data {data.shape}, {len(lab)} labels "
                f"(expected (N, 3072) and N labels); {_HOW_TO_GET}"
            )
        if lab.min(initial=0) < 0 or lab.max(initial=0) > 9:
            raise OSError(f"CIFAR-10 file {path} has labels outside 0..9; {_HOW_TO_GET}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def download_cifar10(root: str | Path | None = None) -> Path:
    """Download and unpack the official CIFAR-10 python tarball (SHA-256 checked); return the data root.

    Without `root` it goes to the cache folder (`tta_surgical.hub.cache_dir("cifar10")`).
    """
    root = Path(root) if root is not None else hub.cache_dir("cifar10")
    if (root / "cifar-10-batches-py" / "test_batch").is_file():
        return root
    tar = hub.fetch("cifar-10-python.tar.gz", CIFAR10_URL, CIFAR10_TAR_SHA256, cache_sub="cifar10")
    with tarfile.open(tar, "r:gz") as t:
        members = [m for m in t.getmembers() if m.name.startswith("cifar-10-batches-py/") and m.isfile()]
        (
            t.extractall(root, members=members, filter="data")
            if hasattr(tarfile, "data_filter")
            else t.extractall(root, members=members)
        )
    return root


def find_cifar10(data_root: str | Path | None = None, *, download: bool = True) -> Path:
    """Locate CIFAR-10: `data_root`, `$TTA_SURGICAL_DATA`, the cache; download into the cache as a last resort."""
    for cand in (hub.data_root(data_root), hub.cache_dir("cifar10")):
        if cand is not None and (cifar10_dir(cand) / "test_batch").is_file():
            return cand
    if data_root is not None:
        raise FileNotFoundError(f"no cifar-10-batches-py/test_batch under {data_root}; {_HOW_TO_GET}")
    if not download:
        raise FileNotFoundError(f"CIFAR-10 not found; {_HOW_TO_GET}")
    return download_cifar10()


# ----------------------------------------------------------------------------------------------- CIFAR-10-C

N_CLASSES = 10
_SIDECAR_FIX = 'write a sidecar {name} saying which rows hold which severity, e.g. {{"rows": {{"5": [0, {n}]}}}}'


def sidecar_path(folder: str | Path, corruption: str) -> Path:
    return Path(folder) / f"{corruption}.json"


def cifar10c_rows(
    folder: str | Path, corruption: str, n_rows: int, labels: np.ndarray | None = None
) -> dict[int, tuple[int, int]]:
    """Severity -> (start, stop) rows of `<corruption>.npy`.

    With a sidecar JSON (written by make-cifar10c) its `rows` field is authoritative; without one the file must have
    the official layout: severities 1..5 in 5 equal blocks, each in test-set order, so `labels` (labels.npy, when
    given) repeats the same labels in every block. A file that does not fit is refused, never guessed at: 10,000
    rows of one severity would otherwise be read as 5 severities of 2,000.
    """
    side = sidecar_path(folder, corruption)
    if side.is_file():
        return _sidecar_rows(side, n_rows)
    npy = Path(folder) / f"{corruption}.npy"
    n = n_rows // 5
    expected = (
        f"without a sidecar {side.name} the official layout is expected: severities 1-5 stacked in 5 equal blocks "
        "(50,000 rows = 5 x 10,000), labels.npy repeating the same labels in each block"
    )
    if n_rows % 5 or n_rows == 0:
        raise OSError(
            f"{npy} has {n_rows} rows, not 5 equal severity blocks (truncated file?); {expected}; if it holds other "
            f"severities, {_SIDECAR_FIX.format(name=side.name, n=n_rows)}"
        )
    if labels is not None and any(not np.array_equal(labels[:n], labels[k * n : (k + 1) * n]) for k in range(1, 5)):
        raise OSError(
            f"{npy} has {n_rows} rows, which would be 5 severities x {n:,}, but labels.npy does not repeat the same "
            f"{n:,} labels in each block; {expected}; if the file holds one severity or another layout, "
            f"{_SIDECAR_FIX.format(name=side.name, n=n_rows)}"
        )
    return {s: ((s - 1) * n, s * n) for s in range(1, 6)}


def _sidecar_rows(side: Path, n_rows: int) -> dict[int, tuple[int, int]]:
    try:
        rows = {int(s): (int(a), int(b)) for s, (a, b) in json.loads(side.read_text())["rows"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise OSError(
            f"{side} is not a valid CIFAR-10-C sidecar ({err!r}); it needs "
            '"rows": {"<severity>": [start, stop], ...}; write it again or remove it (official layout)'
        ) from None
    bad = {s: r for s, r in rows.items() if not (1 <= s <= 5 and 0 <= r[0] < r[1])}
    if bad:
        raise OSError(f"{side} gives invalid rows {bad}: severities are 1..5 and rows [start, stop) with start < stop")
    return rows


def _open_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} not found: {path}; download CIFAR-10-C ({CIFAR10C_URL}) and unpack it, "
            "or generate it with `tta-surgical make-cifar10c --data-root DIR --out DIR`"
        )
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:  # shorter than its header says, or Python objects (never unpickled here)
        raise OSError(f"{path} is truncated or corrupt ({err}); download or generate it again") from None


def _check_labels(labels: np.ndarray, path: Path) -> None:
    """labels.npy must be a 1-D array of class indices 0..9 (a bad label would silently count as an error)."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise OSError(
            f"{path} holds {labels.dtype} {labels.shape}, not a 1-D array of integer class labels; "
            "download or generate it again"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= N_CLASSES))
    if len(bad):
        raise OSError(
            f"{path} has {len(bad):,} labels outside 0..{N_CLASSES - 1} (e.g. {int(labels[bad[0]])} at row "
            f"{int(bad[0])}); CIFAR-10-C labels are the CIFAR-10 classes: download or generate it again"
        )


def load_cifar10c(root: str | Path, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one corruption at one severity from a CIFAR-10-C folder: images uint8 (N, 32, 32, 3), labels int64.

    Images are memory-mapped (only the requested rows are read). labels.npy must have one label per image row
    (make-cifar10c output with only some severities may keep all 5 blocks of labels) with classes 0..9.
    """
    folder = Path(root)
    if not (folder / "labels.npy").is_file() and (folder / "CIFAR-10-C" / "labels.npy").is_file():
        folder = folder / "CIFAR-10-C"
    npy, lab_path = folder / f"{corruption}.npy", folder / "labels.npy"
    images = _open_npy(npy, f"CIFAR-10-C file for {corruption!r}")
    labels = _open_npy(lab_path, "CIFAR-10-C labels.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise OSError(f"{npy} is not uint8 (N, 32, 32, 3): {images.dtype} {images.shape}")
    _check_labels(labels, lab_path)
    has_sidecar = sidecar_path(folder, corruption).is_file()
    if not has_sidecar:
        _check_label_count(len(labels), len(images), npy, lab_path)
    rows = cifar10c_rows(folder, corruption, len(images), None if has_sidecar else np.asarray(labels))
    if severity not in rows:
        raise ValueError(
            f"{npy} holds severities {sorted(rows)}, not {severity}; regenerate with --severities including it"
        )
    start, stop = rows[severity]
    if stop > len(images):
        raise OSError(f"{npy} has {len(images)} rows, expected at least {stop} (truncated?)")
    # make-cifar10c writes the labels of all 5 severity blocks even when the file holds fewer of them.
    if has_sidecar and not (len(labels) == 5 * (stop - start) and stop <= len(labels)):
        _check_label_count(len(labels), len(images), npy, lab_path)
    return images[start:stop], np.asarray(labels[start:stop], dtype=np.int64)


def _check_label_count(n_labels: int, n_images: int, npy: Path, lab_path: Path) -> None:
    if n_labels != n_images:
        raise OSError(
            f"{lab_path} has {n_labels:,} labels but {npy} has {n_images:,} images: every image row needs its label "
            "(official: 50,000 each, the 10,000 test labels repeated for the 5 severities); the files do not belong "
            "together: download or generate them again"
        )
