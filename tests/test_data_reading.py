"""One way to read data: the registered stream sources serve the stream, the supervised split and the source samples;
one `DataContext` says where the data lives; nothing dispatches on source-name strings."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from tta_surgical.config import ConfigError
from tta_surgical.data.context import DataContext
from tta_surgical.finetune import TargetData, load_finetune_config
from tta_surgical.finetune.config import FinetuneSection
from tta_surgical.schema import from_dict
from tta_surgical.streams import SOURCES, Source, register_source, source_class

PACKAGE = Path(__file__).resolve().parents[1] / "tta_surgical"
REPO = PACKAGE.parent


def _source_name_comparisons(root: Path) -> list[str]:
    """`x == "cifar10"`, `x in ("cifar10", ...)`, `x != "imagenetc"` and the like, outside the source classes' own
    `name = "..."` declarations: dispatch on a source's name instead of asking the source."""
    names = set(SOURCES.names())
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            parts = [node.left, *node.comparators]
            consts = [
                c.value
                for part in parts
                for c in ([part] if isinstance(part, ast.Constant) else getattr(part, "elts", []))
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            ]
            if names & set(consts):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def test_no_dispatch_on_source_names_in_the_package():
    assert not _source_name_comparisons(PACKAGE)


def test_the_dispatch_check_can_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text('def f(spec):\n    if spec.source in ("cifar10", "cifar10c"):\n        return 1\n')
    assert _source_name_comparisons(pkg) == ["pkg/m.py:2"]


def test_data_context_resolves_once(monkeypatch, tmp_path):
    (tmp_path / "frost").mkdir()
    monkeypatch.setenv("TTA_SURGICAL_DATA", str(tmp_path))
    ctx = DataContext.resolve()
    assert ctx.root == tmp_path and ctx.frost_dir == tmp_path / "frost" and ctx.num_workers is None
    assert DataContext.of(ctx) is ctx and DataContext.of(str(tmp_path)) == ctx
    assert DataContext.resolve(tmp_path, tmp_path / "other").frost_dir == tmp_path / "other"
    assert ctx.with_workers(0).num_workers == 0 and ctx.with_workers(None) is ctx
    monkeypatch.delenv("TTA_SURGICAL_DATA")
    assert DataContext.resolve() == DataContext(None, None, None)


class _Stripes(Source):
    """A tiny source whose images are class-coloured stripes, served for both the stream and a labeled split."""

    name = "stripes"
    corrupts_on_the_fly = True
    image_size = 8
    default_subdir = None

    def __init__(self) -> None:
        self.labels = np.arange(40) % 4

    @classmethod
    def open(cls, spec, data):
        return cls()

    def _images(self, rows: np.ndarray) -> torch.Tensor:
        base = torch.as_tensor(self.labels[rows] * 60, dtype=torch.uint8)
        return base[:, None, None, None].expand(len(rows), 3, 8, 8).clone()

    def load(self, plan, rows):
        return self._images(rows.cpu().numpy()).to(rows.device)

    def stored_images(self, domain, severity, rows, *, seed=0, batch_size=1000, device="cpu", limit=None):
        return self._images(np.asarray(rows)) // (1 + severity * (domain != "none"))


@pytest.fixture
def stripes(monkeypatch):
    monkeypatch.setattr(SOURCES, "_items", dict(SOURCES._items))  # registered for this test only
    register_source(_Stripes)
    return _Stripes


def test_any_source_that_serves_a_split_can_be_fine_tuned_on(stripes):
    """The supervised split reads through the source (no list of allowed source names)."""
    assert stripes.serves_split() and not source_class("imagenet").serves_split()
    section = from_dict(
        FinetuneSection,
        {"source": "stripes", "corruptions": ["none", "fog"], "severity": 2, "n_train": 8, "n_val_per_class": 1,
         "n_test_per_class": 1},  # fmt: skip
        "finetune",
    )
    target = TargetData(section)
    assert target.n_classes == 4 and np.array_equal(target.source_labels, np.arange(40) % 4)
    rows = np.array([1, 5, 2])
    assert torch.equal(target.images("none", rows)[:, 0, 0, 0], torch.tensor([60, 60, 120], dtype=torch.uint8))
    assert torch.equal(target.images("fog", rows)[:, 0, 0, 0], torch.tensor([20, 20, 40], dtype=torch.uint8))


def test_a_source_without_a_split_is_refused_naming_the_ones_that_serve(stripes):
    with pytest.raises(ConfigError, match=r"finetune.source='imagenet' is not valid; choose one of: .*stripes"):
        from_dict(FinetuneSection, {"source": "imagenet", "corruptions": ["fog"]}, "finetune")


def test_source_samples_come_from_the_source_class(data_root):
    """EATA's source samples: the CIFAR sources give the clean test images (with a note saying so); folder sources
    of ImageNet-C give none."""
    for name in ("cifar10", "cifar10c"):
        load = source_class(name).source_samples(DataContext.resolve(data_root))
        x, y = load(5)
        assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
        assert y.tolist() == [3, 8, 8, 0, 6]  # the first CIFAR-10 test labels
        assert "test" in source_class(name).samples_note
    assert source_class("imagenetc").source_samples(DataContext()) is None


@pytest.mark.parametrize("batch_size", [100, 1000])  # 1000 > limit: one partial generation batch, as make-cifar10c
def test_cifar10_split_images_equal_make_cifar10c_output(data_root, tmp_path, batch_size):
    """The cifar10 source generates the supervised split exactly as `make-cifar10c --limit 300` writes it (the same
    generation batches over the first 300 images), and the cifar10c source reads those files back: same bits."""
    from tta_surgical.data.make_cifar10c import make_cifar10c

    out = tmp_path / "c10c"
    make_cifar10c(data_root, out, corruptions=["fog"], severities=[3], limit=300, batch_size=batch_size)
    base = ["finetune.corruptions=[fog]", "finetune.severity=3"]
    config = REPO / "configs" / "finetune_cifar10c.yaml"
    generate = [*base, "finetune.limit=300", f"finetune.generation_batch_size={batch_size}"]
    read = [*base, "finetune.source=cifar10c", f"finetune.path={out}"]
    rows = np.array([0, 7, 150, 299])
    generated = TargetData(load_finetune_config(config, generate).finetune, data=data_root).images("fog", rows)
    stored = TargetData(load_finetune_config(config, read).finetune, data=data_root).images("fog", rows)
    assert torch.equal(generated, stored)
