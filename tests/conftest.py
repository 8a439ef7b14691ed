"""Shared fixtures: the real-data folder (`TTA_SURGICAL_DATA`, default ../shared/data) and small seeded inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    env = os.environ.get("TTA_SURGICAL_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "cifar-10-batches-py" / "test_batch").is_file():
            return cand
    return None


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
    """The shared real-data folder; tests that need it are skipped with a clear reason when it is absent."""
    root = _shared_data()
    if root is None:
        pytest.skip("real data not found: set TTA_SURGICAL_DATA to the folder holding cifar-10-batches-py/")
    return root


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
