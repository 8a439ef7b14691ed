"""SAR: its update against the paper's equations computed by hand, the moving average, model recovery, settings."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _toy_methods import N_CLASSES, TwoConvNet, entropy, reference_forward, uniform_images
from _toy_methods import PLAIN_SGD as SGD
from _toy_methods import TWO_CONV_NORM as ADAPTED  # kind=norm on every block

from tta_surgical.config import ConfigError, OptimConfig, method_config
from tta_surgical.methods import build_method


def images(seed: int, n: int = 24) -> torch.Tensor:
    return uniform_images(seed, n)


def make(optim: OptimConfig = SGD, scale: float = 3.0, **settings):
    return build_method(TwoConvNet(7, scale), method_config("sar", **settings), optim)


def test_one_update_matches_the_papers_equations():
    """Eq. (2) filter, Eq. (4) perturbation e = rho g / ||g||, the second filter at theta + e, Eq. (5) step."""
    rho, e_margin = 0.05, 0.4  # the defaults
    method = make(rho=rho, e_margin=e_margin, e_m=0.0)
    theta = {k: v.detach().clone() for k, v in method.model.named_parameters()}
    x = images(0)

    # By hand: first pass and its reliable samples.
    e0 = e_margin * math.log(N_CLASSES)
    adapted = {k: theta[k].clone().requires_grad_(True) for k in ADAPTED}
    logits = reference_forward({**theta, **adapted}, x)
    h1 = entropy(logits)
    keep1 = h1.detach() < e0
    loss1 = h1[keep1].mean()
    grads = torch.autograd.grad(loss1, [adapted[k] for k in ADAPTED])
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    # Perturbed point, second pass, second filter (among the first pass's kept samples).
    perturbed = {k: (theta[k] + rho * g / norm).requires_grad_(True) for k, g in zip(ADAPTED, grads)}
    h2 = entropy(reference_forward({**theta, **perturbed}, x))
    keep2 = keep1 & (h2.detach() < e0)
    loss2 = h2[keep2].mean()
    grads2 = torch.autograd.grad(loss2, [perturbed[k] for k in ADAPTED])
    expected = {k: theta[k] - SGD.lr * g for k, g in zip(ADAPTED, grads2)}
    # The data exercise both filters: some samples dropped by the first, more by the second.
    assert 0 < int(keep2.sum()) < int(keep1.sum()) < x.shape[0]

    out = method.step(x)
    torch.testing.assert_close(out, logits.detach(), rtol=1e-5, atol=1e-5)  # the prediction: before the update
    params = dict(method.model.named_parameters())
    for k in ADAPTED:
        torch.testing.assert_close(params[k].detach(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in theta:
        if k not in ADAPTED:
            assert torch.equal(params[k].detach(), theta[k]), k
    assert method.n_filtered == x.shape[0] - int(keep1.sum()) and method.last.n_filtered == method.n_filtered
    assert method.last.loss == pytest.approx(float(loss1.detach()), rel=1e-5)
    assert method.ema == pytest.approx(float(loss2.detach()), rel=1e-5)  # the first moving-average value is taken as is
    assert method.n_updates == 1 and method.n_method_resets == 0


def record_second_losses(method) -> list[float]:
    """Wrap `method.update` to record the second-pass loss of every update that happened."""
    seen: list[float] = []
    update = method.update

    def spy(*args, **kwargs):
        result = update(*args, **kwargs)
        if result.updated:
            seen.append(result.second_loss)
        return result

    method.update = spy
    return seen


def test_moving_average_of_the_second_pass_loss():
    method = make(OptimConfig(lr=1e-3), e_m=0.0)
    seen = record_second_losses(method)
    expected = None
    for s in range(4):
        method.step(images(s))
        expected = seen[-1] if expected is None else 0.9 * expected + 0.1 * seen[-1]
        assert method.ema == pytest.approx(expected, rel=1e-12)
    assert len(seen) == 4


def test_recovery_restores_model_optimizer_and_moving_average():
    method = make(OptimConfig(lr=1e-3), e_m=0.0)
    initial = {k: v.clone() for k, v in method.model.state_dict().items()}
    method.step(images(0))
    first_ema = method.ema
    assert first_ema is not None and method.optimizer.state  # it adapted, Adam has moments

    # Raise e_m above the moving average: the next update triggers recovery (settings are frozen: swap them).
    method.cfg = method_config("sar", e_m=10.0)
    method.step(images(1))
    assert method.n_method_resets == 1 and method.method_resets_by_kind == {"recovery": 1}
    assert method.last.method_reset == "recovery"
    assert method.ema is None and not method.optimizer.state
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, initial[k]), k
    assert method.n_resets == 0  # a method reset is not an engine reset

    # After recovery the moving average restarts from the next loss as is.
    method.cfg = method_config("sar", e_m=0.0)
    seen = record_second_losses(method)
    method.step(images(2))
    assert method.ema == pytest.approx(seen[-1], rel=1e-12) and method.last.method_reset is None


def test_batch_with_no_reliable_sample_changes_nothing():
    method = make(OptimConfig(lr=1e-3), scale=0.01, e_m=0.0)  # near-uniform predictions: every entropy ~ ln C
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    method.step(images(0))
    assert method.n_filtered == 24 and method.n_updates == 0 and method.n_skipped == 0
    assert method.last.loss is None and method.ema is None and not method.optimizer.state
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_across_recoveries_equals_uninterrupted():
    """With the default e_m this confident net recovers at some batches: a resumed run still replays exactly."""

    def fresh():
        return make(OptimConfig(lr=1e-2), scale=6.0)

    full = fresh()
    expected = [full.step(images(s)) for s in range(6)]
    assert full.n_method_resets >= 1
    first = fresh()
    for s in range(3):
        first.step(images(s))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = fresh()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for s in range(3, 6):
        assert torch.equal(resumed.step(images(s)), expected[s]), f"batch {s}"
    assert resumed.ema == full.ema and resumed.n_method_resets == full.n_method_resets


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("e_margin", 0.0),
        ("e_margin", 1.5),
        ("rho", 0.0),
        ("rho", float("inf")),
        ("e_m", -0.1),
        ("e_m", float("nan")),
        ("ema_momentum", 1.0),
        ("ema_momentum", -0.1),
        ("kind", "bn"),
    ],
)
def test_settings_are_validated(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        method_config("sar", **{key: value})


def test_defaults_are_the_authors():
    cfg = method_config("sar")
    assert (cfg.blocks, cfg.kind, cfg.e_margin, cfg.rho, cfg.e_m, cfg.ema_momentum) == (
        ("all",),
        "norm",
        0.4,
        0.05,
        0.2,
        0.9,
    )
