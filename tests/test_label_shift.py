"""`method.blocks: auto` under label shift: the overdispersion signal (`signals.overdispersion`), the running target
statistics (`bn.TargetStats`, `set_bn_stats` "ema") and the selector's switch to them, on tiny models and streams.

Few-class batches: each holds 3 of the tiny model's 5 classes (a different 3 each time), under a covariate shift
(pixel noise) that `auto` adapts to; i.i.d. batches hold all classes in the same shift.
"""

from __future__ import annotations

import copy
import io
import statistics

import pytest
import torch
from test_selection import N_CLASSES, PROTOTYPES, make, source_net
from torch import nn

from tta_surgical.methods import selection, signals
from tta_surgical.methods.bn import TargetStats, batchnorm_layers, set_bn_stats


def noisy(seed: int, n: int = 64, classes: int = N_CLASSES) -> torch.Tensor:
    """A shifted batch (pixel noise) holding `classes` random classes (all of them: an i.i.d. batch)."""
    g = torch.Generator().manual_seed(3000 + seed)
    labels = torch.randperm(N_CLASSES, generator=g)[:classes]
    y = labels[torch.randint(0, classes, (n,), generator=g)]
    x = (0.5 * PROTOTYPES[y] + 0.5 * torch.rand(n, 3, 8, 8, generator=g)).clamp(0, 1)
    return (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def few(seed: int, n: int = 64) -> torch.Tensor:
    return noisy(seed, n, classes=3)


def iid(seed: int, n: int = 64) -> torch.Tensor:
    return noisy(seed, n)


# ---------------------------------------------------------------------------------------------------- the signal


def test_overdispersion_is_the_mean_squared_difference_in_noise_units():
    a = signals.BatchMeans([torch.tensor([0.0, 1.0])], [torch.tensor([0.5, 0.5])])
    b = signals.BatchMeans([torch.tensor([1.0, 1.0])], [torch.tensor([0.5, 1.5])])
    assert float(signals.overdispersion(a, b)) == pytest.approx(0.5 * (1.0 / 1.0 + 0.0))
    two = signals.BatchMeans(a.means * 2, a.noise * 2), signals.BatchMeans([b.means[0], b.means[0] + 2], b.noise * 2)
    # geometric mean over layers: layer 1 gives 0.5, layer 2 (means [0, 1] vs [3, 3]) (3^2 / 1 + 2^2 / 2) / 2 = 5.5
    assert float(signals.overdispersion(*two)) == pytest.approx((0.5 * 5.5) ** 0.5, rel=1e-5)


def _pair_values(batches) -> list[float]:
    reference = signals.SourceReference(source_net(), selection._dispersion_layers)
    previous, values = None, []
    for x in batches:
        reference.probe(x)
        means = reference.stats.means()
        assert means is not None and len(means.means) == 1  # the tiny model's last stage: one BatchNorm layer
        if previous is not None:
            values.append(float(signals.overdispersion(previous, means)))
        previous = means
    return values


def test_overdispersion_separates_iid_from_few_class_batches():
    """The source copy's last-stage batch means of consecutive batches: about 1 noise unit apart for i.i.d. batches,
    several for few-class ones; the medians fall on either side of the policy's thresholds."""
    policy = selection.DEFAULT_POLICY
    iid_values = _pair_values(iid(s) for s in range(12))
    few_values = _pair_values(few(s) for s in range(12))
    assert statistics.median(iid_values) < policy.label_off < policy.label_on < statistics.median(few_values)
    assert statistics.median(few_values) > 4 * statistics.median(iid_values)


# ---------------------------------------------------------------------------------------------------- "ema"


def _layer(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def _expected(net: nn.Sequential, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    h = net[0](x)
    bn = net[1]
    y = (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    return y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def test_ema_statistics_follow_a_step_by_step_computation_and_restart():
    """Per armed step: w = max(momentum, 1/(n+1)), statistics (1-w) running + w batch (biased variance); a later
    forward in the same step and an unarmed forward read the same running values and write nothing; a restart
    makes the next batch normalise with its own statistics (as "batch" does)."""
    net = _layer()
    target = TargetStats(net, momentum=0.25)
    set_bn_stats(net, "ema", target=target)
    keys = set(net.state_dict())
    g = torch.Generator().manual_seed(0)
    run_mean = run_var = None
    n = 0
    for step in range(7):
        if step == 4:
            target.restart()
            n = 0
        x = torch.randn(8, 3, 6, 6, generator=g) * (1 + step) + step
        h = net[0](x).detach()
        var_b, mean_b = torch.var_mean(h, dim=(0, 2, 3), correction=0)
        w = max(0.25, 1.0 / (n + 1))
        mean = mean_b if n == 0 else (1 - w) * run_mean + w * mean_b
        var = var_b if n == 0 else (1 - w) * run_var + w * var_b
        target.arm()
        y = net(x)
        other = torch.randn(8, 3, 6, 6, generator=g)
        y_other = net(other)  # a second forward of the same step (an augmented view): same running values
        target.commit()
        assert torch.allclose(y, _expected(net, x, mean, var), atol=1e-5), step
        h_other = net[0](other).detach()
        var_o, mean_o = torch.var_mean(h_other, dim=(0, 2, 3), correction=0)
        ref_mean = mean_o if n == 0 else (1 - w) * run_mean + w * mean_o
        ref_var = var_o if n == 0 else (1 - w) * run_var + w * var_o
        assert torch.allclose(y_other, _expected(net, other, ref_mean, ref_var), atol=1e-5), step
        if step == 4:  # right after the restart: the batch's own statistics, as test-batch BatchNorm
            batch = copy.deepcopy(net)
            set_bn_stats(batch, "batch")
            assert torch.allclose(y, batch(x), atol=1e-5)
        run_mean, run_var, n = mean, var, n + 1
        assert int(target.counts[0]) == n
        assert torch.allclose(target.mean0, run_mean) and torch.allclose(target.var0, run_var)
    before = copy.deepcopy(target.state_dict())
    with torch.no_grad():
        net(torch.randn(8, 3, 6, 6, generator=g))  # a prediction outside a step writes nothing
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert set(net.state_dict()) == keys  # the running values live in the target, not in the layer


def test_ema_gradient_flows_through_the_batch_share_only():
    net = _layer(1)
    target = TargetStats(net, momentum=0.1)
    set_bn_stats(net, "ema", target=target)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):  # past the warm-up: w = momentum
        target.arm()
        net(torch.randn(8, 3, 6, 6, generator=g))
        target.commit()
    x = torch.randn(8, 3, 6, 6, generator=g)
    weight = torch.randn(8, 4, 4, 4, generator=g)
    (net(x) * weight).sum().backward()
    got = net[0].weight.grad.clone()
    net.zero_grad()
    h = net[0](x)
    var_b, mean_b = torch.var_mean(h, dim=(0, 2, 3), correction=0)
    mean = 0.9 * target.mean0 + 0.1 * mean_b  # the running part is a constant
    var = 0.9 * target.var0 + 0.1 * var_b
    (_expected(net, x, mean, var) * weight).sum().backward()
    assert torch.allclose(got, net[0].weight.grad, atol=1e-5)
    assert not target.mean0.requires_grad


def test_set_bn_stats_ema_needs_the_target_of_its_model_and_switches_back():
    net = _layer()
    with pytest.raises(ValueError, match="'ema' need the TargetStats built for this model"):
        set_bn_stats(net, "ema")
    with pytest.raises(ValueError, match="'ema' need the TargetStats"):
        set_bn_stats(net, "ema", target=TargetStats(source_net()))
    with pytest.raises(ValueError, match="must be one of batch, source, ema"):
        set_bn_stats(net, "running")
    set_bn_stats(net, "ema", target=TargetStats(net))
    set_bn_stats(net, "source")
    bn = batchnorm_layers(net)[0]
    assert "forward" not in bn.__dict__ and "_tta_target" not in bn.__dict__ and not bn.training


# ---------------------------------------------------------------------------------------------------- auto


def _run(method, batches) -> list[str]:
    out = []
    for x in batches:
        method.step(x)
        out.append(method.last.bn_stats)
    return out


def test_auto_switches_to_running_statistics_on_few_class_batches_only():
    few_stats = _run(make("eta"), [few(s) for s in range(24)])
    assert few_stats[0] == "batch" and few_stats[-1] == "ema" and "ema" in few_stats[:16]
    iid_method = make("eta")
    assert set(_run(iid_method, [iid(s) for s in range(24)])) == {"batch"}
    assert not iid_method.selection["label_shift"] and len(iid_method.selection["dispersion"]) >= 3


def test_rotta_keeps_its_own_statistics_under_label_shift():
    method = make("rotta")
    assert set(_run(method, [few(s) for s in range(20)])) <= {"robust", "source"}
    assert not hasattr(method, "target_stats")


def test_a_detected_domain_change_restarts_the_running_statistics(monkeypatch):
    method = make("eta")
    _run(method, [few(s) for s in range(20)])
    assert method.last.bn_stats == "ema"
    counts = method.target_stats["model"].counts
    assert int(counts.min()) > 4
    restarted = False
    for s in range(12):  # a different shift (brighter, less noise): the first probe on it sees a new domain
        method.step((few(100 + s) * 0.5 + 0.5).clamp(0, 1))
        if method.selection["changed"]:
            restarted = True
            assert method.last.bn_stats == "ema" and counts.tolist() == [1] * len(counts)
    assert restarted


def test_running_statistics_resume_and_reset_exactly():
    """A checkpoint taken while auto uses running statistics: resuming equals the uninterrupted run (the running
    values are method state), and reset replays the stream exactly."""
    batches = [few(s) for s in range(26)]
    full = make("eta")
    for x in batches[:20]:
        full.step(x)
    assert full.last.bn_stats == "ema" and "target_stats" in full.state_dict()["state"]
    buffer = io.BytesIO()
    torch.save(full.state_dict(), buffer)
    expected = [(full.step(x), full.last.bn_stats) for x in batches[20:]]
    resumed = make("eta")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for x, (logits, bn) in zip(batches[20:], expected):
        assert torch.equal(resumed.step(x), logits) and resumed.last.bn_stats == bn
    full.reset()
    assert int(full.target_stats["model"].counts.max()) == 0 and not full.selection["label_shift"]
    fresh = make("eta")
    replay = [fresh.step(x) for x in batches]
    assert all(torch.equal(full.step(x), y) for x, y in zip(batches, replay))
