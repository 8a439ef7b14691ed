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
import pickle
import tarfile
from pathlib import Path

import numpy as np

from .. import hub

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
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
            data = np.asarray(d["data"], dtype=np.uint8)
            lab = np.asarray(d["labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as err:
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


def sidecar_path(folder: str | Path, corruption: str) -> Path:
    return Path(folder) / f"{corruption}.json"


def cifar10c_rows(folder: str | Path, corruption: str, n_rows: int) -> dict[int, tuple[int, int]]:
    """Severity -> (start, stop) rows of `<corruption>.npy`.

    With a sidecar JSON (written by make-cifar10c) its `rows` field is authoritative; without one the file
    must have the official layout: 5 equal blocks, severities 1..5.
    """
    side = sidecar_path(folder, corruption)
    if side.is_file():
        meta = json.loads(side.read_text())
        return {int(s): (int(a), int(b)) for s, (a, b) in meta["rows"].items()}
    if n_rows % 5:
        raise OSError(
            f"{Path(folder) / (corruption + '.npy')} has {n_rows} rows, not a multiple of 5, and no sidecar "
            f"{side.name} says which severities it holds (truncated file?)"
        )
    n = n_rows // 5
    return {s: ((s - 1) * n, s * n) for s in range(1, 6)}


def _open_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} not found: {path}; download CIFAR-10-C ({CIFAR10C_URL}) and unpack it, "
            "or generate it with `tta-surgical make-cifar10c --data-root DIR --out DIR`"
        )
    try:
        return np.load(path, mmap_mode="r")
    except ValueError as err:  # numpy raises ValueError when the file is shorter than its header says
        raise OSError(f"{path} is truncated or corrupt ({err}); download or generate it again") from None


def load_cifar10c(root: str | Path, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one corruption at one severity from a CIFAR-10-C folder: images uint8 (N, 32, 32, 3), labels int64.

    Images are memory-mapped (only the requested rows are read).
    """
    folder = Path(root)
    if not (folder / "labels.npy").is_file() and (folder / "CIFAR-10-C" / "labels.npy").is_file():
        folder = folder / "CIFAR-10-C"
    images = _open_npy(folder / f"{corruption}.npy", f"CIFAR-10-C file for {corruption!r}")
    labels = _open_npy(folder / "labels.npy", "CIFAR-10-C labels.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise OSError(f"{folder / (corruption + '.npy')} is not uint8 (N, 32, 32, 3): {images.dtype} {images.shape}")
    rows = cifar10c_rows(folder, corruption, len(images))
    if severity not in rows:
        raise ValueError(
            f"{folder / (corruption + '.npy')} holds severities {sorted(rows)}, not {severity}; "
            "regenerate with --severities including it"
        )
    start, stop = rows[severity]
    if stop > len(images):
        raise OSError(f"{folder / (corruption + '.npy')} has {len(images)} rows, expected at least {stop} (truncated?)")
    if len(labels) < stop:
        # labels.npy may be shorter when only some severities were written; it repeats the test labels.
        n = stop - start
        lab = np.asarray(labels[:n], dtype=np.int64)
    else:
        lab = np.asarray(labels[start:stop], dtype=np.int64)
    return images[start:stop], lab
