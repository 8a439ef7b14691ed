"""`eta` and `eata` (Niu et al., ICML 2022): their updates against a plain step-by-step computation of the paper's
equations (reliability and redundancy filters, weights, moving average, Fisher information, EWC penalty), the source
samples of the Fisher, and the validation of their settings. The registry contracts (reset, resume, NaN batch,
selection) run over both names in tests/test_method_contracts.py."""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tta_surgical.config import Config, ConfigError, OptimConfig, load_config, method_config
from tta_surgical.methods import MethodContext, build_method
from tta_surgical.methods.eata import ewc_penalty, fisher_diagonal
from tta_surgical.models import BlockSpec

REPO = Path(__file__).resolve().parents[1]
N_CLASSES = 4
# SGD (momentum 0.9) in these tests, not the default Adam: Adam divides by the gradient's magnitude, so tensors whose
# gradient is ~0 (a bias that the feature BatchNorm nearly cancels) move by +-lr on float noise and a reference
# computed in another operation order could not be compared; with SGD every step is proportional to the gradient.
OPTIM = OptimConfig(name="sgd", lr=0.1, momentum=0.9)


class Net(nn.Module):
    """conv-bn stem, a conv-bn block, a BatchNorm on the pooled features and a linear head. The feature BatchNorm
    (test-batch statistics) centres the features per batch, so predictions differ between images and both of EATA's
    filters keep some samples and remove others."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.layer1 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.bn_f = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, N_CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.fc.weight.mul_(4.0)
            self.fc.bias.zero_()
            self.bn_f.weight.fill_(1.0)
            self.bn_f.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.bn_f(self.layer1(x).mean((2, 3))))

    def block_spec(self) -> BlockSpec:
        groups = (("input", ("conv1", "bn1")), ("block1", ("layer1",)), ("head", ("bn_f", "fc")))
        return BlockSpec(groups, groups)


def batch(seed: int, n: int = 12) -> torch.Tensor:
    """Images with a random colour per image plus noise (so pooled features differ between images)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 1, 1, generator=g) + 0.3 * torch.rand(n, 3, 6, 6, generator=g)


def source_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return batch(1000, n), torch.randint(0, N_CLASSES, (n,), generator=g)


CONTEXT = MethodContext(seed=0, source_images=source_images, source_note="clean test images, not a source split")


def make(name: str, context: MethodContext = CONTEXT, **settings):
    return build_method(Net(), method_config(name, **settings), OPTIM, context=context)


# ----------------------------------------------------------------------------- an independent reference (plain)


def reference_model(model: nn.Module, blocks=("all",), kind="norm") -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of `model` set up as the paper describes: BatchNorm with test-batch statistics, norm affines trainable."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    params = []
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            params += [m.weight, m.bias]
    return ref, params


def reference_filter(logits: torch.Tensor, mean: torch.Tensor | None, e_margin: float, d_margin: float):
    """Eqns. 3-5 one sample at a time: (entropies, kept indices, weights of the kept, probabilities)."""
    probs = logits.softmax(1)
    entropies = -(probs * torch.log(probs)).sum(1)
    e0 = e_margin * math.log(logits.shape[1])
    kept, weights = [], []
    for i in range(len(logits)):
        if not entropies[i].item() < e0:
            continue  # unreliable
        if mean is not None:
            p = probs[i].detach()
            cosine = (p * mean).sum() / (p.norm() * mean.norm())
            if not cosine.item() < d_margin:
                continue  # redundant
        kept.append(i)
        weights.append(1.0 / math.exp(entropies[i].item() - e0))
    return entropies, kept, weights, probs.detach()


def reference_run(model, batches, e_margin, d_margin, penalty=None):
    """Plain EATA/ETA: per batch, forward, filter, weighted mean entropy (+ penalty) over the kept, one Adam step,
    then m <- m_batch (first time) or 0.9 m + 0.1 m_batch. Returns the logits, kept counts and the final m."""
    ref, params = reference_model(model)
    anchor = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=OPTIM.lr, momentum=OPTIM.momentum, foreach=False)
    mean, outputs, n_kept = None, [], []
    for x in batches:
        logits = ref(x)
        entropies, kept, weights, probs = reference_filter(logits, mean, e_margin, d_margin)
        outputs.append(logits.detach())
        n_kept.append(len(kept))
        if not kept:
            continue
        loss = sum(w * entropies[i] for i, w in zip(kept, weights)) / len(kept)
        if penalty is not None:
            fisher, alpha = penalty
            loss = loss + alpha * sum((f * (p - a) ** 2).sum() for f, p, a in zip(fisher, params, anchor))
        opt.zero_grad()
        loss.backward()
        opt.step()
        batch_mean = probs[kept].mean(0)
        mean = batch_mean if mean is None else 0.9 * mean + 0.1 * batch_mean
    return outputs, n_kept, mean, params


