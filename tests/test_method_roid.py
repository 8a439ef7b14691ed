"""ROID: the update (weights, filter, SLR, consistency, ensembling, class-probability average) and the prior
correction against plain step-by-step computations of the paper's equations, and the settings' validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _toy_methods import EPS, N_CLASSES, TwoConvNet, colour_images

from tta_surgical.config import ConfigError, OptimConfig, method_config
from tta_surgical.methods import build_method
from tta_surgical.methods.augment import ROID_CIFAR, cotta_views
from tta_surgical.methods.roid import prior_correct

C = N_CLASSES


def net() -> TwoConvNet:
    """No conv biases (as in ResNets: batch statistics would cancel them, zero gradient), no ReLU after bn2."""
    return TwoConvNet(11, 4.0, std=0.7, relu2=False, bn_weights=False)


def images(seed: int, n: int = 20) -> torch.Tensor:
    return colour_images(seed, n, texture=0.3, colour=0.7)


def forward(params: dict, x: torch.Tensor) -> torch.Tensor:
    """The network written out, BatchNorm with the batch's own (biased) statistics."""

    def bn(h, name):
        mean = h.mean((0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean((0, 2, 3), keepdim=True)
        h = (h - mean) / torch.sqrt(var + EPS)
        return h * params[f"{name}.weight"].view(1, -1, 1, 1) + params[f"{name}.bias"].view(1, -1, 1, 1)

    h = torch.relu(bn(F.conv2d(x, params["conv1.weight"], padding=1), "bn1"))
    h = bn(F.conv2d(h, params["conv2.weight"], padding=1), "bn2")
    return h.mean((2, 3)) @ params["fc.weight"].t() + params["fc.bias"]


def plain_step(method, x: torch.Tensor, params: dict, source: dict, ema: torch.Tensor, lr: float):
    """One ROID step from the paper's equations: returns (prediction, new params, new p_ema, kept count, loss)."""
    cfg = method.cfg
    adapted = [n for n, _ in method.params()]
    generator = torch.Generator()
    generator.set_state(method.rng.get_state())
    leaves = {k: v.clone().requires_grad_(k in adapted) for k, v in params.items()}
    logits = forward(leaves, x)
    p = logits.softmax(1)
    b = len(x)
    if cfg.use_weighting:
        pd = p.detach()
        div = 1 - (pd @ ema) / (pd.norm(dim=1) * ema.norm())
        div = (div - div.min()) / (div.max() - div.min())
        ent = -(pd * torch.log(pd)).sum(1)
        cert = (-ent - (-ent).min()) / ((-ent).max() - (-ent).min())
        keep = div >= div.mean()
        w = torch.exp(div * cert / cfg.temperature) * keep
    else:
        keep, w = torch.ones(b, dtype=torch.bool), torch.ones(b)
    q = p.clamp(max=0.99)
    slr = -(q * torch.log(q / (1 - q) + 1e-5)).sum(1)
    loss = (slr * w)[keep].sum() / b
    if cfg.use_consistency:
        aug_logits = forward(leaves, cotta_views(x[keep], 1, generator, ROID_CIFAR))
        orig = logits[keep]
        sce = -0.5 * (orig.softmax(1) * aug_logits.log_softmax(1)).sum(1) - 0.5 * (
            aug_logits.softmax(1) * orig.log_softmax(1)
        ).sum(1)
        loss = loss + (sce * w[keep]).sum() / b
    loss.backward()
    opt = torch.optim.Adam([leaves[n] for n in adapted], lr=lr, foreach=False)
    opt.load_state_dict(copy.deepcopy(method.optimizer.state_dict()))
    opt.step()
    new = {}
    for k, v in leaves.items():
        v = v.detach()
        new[k] = cfg.momentum_src * v + (1 - cfg.momentum_src) * source[k] if k in adapted else v
    new_ema = cfg.momentum_probs * ema + (1 - cfg.momentum_probs) * p.detach().mean(0)
    prior = p.detach().mean(0)
    g = max(1 / b, 1 / C) / prior.max()
    smoothed = (prior + g) / (1 + g * C)
    if cfg.prior_correction == "logits":
        prediction = logits.detach() * smoothed
    elif cfg.prior_correction == "probs":
        prediction = torch.log(p.detach() * smoothed / (p.detach() * smoothed).sum(1, keepdim=True))
    else:
        prediction = logits.detach()
    return prediction, new, new_ema, int(keep.sum()), loss.item()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"blocks": ["block1"], "kind": "all"},
        {"use_weighting": False, "prior_correction": "probs"},
        {"use_consistency": False, "prior_correction": "none", "temperature": 0.5},
    ],
)
def test_two_steps_equal_plain_equations(settings):
    lr = 1e-2
    method = build_method(net(), method_config("roid", **settings), OptimConfig(lr=lr))
    params = {k: v.detach().clone() for k, v in method.model.named_parameters()}
    source = copy.deepcopy(params)
    ema = torch.full((C,), 1.0 / C)
    for s in range(2):
        x = images(s)
        prediction, params, ema, kept, loss = plain_step(method, x, params, source, ema, lr)
        out = method.step(x)
        assert torch.allclose(out, prediction, atol=1e-5), f"step {s}: prediction"
        for name, p in method.model.named_parameters():
            assert torch.allclose(p, params[name], atol=1e-6), f"step {s}: {name}"
        assert torch.allclose(method.class_probs_ema, ema, atol=1e-6)
        assert method.last.n_filtered == len(x) - kept and method.last.loss == pytest.approx(loss, rel=1e-5)
        if method.cfg.use_weighting:
            assert 0 < kept < len(x)  # the filter removed some samples, kept others
    assert method.n_updates == 2


