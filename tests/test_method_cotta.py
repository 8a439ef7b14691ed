"""CoTTA (`methods/cotta.py`) against a step-by-step computation of the paper's equations, and its settings."""

from __future__ import annotations

import copy

import pytest
import torch
from _toy_methods import TINY_BLOCK1_HEAD as ADAPTED  # blocks block1 + head
from _toy_methods import TinyNet, uniform_images
from torch import nn

from tta_surgical.config import ConfigError, OptimConfig, method_config
from tta_surgical.methods import MethodContext, build_method
from tta_surgical.methods.augment import cotta_views
from tta_surgical.methods.bn import batch_stats_per_group, set_bn_stats


def net() -> TinyNet:
    """The tests' source network: seed 0, linear weights x4 (confident predictions)."""
    return TinyNet(0, 4.0)


def batch(seed: int = 1, n: int = 12) -> torch.Tensor:
    return uniform_images(seed, n)


def on_batch_statistics(model: nn.Module) -> nn.Module:
    """A copy that normalises with batch statistics, built here without the package's BatchNorm helpers."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
    return model


def make(lr: float = 0.1, seed: int = 3, **settings):
    cfg = method_config("cotta", **settings)
    return build_method(net(), cfg, OptimConfig(name="sgd", lr=lr, momentum=0.0), context=MethodContext(seed=seed))


def test_step_follows_the_equations():
    """Teacher target = mean over views of the EMA teacher's logits (anchor confident < ap); SGD step on the soft
    cross-entropy; teacher <- 0.9 t + 0.1 s; each adapted element restored to its source value with probability rst."""
    n_views, lr, mt, rst = 3, 0.1, 0.9, 0.4
    method = make(lr, n_augmentations=n_views, teacher_momentum=mt, rst=rst, ap=1.0, blocks=("block1", "head"))
    x = batch()
    student, teacher, source = (on_batch_statistics(net()) for _ in range(3))
    g = torch.Generator()
    g.set_state(method.rng.get_state())
    views = cotta_views(x, n_views, g).view(n_views, *x.shape)  # the method's first draws: the views
    with torch.no_grad():
        target = torch.stack([teacher(v) for v in views]).mean(0)  # one forward (one set of statistics) per view
    params = dict(student.named_parameters())
    logits = student(x)
    loss = -(target.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    grads = torch.autograd.grad(loss, [params[n] for n in ADAPTED])
    stepped = {n: params[n].detach() - lr * gr for n, gr in zip(ADAPTED, grads)}
    t_params, s_params = dict(teacher.named_parameters()), dict(source.named_parameters())
    ema = {n: mt * t_params[n].detach() + (1 - mt) * stepped[n] for n in ADAPTED}
    sizes = [stepped[n].numel() for n in ADAPTED]
    uniforms = torch.rand(sum(sizes), generator=g).split(sizes)  # then the restore mask, one draw for all elements
    masks = {n: u.view(stepped[n].shape) < rst for n, u in zip(ADAPTED, uniforms)}
    restored = {n: torch.where(masks[n], s_params[n].detach(), stepped[n]) for n in ADAPTED}

    out = method.step(x)

    assert torch.allclose(out, target, atol=1e-5)  # the prediction is the teacher's, before the update
    got = dict(method.model.named_parameters())
    got_teacher = dict(method.teacher.named_parameters())
    for n, p in got.items():
        expected = restored[n] if n in ADAPTED else s_params[n]
        assert torch.allclose(p, expected, atol=1e-6), n
        assert torch.allclose(got_teacher[n], ema[n] if n in ADAPTED else s_params[n], atol=1e-6), n
    n_restored = sum(int(m.sum()) for m in masks.values())
    assert 0 < n_restored < sum(m.numel() for m in masks.values())  # a real mix of restored and stepped elements
    assert method.last.method_reset == "stochastic_restore" and method.n_method_resets == 1
    assert method.last.loss == pytest.approx(loss.item(), rel=1e-5)


def test_the_anchors_batch_mean_confidence_decides_augmentation():
    x = batch(2)
    with torch.no_grad():
        confidence = on_batch_statistics(net())(x).softmax(1).amax(1).mean().item()
    for ap, augments in ((confidence - 1e-3, False), (confidence + 1e-3, True)):
        method = make(rst=0.0, ap=ap, n_augmentations=2)
        before = method.rng.get_state()
        teacher = on_batch_statistics(net())
        out = method.step(x)
        assert (not torch.equal(method.rng.get_state(), before)) == augments  # views drawn only when augmenting
        if not augments:
            with torch.no_grad():
                assert torch.allclose(out, teacher(x), atol=1e-6)  # the teacher on the clean batch


def test_views_in_one_forward_equal_one_forward_per_view():
    x = batch(4)
    runs = []
    for per_forward in (x.shape[0], 3 * x.shape[0], 0):  # one view, three views, auto
        method = make(n_augmentations=5, ap=1.0, rst=0.05, images_per_forward=per_forward)
        outs = [method.step(batch(s)) for s in (4, 5)]
        runs.append((outs, {k: v.clone() for k, v in method.model.state_dict().items()}))
    for outs, state in runs[1:]:
        for a, b in zip(outs, runs[0][0]):
            assert torch.allclose(a, b, atol=1e-5)
        for k in state:
            assert torch.allclose(state[k], runs[0][1][k], atol=1e-5), k


@pytest.mark.parametrize("prior", [0.0, 3.0])
def test_batch_stats_per_group_equals_separate_forwards(prior):
    model = net().eval()
    set_bn_stats(model, "batch", prior)
    x = batch(6, n=12)
    with torch.no_grad():
        separate = torch.cat([model(chunk) for chunk in x.split(4)])
        with batch_stats_per_group(model, 3):
            grouped = model(x)
        after = model(x)
    assert torch.allclose(grouped, separate, atol=1e-5)
    assert not torch.allclose(after, separate, atol=1e-3)  # outside the block: one set of statistics again
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, nn.BatchNorm2d)) == (prior == 0)


def test_a_skipped_update_moves_neither_teacher_nor_weights():
    method = make(n_augmentations=2, ap=0.0)
    with torch.no_grad():
        method.model.fc.bias[0] = float("inf")  # finite input, non-finite student loss
    teacher = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    weights = {k: v.clone() for k, v in method.model.state_dict().items()}
    method.step(batch())
    assert method.n_skipped == 1 and method.n_updates == 0 and method.n_method_resets == 0
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_defaults_are_the_authors_cifar_settings():
    cfg = method_config("cotta")
    assert (cfg.blocks, cfg.kind) == (("all",), "all")
    assert (cfg.teacher_momentum, cfg.rst, cfg.ap, cfg.n_augmentations) == (0.999, 0.01, 0.92, 32)
    assert cfg.augment_per == "view"


@pytest.mark.parametrize(
    "key, value",
    [
        ("teacher_momentum", 1.5),
        ("teacher_momentum", float("nan")),
        ("rst", -0.1),
        ("ap", 2.0),
        ("n_augmentations", 0),
        ("augment_per", "batch"),
        ("images_per_forward", -1),
        ("kind", "everything"),
    ],
)
def test_invalid_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        method_config("cotta", **{key: value})
