"""RoTTA: the memory bank's replacement rule, the robust-BN / time-reweighted / EMA-teacher update against plain
step-by-step computations of the paper's equations, the strong augmentation, and the settings' validation."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from _toy_methods import EPS, N_CLASSES, TwoConvNet, colour_images
from torch import nn

from tta_surgical.config import ConfigError, OptimConfig, method_config
from tta_surgical.methods import build_method
from tta_surgical.methods.augment import COTTA_CIFAR, cotta_views

C = N_CLASSES


class Net(TwoConvNet):
    """Conv biases, no ReLU after bn2, no bias on the head. The BN statistics are calibrated on images like the
    test ones (as a trained source model's would be), so the predictions spread over several classes."""

    def __init__(self) -> None:
        super().__init__(11, 4.0, std=0.7, conv_bias=True, relu2=False, bn_weights=False)
        with torch.no_grad():
            self.fc.bias.zero_()
            for bn in (self.bn1, self.bn2):
                bn.momentum = 1.0
            self.train()(images(999, 256))  # running statistics := those of a calibration batch
            for bn in (self.bn1, self.bn2):
                bn.momentum = 0.1
        self.eval()


def images(seed: int, n: int = 16) -> torch.Tensor:
    """Mostly flat colour images with a little texture, in [0, 1]."""
    return colour_images(seed, n, texture=0.1, colour=0.9)


def make(lr: float = 1e-2, **settings):
    return build_method(Net(), method_config("rotta", **settings), OptimConfig(lr=lr))


# ------------------------------------------------------------------------------------------------ the bank
class PlainBank:
    """The paper's category-balanced bank (CSTU), written with explicit ages that every insertion increments."""

    def __init__(self, capacity: int, n_classes: int) -> None:
        self.capacity, self.n_classes = capacity, n_classes
        self.slots: list[list[dict]] = [[] for _ in range(n_classes)]
        self.removed = {"own": 0, "majority": 0}

    def score(self, age: int, uncertainty: float) -> float:
        return 1 / (1 + math.exp(-age / self.capacity)) + uncertainty / math.log(self.n_classes)

    def add(self, key, label: int, uncertainty: float) -> None:
        sizes = [len(s) for s in self.slots]
        new = self.score(0, uncertainty)
        if sizes[label] < self.capacity / self.n_classes:
            if sum(sizes) < self.capacity:
                ok = True
            else:
                ok = self.evict([c for c in range(self.n_classes) if sizes[c] == max(sizes)], new, "majority")
        else:
            ok = self.evict([label], new, "own")
        if ok:
            self.slots[label].append({"key": key, "u": uncertainty, "age": 0})
        for slot in self.slots:
            for item in slot:
                item["age"] += 1

    def evict(self, classes: list[int], new_score: float, path: str) -> bool:
        best = None
        for c in classes:
            for i, item in enumerate(self.slots[c]):
                s = self.score(item["age"], item["u"])
                if best is None or s >= best[0]:
                    best = (s, c, i)
        if best is None:
            return True
        if best[0] > new_score:
            self.slots[best[1]].pop(best[2])
            self.removed[path] += 1
            return True
        return False

    def items(self) -> list[tuple[int, dict]]:
        return [(c, item) for c, slot in enumerate(self.slots) for item in slot]


def teacher_view(method, x):
    """Pseudo-labels and the authors' entropy (1e-6 inside the log) of the teacher's prediction."""
    p = method.predict(x).float().softmax(1)
    return p.argmax(1).tolist(), (-(p * torch.log(p + 1e-6)).sum(1)).tolist()


def test_memory_bank_follows_the_replacement_rule():
    method = make(memory_size=6, update_every=16)
    plain = PlainBank(6, C)
    seen: dict[tuple[int, int], torch.Tensor] = {}
    labels_seen = set()
    for b in range(14):
        x = images(b)
        labels, uncertainties = teacher_view(method, x)
        labels_seen.update(labels)
        for i in range(len(x)):
            seen[(b, i)] = x[i]
            plain.add((b, i), labels[i], uncertainties[i])
        method.step(x)
        expected = plain.items()
        assert method.mem_class == [c for c, _ in expected]
        assert [method.clock - a for a in method.mem_arrival] == [item["age"] for _, item in expected]
        assert method.mem_uncertainty == pytest.approx([item["u"] for _, item in expected], abs=1e-6)
        assert torch.equal(method.memory, torch.stack([seen[item["key"]] for _, item in expected]))
    # The rule was exercised: several classes, evictions from the newcomer's class and from the majority classes.
    assert len(labels_seen) >= 3 and min(plain.removed.values()) >= 5, (labels_seen, plain.removed)
    assert method.clock == 14 * 16 and method.n_updates == 14


# ------------------------------------------------------------------------------------------------ the update
def rbn_forward(params: dict, stats: dict, x: torch.Tensor, alpha: float, update: bool):
    """The network with robust BN written out: in an update the statistics take one EMA step towards the batch's
    (biased variance) and normalise with the result. Returns logits and the new statistics."""
    new = {}

    def rbn(h, name):
        mean, var = stats[name]
        if update:
            bm = h.mean((0, 2, 3))
            bv = ((h - bm.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
            mean, var = (1 - alpha) * mean + alpha * bm, (1 - alpha) * var + alpha * bv
            new[name] = (mean.detach().clone(), var.detach().clone())
        h = (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
        return h * params[f"{name}.weight"].view(1, -1, 1, 1) + params[f"{name}.bias"].view(1, -1, 1, 1)

    h = torch.relu(rbn(F.conv2d(x, params["conv1.weight"], params["conv1.bias"], padding=1), "bn1"))
    h = rbn(F.conv2d(h, params["conv2.weight"], params["conv2.bias"], padding=1), "bn2")
    return h.mean((2, 3)) @ params["fc.weight"].t() + params["fc.bias"], new


def model_tensors(model: nn.Module):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    stats = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in model.named_modules() if n.startswith("bn")}
    return params, stats


@pytest.mark.parametrize("selection", [{}, {"blocks": ["block1"], "kind": "all"}])
def test_update_equals_plain_equations(selection):
    """Two batches of 16 with update_every 16: the second update, recomputed from the paper's equations."""
    cap, alpha, nu, lr = 6, 0.05, 0.001, 1e-2
    method = make(lr=lr, memory_size=cap, update_every=16, **selection)
    method.step(images(0))
    x = images(1)
    labels, uncertainties = teacher_view(method, x)
    s_params, s_stats = model_tensors(method.model)
    t_params, t_stats = model_tensors(method.teacher)
    adam = copy.deepcopy(method.optimizer.state_dict())
    generator = torch.Generator()
    generator.set_state(method.rng.get_state())
    prediction = method.predict(x)

    # The prediction: the teacher with its stored (robust) statistics, no update mode.
    assert torch.allclose(prediction, rbn_forward(t_params, t_stats, x, alpha, update=False)[0], atol=1e-5)

    # The bank after the second batch: rebuild it with the plain rule from both batches' teacher views.
    plain = PlainBank(cap, C)
    replay = build_method(Net(), method_config("rotta", memory_size=cap, update_every=16, **selection))
    l0, u0 = teacher_view(replay, images(0))  # the same source teacher saw the first batch
    for i in range(16):
        plain.add((0, i), l0[i], u0[i])
    for i in range(16):
        plain.add((1, i), labels[i], uncertainties[i])
    pool = {0: images(0), 1: images(1)}
    bank_images = torch.stack([pool[item["key"][0]][item["key"][1]] for _, item in plain.items()])
    ages = torch.tensor([float(item["age"]) for _, item in plain.items()])

    # Time-aware reweighting, teacher on the clean bank and student on its strong augmentation (RBN update mode).
    weights = torch.exp(-ages / cap) / (1 + torch.exp(-ages / cap))
    strong = cotta_views(bank_images, 1, generator)
    t_logits, t_new = rbn_forward(t_params, t_stats, bank_images, alpha, update=True)
    adapted = {n for n, _ in method.params()}
    leaves = {k: v.clone().requires_grad_(k in adapted) for k, v in s_params.items()}
    s_logits, s_new = rbn_forward(leaves, s_stats, strong, alpha, update=True)
    loss = (weights * -(t_logits.detach().softmax(1) * s_logits.log_softmax(1)).sum(1)).mean()
    loss.backward()
    opt = torch.optim.Adam([leaves[n] for n, _ in method.params()], lr=lr, foreach=False)
    opt.load_state_dict(adam)
    opt.step()

    out = method.step(x)
    assert torch.equal(out, prediction)  # the prediction is the teacher's, from before the update
    assert method.last.loss == pytest.approx(loss.item(), rel=1e-5)
    for name, p in method.model.named_parameters():
        assert torch.allclose(p, leaves[name].detach(), atol=1e-6), name
    for name, p in method.teacher.named_parameters():
        expected = (1 - nu) * t_params[name] + nu * leaves[name].detach() if name in adapted else t_params[name]
        assert torch.allclose(p, expected, atol=1e-7), name
    for name in ("bn1", "bn2"):
        for model, new in ((method.model, s_new), (method.teacher, t_new)):
            bn = dict(model.named_modules())[name]
            assert torch.allclose(bn.running_mean, new[name][0], atol=1e-6)
            assert torch.allclose(bn.running_var, new[name][1], atol=1e-6)


def test_prediction_uses_stored_statistics_and_names_are_unchanged():
    net = Net()
    names = ([n for n, _ in net.named_parameters()], [n for n, _ in net.named_buffers()])
    method = build_method(net, method_config("rotta"))
    assert ([n for n, _ in net.named_parameters()], [n for n, _ in net.named_buffers()]) == names
    x = images(3)
    reference = Net().eval()
    assert torch.allclose(method.step(x), reference(x), atol=1e-6)  # before any update: the source model


def test_skipped_update_commits_nothing():
    method = make(memory_size=6, update_every=16)
    method.step(images(0))
    with torch.no_grad():
        method.model.fc.weight[0, 0] = float("inf")  # the student's next loss is not finite
    teacher = copy.deepcopy(method.teacher.state_dict())
    stats = [b.clone() for n, b in method.model.named_buffers()]
    method.step(images(1))
    assert method.n_skipped == 1 and method.last.skipped
    assert all(torch.equal(v, teacher[k]) for k, v in method.teacher.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(stats, [b for _, b in method.model.named_buffers()]))
    assert method.clock == 32  # the bank still takes the (finite) instances


# ------------------------------------------------------------------------------------------------ augmentation
def test_strong_augmentation_is_cottas_one_draw_for_the_bank():
    """RoTTA's strong view is `augment.cotta_views` with one parameter draw for the whole bank (as the authors'
    torchvision transform on a batched tensor): equal images get equal views up to the per-pixel noise."""
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.cat([x, x[:1]])  # image 3 repeats image 0
    quiet = replace(COTTA_CIFAR, noise_std=0.0)
    a = cotta_views(x, 1, torch.Generator().manual_seed(5), quiet)
    assert a.shape == x.shape and torch.allclose(a[3], a[0], atol=1e-6)


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    "key,value,match",
    [
        ("memory_size", 0, "method.memory_size must be >= 1"),
        ("update_every", 0, "method.update_every must be >= 1"),
        ("nu", 1.5, "method.nu must be in \\[0, 1\\]"),
        ("alpha", -0.1, "method.alpha must be in \\[0, 1\\]"),
        ("lambda_t", -1.0, "method.lambda_t must be a finite number >= 0"),
        ("lambda_u", float("nan"), "method.lambda_u must be a finite number >= 0"),
        ("kind", "bias", "method.kind='bias' is not valid"),
    ],
)
def test_settings_validation(key, value, match):
    with pytest.raises(ConfigError, match=match):
        method_config("rotta", **{key: value})


def test_defaults_are_the_authors():
    cfg = method_config("rotta")
    values = (cfg.memory_size, cfg.update_every, cfg.nu, cfg.alpha, cfg.lambda_t, cfg.lambda_u)
    assert values == (64, 64, 0.001, 0.05, 1.0, 1.0)
    assert (cfg.blocks, cfg.kind) == (("all",), "norm")