def test_prior_correction_formulas():
    logits = torch.randn(6, C, generator=torch.Generator().manual_seed(0)) * 3
    p = logits.softmax(1)
    prior = p.mean(0)
    g = max(1 / 6, 1 / C) / prior.max()
    smoothed = (prior + g) / (1 + g * C)
    assert torch.allclose(smoothed.sum(), torch.tensor(1.0))
    assert torch.allclose(prior_correct(logits, "logits"), logits * smoothed)
    corrected = prior_correct(logits, "probs").softmax(1)
    assert torch.allclose(corrected, p * smoothed / (p * smoothed).sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(prior_correct(logits, "none"), logits)


def test_degenerate_batch_takes_no_step_and_changes_nothing():
    method = build_method(net(), method_config("roid"))
    state = copy.deepcopy(method.state_dict()["state"])
    out = method.step(images(0, n=1))  # one image: min-max weights are undefined
    assert torch.isfinite(out).all() and method.n_updates == 0 and method.last.n_filtered == 1
    for (k, a), b in zip(method.model.state_dict().items(), state["model"].values()):
        assert torch.equal(a, b), k
    assert method.class_probs_ema is None


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("prior_correction", "yes", "method.prior_correction='yes' is not valid; choose one of: logits, probs, none"),
        ("momentum_src", 1.2, "method.momentum_src must be in \\[0, 1\\]"),
        ("momentum_probs", -0.1, "method.momentum_probs must be in \\[0, 1\\]"),
        ("temperature", 0.0, "method.temperature must be a finite number > 0"),
        ("temperature", float("inf"), "method.temperature must be a finite number > 0"),
        ("use_weighting", "yes", "method.use_weighting: expected true or false"),
        ("blocks", [], "method.blocks must be a non-empty list"),
    ],
)
def test_settings_validation(key, value, match):
    with pytest.raises(ConfigError, match=match):
        method_config("roid", **{key: value})


def test_defaults_are_the_authors():
    cfg = method_config("roid")
    assert (cfg.use_weighting, cfg.use_consistency, cfg.prior_correction) == (True, True, "logits")
    assert (cfg.momentum_src, cfg.momentum_probs, cfg.temperature) == (0.99, 0.9, pytest.approx(1 / 3))
    assert (cfg.blocks, cfg.kind) == (("all",), "norm")
