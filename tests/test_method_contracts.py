"""Contracts every registered online method must meet, on a tiny BatchNorm CNN and a tiny stream.

The tests are generated from `METHODS`, so a new method module gets all of them without touching this file.
`TINY` may give a method settings that fit the tiny model (smaller memory banks, fewer augmentations); it must
not switch a contract off.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _toy_methods import N_CLASSES, TinyNet

from tta_surgical.config import OptimConfig, method_config
from tta_surgical.methods import METHODS, MethodContext, build_method
from tta_surgical.models import select_params

# Settings that fit the tiny model and stream (8x8 images, 5 classes, batches of 16).
TINY: dict[str, dict] = {
    "cotta": {"n_augmentations": 4, "ap": 1.0},  # the confident tiny head never falls below 0.92: always augment
    "memo": {"n_augmentations": 4},
    "rotta": {"memory_size": 10, "update_every": 16},
    # The tiny model predicts nearly the same class for every image, so at the default d_margin 0.4 every batch after
    # the first would be redundant; 0.999 keeps both of EATA's filters active while later batches still update.
    "eata": {"fisher_samples": 32, "d_margin": 0.999},
    "eta": {"d_margin": 0.999},
    # A random tiny net barely reacts to patch shuffling (PLPD ~ +-0.1): threshold 0 still filters about half.
    "deyo": {"plpd_threshold": 0.0},
    # The tiny net is so confident (entropy ~0.17 < e_m 0.2) that SAR would recover at every batch; recovery is
    # checked in tests/test_method_sar.py.
    "sar": {"e_m": 0.05},
}


def net(seed: int) -> TinyNet:
    """conv-bn stem, two conv-bn stages, a confident linear head (so entropy filters keep samples)."""
    return TinyNet(seed, 6.0, deep=True, bn_weights=True)


def batch(seed: int, n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=g) * 1.2 + 0.1).clamp(0, 1)


def source_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


CONTEXT = MethodContext(seed=0, source_images=source_images, source_note="random test images")


def make(name: str, seed: int = 0, context: MethodContext = CONTEXT, **settings):
    cfg = method_config(name, **{**TINY.get(name, {}), **settings})
    return build_method(net(seed), cfg, OptimConfig(lr=5e-3), context=context)


def snapshot(method) -> dict:
    """Every registered state of the method, deep-copied, in the checkpoint's form."""
    return copy.deepcopy(method.state_dict()["state"])


def assert_equal(a, b, where: str = "state") -> None:
    """Exact equality of nested state (tensors bitwise)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


ALL = METHODS.names()
ADAPTING = [n for n in ALL if METHODS.get(n).adapts]


@pytest.mark.parametrize("name", ALL)
def test_step_gives_finite_logits_and_counts(name):
    method = make(name)
    for s in range(3):
        logits = method.step(batch(s))
        assert logits.shape == (16, N_CLASSES) and torch.isfinite(logits).all()
    assert method.n_steps == 3 and method.n_skipped == 0


@pytest.mark.parametrize("name", ADAPTING)
def test_adapting_methods_report_a_finite_loss_and_update(name):
    method = make(name)
    losses = []
    for s in range(4):
        method.step(batch(s))
        losses.append(method.last.loss)
    assert method.n_updates >= 1, "no update in 4 batches of 16"
    assert any(v is not None for v in losses) and all(v is None or math.isfinite(v) for v in losses)


@pytest.mark.parametrize("name", ADAPTING)
def test_frozen_parameters_bit_identical_and_only_selection_changes(name):
    """blocks=[block1], kind=all: exactly block1's tensors may change; frozen ones stay bit-identical."""
    method = make(name, blocks=("block1",), kind="all")
    model = method.model
    selected = {n for n, _ in select_params(model, ["block1"], "all")}
    assert {n for n, _ in method.params()} == selected
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for s in range(4):
        method.step(batch(s))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    params = {n for n, _ in model.named_parameters()}
    assert changed & params == selected, f"changed {sorted(changed & params)}"
    buffers = {k for k in before if k not in params}
    if not METHODS.get(name).updates_norm_statistics:
        assert not changed & buffers, f"buffers changed: {sorted(changed & buffers)}"  # source statistics stay


@pytest.mark.parametrize("name", ADAPTING)
def test_default_selection_is_the_settings_selection(name):
    method = make(name)
    cfg = method.cfg
    assert {n for n, _ in method.params()} == {n for n, _ in select_params(method.model, cfg.blocks, cfg.kind)}
    for n, p in method.model.named_parameters():
        assert p.requires_grad == (n in dict(method.params())), n


@pytest.mark.parametrize("name", ALL)
def test_reset_restores_everything_and_replays_exactly(name):
    method = make(name)
    initial = snapshot(method)
    first = [method.step(batch(s)) for s in range(3)]
    method.reset()
    assert_equal(snapshot(method), initial)
    assert method.n_resets == 1
    for s in range(3):
        assert torch.equal(method.step(batch(s)), first[s]), f"batch {s} differs after reset"


@pytest.mark.parametrize("name", ALL)
def test_resume_from_checkpoint_equals_uninterrupted(name):
    full = make(name)
    for s in range(2):
        full.step(batch(s))
    buffer = io.BytesIO()
    torch.save(full.state_dict(), buffer)  # what the engine writes; must load weights-only
    expected = [full.step(batch(s)) for s in (2, 3, 4)]
    resumed = make(name)  # a fresh process: the source model, then the checkpoint
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for s, e in zip((2, 3, 4), expected):
        assert torch.equal(resumed.step(batch(s)), e), f"batch {s} differs after resume"
    assert_equal(snapshot(resumed), snapshot(full))
    assert {c: getattr(resumed, c) for c in ("n_steps", "n_updates", "n_filtered")} == {
        c: getattr(full, c) for c in ("n_steps", "n_updates", "n_filtered")
    }


@pytest.mark.parametrize("name", ALL)
def test_nan_batch_changes_no_state(name):
    method = make(name)
    method.step(batch(0))
    state = snapshot(method)
    x = batch(1)
    x[2, 1, 3, 3] = float("nan")
    method.step(x)
    assert_equal(snapshot(method), state)
    if METHODS.get(name).adapts:
        assert method.n_skipped == 1 and method.last.skipped
    assert torch.isfinite(method.step(batch(2))).all()  # and the run goes on


@pytest.mark.parametrize("name", ALL)
def test_predict_has_no_side_effects(name):
    method = make(name)
    method.step(batch(0))
    state = snapshot(method)
    a, b = method.predict(batch(5)), method.predict(batch(5))
    assert torch.equal(a, b)
    assert_equal(snapshot(method), state)
    assert all(p.grad is None for _, p in method.params())


@pytest.mark.parametrize("name", ALL)
def test_same_seed_reproduces_a_run(name):
    def run():
        method = make(name)
        return [method.step(batch(s)) for s in range(3)], snapshot(method)

    (a, sa), (b, sb) = run(), run()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert_equal(sa, sb)


@pytest.mark.parametrize("name", ALL)
def test_settings_round_trip_and_reject_unknown_keys(name):
    from tta_surgical.config import ConfigError

    cfg = method_config(name)
    assert cfg.name == name and isinstance(cfg, METHODS.get(name).Settings)
    with pytest.raises(ConfigError, match=f"valid keys in section 'method' for method '{name}'"):
        method_config(name, no_such_setting=1)
