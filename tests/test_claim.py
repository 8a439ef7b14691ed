"""Issue 13, the paper's central claim end to end: target tasks (CIFAR-Flip), the class-prior stream, training
budgets, the online pool and its scoring on the supervised test split, the verdict, report.json and budgets.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_finetune import TINY, tiny_cfg

from tta_surgical import studies
from tta_surgical.config import ConfigError
from tta_surgical.finetune import (
    CLEAN,
    TASKS,
    TargetData,
    TargetTask,
    budget_subset,
    flip_labels,
    get_task,
    load_finetune_config,
    online_pool,
    register_task,
    shift_level,
    split_indices,
)
from tta_surgical.streams import StreamSpec, build_stream, class_prior, class_prior_counts, select_images

REPO = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------------ target tasks


def test_cifar_flip_is_the_papers_relabelling():
    """CIFAR-Flip (Lee et al. 2023): y -> 9 - y on CIFAR-10, i.e. the class order reversed."""
    assert flip_labels(np.arange(10)).tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    pairs = {CIFAR10_CLASSES[y]: CIFAR10_CLASSES[int(flip_labels(np.array([y]))[0])] for y in range(10)}
    assert pairs["airplane"] == "truck" and pairs["cat"] == "frog" and pairs["deer"] == "dog"
    labels = np.random.default_rng(0).integers(0, 10, 500)
    flipped = get_task("cifar_flip").relabel(labels, 10)
    assert np.array_equal(flipped, 9 - labels)
    assert (flipped != labels).all()  # no class keeps its name (10 classes: no fixed point)
    assert np.array_equal(get_task("cifar_flip").relabel(flipped, 10), labels)  # an involution
    assert np.array_equal(get_task("corruption").relabel(labels, 10), labels)
    with pytest.raises(ValueError, match="10 classes"):
        get_task("cifar_flip").relabel(np.arange(100) % 100, 100)


def test_task_registry_and_config_choice():
    assert TASKS.names()[:2] == ["corruption", "cifar_flip"]
    with pytest.raises(KeyError, match="already registered"):
        register_task(TargetTask("cifar_flip", True, "again", flip_labels))
    with pytest.raises(KeyError, match="valid: corruption, cifar_flip"):
        get_task("flip")
    with pytest.raises(ConfigError, match="choose one of: corruption, cifar_flip"):
        tiny_cfg("finetune.task=flip")
    assert shift_level("corruption", "fog") == "input"
    assert shift_level("cifar_flip", CLEAN) == "label"
    assert shift_level("cifar_flip", "fog") == "input+label"
    assert shift_level("corruption", CLEAN) == "none"
    cfg = tiny_cfg("finetune.task=cifar_flip", "finetune.corruptions=[none,fog]")
    assert cfg.finetune.task == "cifar_flip" and cfg.finetune.corruptions == ("none", "fog")
    with pytest.raises(ConfigError, match="needs finetune.source=cifar10"):
        tiny_cfg("finetune.corruptions=[none]", "finetune.source=cifar10c", "finetune.limit=null")
    with pytest.raises(ConfigError, match="unknown \\['nope'\\]"):
        tiny_cfg("finetune.corruptions=[nope]")


def test_flip_config_is_the_corruption_protocol_with_another_task():
    import dataclasses

    flip = load_finetune_config(REPO / "configs" / "finetune_cifar_flip.yaml")
    corr = load_finetune_config(REPO / "configs" / "finetune_cifar10c.yaml")
    same_task = dataclasses.replace(flip.finetune, task=corr.finetune.task, corruptions=corr.finetune.corruptions)
    assert same_task == corr.finetune and flip.model == corr.model and flip.runtime == corr.runtime
    cfg = load_finetune_config(REPO / "configs" / "finetune_cifar_flip.yaml", ["finetune.lrs=[1e-2]"])
    assert cfg.finetune.task == "cifar_flip" and cfg.finetune.corruptions == (CLEAN,) and cfg.finetune.lrs == (1e-2,)


def test_target_data_flip_labels_clean_images_and_shared_split(data_root):
    corr = TargetData(tiny_cfg("finetune.corruptions=[none,fog]").finetune, data=data_root)
    flip = TargetData(tiny_cfg("finetune.task=cifar_flip", "finetune.corruptions=[none]").finetune, data=data_root)
    assert np.array_equal(flip.source_labels, corr.labels)
    assert np.array_equal(flip.labels, 9 - corr.labels)
    a, b = corr.split(2, seed=3), flip.split(2, seed=3)  # the split is drawn on the source labels
    assert all(np.array_equal(getattr(a, p), getattr(b, p)) for p in ("train", "val", "test"))
    from tta_surgical.data.cifar import load_cifar10

    clean, _ = load_cifar10(data_root, "test")
    rows = a.test[:5]
    x, y = flip.labeled(CLEAN, rows)
    assert torch.equal(x, torch.from_numpy(clean[rows]).permute(0, 3, 1, 2))
    assert y.tolist() == (9 - corr.labels[rows]).tolist()
    assert not torch.equal(corr.images("fog", rows), x)


# ------------------------------------------------------------------------------------------------ budgets, pool


def test_budget_subsets_are_nested_and_class_balanced():
    labels = np.repeat(np.arange(10), 30)
    split = split_indices(labels, 20, 5, 5, seed=1)
    small, big = (budget_subset(split.train, labels, k, seed=1) for k in (3, 10))
    assert set(small) <= set(big) <= set(split.train.tolist())
    assert np.bincount(labels[small]).tolist() == [3] * 10 and np.bincount(labels[big]).tolist() == [10] * 10
    assert np.array_equal(small, budget_subset(split.train, labels, 3, seed=1))
    with pytest.raises(ValueError, match="fewer than the budget"):
        budget_subset(split.train, labels, 21, seed=1)
    with pytest.raises(ConfigError, match="train_budget must lie in 1..n_train=20"):
        tiny_cfg("finetune.train_budget=30")


def test_train_budget_trains_on_that_many_images(data_root, tmp_path, monkeypatch):
    from tta_surgical.finetune import core, run_finetune

    seen = []
    real = core.finetune_cell

    def spy(model, pretrained, option, data, section, seed, **kw):
        seen.append((len(data.x["train"]), data.x["test"].clone()))
        return real(model, pretrained, option, data, section, seed, **kw)

    monkeypatch.setattr(core, "finetune_cell", spy)
    cfg = tiny_cfg("finetune.corruptions=[fog]", "finetune.options=[head]")
    run_finetune(cfg, tmp_path / "full", data=data_root)
    summary = run_finetune(tiny_cfg(*cfg_args(cfg), "finetune.train_budget=10"), tmp_path / "b", data=data_root)
    assert [n for n, _ in seen] == [20, 10]
    assert torch.equal(seen[0][1], seen[1][1])  # the same test images whatever the budget
    assert summary["train_budget"] == 10
    rec = json.loads((tmp_path / "b" / "results.jsonl").read_text().splitlines()[0])
    assert rec["split"]["train_used"] == 10 and rec["split"]["train"] == 20


def cfg_args(cfg) -> list[str]:
    return [f"finetune.corruptions={list(cfg.finetune.corruptions)}", f"finetune.options={list(cfg.finetune.options)}"]


def test_online_pool_is_everything_outside_train_and_val():
    labels = np.repeat(np.arange(10), 40)
    split = split_indices(labels, 10, 2, 5, seed=0)
    pool = online_pool(len(labels), split)
    assert not set(pool) & (set(split.train) | set(split.val))
    assert set(split.test) <= set(pool) and len(pool) == 400 - 120
    strict = online_pool(len(labels), split, include_test=False)
    assert not set(strict) & set(split.test) and len(strict) == 400 - 170


# ------------------------------------------------------------------------------------------------ class prior


def test_class_imbalance_frequencies_follow_the_long_tail():
    labels = np.repeat(np.arange(10), 100)
    spec = StreamSpec(domains=("fog",), class_imbalance=10.0, shuffle=True, seed=4)
    prior = class_prior(spec, 10)
    assert prior.max() / prior.min() == pytest.approx(10.0)
    ranks = np.argsort(np.argsort(-prior))
    assert np.allclose(prior, 10.0 ** (-ranks / 9) / (10.0 ** (-ranks / 9)).sum())
    rows = select_images(spec, labels)
    counts = np.bincount(labels[rows], minlength=10)
    assert counts.max() == 100  # the most frequent class keeps all its images
    assert np.array_equal(counts, class_prior_counts(np.full(10, 100), prior))
    assert np.abs(counts / counts.sum() - prior).max() < 1.0 / counts.sum() + 1e-12
    # Seeded: the same seed gives the same rows; another seed ranks the classes differently.
    assert np.array_equal(rows, select_images(spec, labels))
    other = select_images(StreamSpec(domains=("fog",), class_imbalance=10.0, shuffle=True, seed=5), labels)
    assert not np.array_equal(np.bincount(labels[other], minlength=10), counts)


def test_explicit_class_prior_and_its_errors():
    labels = np.repeat(np.arange(4), 50)
    spec = StreamSpec(domains=("fog",), class_prior=(1, 1, 2, 4), n_examples=80, shuffle=False)
    rows = select_images(spec, labels)
    assert np.bincount(labels[rows]).tolist() == [10, 10, 20, 40]
    first = [np.flatnonzero(labels == c)[:k].tolist() for c, k in enumerate([10, 10, 20, 40])]
    assert sorted(rows.tolist()) == sorted(sum(first, []))  # unshuffled: the first rows of each class
    with pytest.raises(ValueError, match="at most 100 fit"):
        select_images(StreamSpec(domains=("fog",), class_prior=(1, 1, 2, 4), n_examples=120), labels)
    with pytest.raises(ValueError, match="has 3 weights"):
        select_images(StreamSpec(domains=("fog",), class_prior=(1, 1, 2)), labels)
    with pytest.raises(ConfigError, match="set only one"):
        StreamSpec(class_prior=(1, 2), class_imbalance=2.0)
    with pytest.raises(ConfigError, match="class_imbalance must be a finite number >= 1"):
        StreamSpec(class_imbalance=0.5)
    with pytest.raises(ConfigError, match="positive finite sum"):
        StreamSpec(class_prior=(0, 0))
    assert class_prior(StreamSpec(), 10) is None  # the default stream keeps the source's frequencies


def test_clean_domain_streams_the_clean_images(data_root):
    from tta_surgical.data.cifar import load_cifar10

    spec = StreamSpec(domains=(CLEAN,), n_examples=40, batch_size=20, class_imbalance=3.0, label_shift="dirichlet")
    stream = build_stream(spec, data=data_root)
    clean, labels = load_cifar10(data_root, "test")
    for b in stream:
        assert torch.equal(b.x, torch.from_numpy(clean[b.plan.indices]).permute(0, 3, 1, 2).float() / 255)
        assert b.y.tolist() == labels[b.plan.indices].tolist()


# ------------------------------------------------------------------------------------------------ the verdict


def _task(level_scores: dict[str, tuple[float, float]], level: str, rgn: str) -> dict:
    """A synthetic task report: option -> (online error, supervised accuracy) on one corruption."""
    per = {
        o: {"online_error_stream": e, "online_accuracy_test": 100.0 - e, "supervised_accuracy_test": a}
        for o, (e, a) in level_scores.items()
    }
    w = {b: (1.0 if b == rgn else 0.1) for b in ("input", "block1", "block2", "block3", "head")}
    return {
        "task": "cifar_flip" if level == "label" else "corruption",
        "shift_levels": {"c": level},
        "blocks": ["input", "block1", "block2", "block3", "head"],
        "options": {o: {"per_corruption": {"c": v}} for o, v in per.items()},
        "rgn_block_weights": {"supervised": {"c": w}, "online": {"c": w}},
    }


def test_verdict_orderings_and_oracle_match():
    scores = {"input": (30, 70), "block1": (29, 75), "block2": (31, 72), "block3": (32, 68), "head": (35, 55)}
    (row,) = studies.verdict_rows(_task({**scores, "all": (30, 71)}, "input", "block1"))
    assert row["best_block_supervised"] == "block1" and row["best_block_online"] == "block1"
    assert row["best_block_online_test"] == "block1"
    assert row["rgn_matches_oracle_supervised"] and row["rgn_matches_oracle_online"]
    assert row["paper_ordering_supervised"] is True
    (row,) = studies.verdict_rows(_task({**scores, "all": (30, 76)}, "input", "block2"))
    assert row["paper_ordering_supervised"] is False  # all layers beat every early block
    assert row["rgn_matches_oracle_supervised"] is False
    flip = {"input": (50, 10), "block1": (50, 20), "block2": (50, 30), "block3": (50, 60), "head": (40, 85)}
    (row,) = studies.verdict_rows(_task({**flip, "all": (45, 80)}, "label", "head"))
    assert row["paper_ordering_supervised"] is True and row["best_block_supervised"] == "head"
    assert row["best_block_online"] == "head" and row["best_block_online_test"] is None  # relabelled test labels
    (row,) = studies.verdict_rows(_task({**flip, "all": (45, 90)}, "label", "head"))
    assert row["paper_ordering_supervised"] is False
    (row,) = studies.verdict_rows(_task(flip, "label", "head"))
    assert row["paper_ordering_supervised"] is None  # without `all` the claim cannot be checked


# ------------------------------------------------------------------------------------------------ end to end


def _report_args(tmp_path: Path, data_root: Path, *extra: str) -> argparse.Namespace:
    from tta_surgical.commands import report

    parser = argparse.ArgumentParser()
    report.configure(parser)
    argv = [
        "--task",
        "cifar_flip",
        "--corruptions",
        "none,gaussian_noise",
        "--options",
        "block1,head,auto-rgn",
        "--online-images",
        "30",
        "--references",
        "norm,source",
        "--data-root",
        str(data_root),
        "--out",
        str(tmp_path / "report"),
        "--device",
        "cpu",
        "--no-progress",
        *[t for t in TINY if not t.startswith("runtime")],
        "stream.batch_size=10",
        *extra,
    ]
    return parser.parse_args(argv)


def test_report_end_to_end_on_real_data(data_root, tmp_path, monkeypatch):
    """Both sides on a tiny CIFAR-Flip task (clean + one corruption): the online stream is the pool outside the
    supervised train/val split, its test scoring uses exactly the supervised test split, report.json has the four
    numbers per task and option, a rerun reuses every cell, and --budgets writes budgets.json."""
    from tta_surgical.commands import report

    scored = []
    real_score = studies.score_run

    def spy(folder, cfg, tests, **kw):
        scored.append((cfg, {c: (x.clone(), y.clone()) for c, (x, y) in tests.items()}))
        return real_score(folder, cfg, tests, **kw)

    monkeypatch.setattr(studies.cells, "score_run", spy)  # where the online cells call it
    args = _report_args(tmp_path, data_root)
    assert report.main(args) == 0
    out = tmp_path / "report"
    rep = json.loads((out / "report.json").read_text())
    task = rep["tasks"]["cifar_flip"]
    assert set(task["options"]) == {"block1", "head", "auto-rgn"}
    for o, entry in task["options"].items():
        for key in ("online_error_stream", "online_accuracy_test", "supervised_accuracy_test"):
            assert isinstance(entry[key], float) and 0.0 <= entry[key] <= 100.0, (o, key)
        assert "rgn_top_block" in entry
    assert set(task["options"]["auto-rgn"]["rgn_top_block"]) == {"supervised", "online"}
    assert task["options"]["auto-rgn"]["rgn_top_block"]["online"] in task["blocks"]
    assert task["shift_levels"] == {"none": "label", "gaussian_noise": "input+label"}
    assert {r["shift"] for r in rep["verdict"]} == {"label", "input+label"}
    # The online stream: the pool outside the supervised train/val split, 30 images of it per corruption.
    cfg = tiny_cfg("finetune.task=cifar_flip", "finetune.corruptions=[none,gaussian_noise]")
    target = TargetData(cfg.finetune, data=data_root)
    split = target.split(2, seed=0)
    stream_rows = set(scored[0][0].stream.indices)
    assert stream_rows == set(online_pool(200, split).tolist())
    assert not stream_rows & (set(split.train.tolist()) | set(split.val.tolist()))
    assert task["online"]["images_per_corruption"] == {"none": 30, "gaussian_noise": 30}
    # Scoring: exactly the supervised test split (images and CIFAR-Flip labels) of each corruption.
    for _, tests in scored:
        for c, (x, y) in tests.items():
            tx, ty = target.labeled(c, split.test)
            assert (
                torch.equal(x, tx)
                and torch.equal(y, ty)
                and y.tolist() == (9 - target.source_labels[split.test]).tolist()
            )
    n_scored = len(scored)
    assert n_scored == 2 * 5  # 2 corruptions x (3 options + the norm and source references)
    assert set(task["reference"]) == {"no_adaptation_accuracy_test", "norm", "source"}
    assert set(task["reference"]["source"]["online_error_stream"]) == {"none", "gaussian_noise"}
    # A rerun reuses every cell and every score: nothing is trained or scored again.
    before = (out / "report.json").read_text()
    assert report.main(args) == 0 and len(scored) == n_scored
    assert (out / "report.json").read_text() == before
    # Budgets: two labeled budgets and two stream lengths, all of them cells of the same folders.
    bargs = _report_args(tmp_path, data_root, "--budgets", "--labeled", "10,20", "--unlabeled", "10,30")
    assert report.main(bargs) == 0
    b = json.loads((out / "budgets.json").read_text())
    assert b["labeled"] == [10, 20] and b["unlabeled"] == [10, 30]
    assert set(b["supervised"]) == {"block1", "head", "auto-rgn"} and set(b["online"]) == {"block1", "head", "auto-rgn"}
    assert all(set(curve) == {"10", "20"} for curve in b["supervised"].values())
    assert all(set(curve) == {"10", "30"} for curve in b["online"].values())
    assert b["supervised"]["head"]["20"] == task["options"]["head"]["supervised_accuracy_test"]
    assert b["online"]["head"]["30"] == task["options"]["head"]["online_accuracy_test"]
    assert (out / "budgets.png").is_file() and "Supervised, by labeled" in (out / "budgets.md").read_text()


def test_report_merge_and_option_errors(tmp_path):
    from tta_surgical.commands import report

    task = {
        "task": "corruption",
        "model": "m",
        "corruptions": ["fog"],
        "options": {
            "head": {
                "online_error_stream": 1.0,
                "online_accuracy_test": 2.0,
                "supervised_accuracy_test": 3.0,
                "rgn_top_block": None,
                "per_corruption": {
                    "fog": {"online_error_stream": 1.0, "online_accuracy_test": 2.0, "supervised_accuracy_test": 3.0}
                },
            }
        },
        "reference": {"no_adaptation_accuracy_test": {"fog": 1.0, "mean": 1.0}},
        "verdict": [],
    }
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps({"tasks": {"corruption": task}, "verdict": []}))
    merged = report.merge_reports([tmp_path / "a", tmp_path / "b"])
    assert list(merged) == ["corruption", "corruption@b"]
    with pytest.raises(FileNotFoundError, match="report.json not found"):
        report.merge_reports([tmp_path / "missing"])
    with pytest.raises(ValueError, match="method.blocks is set per option"):
        report.route_overrides(["method.blocks=[block1]"])
    with pytest.raises(ValueError, match="not a positive integer or 'all'"):
        report.parse_counts("10,x", "--unlabeled")
    with pytest.raises(ConfigError, match="fixed by the study"):
        studies.OnlineSettings(overrides=("stream.n_examples=5",))
    with pytest.raises(ConfigError, match="adapts parameters"):
        studies.OnlineSettings(references=("tent",))


def test_online_cell_plans_reset_and_continual(data_root, tmp_path):
    """Reset: one cell per (corruption, option) plus the norm reference; continual: one cell per option over all
    corruptions without reset. Every cell streams the pool rows; the method is the option's surgical method."""
    cfg = tiny_cfg("finetune.corruptions=[fog,contrast]")
    online = studies.OnlineSettings(n_images=40)
    reset = studies.ShiftStudy(cfg, ["block1", "auto-snr", "auto-rgn"], online, tmp_path, data=data_root)
    assert reset.data.frost_dir == Path(data_root) / "frost"  # the supervised `frost` images need the textures too
    assert reset.online_options == ["block1", "auto-rgn"]  # auto-snr needs labels: no online form
    data, keys = reset.online_cells(0)
    assert [k[:2] for k in keys] == [(o, (c,)) for c in ("fog", "contrast") for o in ("block1", "auto-rgn", "norm")]
    assert all(cell["stream.n_examples"] == 40 for cell in data["cells"])
    methods = [cell["method"] for cell in data["cells"][:3]]
    assert methods[0]["name"] == "surgical" and methods[0]["blocks"] == ["block1"] and methods[0]["kind"] == "all"
    assert methods[1]["weighting"] == "auto-rgn" and methods[1]["blocks"] == ["all"]
    assert methods[2]["name"] == "norm"
    stream = json.loads(data["overrides"][2].split("=", 1)[1])
    assert stream["reset"] == "per_domain" and stream["indices"] == reset.pools[0].tolist()
    cont = studies.ShiftStudy(cfg, ["block1"], studies.OnlineSettings(mode="continual", references=()), tmp_path)
    data, keys = cont.online_cells(0, (None, 10))
    assert keys == [("block1", ("fog", "contrast"), None), ("block1", ("fog", "contrast"), 10)]
    assert json.loads(data["overrides"][2].split("=", 1)[1])["reset"] == "never"
    with pytest.raises(ConfigError, match="adapts no blocks"):
        studies.online_method("norm", "block1")


