"""Contracts of the stream planner, the stream builder and the ImageNet(-C) folder reader."""

from __future__ import annotations

import dataclasses
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tta_surgical.corruptions import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, CORRUPTIONS
from tta_surgical.data import imagenet
from tta_surgical.data.context import DataContext
from tta_surgical.streams import (
    Batch,
    StreamSpec,
    build_stream,
    dirichlet_order,
    gradual_severities,
    load_stream_spec,
    plan_fingerprint,
    plan_stream,
)

REPO = Path(__file__).resolve().parents[1]
LABELS = np.repeat(np.arange(10), 100)  # 1,000 images, 100 per class, class-sorted
RNG_LABELS = np.random.default_rng(0).permutation(LABELS)  # an i.i.d.-looking test-set order


def need(*names: str) -> None:
    missing = [n for n in names if n not in CORRUPTIONS]
    if missing:
        pytest.skip(f"corruptions not registered yet: {missing}")


def spec(**kw) -> StreamSpec:
    base = dict(domains=("fog", "snow", "contrast"), severities=(5,), batch_size=64, n_examples=300, reset="never")
    base.update(kw)
    return StreamSpec(**base)


def label_entropy(y: np.ndarray, n_classes: int = 10) -> float:
    p = np.bincount(y, minlength=n_classes) / len(y)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("order", ["sequential", "gradual", "mixed"])
@pytest.mark.parametrize("shift", ["none", "dirichlet"])
def test_plan_is_reproducible(order, shift):
    s = spec(order=order, label_shift=shift, severities=(1, 3, 5), shuffle=True)
    a, b = plan_stream(s, RNG_LABELS), plan_stream(dataclasses.replace(s), RNG_LABELS.copy())
    assert plan_fingerprint(a) == plan_fingerprint(b) and len(a) == len(b) > 0
    assert all(np.array_equal(x.indices, y.indices) and x.noise_seed == y.noise_seed for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "kw", [dict(order="mixed"), dict(label_shift="dirichlet"), dict(shuffle=True, n_examples="all")]
)
def test_seed_changes_random_plans(kw):
    a, b = plan_stream(spec(seed=0, **kw), RNG_LABELS), plan_stream(spec(seed=1, **kw), RNG_LABELS)
    order_a = np.concatenate([p.indices for p in a])
    order_b = np.concatenate([p.indices for p in b])
    assert not np.array_equal(order_a, order_b)
    assert sorted(order_a.tolist()) == sorted(order_b.tolist())  # same images, other order


def test_seed_only_changes_noise_of_a_deterministic_plan():
    a, b = plan_stream(spec(seed=0), RNG_LABELS), plan_stream(spec(seed=1), RNG_LABELS)
    assert len(a) == len(b) == 15
    assert all(np.array_equal(x.indices, y.indices) for x, y in zip(a, b, strict=True))
    assert all(x.noise_seed != y.noise_seed for x, y in zip(a, b, strict=True))
    assert len({p.noise_seed for p in a}) == len(a)  # every batch draws its own noise


def test_sequential_covers_each_domain_once_in_order():
    s = spec(severities=(3, 5), n_examples=250)
    plan = plan_stream(s, RNG_LABELS)
    seen = Counter()
    segs = []
    for p in plan:
        assert p.domain != "mixed" and (p.domain_ids == p.domain_ids[0]).all()
        assert (p.item_severities == p.severity).all() and len(p) <= 64
        seen.update((p.domain, p.severity, int(i)) for i in p.indices)
        if not segs or segs[-1] != (p.domain, p.severity):
            segs.append((p.domain, p.severity))
    # domain-major: each domain at each listed severity, then the next domain
    assert segs == [(d, sv) for d in s.domains for sv in (3, 5)]
    assert set(seen.values()) == {1}
    for d in s.domains:
        for sv in (3, 5):
            # unshuffled CIFAR keeps the test-set order: the first n_examples images, in order
            got = [i for p in plan if (p.domain, p.severity) == (d, sv) for i in p.indices.tolist()]
            assert got == list(range(250))
    assert [p.batch_index for p in plan] == list(range(len(plan)))
    assert len(plan) == 3 * 2 * 4  # ceil(250 / 64) = 4 batches per segment; the last one holds 58
    assert len(plan[3]) == 250 - 3 * 64


