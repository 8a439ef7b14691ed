"""LAME: the method's assignment against a plain, independent implementation of the paper's bound iterations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tta_surgical.config import ConfigError, method_config
from tta_surgical.methods import build_method
from tta_surgical.methods.lame import affinity_matrix, laplacian_assignment
from tta_surgical.models import BlockSpec

C = 5


class Net(nn.Module):
    """conv-BN-ReLU, global pooling, linear head; `features(x)` is the head's input, written out for the test."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, C)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            self.bn.running_var.uniform_(0.5, 2.0, generator=g)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def block_spec(self) -> BlockSpec:
        groups = (("input", ("conv", "bn")), ("head", ("fc",)))
        return BlockSpec(groups, groups)


def images(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def plain_lame(probs: torch.Tensor, feats: torch.Tensor, affinity: str, knn: int, sigma: float = 1.0):
    """The paper's algorithm written out loop by loop (no code shared with the method)."""
    n = feats.shape[0]
    f = feats / feats.norm(dim=1, keepdim=True)
    d = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            d[i, j] = ((f[i] - f[j]) ** 2).sum().sqrt()
    if affinity == "rbf":
        kth = torch.stack([d[i].sort().values[min(knn, n) - 1] for i in range(n)])  # k-th smallest, self included
        s = sigma * kth.mean()
        w = torch.exp(-(d**2) / (2 * s**2))
    elif affinity == "knn":
        w = torch.zeros(n, n)
        for i in range(n):
            order = [j for j in d[i].argsort().tolist() if j != i]
            w[i, order[:knn]] = 1.0
    else:
        w = f @ f.t()
    a = -torch.log(probs + 1e-10)
    y = torch.softmax(-a, dim=1)
    energies = []
    for it in range(100):
        y = torch.softmax(-a + w @ y, dim=1)
        e = float((a * y - (w @ y) * y + y * torch.log(y.clamp(min=1e-20))).sum())
        if it > 1 and abs(e - energies[-1]) <= 1e-8 * abs(energies[-1]):
            break
        energies.append(e)
    return y, w


@pytest.mark.parametrize("affinity", ["rbf", "knn", "linear"])
def test_step_equals_plain_bound_iterations(affinity):
    net = Net()
    method = build_method(net, method_config("lame", affinity=affinity))
    x = images()
    out = method.step(x)
    with torch.no_grad():
        feats = net.features(x)
        probs = torch.softmax(net.fc(feats), dim=1)  # eval mode: source BatchNorm statistics (the default)
    y, _ = plain_lame(probs, feats, affinity, knn=5)
    assert torch.allclose(out.softmax(dim=1), y, atol=1e-5)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(len(x)), atol=1e-5)  # logits are log Y
    # LAME changes the prediction of at least some images on this batch (else the test would be vacuous).
    assert (y - probs).abs().max() > 1e-2


def test_result_is_a_fixed_point_of_the_bound_update():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(40, 7, generator=g), dim=1)
    feats = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    kernel = affinity_matrix(feats, "rbf", 5, 1.0)
    unary = -torch.log(probs + 1e-10)
    y = laplacian_assignment(unary, kernel).exp()
    assert torch.allclose(y, torch.softmax(-unary + kernel @ y, dim=1), atol=1e-5)
    assert torch.equal(kernel, kernel.t()) and torch.allclose(kernel.diagonal(), torch.ones(40))


def test_sigma_scales_the_data_relative_bandwidth():
    f = torch.nn.functional.normalize(torch.randn(12, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    d = torch.cdist(f, f)
    s = d.sort(dim=1).values[:, 2].mean()  # knn 3: the 3rd smallest distance (self included)
    for sigma in (1.0, 0.5):
        expected = torch.exp(-(d**2) / (2 * (sigma * s) ** 2))
        assert torch.allclose(affinity_matrix(f, "rbf", 3, sigma), expected, atol=1e-6)


def test_single_image_gives_finite_output():
    method = build_method(Net(), method_config("lame"))
    out = method.step(images(1))
    assert out.shape == (1, C) and torch.isfinite(out).all()


def test_batch_statistics_option_and_no_state_change():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    method = build_method(net, method_config("lame", bn_stats="batch"))
    x = images()
    out = method.step(x)
    with torch.no_grad():
        h = net.conv(x)
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        hn = (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + net.bn.eps)
        feats = torch.relu(hn * net.bn.weight.view(1, -1, 1, 1) + net.bn.bias.view(1, -1, 1, 1)).mean((2, 3))
    y, _ = plain_lame(torch.softmax(net.fc(feats), dim=1), feats, "rbf", knn=5)
    assert torch.allclose(out.softmax(dim=1), y, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert method.n_updates == 0 and method.params() == []


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("affinity", "cosine", "method.affinity='cosine' is not valid; choose one of: rbf, knn, linear"),
        ("bn_stats", "ema", "method.bn_stats='ema' is not valid; choose one of: source, batch"),
        ("knn", 0, "method.knn must be >= 1"),
        ("sigma", 0.0, "method.sigma must be a finite number > 0"),
        ("sigma", float("inf"), "method.sigma must be a finite number > 0"),
        ("max_steps", 0, "method.max_steps must be >= 1"),
        ("tolerance", -1e-3, "method.tolerance must be a finite number >= 0"),
    ],
)
def test_settings_validation(key, value, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        method_config("lame", **{key: value})


def test_lame_has_no_block_settings():
    with pytest.raises(ConfigError, match="valid keys in section 'method' for method 'lame'"):
        method_config("lame", blocks=["block1"])
