"""Supervised few-shot surgical fine-tuning: splits, selection, lr-grid restore, auto-RGN, resume, summaries.

The online-vs-supervised report (target tasks, budgets, the verdict) is tested in test_claim.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_finetune import TINY as TINY_RUN
from _tiny_finetune import tiny_cfg as tiny_run_cfg

from tta_surgical.config import ConfigError
from tta_surgical.finetune import (
    CellData,
    FinetuneSection,
    TargetData,
    average_ranks,
    build_rgn_optimizer,
    finetune_cell,
    guarded_step,
    load_finetune_config,
    per_class_train,
    rank_row,
    read_results,
    run_finetune,
    select_best,
    split_indices,
    summarize,
    validate_options,
)
from tta_surgical.finetune import core as ft_core
from tta_surgical.models import create_model, select_params

REPO = Path(__file__).resolve().parents[1]
TINY = ["finetune.corruptions=[gaussian_noise,contrast]", *TINY_RUN]


def tiny_cfg(*extra: str):
    return tiny_run_cfg(*extra, base=TINY)


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    model, _ = create_model("resnet20", pretrained=False)
    return model


def synthetic_data(n_per_class=(2, 1, 2), classes=10, seed=0) -> CellData:
    g = torch.Generator().manual_seed(seed)
    x, y = {}, {}
    for part, n in zip(("train", "val", "test"), n_per_class):
        y[part] = torch.arange(classes).repeat_interleave(n)
        x[part] = torch.randint(0, 256, (len(y[part]), 3, 32, 32), generator=g, dtype=torch.uint8)
    return CellData(x, y)


def section(**kw) -> FinetuneSection:
    base = dict(lrs=(1e-2,), epochs=1, batch_size=10, n_train=20, n_val_per_class=1, n_test_per_class=2)
    base.update(kw)
    return FinetuneSection(**base)


# ----------------------------------------------------------------------------------------------- splits


def test_split_class_balanced_disjoint_reproducible():
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 20))
    a = split_indices(labels, 2, 1, 2, seed=0)
    assert a.sizes() == {"train": 20, "val": 10, "test": 20}
    for part, n in (("train", 2), ("val", 1), ("test", 2)):
        assert np.bincount(labels[getattr(a, part)], minlength=10).tolist() == [n] * 10
    sets = [set(a.train.tolist()), set(a.val.tolist()), set(a.test.tolist())]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    b = split_indices(labels, 2, 1, 2, seed=0)
    assert all(np.array_equal(getattr(a, p), getattr(b, p)) for p in ("train", "val", "test"))
    c = split_indices(labels, 2, 1, 2, seed=1)
    assert not np.array_equal(a.train, c.train) and not np.array_equal(a.test, c.test)


def test_split_errors():
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(ValueError, match="fewer"):
        split_indices(labels, 3, 1, 2, seed=0)  # 6 per class > 5
    with pytest.raises(ValueError, match="empty"):
        split_indices(labels, 0, 1, 1, seed=0)
    with pytest.raises(ValueError, match="no labeled images"):
        split_indices(np.zeros(0, np.int64), 1, 1, 1, seed=0)
    with pytest.raises(ValueError, match="too small"):
        per_class_train(5, 10)
    with pytest.raises(ValueError, match="multiple of 10"):
        per_class_train(15, 10)
    assert per_class_train(1000, 10) == 100


def test_config_errors():
    with pytest.raises(ConfigError, match="empty"):
        FinetuneSection(n_train=0)
    with pytest.raises(ConfigError, match="n_val_per_class"):
        FinetuneSection(n_val_per_class=0)
    with pytest.raises(ConfigError, match="unknown config key finetune.epoch"):
        load_finetune_config(None, ["finetune.epoch=3"])
    with pytest.raises(ConfigError, match="bn_mode"):
        load_finetune_config(None, ["finetune.bn_mode=train"])
    cfg = load_finetune_config(REPO / "configs" / "finetune_imagenetc.yaml")
    assert cfg.model.name == "resnet50" and cfg.finetune.epochs == 10 and cfg.finetune.n_test_per_class == 10


def test_unknown_option_lists_valid(random_model):
    with pytest.raises(ValueError, match=r"unknown finetune option 'block9'.*auto-rgn.*block1.*head"):
        validate_options(random_model, ["block1", "block9"])
    validate_options(random_model, ["input", "block1-2", "block1.0", "head", "all", "auto-rgn", "auto-snr"])


def test_empty_labeled_set_is_an_error():
    x = {p: torch.zeros(0 if p == "train" else 2, 3, 32, 32, dtype=torch.uint8) for p in ("train", "val", "test")}
    y = {p: torch.zeros(len(x[p]), dtype=torch.long) for p in x}
    with pytest.raises(ValueError, match="train set is empty"):
        CellData(x, y)


# ----------------------------------------------------------------------------------------------- pure selection


def test_select_best_on_hand_made_history():
    h = [
        {"lr": 1e-2, "epoch": 1, "val_correct": 5},
        {"lr": 1e-2, "epoch": 2, "val_correct": 8},
        {"lr": 1e-3, "epoch": 1, "val_correct": 7},
        {"lr": 1e-3, "epoch": 3, "val_correct": 8},  # ties with (1e-2, 2): the lower lr wins
        {"lr": 1e-3, "epoch": 4, "val_correct": 8},  # same lr, later epoch: loses
        {"lr": 1e-1, "epoch": 1, "val_correct": 2},
    ]
    best = select_best(h)
    assert (best["lr"], best["epoch"]) == (1e-3, 3)
    assert (
        select_best([{"lr": 0.1, "epoch": 2, "val_acc": 50.0}, {"lr": 0.1, "epoch": 1, "val_acc": 50.0}])["epoch"] == 1
    )
    with pytest.raises(ValueError, match="empty"):
        select_best([])


def test_ranks_with_ties():
    assert rank_row({"a": 90.0, "b": 80.0, "c": 90.0, "d": 70.0}) == {"a": 1.5, "c": 1.5, "b": 3.0, "d": 4.0}
    acc = {"a": {"x": 90.0, "y": 50.0}, "b": {"x": 80.0, "y": 60.0}, "c": {"x": 80.0, "y": 40.0}}
    # x: a 1, b 2.5, c 2.5; y: b 1, a 2, c 3
    assert average_ranks(acc) == {"a": 1.5, "b": 1.75, "c": 2.75}


def test_summarize_means_and_standard_errors():
    recs = [
        {"option": o, "corruption": c, "seed": s, "test_acc": acc, "lr": 1e-3, "best_epoch": 1, "source_test_acc": 10.0}
        for o, c, s, acc in [
            ("block1", "fog", 0, 60.0),
            ("block1", "fog", 1, 70.0),
            ("block1", "snow", 0, 40.0),
            ("block1", "snow", 1, 50.0),
            ("all", "fog", 0, 50.0),
            ("all", "fog", 1, 50.0),
            ("all", "snow", 0, 45.0),
            ("all", "snow", 1, 45.0),
        ]
    ]
    s = summarize(recs, ["block1", "all"], ["fog", "snow"], [0, 1])
    assert s["accuracy"]["block1"] == {"fog": 65.0, "snow": 45.0}
    assert s["mean_accuracy"] == {"block1": 55.0, "all": 47.5}
    assert s["accuracy_se"]["block1"]["fog"] == pytest.approx(5.0)  # std 7.07 / sqrt 2
    assert s["mean_accuracy_se"]["block1"] == pytest.approx(5.0)  # per-seed means 50, 60
    assert s["rank"] == {"block1": 1.25, "all": 1.75}  # fog: block1 1, all 2; snow: a tie, 1.5 each
    assert s["source_mean_accuracy"] == 10.0


# ----------------------------------------------------------------------------------------------- training


def test_guard_skips_non_finite_steps():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=0.1)
    assert not guarded_step(opt, [w], (w * float("inf")).sum())
    assert torch.equal(w.detach(), torch.ones(3)) and not opt.state
    assert guarded_step(opt, [w], (w**2).sum())
    assert not torch.equal(w.detach(), torch.ones(3))


@pytest.mark.parametrize("option", ["block1", "head"])
def test_only_selected_tensors_change_and_grid_restores(random_model, option):
    model = random_model
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    selected = {n for n, _ in select_params(model, option)}
    starts, ends = [], []
    rec = finetune_cell(
        model,
        pretrained,
        option,
        synthetic_data(),
        section(lrs=(1e-2, 1e-3), epochs=2),
        seed=0,
        on_lr_start=lambda lr, m: starts.append({k: v.clone() for k, v in m.state_dict().items()}),
        on_lr_done=lambda lr: ends.append({k: v.clone() for k, v in model.state_dict().items()}),
    )
    assert len(starts) == len(ends) == 2
    for start in starts:  # every lr starts from the exact pretrained weights (the second one too)
        assert all(torch.equal(start[k], pretrained[k]) for k in pretrained)
    for end in ends:
        changed = {k for k in pretrained if not torch.equal(end[k], pretrained[k])}
        assert changed and changed <= selected, changed - selected  # BN running stats never move either
    assert all(torch.equal(model.state_dict()[k], pretrained[k]) for k in pretrained)  # the cell restores
    assert rec["tuned_params"] == sum(p.numel() for n, p in model.named_parameters() if n in selected)
    assert len(rec["history"]) == 4 and rec["lr"] in (1e-2, 1e-3) and rec["best_epoch"] in (1, 2)
    best = select_best(rec["history"])
    assert rec["test_acc"] == best["test_acc"]


def test_batch_bn_mode_never_writes_running_stats(random_model):
    pretrained = {k: v.clone() for k, v in random_model.state_dict().items()}
    ends = []
    finetune_cell(
        random_model,
        pretrained,
        "all",
        synthetic_data(),
        section(bn_mode="batch"),
        seed=0,
        on_lr_done=lambda lr: ends.append({k: v.clone() for k, v in random_model.state_dict().items()}),
    )
    stats = [k for k in pretrained if "running_" in k]
    assert stats and all(torch.equal(ends[0][k], pretrained[k]) for k in stats)
    assert not random_model.training or all(not m.training for m in random_model.modules())


def test_auto_rgn_per_tensor_lrs_follow_rgn_weights(random_model):
    from tta_surgical.autotune import rgn_weights

    model = random_model
    model.eval()
    params = select_params(model, "all")
    data = synthetic_data()
    batches = [
        (data.x["train"][:10].float() / 255, data.y["train"][:10]),
        (data.x["train"][10:].float() / 255, data.y["train"][10:]),
    ]
    opt, weights = build_rgn_optimizer(model, params, batches, 1e-2, 1e-4, n_batches=2)
    expected = rgn_weights(model, params, batches, ft_core.cross_entropy, n_batches=2)
    assert weights == pytest.approx(expected)
    assert max(weights.values()) == pytest.approx(1.0)
    by_name = {g["name"]: g for g in opt.param_groups}
    for name, w in weights.items():
        if w > 0:
            assert by_name[name]["lr"] == pytest.approx(1e-2 * w)
            assert by_name[name]["weight_decay"] == 1e-4
    assert all(p.grad is None for _, p in params)


def test_auto_options_run(random_model):
    pretrained = {k: v.clone() for k, v in random_model.state_dict().items()}
    rgn = finetune_cell(random_model, pretrained, "auto-rgn", synthetic_data(), section(epochs=2), seed=0)
    assert set(rgn["rgn_block_weights"]) == {"input", "block1", "block2", "block3", "head"}
    assert max(rgn["rgn_block_weights_epoch1"].values()) <= 1.0
    snr = finetune_cell(random_model, pretrained, "auto-snr", synthetic_data(), section(snr_threshold=0.5), seed=0)
    n_all = len(list(random_model.parameters()))
    assert 0 < snr["n_tensors"] == n_all - len(snr["snr_frozen"])
    assert all(snr["snr_scores"][n] < 0.5 for n in snr["snr_frozen"])


# ----------------------------------------------------------------------------------------------- data and runs


def test_generated_target_equals_make_cifar10c(data_root, tmp_path):
    from tta_surgical.data.cifar import load_cifar10c
    from tta_surgical.data.make_cifar10c import make_cifar10c

    make_cifar10c(
        data_root, tmp_path, corruptions=["gaussian_noise"], severities=[5], limit=200, batch_size=100, progress=False
    )
    ref, ref_labels = load_cifar10c(tmp_path, "gaussian_noise", 5)
    target = TargetData(tiny_cfg().finetune, data=data_root)
    idx = np.array([3, 150, 7, 199, 0])
    got = target.images("gaussian_noise", idx).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, ref[idx]) and np.array_equal(target.labels, ref_labels)


def test_run_writes_results_summary_and_resumes(data_root, tmp_path, monkeypatch):
    cfg = tiny_cfg("finetune.options=[block1,auto-rgn]")
    calls = []
    real = ft_core.finetune_cell

    def counting(model, pretrained, option, data, sec, seed, **kw):
        calls.append(option)
        return real(model, pretrained, option, data, sec, seed, **kw)

    monkeypatch.setattr(ft_core, "finetune_cell", counting)
    out = tmp_path / "ft"
    summary = run_finetune(cfg, out, data=data_root)
    assert len(calls) == 4
    recs = read_results(out / "results.jsonl")
    assert [(r["corruption"], r["option"]) for r in recs] == [
        ("gaussian_noise", "block1"),
        ("gaussian_noise", "auto-rgn"),
        ("contrast", "block1"),
        ("contrast", "auto-rgn"),
    ]
    for r in recs:
        assert r["split"] == {"train": 20, "val": 10, "test": 20, "train_used": 20}
        assert {"lr", "best_epoch", "val_acc", "test_acc", "tuned_params", "wall_s", "n_skipped"} <= set(r)
    assert set(summary["accuracy"]) == {"block1", "auto-rgn"} and set(summary["rank"]) == {"block1", "auto-rgn"}
    assert json.loads((out / "summary.json").read_text())["mean_accuracy"] == summary["mean_accuracy"]
    md = (out / "summary.md").read_text()
    assert "| gaussian_noise |" in md and "**rank**" in md and "auto-RGN per-block weights" in md

    with pytest.raises(FileExistsError, match="--resume"):
        run_finetune(cfg, out, data=data_root)
    # A crash after two cells, mid-way through writing the third line:
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    calls.clear()
    resumed = run_finetune(cfg, out, data=data_root, resume=True)
    assert calls == ["block1", "auto-rgn"]  # only the contrast cells are redone
    assert len(read_results(out / "results.jsonl")) == 4
    assert resumed["accuracy"] == summary["accuracy"]  # deterministic on CPU
    calls.clear()
    run_finetune(cfg, out, data=data_root, resume=True)
    assert calls == []
    with pytest.raises(ValueError, match="config differs"):
        run_finetune(
            tiny_cfg("finetune.options=[block1,auto-rgn]", "finetune.epochs=2"), out, data=data_root, resume=True
        )


def test_finetune_command_main(data_root, tmp_path):
    from tta_surgical.commands import finetune as cmd

    parser = argparse.ArgumentParser()
    cmd.configure(parser)
    args = parser.parse_args(
        [
            "--config",
            str(REPO / "configs" / "finetune_cifar10c.yaml"),
            "--data-root",
            str(data_root),
            "--out",
            str(tmp_path / "cli"),
            "--device",
            "cpu",
            "--no-progress",
            *TINY,
            "finetune.options=[head]",
            "finetune.corruptions=[brightness]",
        ]
    )
    assert cmd.main(args) == 0
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert list(summary["accuracy"]["head"]) == ["brightness"]