def assert_run_matches(method, batches, e_margin, d_margin, penalty=None) -> list[int]:
    outputs, n_kept, mean, params = reference_run(Net(), batches, e_margin, d_margin, penalty)
    for x, expected, kept in zip(batches, outputs, n_kept):
        logits = method.step(x)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert method.last.n_filtered == len(x) - kept
        assert method.last.n_updates == (1 if kept else 0) and (method.last.loss is None) == (kept == 0)
    for (name, p), q in zip(method.params(), params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(method.probs_mean, mean, rtol=1e-4, atol=1e-6)
    return n_kept


# ----------------------------------------------------------------------------------------------------- ETA


def test_eta_matches_the_papers_equations_step_by_step():
    e_margin, d_margin = 0.4, 0.75
    batches = [batch(s) for s in range(5)]
    method = make("eta", e_margin=e_margin, d_margin=d_margin)
    n_kept = assert_run_matches(method, batches, e_margin, d_margin)
    # The test exercises both filters: some batches keep some samples and drop others, and the first batch
    # (no running mean yet) is filtered by entropy alone.
    assert any(0 < k < 12 for k in n_kept[1:]), n_kept
    assert method.n_filtered == 12 * len(batches) - sum(n_kept)


def test_first_batch_only_filters_by_entropy_and_starts_the_mean():
    method = make("eta", d_margin=0.01)  # would remove almost everything once a mean exists
    x = batch(0)
    logits = method.predict(x)
    probs = logits.softmax(1)
    entropy = -(probs * probs.log()).sum(1)
    reliable = entropy < 0.4 * math.log(N_CLASSES)
    assert 0 < int(reliable.sum()) < len(x)
    method.step(x)
    assert method.last.n_filtered == int((~reliable).sum())
    torch.testing.assert_close(method.probs_mean, probs[reliable].mean(0))
    method.step(batch(1))
    assert method.last.n_filtered >= 11  # now the redundancy filter applies


def test_a_batch_that_keeps_nothing_takes_no_step_and_keeps_the_mean():
    method = make("eta", e_margin=1e-6)  # no prediction is that confident
    before = {n: p.detach().clone() for n, p in method.params()}
    method.step(batch(0))
    assert method.last.n_filtered == 12 and method.n_updates == 0 and method.last.loss is None
    assert method.probs_mean is None and not method.last.skipped
    assert all(torch.equal(p, before[n]) for n, p in method.params())


def test_non_finite_logits_are_filtered_and_change_nothing():
    """Finite inputs whose forward overflows: NaN entropies fail the reliability test, so no step and no mean."""
    method = make("eta")
    method.step(batch(0))
    mean, state = method.probs_mean.clone(), {n: p.detach().clone() for n, p in method.params()}
    x = batch(1)
    x[0] = 3e38
    method.step(x)
    assert torch.equal(method.probs_mean, mean)
    assert all(torch.equal(p, state[n]) for n, p in method.params())


# ----------------------------------------------------------------------------------------------------- EATA


def reference_fisher(model: nn.Module, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Authors' batch form, written out: F = mean over batches of (grad of the batch's mean pseudo-label CE)^2."""
    ref, params = reference_model(model)
    sums = [torch.zeros_like(p) for p in params]
    n_batches = 0
    for start in range(0, len(images), batch_size):
        logits = ref(images[start : start + batch_size])
        loss = nn.functional.cross_entropy(logits, logits.argmax(1).detach())
        for p in params:
            p.grad = None
        loss.backward()
        for s, p in zip(sums, params):
            s += p.grad**2
        n_batches += 1
    return [s / n_batches for s in sums]


def test_fisher_is_the_mean_over_batches_of_squared_batch_gradients():
    images = batch(7, 10)
    ref, params = reference_model(Net())
    got = fisher_diagonal(ref, params, images, batch_size=4)  # batches of 4, 4, 2
    expected = reference_fisher(Net(), images, batch_size=4)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in params)  # the helper leaves .grad alone
    one_batch = fisher_diagonal(ref, params, images, batch_size=10)
    assert not all(torch.allclose(a, b) for a, b in zip(got, one_batch))  # the batch size matters (batch form)


def test_ewc_penalty_is_the_fisher_weighted_squared_distance():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    fisher = [torch.rand(3, generator=g), torch.rand(2, 2, generator=g)]
    anchor = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    expected = sum(
        float(f.flatten()[i]) * (float(p.flatten()[i]) - float(a.flatten()[i])) ** 2
        for p, f, a in zip(params, fisher, anchor)
        for i in range(p.numel())
    )
    assert ewc_penalty(params, fisher, anchor).item() == pytest.approx(expected, rel=1e-6)


def test_eata_fisher_uses_test_batch_statistics_and_warns_about_test_images():
    method = make("eata", fisher_samples=24, fisher_batch_size=24)  # one batch: independent of the seeded order
    expected = reference_fisher(Net(), source_images(24)[0], batch_size=24)
    for f, e in zip(method.fisher, expected):  # same images in another (seeded) order: float-summation tolerance
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-5)
    for a, (_, p) in zip(method.anchor, method.params()):
        assert torch.equal(a, p.detach())
    assert method.warnings == ["method eata: clean test images, not a source split"]


def test_eata_matches_the_papers_equations_step_by_step():
    e_margin, d_margin, alpha = 0.4, 0.75, 50.0  # a large alpha, so the penalty visibly shapes the updates
    method = make("eata", e_margin=e_margin, d_margin=d_margin, fisher_alpha=alpha, fisher_samples=24)
    fisher = [f.clone() for f in method.fisher]
    batches = [batch(s) for s in range(5)]
    assert_run_matches(method, batches, e_margin, d_margin, penalty=(fisher, alpha))
    eta = make("eta", e_margin=e_margin, d_margin=d_margin)
    for x in batches:
        eta.step(x)
    distance = [(p - a).abs().max().item() for (_, p), a in zip(method.params(), method.anchor)]
    eta_distance = [(p - a).abs().max().item() for (_, p), a in zip(eta.params(), method.anchor)]
    assert sum(distance) < sum(eta_distance)  # the penalty holds the parameters closer to the source


def test_fisher_alpha_zero_is_eta_and_needs_no_source():
    eata = make("eata", fisher_alpha=0.0, context=MethodContext(seed=0))
    eta = make("eta")
    assert eata.fisher == [] and eata.warnings == []
    for s in range(3):
        assert torch.equal(eata.step(batch(s)), eta.step(batch(s)))


def test_eata_without_any_source_says_to_set_source_data():
    with pytest.raises(ConfigError, match=r"set method\.source_data"):
        make("eata", context=MethodContext(seed=0))


def write_cifar_folder(root: Path, n_per_batch: int = 8) -> np.ndarray:
    """A CIFAR-10 python-layout folder: data_batch_1..5 with distinct images, and a test_batch of zeros."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = batch(2024, 5 * n_per_batch)  # per-image colours (see `batch`), as uint8 32x32 planes
    images = nn.functional.interpolate(images, size=(32, 32), mode="nearest") / 1.3
    train = (images * 255).round().clamp(0, 255).to(torch.uint8).reshape(5 * n_per_batch, 3072).numpy()
    for i in range(5):
        rows = train[i * n_per_batch : (i + 1) * n_per_batch]
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": rows, "labels": [i % 10] * n_per_batch}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((n_per_batch, 3072), np.uint8), "labels": [0] * n_per_batch}, f)
    return train.reshape(-1, 3, 32, 32)


def test_eata_reads_a_seeded_subset_of_the_training_split(tmp_path):
    train = write_cifar_folder(tmp_path)
    cfg = {"fisher_samples": 40, "fisher_batch_size": 40, "source_data": str(tmp_path)}

    def build(seed: int, **kw):
        return build_method(Net(), method_config("eata", **{**cfg, **kw}), context=MethodContext(seed=seed))

    every = build(0)  # all 40 training images in one batch: the order does not matter
    expected = reference_fisher(Net(), torch.from_numpy(train).float() / 255.0, batch_size=40)
    for f, e in zip(every.fisher, expected):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-5)
    assert every.warnings == []
    a, b, c = build(0, fisher_samples=10), build(0, fisher_samples=10), build(1, fisher_samples=10)
    assert all(torch.equal(x, y) for x, y in zip(a.fisher, b.fisher))  # seeded
    assert not all(torch.equal(x, y) for x, y in zip(a.fisher, c.fisher))  # another seed, another subset


