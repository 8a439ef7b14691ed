"""Shared fixtures: the real-data folder (`TTA_SURGICAL_DATA`, default ../shared/data), its SHA256SUMS, and small
seeded inputs. Optional dependencies are imported with `_extras.require` (skip on a laptop, fail in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "TTA_SURGICAL_DATA"
# An absolute path, so the processes tests start (resume in a fresh process, sweep workers) find the data whatever
# their working directory (the README's test command sets a relative one).
if os.environ.get(DATA_ENV):
    os.environ[DATA_ENV] = str(Path(os.environ[DATA_ENV]).expanduser().resolve())


def _shared_data() -> Path | None:
    """`$TTA_SURGICAL_DATA` when set (it must then hold the data), else ../shared/data when present, else None."""
    env = os.environ.get(DATA_ENV)
    if env:
        if not (Path(env) / "cifar-10-batches-py" / "test_batch").is_file():
            # A data root given on purpose (CI sets it) that lacks the data is a broken setup, not a laptop.
            pytest.fail(f"{DATA_ENV}={env} holds no cifar-10-batches-py/test_batch; fix the path or unset it",
                        pytrace=False)  # fmt: skip
        return Path(env)
    cand = REPO.parent / "shared" / "data"
    return cand if (cand / "cifar-10-batches-py" / "test_batch").is_file() else None


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests use tiny tensors: one intra-op thread is faster than a contended pool on small shared machines
    (10-30x here) and makes timings of the suite predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real-data folder; tests that need it are skipped with a clear reason when none is found, and fail
    when `TTA_SURGICAL_DATA` names a folder without the data."""
    root = _shared_data()
    if root is None:
        pytest.skip("real data not found: set TTA_SURGICAL_DATA to the folder holding cifar-10-batches-py/")
    return root


@pytest.fixture(scope="session")
def data_sha256(data_root: Path) -> dict[str, str]:
    """The data root's SHA256SUMS as {relative path: hex digest}. A data root without the file fails the tests that
    use it (they compare the package's checksum tables with it), rather than letting them pass unchecked."""
    return read_sha256sums(data_root)


def read_sha256sums(root: Path) -> dict[str, str]:
    """`root/SHA256SUMS` (sha256sum format) as {relative path: digest}; a missing file fails the calling test."""
    path = root / "SHA256SUMS"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the data root must list its files' SHA-256 sums (sha256sum format)",
                    pytrace=False)  # fmt: skip
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, rel = line.split(maxsplit=1)
            sums[rel.strip().lstrip("*")] = digest.lower()
    return sums


@pytest.fixture(scope="session")
def frost_dir(data_root: Path) -> Path:
    return data_root / "frost"


@pytest.fixture(scope="session")
def frost_or_none() -> Path | None:
    """The shared frost folder, or None (tests of other corruptions must not need the real data)."""
    root = _shared_data()
    return root / "frost" if root is not None else None


@pytest.fixture
def images32() -> torch.Tensor:
    """A small batch of smooth-plus-texture 32x32 images in [0, 1] (random noise alone hides blur effects)."""
    g = torch.Generator().manual_seed(1234)
    base = torch.rand(4, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)
    return (0.8 * x + 0.2 * torch.rand(4, 3, 32, 32, generator=g)).clamp(0, 1)
