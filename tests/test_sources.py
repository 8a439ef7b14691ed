"""Contracts of the stream sources: the registry, explicit image sets (`stream.indices`, `MemorySource`), and the
one typed loader of stream specs (code, YAML file, run config and CLI override apply the same rules)."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tta_surgical.config import Config, ConfigError, apply_overrides, from_dict, load_config
from tta_surgical.data import imagenet
from tta_surgical.data.context import DataContext
from tta_surgical.registry import UnknownNameError
from tta_surgical.streams import (
    SOURCES,
    MemorySource,
    Source,
    StreamSpec,
    build_stream,
    load_stream_spec,
    register_source,
    source_class,
)

REPO = Path(__file__).resolve().parents[1]


def write_cifar(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """`images` uint8 (N, 32, 32, 3) as cifar-10-batches-py/test_batch in the official pickle layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), "labels": labels.tolist()}, f)
    return root


@pytest.fixture
def cifar(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """40 smooth 32x32 images (corruptions act visibly on them), labels 0..9 repeated."""
    g = np.random.default_rng(1)
    images = np.kron(g.integers(0, 256, (40, 4, 4, 3)), np.ones((1, 8, 8, 1))).astype(np.uint8)
    labels = np.arange(40) % 10
    return write_cifar(tmp_path / "full", images, labels), images, labels


def same_batches(a, b) -> bool:
    """Equal pixels, labels, domains, severities and resets, batch by batch."""
    a, b = list(a), list(b)

    def where(t) -> tuple:
        return t.domain, t.severity, t.reset_before, t.batch_index

    return len(a) == len(b) and all(
        torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and where(x) == where(y) for x, y in zip(a, b)
    )


def count_opens(monkeypatch, name: str) -> list[str]:
    """Record every `open` of the source class `name` (for this test only)."""
    cls, opened = source_class(name), []
    real_open = cls.open.__func__

    def counting_open(klass, spec, data):
        opened.append(spec.source)
        return real_open(klass, spec, data)

    monkeypatch.setattr(cls, "open", classmethod(counting_open))
    return opened


# ------------------------------------------------------------------------------------------------ the registry


def test_registry_holds_the_five_sources_and_their_attributes():
    assert set(SOURCES.names()) == {"cifar10", "cifar10c", "imagenet", "imagenetc", "memory"}
    for name in SOURCES:
        assert source_class(name).name == name and issubclass(source_class(name), Source)
    on_the_fly = {n for n in SOURCES if source_class(n).corrupts_on_the_fly}
    assert on_the_fly == {"cifar10", "imagenet"}  # memory decides per instance (clean or already corrupted)
    assert {n: source_class(n).default_subdir for n in ("cifar10", "cifar10c", "imagenetc", "imagenet")} == {
        "cifar10": "",
        "cifar10c": "CIFAR-10-C",
        "imagenetc": "ImageNet-C",
        "imagenet": "imagenet/val",
    }
    # the spec's automatic values come from the source class
    assert [StreamSpec(source=n).resolved_image_size for n in ("cifar10", "cifar10c", "imagenetc", "imagenet")] == [
        32,
        32,
        224,
        224,
    ]
    assert [StreamSpec(source=n).resolved_shuffle for n in ("cifar10", "cifar10c", "imagenetc", "imagenet")] == [
        False,
        False,
        True,
        True,
    ]
    with pytest.raises(KeyError, match="already registered"):
        register_source(source_class("cifar10"))
    with pytest.raises(UnknownNameError, match="valid: cifar10, cifar10c"):
        source_class("svhn")


def test_a_new_source_is_one_class(monkeypatch, tmp_path):
    """What a newcomer writes: a Source subclass with its attributes, `open` and `load`; the spec, the plan and
    the stream (on-the-fly corruption, resume) then work unchanged."""
    monkeypatch.setattr(SOURCES, "_items", dict(SOURCES._items))  # registered for this test only

    @register_source
    class Checkerboard(Source):
        name = "checkerboard"
        corrupts_on_the_fly = True
        image_size = 16
        shuffle_by_default = True
        default_subdir = "checkers"

        def __init__(self, n: int) -> None:
            self.labels = np.arange(n) % 2

        @classmethod
        def open(cls, spec, data):
            return cls(int(cls.require_folder(spec, data).name.split("_")[1]))

        def load(self, plan, rows):
            board = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 255
            return board.to(torch.uint8).expand(len(rows), 3, 16, 16).clone()

    s = StreamSpec(source="checkerboard", path=str(tmp_path / "n_12"), domains=("contrast",), batch_size=5)
    assert (s.resolved_image_size, s.resolved_shuffle) == (16, True)
    with pytest.raises(ConfigError, match="16x16"):
        dataclasses.replace(s, image_size=32)
    stream = build_stream(s)
    batches = list(stream)
    assert [len(b.y) for b in batches] == [5, 5, 2] and batches[0].x.shape[1:] == (3, 16, 16)
    assert same_batches(batches[1:], build_stream(s).iter_from(1))
    monkeypatch.delenv("TTA_SURGICAL_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=r"source 'checkerboard' needs data.*holding checkers/"):
        build_stream(dataclasses.replace(s, path=None))


def test_build_stream_opens_the_source_once(cifar, monkeypatch):
    root, _, _ = cifar
    opened = count_opens(monkeypatch, "cifar10")
    s = StreamSpec(source="cifar10", path=str(root), domains=("fog", "contrast"), severities=(1, 3), batch_size=16)
    stream = build_stream(s)
    list(stream)
    list(stream.iter_from(3))
    assert opened == ["cifar10"]


# ------------------------------------------------------------------------------------------------ stream.indices


def test_indices_stream_the_chosen_rows_as_if_they_were_the_source(cifar, tmp_path):
    """A stream over `indices` of a source equals, bit for bit, the stream over a source holding only those rows."""
    root, images, labels = cifar
    rows = np.array([33, 2, 17, 5, 8, 21, 39, 0, 11, 30, 25, 14], dtype=np.int64)
    alone = write_cifar(tmp_path / "alone", images[rows], labels[rows])
    for order, reset in (("sequential", "per_domain"), ("mixed", "never")):
        base = dict(source="cifar10", domains=("gaussian_noise", "contrast"), severities=(2, 5), order=order,
                    reset=reset, batch_size=5, shuffle=True, seed=3)  # fmt: skip
        view = build_stream(StreamSpec(**base, path=str(root), indices=tuple(rows)))
        whole = build_stream(StreamSpec(**base, path=str(alone)))
        assert view.fingerprint() == whole.fingerprint()
        assert np.array_equal(view.labels, labels[rows])
        assert same_batches(view, whole)
        assert same_batches(view.iter_from(4), whole.iter_from(4))


def test_indices_are_checked(cifar):
    root, _, _ = cifar
    for bad in ([], [1, 1], [-1, 2]):
        with pytest.raises(ConfigError, match=r"stream\.indices must be a non-empty list of distinct"):
            StreamSpec(indices=bad)
    with pytest.raises(ValueError, match=r"stream\.indices names row 40 but the 'cifar10' source has 40 rows"):
        build_stream(StreamSpec(path=str(root), domains=("fog",), indices=(3, 40)))
    spec = StreamSpec(indices=np.arange(4))  # numpy arrays are accepted from code, stored as a tuple of ints
    assert spec.indices == (0, 1, 2, 3) and all(type(i) is int for i in spec.indices)


@pytest.fixture
def cifar10c(tmp_path, cifar) -> tuple[Path, Path]:
    """A tiny CIFAR-10-C folder written by `make-cifar10c --limit 30` (two corruptions, severities 2 and 5)."""
    from tta_surgical.cli import main

    root, _, _ = cifar
    out = tmp_path / "CIFAR-10-C"
    argv = ["make-cifar10c", "--data-root", str(root), "--out", str(out), "--corruptions", "fog,gaussian_noise",
            "--severities", "2,5", "--limit", "30", "--batch-size", "16", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return root, out


def test_cifar10c_files_with_indices_equal_a_written_subset(cifar10c, tmp_path):
    """What `report` used to do (write the chosen rows as a CIFAR-10-C folder) and `stream.indices` give the same
    stream: plan, fingerprint and batches."""
    from tta_surgical.data.cifar import load_cifar10c
    from tta_surgical.finetune import write_cifar10c_subset

    _, folder = cifar10c
    rows = np.array([1, 4, 5, 9, 12, 13, 20, 22, 27, 29], dtype=np.int64)
    subset = tmp_path / "subset"
    for c in ("fog", "gaussian_noise"):
        imgs, labs = load_cifar10c(folder, c, 5)
        write_cifar10c_subset(subset, c, 5, torch.from_numpy(np.array(imgs[rows])).permute(0, 3, 1, 2), labs[rows], {})
    base = dict(source="cifar10c", domains=("fog", "gaussian_noise"), severities=(5,), batch_size=4, shuffle=True,
                seed=1)  # fmt: skip
    view = build_stream(StreamSpec(**base, path=str(folder), indices=tuple(rows)))
    copy = build_stream(StreamSpec(**base, path=str(subset)))
    assert view.fingerprint() == copy.fingerprint() and same_batches(view, copy)
    for b in view:  # and the pixels are the file's rows
        want = np.array(load_cifar10c(folder, b.domain, 5)[0][rows[b.plan.indices]])
        assert torch.equal(b.x, torch.from_numpy(want).permute(0, 3, 1, 2).float() / 255)
    # a mixed stream gathers each image from its own file and severity block, through the same view
    mixed = build_stream(StreamSpec(**{**base, "order": "mixed", "reset": "never", "severities": (2, 5)},
                                    path=str(folder), indices=tuple(rows)))  # fmt: skip
    assert mixed.n_images == 2 * 2 * len(rows)
    for b in mixed:
        for i, (d, sev, pos) in enumerate(zip(b.plan.domain_ids, b.plan.item_severities, b.plan.indices)):
            want = np.array(load_cifar10c(folder, mixed.spec.domains[d], int(sev))[0][rows[pos]])
            assert torch.equal(b.x[i], torch.from_numpy(want).permute(2, 0, 1).float() / 255)


def test_imagenetc_indices_equal_a_linked_subset(tmp_path):
    """`stream.indices` over ImageNet-C folders = the symlinked subset tree `report` used to build."""
    from torchvision.io import encode_jpeg

    root = tmp_path / "ImageNet-C"
    g = torch.Generator().manual_seed(0)
    for corr in ("fog", "snow"):  # 3 classes x 2 images of 224x224, the same file names in both corruptions
        for w, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
            (root / corr / "5" / wnid).mkdir(parents=True)
            for j in range(2):
                img = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=224, mode="bilinear")
                data = encode_jpeg((img[0] * 255).to(torch.uint8), quality=90).numpy().tobytes()
                (root / corr / "5" / wnid / f"ILSVRC2012_val_{2 * w + j:08d}.JPEG").write_bytes(data)
    index = imagenet.scan_imagenetc(root, "fog", 5)
    rows = np.array([0, 3, 4], dtype=np.int64)  # one image of each of the three classes
    linked = tmp_path / "linked"
    for corr in ("fog", "snow"):
        for i in rows:
            dst = linked / corr / "5" / index.relpaths[i]
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(root / corr / "5" / index.relpaths[i], dst)
    base = dict(source="imagenetc", domains=("fog", "snow"), batch_size=2, seed=4)
    serial = DataContext.resolve(num_workers=0)
    view = build_stream(StreamSpec(**base, path=str(root), indices=tuple(rows)), data=serial)
    copy = build_stream(StreamSpec(**base, path=str(linked)), data=serial)
    assert view.fingerprint() == copy.fingerprint() and same_batches(view, copy)


# ------------------------------------------------------------------------------------------------ in memory


def test_memory_clean_images_equal_the_cifar10_source(cifar):
    root, images, labels = cifar
    kw = dict(domains=("gaussian_noise", "fog"), severities=(3,), batch_size=16, order="mixed", reset="never")
    mem = MemorySource(torch.from_numpy(images).permute(0, 3, 1, 2), labels)
    a = build_stream(StreamSpec(source="memory", **kw), source=mem)
    b = build_stream(StreamSpec(source="cifar10", path=str(root), **kw))
    assert a.fingerprint() == b.fingerprint() and same_batches(a, b)
    assert same_batches(a.iter_from(2), b.iter_from(2))


def test_memory_corrupted_images_are_served_as_given():
    g = np.random.default_rng(0)
    labels = np.arange(12) % 3
    given = {(c, s): g.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8) for c in ("fog", "snow") for s in (1, 4)}
    mem = MemorySource(given, labels)
    for order, reset in (("sequential", "per_domain"), ("mixed", "never")):
        spec = StreamSpec(source="memory", domains=("fog", "snow"), severities=(1, 4), order=order, reset=reset,
                          batch_size=5, shuffle=True)  # fmt: skip
        stream = build_stream(spec, source=mem)
        assert stream.n_images == 48
        for b in stream:
            assert torch.equal(b.y, torch.as_tensor(labels[b.plan.indices]))
            for i, (d, s, row) in enumerate(zip(b.plan.domain_ids, b.plan.item_severities, b.plan.indices)):
                want = torch.from_numpy(given[(spec.domains[d], int(s))][row]).float() / 255
                assert torch.equal(b.x[i], want)


def test_memory_source_errors_are_clear():
    labels = np.zeros(4, np.int64)
    imgs = np.zeros((4, 3, 8, 8), np.uint8)
    with pytest.raises(ValueError, match=r"given in Python.*source=MemorySource"):
        build_stream(StreamSpec(source="memory", domains=("fog",)))
    with pytest.raises(ValueError, match=r"no images for \(domain, severity\) \('snow', 5\)"):
        only_fog = MemorySource({("fog", 5): imgs}, labels)
        build_stream(StreamSpec(source="memory", domains=("fog", "snow")), source=only_fog)
    with pytest.raises(ValueError, match="uint8 \\(N, 3, H, W\\) with N = 4"):
        MemorySource(imgs.astype(np.float32), labels)
    with pytest.raises(ValueError, match="uint8 \\(N, 3, H, W\\) with N = 5"):
        MemorySource(imgs, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="image_size 16 differs"):
        build_stream(StreamSpec(source="memory", domains=("fog",), image_size=16), source=MemorySource(imgs, labels))
    with pytest.raises(ValueError, match="'memory' source was given for a stream whose stream.source is 'cifar10'"):
        build_stream(StreamSpec(domains=("fog",)), source=MemorySource(imgs, labels))


def test_engine_runs_a_memory_source_like_the_files_it_holds(data_root, tmp_path, monkeypatch):
    """engine.run(..., source=MemorySource) over the first 32 real test images = the cifar10 source over them;
    a run opens its source once."""
    import json

    from tta_surgical.data.cifar import load_cifar10
    from tta_surgical.engine import run

    images, labels = load_cifar10(data_root)
    over = ["stream.domains=[brightness]", "stream.n_examples=32", "stream.batch_size=16", "runtime.device=cpu",
            "runtime.progress=false"]  # fmt: skip
    cfg = load_config(REPO / "configs" / "tent.yaml", overrides=over)
    mem = MemorySource(torch.from_numpy(images[:32]).permute(0, 3, 1, 2), labels[:32])
    a = run(apply_overrides(cfg, ["stream.source=memory"]), tmp_path / "m", data=data_root, source=mem)
    opened = count_opens(monkeypatch, "cifar10")
    b = run(cfg, tmp_path / "c", data=data_root)
    assert opened == ["cifar10"]
    assert a["stream_fingerprint"] == b["stream_fingerprint"] and a["errors"] == b["errors"]

    def lines(folder: Path) -> list[dict]:
        rows = [json.loads(t) for t in (folder / "results.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("latency_ms", "warmup")} for r in rows]

    assert lines(tmp_path / "m") == lines(tmp_path / "c")


# ------------------------------------------------------------------------------------------------ one loader


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("order", "random", r"stream\.order='random' is not valid; choose one of: sequential, mixed, gradual"),
        ("reset", "sometimes", r"stream\.reset='sometimes' is not valid; choose one of: per_domain, never"),
        ("source", "svhn", r"stream\.source='svhn' is not valid; choose one of: cifar10, cifar10c"),
        ("batch_size", 0, r"stream\.batch_size must be an integer >= 1, got 0"),
        ("batch_size", "many", r"stream\.batch_size: expected an integer, got 'many'"),
        ("shuffle", "yes", r"stream\.shuffle: expected bool \| None, got 'yes'"),
        ("severities", [1, 7], r"stream\.severities must be a non-empty list of integers in 1\.\.5"),
        ("domains", ["fogg"], r"stream\.domains: unknown corruption\(s\) 'fogg'; choose one of: gaussian_noise"),
    ],
)
def test_every_entry_point_applies_the_same_rules(tmp_path, key, value, needle):
    """Python construction, a stream file, a run config's stream section and a CLI override fail alike."""
    import json

    import yaml

    stream_file = tmp_path / "s.yaml"
    stream_file.write_text(yaml.safe_dump({"stream": {key: value}}))
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"stream": {key: value}}))
    attempts = [
        lambda: StreamSpec(**{key: value}),
        lambda: load_stream_spec({key: value}),
        lambda: load_stream_spec(stream_file),
        lambda: load_config(stream=stream_file),
        lambda: load_config(run_file),
        lambda: apply_overrides(Config(), [f"stream.{key}={json.dumps(value)}"]),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigError, match=needle):
            attempt()


def test_code_and_yaml_build_the_same_spec(tmp_path):
    import yaml

    data = {"domains": "benchmark", "severities": 3, "n_examples": "1e3", "batch_size": 64.0, "seed": 2,
            "path": "data/x", "shuffle": None, "indices": [5, 1, 3]}  # fmt: skip
    in_code = StreamSpec(**{**data, "path": Path("data/x"), "seed": np.int64(2), "indices": np.array([5, 1, 3])})
    assert from_dict(StreamSpec, data, "stream") == in_code == load_stream_spec(data)
    assert in_code.severities == (3,) and in_code.n_examples == 1000 and in_code.batch_size == 64
    assert in_code.path == "data/x" and in_code.indices == (5, 1, 3)
    for f in sorted((REPO / "streams").glob("*.yaml")):  # the shipped files read alike through both doors
        assert load_stream_spec(f) == load_config(stream=f).stream, f.name
    # a stream file holds exactly one top-level `stream:` section, whichever loader reads it
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stream": {"seed": 1}, "model": {"name": "resnet20"}}))
    for load in (load_stream_spec, lambda p: load_config(stream=p)):
        with pytest.raises(ConfigError, match="exactly one top-level 'stream:' section"):
            load(bad)