def test_eata_state_carries_the_fisher_and_the_mean():
    method = make("eata", fisher_samples=24)
    method.step(batch(0))
    state = method.state_dict()["state"]
    assert {"model", "optimizer", "rng", "probs_mean", "fisher", "anchor"} <= set(state)
    method.reset()
    assert method.probs_mean is None and len(method.fisher) == len(method.params())


# ------------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("name", ["eta", "eata"])
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("e_margin", 0.0, r"method\.e_margin must lie in \(0, 1\]"),
        ("e_margin", 1.5, r"method\.e_margin must lie in \(0, 1\]"),
        ("e_margin", float("nan"), r"method\.e_margin"),
        ("d_margin", -0.1, r"method\.d_margin must lie in \(0, 1\]"),
        ("d_margin", 2.0, r"method\.d_margin must lie in \(0, 1\]"),
        ("kind", "bias", r"method\.kind='bias' is not valid; choose one of: all, norm, conv"),
    ],
)
def test_settings_are_validated(name, key, value, message):
    with pytest.raises(ConfigError, match=message):
        method_config(name, **{key: value})


def test_eta_has_no_fisher_settings():
    with pytest.raises(ConfigError, match=r"unknown config key method\.fisher_alpha.*for method 'eta'"):
        method_config("eta", fisher_alpha=1.0)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("fisher_alpha", -1.0, r"method\.fisher_alpha must be a finite number >= 0"),
        ("fisher_alpha", float("inf"), r"method\.fisher_alpha must be a finite number >= 0"),
        ("fisher_samples", 0, r"method\.fisher_samples must be >= 1"),
        ("fisher_batch_size", 1, r"method\.fisher_batch_size must be >= 2"),
        ("source_data", " ", r"method\.source_data must be a folder path or null"),
        ("source_data", 3, r"method\.source_data: expected"),
    ],
)
def test_eata_settings_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=message):
        method_config("eata", **{key: value})