def test_all_examples_and_shorthands():
    s = StreamSpec(domains="benchmark", n_examples="all")
    assert s.domains == BENCHMARK_CORRUPTIONS and s.n_examples is None
    assert StreamSpec(domains="all").domains == ALL_CORRUPTIONS
    assert StreamSpec(domains=["benchmark"]).domains == BENCHMARK_CORRUPTIONS
    assert StreamSpec(domains="fog", severities=3).domains == ("fog",)
    plan = plan_stream(StreamSpec(domains=("fog",), batch_size=300), LABELS)
    assert sum(len(p) for p in plan) == 1000 and len(plan) == 4


def test_gradual_severity_order():
    assert gradual_severities((1, 2, 3, 4, 5)) == (1, 2, 3, 4, 5, 4, 3, 2, 1)
    assert gradual_severities((5, 1, 3)) == (1, 3, 5, 3, 1)
    s = spec(order="gradual", severities=(1, 2, 3, 4, 5), domains=("fog", "snow"), n_examples=100, batch_size=50)
    plan = plan_stream(s, RNG_LABELS)
    steps = [(p.domain, p.severity) for p in plan[::2]]  # 2 batches per step
    ramp = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert steps == [("fog", v) for v in ramp] + [("snow", v) for v in ramp]
    assert all(len(p) == 50 for p in plan)
    # one domain_index per domain: the ramp is one episode for the per_domain reset
    assert {p.domain_index for p in plan if p.domain == "snow"} == {1}


def test_mixed_draws_everything_once_and_mixes_batches():
    s = spec(order="mixed", severities=(3, 5), n_examples=200, batch_size=100)
    plan = plan_stream(s, RNG_LABELS)
    draws = Counter(
        (int(d), int(v), int(i)) for p in plan for d, v, i in zip(p.domain_ids, p.item_severities, p.indices)
    )
    assert len(draws) == 3 * 2 * 200 and set(draws.values()) == {1}
    assert all(p.domain == "mixed" and p.severity == 0 for p in plan)
    assert all(len(p.groups()) > 1 for p in plan)
    g = plan[0].groups()
    assert sorted(int(x) for _, _, pos in g for x in pos) == list(range(100))  # groups partition the batch


def test_dirichlet_is_non_iid_and_uses_each_image_once():
    s = spec(domains=("fog", "snow"), n_examples=1000, batch_size=50)
    iid = plan_stream(s, RNG_LABELS)
    shifted = plan_stream(dataclasses.replace(s, label_shift="dirichlet", dirichlet_delta=0.1), RNG_LABELS)
    h_iid = np.mean([label_entropy(RNG_LABELS[p.indices]) for p in iid])
    h_dir = np.mean([label_entropy(RNG_LABELS[p.indices]) for p in shifted])
    assert h_iid > 2.0  # ~ log(10) = 2.30 for i.i.d. batches of 50
    assert h_dir < 0.6 * h_iid, (h_dir, h_iid)
    for d in ("fog", "snow"):
        idx = np.concatenate([p.indices for p in shifted if p.domain == d])
        assert sorted(idx.tolist()) == list(range(1000))
    # a large concentration approaches an i.i.d. order
    mild = plan_stream(dataclasses.replace(s, label_shift="dirichlet", dirichlet_delta=100.0), RNG_LABELS)
    assert np.mean([label_entropy(RNG_LABELS[p.indices]) for p in mild]) > 0.9 * h_iid


def test_dirichlet_order_is_a_permutation():
    labels = np.random.default_rng(3).integers(0, 7, 333)
    perm = dirichlet_order(labels, 0.05, np.random.default_rng(0))
    assert sorted(perm.tolist()) == list(range(333))