def test_shipped_budget_sweep_is_the_reports_supervised_cells(data_root, tmp_path):
    """configs/sweeps/finetune_budgets.yaml and `report --budgets` with the same settings resolve to the same cells
    (same configs, same ids): either can run them, the other reuses them."""
    import yaml

    from tta_surgical.sweep import load_sweep

    shipped = load_sweep(REPO / "configs" / "sweeps" / "finetune_budgets.yaml")
    cfg = load_finetune_config(
        REPO / "configs" / "finetune_cifar10c.yaml",
        [
            "finetune.corruptions=[gaussian_noise,contrast]",
            "finetune.lrs=[1e-2,1e-3]",
            "finetune.epochs=3",
            "finetune.seeds=[0]",
            "runtime.device=cpu",
        ],
    )
    options = ["input", "block1", "block2", "block3", "head", "all", "auto-rgn"]
    comp = studies.ShiftStudy(cfg, options, studies.OnlineSettings(), tmp_path, data=data_root)
    data, keys = comp.supervised_cells([100, 250, 500, 1000])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    ours = load_sweep(tmp_path / "s.yaml", check_models=False)
    assert [c.id for c in ours.cells] == [c.id for c in shipped.cells]
    assert keys[-1] == ("contrast", None)  # the full budget is the main study's cell