def test_defaults_are_the_authors_cifar_settings():
    eata = method_config("eata")
    assert (eata.blocks, eata.kind, eata.e_margin, eata.d_margin) == (("all",), "norm", 0.4, 0.4)
    assert (eata.fisher_alpha, eata.fisher_samples, eata.source_data) == (1.0, 2000, None)
    assert method_config("eta") == method_config("eta", e_margin=0.4, d_margin=0.4, blocks=["all"], kind="norm")


@pytest.mark.parametrize("name", ["eta", "eata"])
def test_configs_are_the_defaults_with_the_authors_optimiser(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config) and cfg.method == method_config(name)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == ("adam", 1e-3, (0.9, 0.999), 0.0)
    assert cfg.model.name == "resnet20"


# ---------------------------------------------------------------------------------------------- end to end


def test_eata_run_reports_filtered_images_loss_and_the_source_warning(tmp_path, data_root):
    """configs/eata.yaml through the engine on a tiny real stream: without method.source_data the Fisher comes from
    the clean test images and summary.json says so; filtered images and losses reach the results lines."""
    import json

    from tta_surgical.corruptions import CORRUPTIONS
    from tta_surgical.engine import run

    if "gaussian_noise" not in CORRUPTIONS:
        pytest.skip("gaussian_noise is not registered")
    overrides = [
        "stream.domains=[gaussian_noise]",
        "stream.severities=[5]",
        "stream.n_examples=64",
        "stream.batch_size=32",
        "runtime.device=cpu",
        "runtime.progress=false",
        "method.fisher_samples=64",
        "method.fisher_batch_size=32",
    ]
    cfg = load_config(REPO / "configs" / "eata.yaml", overrides=overrides)
    with pytest.warns(UserWarning, match="clean CIFAR-10 \\*test\\* images"):
        summary = run(cfg, tmp_path / "eata", data=data_root)
    assert any("method.source_data" in w for w in summary["method_warnings"])
    lines = [json.loads(x) for x in (tmp_path / "eata" / "results.jsonl").read_text().splitlines() if x.strip()]
    assert summary["n_filtered"] == sum(r["n_filtered"] for r in lines) > 0
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in lines)
    assert summary["n_updates"] == len(lines) == 2
