"""MEMO (`methods/memo.py`) against a per-image loop of the paper's equations, and its settings."""

from __future__ import annotations

import math

import pytest
import torch
from _toy_methods import N_CLASSES, TinyNet, uniform_images
from _toy_methods import TINY_BLOCK1_HEAD as ADAPTED  # blocks block1 + head
from torch import nn

from tta_surgical.config import ConfigError, OptimConfig, method_config
from tta_surgical.methods import MethodContext, build_method
from tta_surgical.methods.augment import augmix_views
from tta_surgical.methods.memo import marginal_entropy


def batch(seed: int = 1, n: int = 5) -> torch.Tensor:
    return uniform_images(seed, n)


def with_prior_batchnorm(model: nn.Module, strength: float) -> nn.Module:
    """Every BatchNorm normalises with N/(N+1) x source + 1/(N+1) x the statistics of whatever batch it sees (one
    image's views, or the image): the authors' `nn.BatchNorm2d.prior`, written here independently of the package."""

    def forward(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        w = strength / (strength + 1.0)
        mean = w * bn.running_mean + (1 - w) * x.mean((0, 2, 3))
        var = w * bn.running_var + (1 - w) * x.var((0, 2, 3), unbiased=False)
        y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
        return y * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]

    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.forward = forward.__get__(m)
    return model


def make(lr: float = 0.05, seed: int = 2, optim: str = "sgd", **settings):
    cfg = method_config("memo", **settings)
    return build_method(TinyNet(), cfg, OptimConfig(name=optim, lr=lr, momentum=0.0), context=MethodContext(seed=seed))


def test_each_image_takes_one_step_on_its_marginal_entropy_from_the_source_weights():
    n_views, lr, prior = 4, 0.05, 2.0
    method = make(lr, n_augmentations=n_views, prior_strength=prior, blocks=("block1", "head"))
    x = batch()
    g = torch.Generator()
    g.set_state(method.rng.get_state())
    views = augmix_views(x, n_views, g).view(n_views, *x.shape)  # the method's draws: view v of image i
    expected, last = [], None
    for i in range(x.shape[0]):
        net = with_prior_batchnorm(TinyNet(), prior)  # every image starts from the source weights
        params = dict(net.named_parameters())
        probs = net(views[:, i]).softmax(dim=1).mean(dim=0)  # the marginal over the image's views
        entropy = -(probs * probs.log()).sum()
        grads = torch.autograd.grad(entropy, [params[n] for n in ADAPTED])
        with torch.no_grad():
            for n, gr in zip(ADAPTED, grads):
                params[n].sub_(lr * gr)
            expected.append(net(x[i : i + 1]))  # the adapted network on the clean image alone
        last = {n: p.detach().clone() for n, p in params.items()}

    out = method.step(x)

    assert torch.allclose(out, torch.cat(expected), atol=1e-5)
    for n, p in method.model.named_parameters():  # the state the per-image loop leaves: the last image's weights
        assert torch.allclose(p, last[n], atol=1e-6), n
    assert method.n_updates >= 1 and math.isfinite(method.last.loss)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_chunks_of_images_change_nothing(optim):
    x = batch(3, n=6)
    runs = []
    for per_forward in (3, 2 * 3, 6 * 3, 0):  # one image per forward, two, all six, auto
        method = make(optim=optim, lr=0.01, n_augmentations=3, images_per_forward=per_forward)
        runs.append((method.step(x), method.n_updates))
    for out, _ in runs[1:]:
        assert torch.allclose(out, runs[0][0], atol=1e-5)  # each image's step is its own, whatever shares its forward
    assert [n for _, n in runs[:3]] == [6, 3, 1]  # one update per forward


def test_episodic_the_history_does_not_matter():
    x, y = batch(4), batch(5)
    fresh = make(n_augmentations=3)
    used = make(n_augmentations=3)
    used.step(x)
    fresh.rng.set_state(used.rng.get_state())  # same views for y
    assert torch.allclose(fresh.step(y), used.step(y), atol=1e-6)


def test_predict_is_the_source_network_with_memos_statistics():
    method = make(prior_strength=2.0, n_augmentations=2)
    method.step(batch(6))
    x = batch(7)
    reference = with_prior_batchnorm(TinyNet(), 2.0)
    with torch.no_grad():
        expected = torch.cat([reference(x[i : i + 1]) for i in range(x.shape[0])])
    assert torch.allclose(method.predict(x), expected, atol=1e-5)


def test_marginal_entropy():
    logits = torch.randn(3, 4, N_CLASSES)
    p = logits.softmax(-1).mean(-2)
    assert torch.allclose(marginal_entropy(logits), -(p * p.log()).sum(-1), atol=1e-6)
    one = logits[:, :1]
    assert torch.allclose(marginal_entropy(one), -(one.softmax(-1) * one.log_softmax(-1)).sum(-1).squeeze(1), atol=1e-6)


def test_defaults_are_the_authors_settings():
    cfg = method_config("memo")
    assert (cfg.blocks, cfg.kind, cfg.n_augmentations, cfg.bn_stats, cfg.prior_strength) == (
        ("all",),
        "all",
        32,
        "batch",
        16.0,
    )
    assert method_config("memo", bn_stats="source", prior_strength=0.0).bn_stats == "source"


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"n_augmentations": 0}, "n_augmentations"),
        ({"bn_stats": "test"}, "bn_stats"),
        ({"prior_strength": -1.0}, "prior_strength"),
        ({"prior_strength": float("inf")}, "prior_strength"),
        ({"bn_stats": "source"}, "prior_strength"),  # the default prior needs batch statistics
        ({"images_per_forward": -4}, "images_per_forward"),
        ({"blocks": []}, "blocks"),
    ],
)
def test_invalid_settings_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        method_config("memo", **settings)
