"""Contracts of the online methods on a tiny BatchNorm CNN: what changes, what stays bit-identical, reset, guards."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tta_surgical.config import MethodSettings, OptimConfig, method_config
from tta_surgical.methods import METHODS, Method, build_method, entropy, set_bn_stats
from tta_surgical.methods.entropy_min import EntropyMinimization
from tta_surgical.models import BlockSpec, create_model, select_params

TENT = method_config("tent")


class TinyNet(nn.Module):
    """conv-bn stem, two conv-bn stages, linear head; random (non-trivial) BN running stats and affines."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))

    def block_spec(self) -> BlockSpec:
        groups = (("input", ("conv1", "bn1")), ("block1", ("layer1",)), ("block2", ("layer2",)), ("head", ("fc",)))
        return BlockSpec(groups, groups)


def batch(seed: int = 1, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) * 1.5 + 0.2  # shifted away from the "source" statistics


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_nested_equal(a, b, where="") -> None:
    """Exact equality of optimiser state dicts (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_registry_is_the_one_list_of_methods():
    assert {"source", "norm", "tent", "surgical"} <= set(METHODS.names())
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert issubclass(cls, Method) and issubclass(cls.Settings, MethodSettings)
        assert MethodSettings.variant(name) is cls.Settings and method_config(name).name == name
    assert issubclass(METHODS.get("tent"), EntropyMinimization)  # Tent is entropy minimisation with its defaults
    assert method_config("tent").kind == "norm" and method_config("surgical").kind == "all"


def test_entropy_values():
    assert entropy(torch.zeros(3, 10)).item() == pytest.approx(math.log(10), rel=1e-6)
    assert entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)
    logits = torch.randn(4, 6)
    p = logits.softmax(1)
    assert entropy(logits).item() == pytest.approx((-(p * p.log()).sum(1)).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="batch, classes"):
        entropy(torch.zeros(10))


@pytest.mark.parametrize(
    "blocks, kind",
    [(("block1",), "norm"), (("input", "block1"), "all"), (("head",), "all"), (("all",), "conv"), (("all",), "norm")],
)
def test_frozen_bit_identical_selected_changed(blocks, kind):
    model = TinyNet()
    before = clone_state(model)
    method = build_method(model, method_config("surgical", blocks=blocks, kind=kind), OptimConfig(lr=1e-2))
    selected = {n for n, _ in select_params(model, blocks, kind)}
    assert {n for n, _ in method.params()} == selected and selected
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in selected), n  # frozen ones cost autograd nothing
    method.step(batch())
    after = model.state_dict()
    for name, value in after.items():
        if name in selected:
            assert not torch.equal(value, before[name]), f"{name} should have adapted"
        else:
            assert torch.equal(value, before[name]), f"{name} should be bit-identical"


@pytest.mark.parametrize(
    "cfg",
    [
        TENT,
        method_config("norm"),
        method_config("norm", prior_strength=16.0),
        method_config("surgical", blocks=("block1", "head"), kind="all"),
        method_config("surgical", blocks=("input",), kind="all", bn_stats="source"),
        method_config("surgical", blocks=("all",), kind="norm", prior_strength=4.0),
        method_config("source"),
    ],
    ids=lambda c: "-".join(f"{v}" for v in vars(c).values()),
)
def test_running_stats_untouched(cfg):
    model = TinyNet()
    stats = bn_buffers(model)
    method = build_method(model, cfg, OptimConfig(lr=1e-2))
    for s in range(3):
        method.step(batch(s))
        method.predict(batch(10 + s))
    assert_states_equal(bn_buffers(model), stats)


def test_tent_returns_pre_update_prediction_with_batch_stats():
    model = TinyNet()
    reference = copy.deepcopy(model)
    x = batch()
    # manual Tent forward: BN normalises with the batch statistics, nothing else changes
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
    with torch.no_grad():
        expected = reference(x)
        source_pred = TinyNet().eval()(x)
    method = build_method(model, TENT, OptimConfig(lr=1e-2))
    out = method.step(x)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, source_pred, atol=1e-3)  # it really is not the source-statistics prediction
    assert not torch.allclose(method.predict(x), out, atol=1e-6)  # the update happened after the prediction
    assert method.n_updates == 1 and method.n_steps == 1


def test_predict_has_no_side_effects():
    model = TinyNet()
    method = build_method(model, TENT)
    method.step(batch(0))
    state, opt = clone_state(model), copy.deepcopy(method.optimizer.state_dict())
    a = method.predict(batch(1))
    b = method.predict(batch(1))
    assert torch.equal(a, b)
    assert_states_equal(clone_state(model), state)
    assert_nested_equal(method.optimizer.state_dict(), opt)
    assert all(p.grad is None for _, p in method.params())


@pytest.mark.parametrize("optim", [OptimConfig(name="adam", lr=1e-2), OptimConfig(name="sgd", lr=0.1, momentum=0.9)])
def test_reset_restores_model_and_optimizer_exactly(optim):
    model = TinyNet()
    method = build_method(model, method_config("surgical", blocks=("block1", "head"), kind="all"), optim)
    state0, opt0 = clone_state(model), copy.deepcopy(method.optimizer.state_dict())
    first = method.step(batch(0))
    first_next = method.step(batch(1))
    method.step(batch(2))
    assert method.optimizer.state_dict()["state"]  # momentum / Adam moments exist now
    method.reset()
    assert_states_equal(clone_state(model), state0)
    assert_nested_equal(method.optimizer.state_dict(), opt0)
    # and the run replays bit for bit from there (optimiser moments restarted too)
    assert torch.equal(method.step(batch(0)), first)
    assert torch.equal(method.step(batch(1)), first_next)


def test_same_seed_reproduces_exactly():
    def run():
        method = build_method(TinyNet(seed=5), method_config("surgical", blocks=("all",), kind="all"))
        return [method.step(batch(s)) for s in range(4)], clone_state(method.model)

    (outs_a, state_a), (outs_b, state_b) = run(), run()
    for a, b in zip(outs_a, outs_b):
        assert torch.equal(a, b)
    assert_states_equal(state_a, state_b)


@pytest.mark.parametrize("optim", [OptimConfig(name="adam", lr=1e-2), OptimConfig(name="sgd", lr=0.1)])
def test_nan_batch_skips_update(optim):
    model = TinyNet()
    method = build_method(model, TENT, optim)
    method.step(batch(0))
    state, opt = clone_state(model), copy.deepcopy(method.optimizer.state_dict())
    x = batch(1)
    x[3, 0, 2, 2] = float("nan")  # one bad pixel poisons the batch statistics of every BN layer
    method.step(x)
    assert method.n_skipped == 1 and method.n_updates == 1 and method.n_steps == 2
    assert_states_equal(clone_state(model), state)
    assert_nested_equal(method.optimizer.state_dict(), opt)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert torch.isfinite(method.step(batch(2))).all() and method.n_updates == 2  # and the run goes on


def test_non_finite_gradient_with_finite_loss_skips_update():
    model = TinyNet()
    method = build_method(model, TENT)
    state = clone_state(model)
    handle = model.bn1.weight.register_hook(lambda g: g * float("inf"))
    out = method.step(batch(0))
    handle.remove()
    assert torch.isfinite(out).all() and method.n_skipped == 1 and method.n_updates == 0
    assert_states_equal(clone_state(model), state)


def test_norm_prior_strength_matches_formula():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    pristine = copy.deepcopy(bn)
    model = nn.Sequential(bn)
    x = torch.randn(6, 3, 4, 4) * 2 + 0.7
    prior = 10.0
    n = x.shape[0]
    mu_b = x.mean((0, 2, 3))
    var_b = x.var((0, 2, 3), unbiased=False)
    w = prior / (prior + n)
    mu = w * bn.running_mean + (1 - w) * mu_b
    var = w * bn.running_var + (1 - w) * var_b
    expected = (x - mu[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    expected = expected * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    stats = bn_buffers(model)
    out = build_method(model, method_config("norm", prior_strength=prior)).step(x)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)
    assert_states_equal(bn_buffers(model), stats)
    # N = 0 is exactly training-mode BatchNorm; N -> infinity tends to the source (eval) output
    out0 = build_method(nn.Sequential(copy.deepcopy(pristine)), method_config("norm")).step(x)
    ref = copy.deepcopy(pristine).train()
    ref.track_running_stats = False
    with torch.no_grad():
        assert torch.equal(out0, ref(x))
        big = method_config("norm", prior_strength=1e9)
        out_inf = build_method(nn.Sequential(copy.deepcopy(pristine)), big).step(x)
        torch.testing.assert_close(out_inf, pristine.eval()(x), rtol=1e-4, atol=1e-4)


def test_norm_and_source_do_not_change_parameters_and_run_inference_mode():
    for name in ("norm", "source"):
        model = TinyNet()
        state = clone_state(model)
        method = build_method(model, method_config(name))
        out = method.step(batch())
        assert out.is_inference() and method.params() == [] and method.optimizer is None
        assert_states_equal(clone_state(model), state)
        assert not any(p.requires_grad for p in model.parameters())
    source = build_method(TinyNet(), method_config("source"))
    with torch.no_grad():
        assert torch.equal(source.step(batch()), TinyNet().eval()(batch()))


def test_surgical_all_norm_equals_tent():
    tent = build_method(TinyNet(), TENT, OptimConfig(lr=1e-2))
    cfg = method_config("surgical", blocks=("all",), kind="norm")
    surgical = build_method(TinyNet(), cfg, OptimConfig(lr=1e-2))
    for s in range(3):
        assert torch.equal(tent.step(batch(s)), surgical.step(batch(s)))
    assert_states_equal(clone_state(tent.model), clone_state(surgical.model))


def test_bn_stats_source_keeps_eval_normalisation():
    model = TinyNet()
    reference = TinyNet().eval()
    method = build_method(model, method_config("surgical", blocks=("head",), kind="all", bn_stats="source"))
    with torch.no_grad():  # step still adapts inside an outer no_grad (it enables grad itself)
        expected = reference(batch())
        assert torch.equal(method.step(batch()), expected)
    assert method.n_updates == 1


def test_multiple_steps_update_more_but_return_first_forward():
    one = build_method(TinyNet(), TENT, OptimConfig(lr=1e-2))
    three = build_method(TinyNet(), method_config("tent", steps=3), OptimConfig(lr=1e-2))
    assert torch.equal(one.step(batch()), three.step(batch()))
    assert three.n_updates == 3 and one.n_updates == 1
    assert not torch.equal(one.model.bn1.weight, three.model.bn1.weight)


@pytest.mark.parametrize("optim", [OptimConfig(name="adam", lr=5e-3), OptimConfig(name="sgd", lr=0.05, nesterov=True)])
def test_sgd_and_adam_lower_the_entropy(optim):
    method = build_method(TinyNet(), TENT, optim)
    x = batch(3, n=16)
    start = entropy(method.predict(x)).item()
    for _ in range(10):
        method.step(x)
    assert entropy(method.predict(x)).item() < start
    assert type(method.optimizer).__name__.lower() == optim.name


def test_state_dict_resume_matches_uninterrupted_run():
    cfg, optim = method_config("surgical", blocks=("block2", "head"), kind="all"), OptimConfig(lr=1e-2)
    full = build_method(TinyNet(), cfg, optim)
    for s in range(2):
        full.step(batch(s))
    ckpt = copy.deepcopy(full.state_dict())
    expected = [full.step(batch(s)) for s in (2, 3)]
    resumed = build_method(TinyNet(), cfg, optim)  # a fresh process: pretrained model, then the checkpoint
    resumed.load_state_dict(ckpt)
    assert resumed.n_steps == 2
    for s, e in zip((2, 3), expected):
        assert torch.equal(resumed.step(batch(s)), e)
    assert_states_equal(clone_state(resumed.model), clone_state(full.model))
    # reset after resume still goes back to the pretrained model, not to the checkpoint
    resumed.reset()
    assert_states_equal(clone_state(resumed.model), clone_state(TinyNet()))
    with pytest.raises(ValueError, match="method"):
        build_method(TinyNet(), TENT).load_state_dict(ckpt)


def test_selection_without_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match="select no parameters"):
        build_method(TinyNet(), method_config("surgical", blocks=("head",), kind="norm"))


def test_bf16_autocast_and_channels_last():
    model = TinyNet().to(memory_format=torch.channels_last)
    x = batch().contiguous(memory_format=torch.channels_last)
    ref = build_method(TinyNet(), TENT).step(batch())
    method = build_method(model, TENT, autocast_dtype="bf16")
    out = method.step(x)
    assert torch.isfinite(out).all() and method.n_updates == 1
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    prior = build_method(TinyNet(), method_config("norm", prior_strength=8.0), autocast_dtype=torch.bfloat16)
    assert torch.isfinite(prior.step(x)).all()


def test_set_bn_stats_round_trip():
    model = TinyNet().eval()
    set_bn_stats(model, "batch", 4.0)
    set_bn_stats(model, "source")
    with torch.no_grad():
        assert torch.equal(model(batch()), TinyNet().eval()(batch()))
    with pytest.raises(ValueError, match="must be one of batch, source, ema"):
        set_bn_stats(model, "running")


def test_resnet20_tent_step():
    model, _ = create_model("resnet20", pretrained=False, allow_random=True)
    method = build_method(model, TENT)
    x = torch.rand(4, 3, 32, 32)
    before = clone_state(model)
    out = method.step(x)
    assert out.shape == (4, 10) and method.n_updates == 1
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {n for n, _ in method.params()}
    assert all(("bn" in n or "downsample.1" in n or "shortcut" in n) for n in changed)
    assert isinstance(method, Method)
