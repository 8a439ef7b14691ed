"""auto-RGN / auto-SNR (tta_surgical.autotune) against direct autograd computations on a tiny CNN, and the online
auto-RGN weighting of the entropy methods (per-group learning rates, refresh schedule, reset, engine run)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tta_surgical import autotune
from tta_surgical.autotune import (
    block_weight_table,
    relative_grad_norms,
    rgn_weights,
    snr_mask,
    snr_scores,
    weighted_param_groups,
)
from tta_surgical.config import ConfigError, OptimConfig, load_config, method_config
from tta_surgical.methods import build_method, entropy
from tta_surgical.models import BlockSpec, block_map, block_names, create_model, select_params

REPO = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    """conv-bn stem, one conv stage, linear head; non-trivial BN statistics and affines."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 5)
        self.bn1.running_mean.uniform_(-0.3, 0.3)
        self.bn1.running_var.uniform_(0.5, 2.0)
        self.bn1.weight.data.uniform_(0.5, 1.5)
        self.bn1.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layer1(x).mean((2, 3)))

    def block_spec(self) -> BlockSpec:
        groups = (("input", ("conv1", "bn1")), ("block1", ("layer1",)), ("head", ("fc",)))
        return BlockSpec(groups, groups)


def data(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) * 1.5 + 0.2, torch.randint(0, 5, (n,), generator=g)