@pytest.mark.parametrize(
    ("reset", "extra", "expected"),
    [
        ("never", {}, lambda p: False),
        ("per_domain", {}, lambda p: p.batch_index in (5, 10)),
        ("every_n", {"reset_every": 4}, lambda p: p.batch_index in (4, 8, 12)),
        ("episodic", {}, lambda p: p.batch_index > 0),
    ],
)
def test_reset_flags(reset, extra, expected):
    plan = plan_stream(spec(reset=reset, **extra), RNG_LABELS)  # 3 domains x ceil(300/64)=5 batches
    assert len(plan) == 15
    assert [p.reset_before for p in plan] == [expected(p) for p in plan]
    assert [p.domain_index for p in plan] == [b // 5 for b in range(15)]


def test_per_class_subset():
    s = spec(per_class=7, n_examples="all", domains=("fog",), batch_size=1000)
    (p,) = plan_stream(s, RNG_LABELS)
    assert np.bincount(RNG_LABELS[p.indices], minlength=10).tolist() == [7] * 10
    (q,) = plan_stream(s, RNG_LABELS)
    assert np.array_equal(p.indices, q.indices)
    (r,) = plan_stream(dataclasses.replace(s, seed=5), RNG_LABELS)
    assert not np.array_equal(np.sort(p.indices), np.sort(r.indices))
    with pytest.raises(ValueError, match="fewer than the 200 per class"):
        plan_stream(dataclasses.replace(s, per_class=200), RNG_LABELS)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(domains=("fogg",)), r"stream\.domains: unknown corruption.*'fogg'.*one of: gaussian_noise, .*saturate"),
        (dict(severities=(0, 5)), r"integers in 1\.\.5"),
        (dict(severities=(6,)), r"integers in 1\.\.5"),
        (dict(batch_size=0), r"batch_size must be an integer >= 1"),
        (dict(order="random"), r"stream\.order='random' is not valid; choose one of: sequential, mixed, gradual"),
        (dict(reset="sometimes"), r"choose one of: per_domain, never, every_n, episodic"),
        (dict(label_shift="zipf"), r"choose one of: none, dirichlet"),
        (dict(source="svhn"), r"choose one of: cifar10, cifar10c, imagenetc, imagenet"),
        (dict(reset="every_n"), r"reset_every >= 1"),
        (dict(order="mixed", reset="per_domain"), r"no domain boundary"),
        (dict(label_shift="dirichlet", dirichlet_delta=0.0), r"positive"),
        (dict(n_examples=-1), r"n_examples=-1 selects no images; write stream.n_examples=all"),
        (dict(source="imagenetc", image_size=128), r"224x224"),
        (dict(domains=()), r"non-empty"),
    ],
)
def test_bad_specs_raise_clear_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        spec(**kw)


def test_too_many_examples_and_bad_labels():
    with pytest.raises(ValueError, match="n_examples = 5000 but the source offers only 1000"):
        plan_stream(spec(n_examples=5000), LABELS)
    with pytest.raises(ValueError, match="1-D integer"):
        plan_stream(spec(), np.zeros((3, 2), np.int64))


# ------------------------------------------------------------------------------------------------ YAML


def test_shipped_stream_files_load():
    files = sorted((REPO / "streams").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"cifar10c_reset", "cifar10c_continual", "cifar10c_gradual", "cifar10c_mixed", "cifar10c_dirichlet"} <= names
    assert {"imagenetc_continual", "quickstart"} <= names
    specs = {f.stem: load_stream_spec(f) for f in files}
    reset = specs["cifar10c_reset"]
    assert reset.domains == BENCHMARK_CORRUPTIONS and reset.severities == (5,) and reset.reset == "per_domain"
    assert (reset.batch_size, reset.n_examples, reset.source, reset.order) == (200, 10000, "cifar10", "sequential")
    assert specs["cifar10c_continual"].reset == "never"
    assert specs["cifar10c_gradual"].order == "gradual"
    assert specs["cifar10c_mixed"].order == "mixed"
    assert specs["cifar10c_dirichlet"].label_shift == "dirichlet"
    inc = specs["imagenetc_continual"]
    assert (inc.source, inc.batch_size, inc.resolved_image_size) == ("imagenetc", 64, 224)
    # every shipped stream plans on a CIFAR-sized label set (ImageNet: 5 per class of a fake 1000-class set)
    for name, s in specs.items():
        labels = np.repeat(np.arange(1000), 5) if s.source == "imagenetc" else np.tile(np.arange(10), 1000)
        assert len(plan_stream(s, labels)) > 0, name


