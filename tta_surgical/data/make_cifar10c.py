"""Generate CIFAR-10-C in the official layout with the torch corruption engine.

Output folder (readable by anything that reads the Zenodo release):
- `<corruption>.npy`: uint8 (len(severities) * N, 32, 32, 3); with the default severities 1..5 this is exactly
  the official (5 * N, 32, 32, 3) layout, rows (s-1)*N .. s*N-1 holding severity s in test-set order. When only
  some severities are asked for, they are stacked in ascending order and the sidecar says which rows hold what.
- `<corruption>.json`: sidecar metadata: severities, `rows` (severity -> [start, stop)), seed, image count,
  batch size, device, versions, and `complete: true`.
- `labels.npy`: uint8 (5 * N,), the N test labels repeated 5 times (the official file).

Every file is written under a temporary name and renamed when complete, so an interrupted run leaves no
file that looks finished; a rerun skips complete files (same settings) and redoes the rest.
Randomness: the batch starting at image i of corruption c at severity s uses a generator seeded from
(seed, c, s, i), so one corruption generated alone equals the same corruption in a full run.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..corruptions import ALL_CORRUPTIONS, CORRUPTIONS, check_severity, corrupt, make_generator, to_uint8
from ..fileio import atomic_write_text
from .cifar import load_cifar10, sidecar_path

FORMAT_VERSION = 1


def batch_seed(seed: int, corruption: str, severity: int, start: int) -> int:
    """The generator seed of one batch: stable across runs, platforms and the set of corruptions asked for."""
    return zlib.crc32(f"{seed}:{corruption}:{severity}:{start}".encode())


def _settings(corruption: str, severities: Sequence[int], n: int, seed: int, batch_size: int) -> dict:
    rows = {str(s): [i * n, (i + 1) * n] for i, s in enumerate(severities)}
    return {
        "corruption": corruption,
        "severities": list(severities),
        "rows": rows,
        "n_images": n,
        "seed": seed,
        "batch_size": batch_size,
        "format_version": FORMAT_VERSION,
    }


def _is_complete(out: Path, corruption: str, settings: dict) -> bool:
    npy, side = out / f"{corruption}.npy", sidecar_path(out, corruption)
    if not (npy.is_file() and side.is_file()):
        return False
    try:
        meta = json.loads(side.read_text())
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, json.JSONDecodeError):
        return False
    same = all(meta.get(k) == v for k, v in settings.items())
    return (
        bool(meta.get("complete"))
        and same
        and arr.shape == (len(settings["severities"]) * settings["n_images"], 32, 32, 3)
    )


def _holds(path: Path, expected: np.ndarray) -> bool:
    """Whether `path` is a plain .npy equal to `expected` (a damaged or pickled file is not: it gets rewritten)."""
    try:
        return path.is_file() and np.array_equal(np.load(path, allow_pickle=False), expected)
    except (ValueError, OSError, EOFError):
        return False


def make_cifar10c(
    data_root: str | Path,
    out: str | Path,
    *,
    corruptions: Sequence[str] = ALL_CORRUPTIONS,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    limit: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 1000,
    frost_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Write CIFAR-10-C files for `corruptions` x `severities` into `out`; return corruption -> "written"/"skipped"."""
    for c in corruptions:
        CORRUPTIONS.get(c)  # unknown names raise, listing the valid ones
    severities = sorted({check_severity(int(s)) for s in severities})
    if not severities:
        raise ValueError("no severities asked for; give some of 1,2,3,4,5")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    images, labels = load_cifar10(data_root, "test")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        images, labels = images[:limit], labels[:limit]
    n = len(images)
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp*"):  # leftovers of an interrupted run: never complete, redo them
        stale.unlink()

    lab_path = out / "labels.npy"
    lab = np.tile(labels.astype(np.uint8), 5)
    if not _holds(lab_path, lab):
        tmp = out / f"labels.npy.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, lab)
        os.replace(tmp, lab_path)

    todo = [c for c in corruptions if not _is_complete(out, c, _settings(c, severities, n, seed, batch_size))]
    status = {c: "skipped" for c in corruptions if c not in todo}
    x_all = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)  # uint8 (N, 3, 32, 32), resident on device
    n_batches = len(todo) * len(severities) * -(-n // batch_size)
    bar = tqdm(total=n_batches, desc="make-cifar10c", unit="batch", disable=not progress)
    for c in todo:
        settings = _settings(c, severities, n, seed, batch_size)
        tmp = out / f"{c}.npy.tmp{os.getpid()}"
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(severities) * n, 32, 32, 3))
        for i, s in enumerate(severities):
            for start in range(0, n, batch_size):
                bar.set_postfix_str(f"{c} s{s}")
                x = x_all[start : start + batch_size].float().div_(255)
                g = make_generator(batch_seed(seed, c, s, start), device)
                y = to_uint8(corrupt(x, c, s, g, preset="cifar", frost_dir=frost_dir))
                arr[i * n + start : i * n + start + len(x)] = y.permute(0, 2, 3, 1).cpu().numpy()
                bar.update(1)
        arr.flush()
        del arr
        os.replace(tmp, out / f"{c}.npy")
        meta = dict(settings, complete=True, device=str(device), torch=torch.__version__, tta_surgical=__version__)
        atomic_write_text(sidecar_path(out, c), json.dumps(meta, indent=1))
        status[c] = "written"
    bar.close()
    return status