def ce(logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def ent(logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return entropy(logits)


def hand_rgn(model: nn.Module, batches, loss_fn) -> dict[str, float]:
    """||g|| / ||theta|| per tensor with plain backward(), averaged over the batches."""
    sums = {n: 0.0 for n, _ in model.named_parameters()}
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        for n, p in model.named_parameters():
            sums[n] += (p.grad.norm() / p.detach().norm()).item()
    model.zero_grad(set_to_none=True)
    return {n: s / len(batches) for n, s in sums.items()}


# ------------------------------------------------------------------------------------------------------ auto-RGN


def test_rgn_weights_equal_direct_computation():
    model = TinyNet().eval()
    params = list(model.named_parameters())
    batches = [data(s) for s in (1, 2, 3)]
    expected_raw = hand_rgn(copy.deepcopy(model), batches, ce)
    raw = relative_grad_norms(model, params, batches, ce)
    weights = rgn_weights(model, params, batches, ce)
    top = max(expected_raw.values())
    assert list(weights) == [n for n, _ in params]
    for n in expected_raw:
        assert raw[n] == pytest.approx(expected_raw[n], rel=1e-5)
        assert weights[n] == pytest.approx(expected_raw[n] / top, rel=1e-5)
    assert max(weights.values()) == 1.0  # exactly: the max divided by itself
    assert all(0.0 < w <= 1.0 for w in weights.values())
    # only the first n_batches batches count
    assert rgn_weights(model, params, batches + [data(9)], ce, n_batches=3) == weights
    assert rgn_weights(model, params, batches, ce, n_batches=1) == pytest.approx(
        {n: v / max(hand_rgn(model, batches[:1], ce).values()) for n, v in hand_rgn(model, batches[:1], ce).items()},
        rel=1e-5,
    )


def test_rgn_has_no_side_effects():
    """.grad, requires_grad flags and BN running statistics (model in train mode) are as before."""
    model = TinyNet().train()
    params = list(model.named_parameters())
    sentinel = {n: torch.full_like(p, 7.0) for n, p in params}
    for n, p in params:
        p.grad = sentinel[n].clone()
    model.fc.bias.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    w = rgn_weights(model, params, [data(1), data(2)], ce)
    assert w["fc.bias"] > 0  # measured even though it was frozen
    assert not model.fc.bias.requires_grad and model.fc.weight.requires_grad
    for n, p in params:
        assert torch.equal(p.grad, sentinel[n]), n
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_rgn_include_norm_false_and_zero_norm_tensor():
    model = TinyNet().eval()
    with torch.no_grad():
        model.layer1[0].bias.zero_()  # ||theta|| = 0: relative gradient undefined -> weight 0
    params = list(model.named_parameters())
    batches = [data(4), data(5)]
    raw = relative_grad_norms(model, params, batches, ce, include_norm=False)
    assert set(raw) == {n for n, _ in params} - {"bn1.weight", "bn1.bias"}
    weights = rgn_weights(model, params, batches, ce, include_norm=False)
    assert weights["bn1.weight"] == weights["bn1.bias"] == 0.0
    assert weights["layer1.0.bias"] == 0.0
    expected = hand_rgn(copy.deepcopy(model), batches, ce)
    top = max(v for n, v in expected.items() if not n.startswith("bn1") and math.isfinite(v))
    for n in ("conv1.weight", "layer1.0.weight", "fc.weight", "fc.bias"):
        assert weights[n] == pytest.approx(expected[n] / top, rel=1e-5)
    assert max(weights.values()) == 1.0


def test_rgn_errors():
    model = TinyNet().eval()
    params = list(model.named_parameters())
    with pytest.raises(ValueError, match="no batches"):
        rgn_weights(model, params, [], ce)
    with pytest.raises(ValueError, match="no parameters"):
        rgn_weights(model, [], [data(1)], ce)
    x, y = data(1)
    with pytest.raises(FloatingPointError, match="non-finite"):
        rgn_weights(model, params, [(x * float("nan"), y)], ce)


def test_weighted_param_groups():
    model = TinyNet()
    params = list(model.named_parameters())
    weights = {
        "conv1.weight": 1.0,
        "bn1.weight": 0.5,
        "bn1.bias": 0.0,
        "layer1.0.weight": 0.25,
        "layer1.0.bias": 0.1,
        "fc.weight": 0.05,
        "fc.bias": 0.2,
    }
    assert list(weights) == [n for n, _ in params]
    groups = weighted_param_groups(params, weights, base_lr=1e-2, weight_decay=1e-4, min_weight=0.06)
    assert [g["name"] for g in groups] == ["conv1.weight", "bn1.weight", "layer1.0.weight", "layer1.0.bias", "fc.bias"]
    for g in groups:
        assert g["lr"] == pytest.approx(1e-2 * weights[g["name"]])
        assert g["weight_decay"] == 1e-4 and len(g["params"]) == 1
        assert g["params"][0] is dict(params)[g["name"]]
    opt = torch.optim.Adam(groups, lr=1.0)
    assert [pg["lr"] for pg in opt.param_groups] == [g["lr"] for g in groups]
    assert len(weighted_param_groups(params, weights, 1e-3)) == 6  # default min_weight 0 drops only w == 0
    assert snr_mask({"a": 1.0}) == {"a": True}
    assert weighted_param_groups(params[:1], {"conv1.weight": True}, 1e-3)[0]["lr"] == 1e-3  # a mask works too
    with pytest.raises(ValueError, match="no weight for 1 tensor"):
        weighted_param_groups(params, {k: v for k, v in weights.items() if k != "fc.bias"}, 1e-3)
    with pytest.raises(ValueError, match="finite number >= 0"):
        weighted_param_groups(params, {**weights, "fc.bias": float("nan")}, 1e-3)


# ------------------------------------------------------------------------------------------------------ auto-SNR


def loop_snr(model: nn.Module, params, x, y) -> dict[str, float]:
    """One backward per example (eval mode), per-element mean^2 / unbiased var, mean over elements, / max."""
    model = copy.deepcopy(model).eval()
    names = [n for n, _ in params]
    per = {n: [] for n in names}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            if n in per:
                per[n].append(p.grad.detach().double().clone())
    raw = {}
    for n in names:
        g = torch.stack(per[n])
        mean, var = g.mean(0), g.var(0, unbiased=True)
        raw[n] = torch.where(var > 0, mean**2 / var, torch.zeros_like(var)).mean().item()
    top = max(raw.values())
    return {n: v / top for n, v in raw.items()}


def test_snr_scores_equal_per_example_loop():
    model = TinyNet().train()  # snr_scores must switch to eval (BN source statistics) and restore the mode
    params = list(model.named_parameters())
    x, y = data(7, n=7)
    expected = loop_snr(model, params, x, y)
    for chunk in (3, 64):  # uneven chunks exercise the moment merge
        scores = snr_scores(model, params, x, y, chunk=chunk)
        assert list(scores) == list(expected)
        for n in expected:
            assert scores[n] == pytest.approx(expected[n], abs=1e-5), (chunk, n)
    assert max(scores.values()) == 1.0 and min(scores.values()) >= 0.0
    assert model.training and model.bn1.training
    # without norm tensors: left out, the rest renormalised among themselves
    sub = snr_scores(model, params, x, y, include_norm=False)
    assert set(sub) == set(expected) - {"bn1.weight", "bn1.bias"} and max(sub.values()) == 1.0
    with pytest.raises(ValueError, match="at least 2 examples"):
        snr_scores(model, params, x[:1], y[:1])


def test_snr_mask_threshold():
    scores = {"a": 1.0, "b": 0.5, "c": 0.4999, "d": 0.0}
    assert snr_mask(scores) == {"a": True, "b": True, "c": False, "d": False}
    assert snr_mask(scores, threshold=0.0) == dict.fromkeys(scores, True)
    assert snr_mask(scores, threshold=1.0) == {"a": True, "b": False, "c": False, "d": False}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        snr_mask(scores, threshold=0.95 * 2)


# ------------------------------------------------------------------------------------------------------ reporting


def test_block_weight_table_on_resnet20():
    model, _ = create_model("resnet20", pretrained=False)
    names = [n for n, _ in model.named_parameters()]
    weights = {n: (i % 7) / 6 for i, n in enumerate(names)}
    table = block_weight_table(model, weights)
    assert list(table) == block_names(model)  # every block, in model order
    for block, members in block_map(model).items():
        assert table[block] == pytest.approx(sum(weights[n] for n in members) / len(members))
    partial = block_weight_table(model, {n: 1.0 for n in block_map(model)["block2"]})
    assert partial["block2"] == 1.0 and partial["input"] == partial["head"] == 0.0
    with pytest.raises(ValueError, match="not parameters"):
        block_weight_table(model, {"layer9.weight": 1.0})


def test_block_weight_table_from_rgn_on_resnet20():
    model, _ = create_model("resnet20", pretrained=False)
    model.eval()
    params = select_params(model, "all", "all")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    weights = rgn_weights(model, params, [(x, y)], ce)
    table = block_weight_table(model, weights)
    assert list(table) == block_names(model)
    assert all(0.0 <= v <= 1.0 for v in table.values()) and max(weights.values()) == 1.0


# ------------------------------------------------------------------------------------------------------ online


def autorgn(model: nn.Module, every: int = 3, **kw) -> object:
    cfg = method_config("surgical", kind="all", weighting="auto-rgn", weighting_every=every, **kw)
    return build_method(model, cfg, OptimConfig(lr=1e-2))


def test_online_lrs_are_rgn_weights_of_the_entropy_gradient():
    model = TinyNet()
    method = autorgn(model, blocks=("input", "head"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("layer1")}
    reference = copy.deepcopy(model)  # configured: BN on test-batch statistics, same modes
    ref_params = [(n, p) for n, p in reference.named_parameters() if n in dict(method.params())]
    x, _ = data(11, n=8)
    expected = rgn_weights(reference, ref_params, [(x, None)], ent)
    assert max(expected.values()) == 1.0 and min(expected.values()) < 0.5  # a non-trivial weighting

    method.step(x)
    groups = method.optimizer.param_groups
    assert [g["name"] for g in groups] == [n for n, _ in method.params()]
    for g in groups:
        assert g["lr"] == pytest.approx(1e-2 * expected[g["name"]], rel=1e-5)
    assert method.weights == pytest.approx(expected, rel=1e-5)
    # the update itself is Adam with those per-tensor learning rates on the entropy of the batch
    opt = torch.optim.Adam(weighted_param_groups(ref_params, expected, 1e-2))
    opt.zero_grad()
    entropy(reference(x)).backward()
    opt.step()
    for (n, p), (_, q) in zip(method.params(), ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_online_refresh_schedule_adam_state_and_reset(monkeypatch):
    model = TinyNet()
    method = autorgn(model, every=3)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    optim0 = copy.deepcopy(method.optimizer.state_dict())
    assert all(g["lr"] == 1e-2 for g in optim0["param_groups"])

    calls = []
    real = autotune.rgn_weights_from_grads

    def spy(params, grads):
        calls.append(method.n_steps)  # batches before this one (n_steps counts finished steps)
        return real(params, grads)

    monkeypatch.setattr("tta_surgical.methods.entropy_min.rgn_weights_from_grads", spy)
    lrs = []
    for i in range(7):
        method.step(data(20 + i)[0])
        lrs.append([g["lr"] for g in method.optimizer.param_groups])
    assert calls == [0, 3, 6]  # first batch, then every 3 batches
    assert lrs[1] == lrs[0] and lrs[2] == lrs[0] and lrs[3] != lrs[2]
    # refreshing changes the learning rates in place: Adam's state persists (7 steps counted, not 1)
    steps = {int(s["step"]) for s in method.optimizer.state.values()}
    assert steps == {7}

    method.reset()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state0[k]), k
    restored = method.optimizer.state_dict()
    assert restored["state"] == {} and restored["param_groups"] == optim0["param_groups"]
    method.step(data(40)[0])
    assert calls == [0, 3, 6, 7]  # the first batch after a reset refreshes again


def test_online_state_dict_roundtrip_resumes_the_schedule():
    a = autorgn(TinyNet(), every=2)
    for i in range(3):
        a.step(data(50 + i)[0])
    b = autorgn(TinyNet(seed=5), every=2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for i in range(3):  # batch 3 (no refresh), batch 4 (refresh), batch 5
        x = data(60 + i)[0]
        torch.testing.assert_close(a.step(x), b.step(x), rtol=0, atol=0)
    assert [g["lr"] for g in a.optimizer.param_groups] == [g["lr"] for g in b.optimizer.param_groups]
    for (n, p), (_, q) in zip(a.params(), b.params()):
        assert torch.equal(p, q), n


def test_online_tent_with_auto_rgn_weights_norm_tensors_only():
    model = TinyNet()
    method = build_method(model, method_config("tent", weighting="auto-rgn"), OptimConfig(lr=1e-3))
    method.step(data(3)[0])
    assert [g["name"] for g in method.optimizer.param_groups] == ["bn1.weight", "bn1.bias"]
    assert max(g["lr"] for g in method.optimizer.param_groups) == 1e-3


def test_weighting_config_validation():
    assert method_config("surgical", weighting="auto-rgn").weighting_every == 50
    with pytest.raises(ConfigError, match="none, auto-rgn"):
        method_config("surgical", weighting="auto-snr")
    with pytest.raises(ConfigError, match="method.weighting; valid keys in section 'method' for method 'norm'"):
        method_config("norm", weighting="auto-rgn")
    with pytest.raises(ConfigError, match="weighting_every"):
        method_config("surgical", weighting="auto-rgn", weighting_every=0)
    cfg = load_config(REPO / "configs" / "surgical_autorgn.yaml")
    assert (cfg.method.name, cfg.method.blocks, cfg.method.kind, cfg.method.weighting) == (
        "surgical",
        ("all",),
        "all",
        "auto-rgn",
    )


def test_engine_runs_surgical_autorgn(tmp_path, data_root):
    from tta_surgical.corruptions import CORRUPTIONS
    from tta_surgical.engine import run

    if "gaussian_noise" not in CORRUPTIONS:
        pytest.skip("gaussian_noise not registered")
    cfg = load_config(
        REPO / "configs" / "surgical_autorgn.yaml",
        overrides=[
            "stream.domains=[gaussian_noise]",
            "stream.severities=[5]",
            "stream.n_examples=48",
            "stream.batch_size=16",
            "stream.reset=never",
            "runtime.device=cpu",
            "runtime.progress=false",
            "method.weighting_every=2",
        ],
    )
    summary = run(cfg, tmp_path / "autorgn", data=data_root)
    assert summary["n_images"] == 48 and summary["n_skipped_updates"] == 0
    assert math.isfinite(summary["mean_error"]) and 0.0 <= summary["mean_error"] <= 100.0
