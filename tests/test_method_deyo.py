"""DeYO: its update against the paper's equations computed by hand, the patch shuffle, the filter flags, settings."""

from __future__ import annotations

import math

import pytest
import torch
from _toy_methods import N_CLASSES, TwoConvNet, entropy, reference_forward, uniform_images
from _toy_methods import PLAIN_SGD as SGD
from _toy_methods import TWO_CONV_NORM as ADAPTED  # kind=norm on every block

from tta_surgical.config import ConfigError, OptimConfig, method_config
from tta_surgical.methods import build_method
from tta_surgical.methods.augment import occlude, patch_shuffle, pixel_shuffle


def images(seed: int, n: int = 32, size: int = 8) -> torch.Tensor:
    return uniform_images(seed, n, size)


def shuffle_by_hand(x: torch.Tensor, order: torch.Tensor, p: int) -> torch.Tensor:
    """Patch k of the output grid (row-major) is patch order[i, k] of image i: one image, one patch at a time."""
    out = torch.empty_like(x)
    h, w = x.shape[2] // p, x.shape[3] // p
    for i in range(x.shape[0]):
        for k in range(p * p):
            src = int(order[i, k])
            out[i, :, (k // p) * h : (k // p + 1) * h, (k % p) * w : (k % p + 1) * w] = x[
                i, :, (src // p) * h : (src // p + 1) * h, (src % p) * w : (src % p + 1) * w
            ]
    return out


def make(optim: OptimConfig = SGD, scale: float = 8.0, **settings):
    return build_method(TwoConvNet(3, scale), method_config("deyo", **settings), optim)


def test_one_update_matches_the_papers_equations():
    """Entropy filter, patch-shuffled view of the kept images, PLPD filter, Eq. (10) weights, one SGD step."""
    threshold = 0.2  # the default
    method = make()
    theta = {k: v.detach().clone() for k, v in method.model.named_parameters()}
    x = images(0)
    rng = torch.Generator().manual_seed(0)
    rng.set_state(method.rng.get_state())  # the draws the method will make

    adapted = {k: theta[k].clone().requires_grad_(True) for k in ADAPTED}
    logits = reference_forward({**theta, **adapted}, x)
    h = entropy(logits)
    log_c = math.log(N_CLASSES)
    keep1 = h.detach() < 0.5 * log_c
    idx = keep1.nonzero().squeeze(1)
    order = torch.argsort(torch.rand(len(idx), 16, generator=rng), dim=1)
    with torch.no_grad():
        view_logits = reference_forward(theta, shuffle_by_hand(x[idx], order, 4))  # BN statistics of the kept images
        probs = logits.detach()[idx].softmax(1)
        pseudo = probs.argmax(1)
        plpd = probs[torch.arange(len(idx)), pseudo] - view_logits.softmax(1)[torch.arange(len(idx)), pseudo]
    keep2 = plpd > threshold
    kept = idx[keep2]
    weights = torch.exp(-(h.detach()[kept] - 0.4 * log_c)) + torch.exp(plpd[keep2])
    loss = (weights * h[kept]).mean()
    grads = torch.autograd.grad(loss, [adapted[k] for k in ADAPTED])
    expected = {k: theta[k] - SGD.lr * g for k, g in zip(ADAPTED, grads)}
    assert 0 < len(kept) < len(idx) < x.shape[0]  # both filters remove samples from this batch

    out = method.step(x)
    torch.testing.assert_close(out, logits.detach(), rtol=1e-5, atol=1e-5)  # the prediction: before the update
    params = dict(method.model.named_parameters())
    for k in ADAPTED:
        torch.testing.assert_close(params[k].detach(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in theta:
        if k not in ADAPTED:
            assert torch.equal(params[k].detach(), theta[k]), k
    assert method.n_filtered == x.shape[0] - len(kept) and method.n_updates == 1
    assert method.last.loss == pytest.approx(float(loss.detach()), rel=1e-5)


def test_without_filters_and_weights_it_is_tent():
    """All four flags off: the loss is the mean entropy of the whole batch (Tent's), nothing is filtered."""
    method = make(filter_ent=False, filter_plpd=False, reweight_ent=False, reweight_plpd=False)
    theta = {k: v.detach().clone() for k, v in method.model.named_parameters()}
    x = images(1)
    adapted = {k: theta[k].clone().requires_grad_(True) for k in ADAPTED}
    loss = entropy(reference_forward({**theta, **adapted}, x)).mean()
    grads = torch.autograd.grad(loss, [adapted[k] for k in ADAPTED])
    method.step(x)
    params = dict(method.model.named_parameters())
    for k, g in zip(ADAPTED, grads):
        torch.testing.assert_close(params[k].detach(), theta[k] - SGD.lr * g, rtol=1e-5, atol=1e-6, msg=k)
    assert method.n_filtered == 0 and method.last.loss == pytest.approx(float(loss.detach()), rel=1e-5)


def test_batch_with_nothing_kept_changes_nothing():
    method = make(OptimConfig(lr=1e-3), scale=0.01)  # near-uniform predictions: every entropy ~ ln C
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    rng_before = method.rng.get_state()
    method.step(images(0))
    assert method.n_filtered == 32 and method.n_updates == 0 and method.last.loss is None
    assert torch.equal(method.rng.get_state(), rng_before)  # no view was drawn
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_patch_shuffle_permutes_each_images_patches_with_its_own_order():
    x = images(2, n=6, size=12)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    y = patch_shuffle(x, g, 4)
    g.set_state(state)
    order = torch.argsort(torch.rand(6, 16, generator=g), dim=1)
    assert torch.equal(y, shuffle_by_hand(x, order, 4))
    assert len({tuple(o.tolist()) for o in order}) == 6  # a permutation per image
    g.set_state(state)
    assert torch.equal(patch_shuffle(x, g, 4), y)  # the generator's state fixes the draw


def test_patch_shuffle_resizes_sides_that_are_not_multiples():
    x = images(3, n=2, size=10)
    y = patch_shuffle(x, torch.Generator().manual_seed(0), 4)
    assert y.shape == x.shape and torch.isfinite(y).all()
    flat = images(3, n=2, size=8)
    flat[:] = 0.25  # a constant image survives resizing and shuffling unchanged
    assert torch.allclose(patch_shuffle(flat[:, :, :7, :7], torch.Generator(), 4), flat[:, :, :7, :7])
    with pytest.raises(ValueError, match="cannot be cut"):
        patch_shuffle(images(0, n=1, size=3), torch.Generator(), 4)


def test_pixel_shuffle_and_occlusion():
    x = images(4, n=3, size=6)
    g = torch.Generator().manual_seed(1)
    y = pixel_shuffle(x, g)
    order = torch.randperm(36, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, x.flatten(2)[:, :, order].reshape(x.shape))  # one permutation for all images
    z = occlude(x, 2, 1, 3)
    mean = x.mean((2, 3))
    assert torch.allclose(z[:, :, 1:3, 3:5], mean[:, :, None, None].expand(3, 3, 2, 2))
    z[:, :, 1:3, 3:5] = x[:, :, 1:3, 3:5]
    assert torch.equal(z, x)
    with pytest.raises(ValueError, match="does not fit"):
        occlude(x, 4, 4, 0)


@pytest.mark.parametrize("aug_type", ["pixel", "occ"])
def test_other_views_adapt(aug_type):
    method = make(
        OptimConfig(lr=1e-3), aug_type=aug_type, occlusion_size=4, row_start=2, column_start=2, plpd_threshold=0.0
    )
    method.step(images(5))
    assert method.n_updates == 1 and 0 < method.n_filtered < 32


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("margin", 0.0),
        ("margin", 1.5),
        ("margin_e0", -0.1),
        ("plpd_threshold", 1.0),
        ("plpd_threshold", -1.5),
        ("aug_type", "rotate"),
        ("patch_len", 1),
        ("occlusion_size", 0),
        ("row_start", -1),
        ("column_start", -2),
        ("kind", "weights"),
    ],
)
def test_settings_are_validated(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        method_config("deyo", **{key: value})


def test_defaults_are_the_authors():
    cfg = method_config("deyo")
    assert (cfg.blocks, cfg.kind, cfg.margin, cfg.margin_e0, cfg.plpd_threshold, cfg.aug_type, cfg.patch_len) == (
        ("all",),
        "norm",
        0.5,
        0.4,
        0.2,
        "patch",
        4,
    )
    assert cfg.filter_ent and cfg.filter_plpd and cfg.reweight_ent and cfg.reweight_plpd