def test_load_stream_spec_rejects_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key stream\.batchsize; valid keys in section 'stream'"):
        load_stream_spec({"stream": {"batchsize": 10}})
    f = tmp_path / "s.yaml"
    f.write_text("stream:\n  domains: benchmark\n  severities: [1, 2]\n  order: sequential\n  seed: 3\n")
    s = load_stream_spec(f)
    assert s.severities == (1, 2) and s.seed == 3 and s.domains == BENCHMARK_CORRUPTIONS
    f.write_text("stream:\n  severities: [7]\n")
    with pytest.raises(ValueError, match=r"s\.yaml: stream\.severities"):
        load_stream_spec(f)
    assert load_stream_spec({"order": "mixed", "reset": "episodic"}).order == "mixed"


# ------------------------------------------------------------------------------------------------ streams


def write_fake_cifar(root: Path, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A tiny cifar-10-batches-py/test_batch in the official pickle format."""
    g = np.random.default_rng(1)
    # smooth images (corruptions act visibly on them), uint8 planes R, G, B per row as in the official file
    base = g.integers(0, 256, (n, 3, 4, 4)).astype(np.float64)
    img = np.kron(base, np.ones((1, 1, 8, 8))).astype(np.uint8)
    labels = np.arange(n) % 10
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": img.reshape(n, -1), "labels": labels.tolist()}, f)
    return img, labels


def collect(it) -> list[Batch]:
    return list(it)


@pytest.mark.parametrize("order", ["sequential", "mixed"])
def test_cifar10_on_the_fly_and_resume(tmp_path, order):
    need("gaussian_noise", "contrast")
    img, labels = write_fake_cifar(tmp_path)
    s = StreamSpec(
        source="cifar10",
        domains=("gaussian_noise", "contrast"),
        severities=(2, 5),
        order=order,
        batch_size=16,
        reset="never",
        path=str(tmp_path),
    )
    stream = build_stream(s)
    assert len(stream) == len(stream.plan) and stream.n_images == 2 * 2 * 40
    full = collect(stream)
    assert [b.batch_index for b in full] == list(range(len(stream)))
    for b in full:
        assert b.x.dtype == torch.float32 and b.x.shape == (len(b.plan), 3, 32, 32)
        assert b.y.dtype == torch.long and torch.equal(b.y, torch.as_tensor(labels[b.plan.indices]))
        assert 0 <= b.x.min() and b.x.max() <= 1
        assert torch.equal(b.x * 255, (b.x * 255).round())  # quantized to the uint8 grid
        clean = torch.as_tensor(img[b.plan.indices]).float() / 255
        assert not torch.allclose(b.x, clean, atol=0.02)  # it was corrupted
    k = len(stream) // 2 + 1
    tail = collect(stream.iter_from(k))
    assert len(tail) == len(full) - k
    for a, b in zip(full[k:], tail):
        assert a.batch_index == b.batch_index and a.domain == b.domain and torch.equal(a.x, b.x)
    # a fresh stream (a resumed process) regenerates the same batch bit for bit
    again = collect(build_stream(s).iter_from(len(stream) - 1))
    assert torch.equal(again[0].x, full[-1].x)
    if order == "sequential":
        # severity 5 gaussian noise is stronger than severity 2 on the same images
        dev = {b.severity: (b.x - torch.as_tensor(img[b.plan.indices]).float() / 255).std() for b in full[:6]}
        assert dev[5] > dev[2]


def test_cifar10_quantize_off_and_group_corruption_matches(tmp_path):
    need("contrast", "brightness")
    from tta_surgical.corruptions import corrupt, make_generator
    from tta_surgical.streams import derive_seed

    img, _ = write_fake_cifar(tmp_path, n=20)
    s = StreamSpec(
        source="cifar10", domains=("contrast", "brightness"), order="mixed", reset="never", batch_size=20,
        quantize=False, path=str(tmp_path),
    )  # fmt: skip
    b = next(iter(build_stream(s)))
    assert not torch.equal(b.x * 255, (b.x * 255).round())
    # each (domain, severity) group equals corrupt() of its images with the batch-derived generator
    for d, sev, pos in b.plan.groups():
        x = torch.as_tensor(img[b.plan.indices[pos]]).float() / 255
        g = make_generator(derive_seed(b.plan.noise_seed, d, sev))
        assert torch.allclose(b.x[torch.as_tensor(pos)], corrupt(x, s.domains[d], sev, g), atol=1e-6)


def write_fake_cifar10c(root: Path, corruptions: tuple[str, ...], n: int = 30) -> np.ndarray:
    g = np.random.default_rng(2)
    root.mkdir(parents=True)
    for c in corruptions:
        np.save(root / f"{c}.npy", g.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
    labels = np.tile(np.arange(n) % 10, 5).astype(np.uint8)
    np.save(root / "labels.npy", labels)
    return labels[:n]


@pytest.mark.parametrize("order", ["sequential", "mixed"])
def test_cifar10c_files(tmp_path, order):
    root = tmp_path / "CIFAR-10-C"
    labels = write_fake_cifar10c(root, ("fog", "snow"))
    s = StreamSpec(
        source="cifar10c", domains=("fog", "snow"), severities=(1, 4), order=order, batch_size=8, reset="never"
    )
    stream = build_stream(s, data=tmp_path)  # finds <data_root>/CIFAR-10-C
    batches = list(stream)
    assert stream.n_images == 2 * 2 * 30
    for b in batches:
        assert torch.equal(b.y, torch.as_tensor(labels[b.plan.indices], dtype=torch.long))
        for i, (d, sev, row) in enumerate(zip(b.plan.domain_ids, b.plan.item_severities, b.plan.indices)):
            arr = np.load(root / f"{s.domains[d]}.npy", mmap_mode="r")
            want = torch.as_tensor(np.array(arr[(sev - 1) * 30 + row])).permute(2, 0, 1).float() / 255
            assert torch.equal(b.x[i], want)
    tail = list(stream.iter_from(5))
    # sequential: ceil(30 / 8) = 4 batches per (domain, severity); mixed: 120 images in ceil(120 / 8) = 15
    assert len(batches) == (16 if order == "sequential" else 15) and len(tail) == len(batches) - 5
    assert all(torch.equal(a.x, b.x) and a.batch_index == b.batch_index for a, b in zip(batches[5:], tail, strict=True))


def test_missing_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="2235448"):
        build_stream(StreamSpec(source="imagenetc", domains=("fog",), path=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="CIFAR-10-C"):
        build_stream(StreamSpec(source="cifar10c", domains=("fog",), path=str(tmp_path)))


# ------------------------------------------------------------------------------------------------ ImageNet


def write_jpeg_tree(root: Path, size: tuple[int, int] | None = (224, 224), seed: int = 0) -> dict[str, torch.Tensor]:
    """<root>/<wnid>/<name>.JPEG for 3 wnids x 2 images; returns relpath -> the uint8 image encoded."""
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    out = {}
    for w, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        (root / wnid).mkdir(parents=True)
        for j in range(2):
            h, wd = size if size is not None else (int(40 + 13 * w + 7 * j), int(60 - 5 * w + 3 * j))
            img = torch.nn.functional.interpolate(
                torch.rand(1, 3, 4, 4, generator=g), size=(h, wd), mode="bilinear", align_corners=False
            )
            img = (img[0] * 255).to(torch.uint8)
            rel = f"{wnid}/ILSVRC2012_val_{w * 2 + j:08d}.JPEG"
            (root / rel).write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
            out[rel] = img
    return out


@pytest.fixture(scope="module")
def fake_imagenetc(tmp_path_factory) -> Path:
    """2 corruptions x 2 severities x 3 wnids x 2 JPEGs of 224x224."""
    root = tmp_path_factory.mktemp("inc") / "ImageNet-C"
    for c, corr in enumerate(["fog", "snow"]):
        for sev in (3, 5):
            write_jpeg_tree(root / corr / str(sev), seed=10 * c + sev)
    return root


def test_scan_imagenetc(fake_imagenetc):
    index = imagenet.scan_imagenetc(fake_imagenetc, "fog", 5)
    assert len(index) == 6 and index.wnids == ("n01440764", "n01443537", "n01484850")
    assert index.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert index.relpaths[2] == "n01443537/ILSVRC2012_val_00000002.JPEG"
    with pytest.raises(FileNotFoundError, match=r"fog/4 not found.*present.*fog, snow.*2235448"):
        imagenet.scan_imagenetc(fake_imagenetc, "fog", 4)
    with pytest.raises(FileNotFoundError, match=r"<root>/<corruption>/<severity 1\.\.5>/<wnid>"):
        imagenet.scan_imagenetc(fake_imagenetc / "missing", "fog", 5)


def test_imagenetc_stream_reads_the_files(fake_imagenetc):
    from torchvision.io import decode_jpeg, read_file

    s = StreamSpec(
        source="imagenetc", domains=("fog", "snow"), severities=(3, 5), batch_size=4, reset="per_domain",
        shuffle=True, seed=1,
    )  # fmt: skip
    stream = build_stream(s, data=DataContext.resolve(fake_imagenetc.parent, num_workers=0))
    batches = list(stream)
    assert stream.n_images == 2 * 2 * 6 and len(batches) == 2 * 2 * 2
    assert [(b.domain, b.severity) for b in batches[::2]] == [("fog", 3), ("fog", 5), ("snow", 3), ("snow", 5)]
    index = imagenet.scan_imagenetc(fake_imagenetc, "fog", 3)
    for b in batches:
        assert b.x.shape == (len(b.plan), 3, 224, 224)
        assert torch.equal(b.y, torch.as_tensor(index.labels[b.plan.indices]))
        for i, row in enumerate(b.plan.indices):
            path = fake_imagenetc / b.domain / str(b.severity) / index.relpaths[row]
            assert torch.equal(b.x[i], decode_jpeg(read_file(str(path))).float() / 255)
    # worker processes give the same batches, and resume works
    tail = list(build_stream(s, data=DataContext.resolve(fake_imagenetc.parent, num_workers=1)).iter_from(5))
    assert len(tail) == len(batches) - 5 == 3
    assert all(torch.equal(a.x, b.x) and a.batch_index == b.batch_index for a, b in zip(batches[5:], tail, strict=True))


def test_iter_image_folder_and_subset(fake_imagenetc):
    index = imagenet.scan_imagenetc(fake_imagenetc, "snow", 3)
    sub = imagenet.subset_per_class(index.labels, 1, seed=0)
    assert np.bincount(index.labels[sub]).tolist() == [1, 1, 1]
    assert np.array_equal(sub, imagenet.subset_per_class(index.labels, 1, seed=0))
    out = list(imagenet.iter_image_folder(index, batch_size=2, indices=sub, num_workers=0))
    assert [tuple(x.shape) for x, _ in out] == [(2, 3, 224, 224), (1, 3, 224, 224)]
    assert torch.cat([y for _, y in out]).tolist() == [0, 1, 2]


def test_clean_imagenet_resized_cropped_and_corrupted(tmp_path):
    need("brightness")
    root = tmp_path / "val"
    write_jpeg_tree(root, size=None)  # varied sizes, as in the real val set
    s = StreamSpec(source="imagenet", path=str(root), domains=("brightness",), image_size=32, batch_size=4)
    batches = list(build_stream(s, data=DataContext.resolve(num_workers=0)))
    assert [tuple(b.x.shape) for b in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert 0 <= min(b.x.min() for b in batches) and max(b.x.max() for b in batches) <= 1
    assert imagenet.resize_size(224) == 256
    # ImageNet-C images must share one size: a clean folder read as ImageNet-C is a clear error
    s2 = StreamSpec(source="imagenetc", path=str(tmp_path / "c"), domains=("fog",), severities=(1,), batch_size=6)
    write_jpeg_tree(tmp_path / "c" / "fog" / "1", size=None)
    with pytest.raises(ValueError, match="different sizes"):
        list(build_stream(s2, data=DataContext.resolve(num_workers=0)))


# ------------------------------------------------------------------------------------------------ real data


def test_real_cifar10_stream(data_root):
    need("gaussian_noise", "fog")
    from tta_surgical.data.cifar import load_cifar10

    images, labels = load_cifar10(data_root)
    s = load_stream_spec(REPO / "streams" / "quickstart.yaml")
    s = dataclasses.replace(s, domains=("gaussian_noise", "fog"), n_examples=100, batch_size=50)
    stream = build_stream(s, data=data_root)
    assert len(stream.labels) == 10000 and len(stream) == 4
    batches = list(stream)
    assert [b.reset_before for b in batches] == [False, False, True, False]
    assert torch.equal(batches[0].y, torch.as_tensor(labels[:50]))
    assert torch.equal(batches[2].y, torch.as_tensor(labels[:50]))
    clean = torch.as_tensor(images[:50]).permute(0, 3, 1, 2).float() / 255
    # Severity-5 Gaussian noise: sigma 0.10 in CIFAR-10-C (0.09 at severity 4, 0.08 at 3). Measured where clipping
    # to [0, 1] cannot act (clean values 3 sigma inside), the residual's std estimates sigma to about +-0.0005 on
    # these ~60k pixels (uint8 rounding adds 0.001 in quadrature), so the window below excludes severity 4.
    inside = (clean > 0.32) & (clean < 0.68)
    assert inside.sum() > 30_000
    resid = (batches[0].x - clean)[inside].std().item()
    assert abs(resid - 0.10) < 0.004, resid


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cifar10_stream_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    need("gaussian_noise", "fog")
    write_fake_cifar(tmp_path)
    s = StreamSpec(source="cifar10", domains=("gaussian_noise", "fog"), order="mixed", reset="never", batch_size=16,
                   path=str(tmp_path))  # fmt: skip
    stream = build_stream(s, device="cuda")
    assert stream.source.on_device.device.type == "cuda"  # the clean set lives on the GPU, gathered there per batch
    full = list(stream)
    assert all(b.x.is_cuda and b.y.is_cuda for b in full)
    tail = list(build_stream(s, device="cuda").iter_from(2))
    assert len(tail) == len(full) - 2 > 0
    assert all(torch.equal(a.x, b.x) for a, b in zip(full[2:], tail, strict=True))


@pytest.mark.gpu
def test_imagenetc_gpu_decode(fake_imagenetc):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    s = StreamSpec(source="imagenetc", domains=("fog",), severities=(3,), batch_size=4, reset="never")
    cpu = list(build_stream(s, data=DataContext.resolve(fake_imagenetc.parent, num_workers=0)))
    gpu = list(build_stream(s, data=DataContext.resolve(fake_imagenetc.parent, num_workers=2), device="cuda"))
    assert len(cpu) == len(gpu) == 2  # 6 images, batches of 4
    for a, b in zip(cpu, gpu, strict=True):
        assert b.x.is_cuda and torch.equal(a.y, b.y.cpu())
        # nvjpeg and libjpeg-turbo may round differently (IDCT / upsampling): within a few levels
        assert (a.x - b.x.cpu()).abs().mean() < 2 / 255
