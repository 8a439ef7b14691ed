"""`method.blocks: auto` (`tta_surgical.methods.selection`): label-free choice of what to adapt and of the BatchNorm
statistics, batch by batch, on tiny models and synthetic streams whose shift comes and goes.

The tiny "source" model is `TinyNet` with its BatchNorm running statistics measured on the source distribution
below (class prototypes plus texture), so clean batches sit near the source statistics and shifted ones do not.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import math

import pytest
import torch
from _toy_methods import N_CLASSES, TinyNet
from test_engine import Crash, read_lines, tiny_cfg
from test_method_contracts import CONTEXT, assert_equal, snapshot

import tta_surgical
from tta_surgical.config import ConfigError, OptimConfig, method_config
from tta_surgical.engine import run
from tta_surgical.methods import build_method, selection, signals
from tta_surgical.methods.selection import Selector, candidate_blocks, is_auto
from tta_surgical.models import select_params

ADAPTING = ("tent", "surgical", "eta", "eata", "sar", "deyo", "roid", "cotta", "rotta")
# Settings that fit the tiny model (as in test_method_contracts.py): filters that keep samples, small banks.
TINY: dict[str, dict] = {
    "cotta": {"n_augmentations": 4, "ap": 1.0},
    "rotta": {"memory_size": 10, "update_every": 16},
    "eata": {"fisher_samples": 32, "d_margin": 0.999},
    "eta": {"d_margin": 0.999},
    "deyo": {"plpd_threshold": 0.0},
    "sar": {"e_m": 0.05},
}
PROTOTYPES = torch.rand(N_CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def clean(seed: int, n: int = 32, label: int | None = None) -> torch.Tensor:
    """Source images: a class prototype plus texture; `label` makes a one-class batch (label shift only)."""
    g = torch.Generator().manual_seed(1000 + seed)
    y = torch.full((n,), label) if label is not None else torch.randint(0, N_CLASSES, (n,), generator=g)
    return (0.5 * PROTOTYPES[y] + 0.5 * torch.rand(n, 3, 8, 8, generator=g)).clamp(0, 1)


def shifted(seed: int, n: int = 32) -> torch.Tensor:
    """A covariate shift that moves the first layer's statistics: low contrast and strong pixel noise."""
    g = torch.Generator().manual_seed(2000 + seed)
    return (0.2 * clean(seed, n) + 0.4 + 0.6 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)


def labelled(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5000 + seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return (0.5 * PROTOTYPES[y] + 0.5 * torch.rand(n, 3, 8, 8, generator=g)).clamp(0, 1), y


@functools.lru_cache(maxsize=2)
def _trained(seed: int) -> TinyNet:
    """TinyNet trained on the source distribution (so its predictions follow the classes), then its running
    statistics measured there (a cumulative average over 40 batches)."""
    torch.manual_seed(seed)
    net = TinyNet(seed, 1.0, deep=True, bn_weights=True).train()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for step in range(150):
        x, y = labelled(step, 64)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for s in range(40):
            net(clean(10_000 + s, 64))
    for bn in bns:
        bn.momentum = 0.1
    return net.eval().requires_grad_(True)


def source_net(seed: int = 0) -> TinyNet:
    return copy.deepcopy(_trained(seed))


def make(name: str = "eta", seed: int = 0, **settings):
    cfg = method_config(name, **{**TINY.get(name, {}), "blocks": ["auto"], **settings})
    return build_method(source_net(seed), cfg, OptimConfig(lr=5e-3), context=CONTEXT)


def stream(n_clean: int = 3, n_shift: int = 6, n_back: int = 8) -> list[torch.Tensor]:
    """Clean, then shifted, then clean again: the selector must follow the shift in and out."""
    return [clean(i) for i in range(n_clean)] + [shifted(i) for i in range(n_shift)] + [
        clean(100 + i) for i in range(n_back)
    ]


def choices(method, batches) -> list[tuple[str, str]]:
    out = []
    for x in batches:
        method.step(x)
        out.append((method.last.adapted, method.last.bn_stats))
    return out


# ---------------------------------------------------------------------------------------------------- config


def test_auto_is_a_valid_block_selection_alone():
    cfg = method_config("eta", blocks=["auto"])
    assert is_auto(cfg.blocks) and is_auto("auto") and not is_auto(["block1"])
    with pytest.raises(ConfigError, match="auto chooses the blocks itself"):
        method_config("eta", blocks=["auto", "block1"])


def test_memo_refuses_auto_with_a_clear_error():
    with pytest.raises(ValueError, match="memo does not support blocks: auto"):
        build_method(source_net(), method_config("memo", blocks=["auto"], n_augmentations=2), OptimConfig())


def test_api_adapt_takes_blocks_auto():
    adapted = tta_surgical.adapt(source_net(), "eta", blocks="auto", d_margin=0.999)
    adapted(shifted(0))
    assert adapted.last.adapted in {"block1", "block2", "block1-2", "none"}
    assert adapted.last.bn_stats in {"batch", "source"}


# ---------------------------------------------------------------------------------------------------- mechanics


def test_a_model_without_stages_is_a_clear_error():
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5))
    tta_surgical.blocks(net, block_map={"input": ["0", "1"], "head": ["3"]})
    with pytest.raises(ValueError, match="blocks: auto needs a block map with stages"):
        candidate_blocks(net)


def test_candidates_and_union_are_the_first_two_stages():
    method = make()
    model = method.model
    assert candidate_blocks(model) == {"block1": ["block1"], "block2": ["block2"], "block1-2": ["block1", "block2"]}
    union = {n for n, _ in select_params(model, ["block1", "block2"], "all")}
    assert {n for n, _ in method.params()} == union
    assert isinstance(method.selector, Selector)


@pytest.fixture
def sticky(monkeypatch):
    """A policy that never confirms a new choice, so a test can set the choice by hand."""
    monkeypatch.setattr(selection, "DEFAULT_POLICY", dataclasses.replace(selection.DEFAULT_POLICY, confirm=10**6))


def test_only_the_chosen_blocks_change_and_adam_state_of_the_others_is_untouched(sticky):
    """Force block2, then block1: each step changes exactly the chosen tensors; the other's Adam state stays."""
    method = make("tent")
    model = method.model
    block1 = dict(select_params(model, ["block1"], "all"))
    block2 = dict(select_params(model, ["block2"], "all"))
    method.step(shifted(0))  # the first decision: shifted, adapt
    method.selection["choice"] = ["block2", "batch"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.step(shifted(1))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(block2), sorted(changed)
    state_block2 = {n: copy.deepcopy(method.optimizer.state[p]) for n, p in block2.items()}
    method.selection["choice"] = ["block1", "batch"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.step(shifted(2))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == set(block1), sorted(changed)
    for n, p in block2.items():  # Adam skipped block2: its moments and step count are those of the last block2 step
        for key, value in state_block2[n].items():
            assert torch.equal(method.optimizer.state[p][key], value), (n, key)


def test_gradients_stop_at_the_earliest_chosen_block(sticky):
    method = make("tent")
    method.step(shifted(0))
    method.selection["choice"] = ["block2", "batch"]
    grads = {}
    hooks = [p.register_hook(lambda g, n=n: grads.setdefault(n, g)) for n, p in method.model.named_parameters()
             if p.requires_grad or n.startswith("layer1")]
    method.step(shifted(1))
    for h in hooks:
        h.remove()
    assert grads and all(n.startswith("layer2") for n in grads), sorted(grads)


# ---------------------------------------------------------------------------------------------------- the rule


def test_selector_follows_a_shift_in_and_out():
    """Clean -> source statistics, nothing adapted; shifted -> adapt with test statistics; clean again -> back to
    the source model (restored: `auto_source`)."""
    method = make()
    seen = choices(method, stream())
    assert seen[:3] == [("none", "source")] * 3
    assert all(c[0] != "none" and c[1] == "batch" for c in seen[4:9]), seen
    assert seen[-1] == ("none", "source"), seen
    assert method.method_resets_by_kind.get("auto_source") == 1


def test_back_to_source_restores_the_source_model_exactly():
    method = make()
    source = {k: v.clone() for k, v in method.model.state_dict().items()}
    reference = source_net()
    choices(method, stream())
    assert all(torch.equal(v, source[k]) for k, v in method.model.state_dict().items())
    x = clean(555)
    assert torch.allclose(method.step(x), reference(x), atol=1e-6)


def test_label_shift_only_stream_keeps_the_source_statistics():
    """One-class batches from the source distribution: the class prior drifts, the inputs do not move."""
    method = make()
    seen = choices(method, [clean(i, label=i // 3 % N_CLASSES) for i in range(15)])
    assert set(seen) == {("none", "source")}, seen
    assert method.n_updates == 0


def test_one_odd_batch_does_not_flip_the_choice():
    """Hysteresis: a single shifted batch inside a clean stream changes nothing."""
    method = make()
    batches = [clean(i) for i in range(4)] + [shifted(0)] + [clean(50 + i) for i in range(4)]
    assert set(choices(method, batches)) == {("none", "source")}


def other_shift(seed: int, n: int = 32) -> torch.Tensor:
    """A second covariate shift with another per-layer profile: a 3 x 3 box blur (textures gone, contrast kept)."""
    return torch.nn.functional.avg_pool2d(clean(seed, n), 3, stride=1, padding=1)


def test_a_shift_that_moves_restarts_the_young_domain_rule():
    """Noise for a while (both early stages, then the first alone once the domain is old), then another shift: the
    selector sees the per-layer shift profile move and adapts both early stages again, then block1 again."""
    method = make(auto_young=3)
    seen = choices(method, [shifted(i) for i in range(8)] + [other_shift(i) for i in range(12)])
    first, second = [c[0] for c in seen[:8]], [c[0] for c in seen[8:]]
    assert first[:3] == ["block1-2"] * 3 and first[-1] == "block1", seen
    old = first.index("block1")
    assert "block1-2" in second and second[-1] == "block1", seen  # the new domain is young, then old
    restart = second.index("block1-2")
    assert all(c == "block1-2" for c in second[restart : restart + 3]), seen
    assert old >= 3 and all(c[1] == "batch" for c in seen), seen


def test_a_steady_shift_never_restarts():
    """The same shift throughout: one young period at the start, then block1 to the end (no false domain change)."""
    seen = [c[0] for c in choices(make(auto_young=3), [shifted(i) for i in range(20)])]
    switch = seen.index("block1")
    assert set(seen[:switch]) == {"block1-2"} and set(seen[switch:]) == {"block1"}, seen


# ---------------------------------------------------------------------------------------- the per-method young phase


def test_deyo_adapts_both_early_stages_for_the_whole_shifted_domain():
    """DeYO's young phase is the whole domain: it never switches to block1 while shifted (eta, on the same stream,
    does after its 10 young batches), and a clean stream still serves the source model."""
    assert method_config("deyo", blocks=["auto"]).auto_young == "domain"
    batches = [shifted(i) for i in range(16)]
    assert {c[0] for c in choices(make("deyo"), batches)} == {"block1-2"}
    eta = [c[0] for c in choices(make("eta"), batches)]
    assert eta[:10] == ["block1-2"] * 10 and eta[-1] == "block1", eta
    assert choices(make("deyo"), stream(3, 0, 0)) == [("none", "source")] * 3


@pytest.mark.parametrize("name", ("tent", "eta", "deyo"))
def test_each_method_leaves_the_young_phase_after_its_own_length(name):
    """`auto_young=N` overrides the method's default: N batches of block1-2 (plus the `confirm` batches a new
    choice waits), then block1 to the end of a steady shift."""
    seen = [c[0] for c in choices(make(name, auto_young=4), [shifted(i) for i in range(12)])]
    switch = seen.index("block1")
    assert set(seen[:switch]) == {"block1-2"} and set(seen[switch:]) == {"block1"}, seen
    assert switch == 4 + selection.DEFAULT_POLICY.confirm - 1, seen


def _stage(method, stage: str) -> dict[str, torch.nn.Parameter]:
    return dict(select_params(method.model, [stage], "all"))


def test_young_restore_puts_the_second_stage_back_to_the_source_with_its_optimiser_state():
    """`auto_young_restore`: when the domain ages out, the second stage's parameters equal the source again and
    Adam holds no state for them (the first stage keeps what it learnt); the results line reports the restore; a
    new domain adapts block2 from the source."""
    method = make("tent", auto_young=3)  # Tent restores by default
    source = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    block1, block2 = _stage(method, "block1"), _stage(method, "block2")
    seen = []
    for i in range(8):
        method.step(shifted(i))
        seen.append((method.last.adapted, method.last.method_reset))
        if method.last.adapted == "block1-2":
            assert any(not torch.equal(p, source[n]) for n, p in block2.items())  # block2 is adapting
            learnt = {n: p.detach().clone() for n, p in block1.items()}
    switch = [a for a, _ in seen].index("block1")
    assert seen[switch] == ("block1", "auto_young_restore") and seen[-1] == ("block1", None), seen
    assert all(torch.equal(p, source[n]) for n, p in block2.items())
    assert all(p not in method.optimizer.state for p in block2.values())
    assert any(not torch.equal(p, learnt[n]) for n, p in block1.items())  # block1 kept adapting after the switch
    assert any(not torch.equal(learnt[n], source[n]) for n in block1)  # ... from what it had learnt, not the source
    assert method.method_resets_by_kind == {"auto_young_restore": 1}
    method.step(other_shift(0))  # a new domain: block2 adapts again, from the source
    method.step(other_shift(1))
    assert method.last.adapted == "block1-2" and all(p in method.optimizer.state for p in block2.values())


def test_without_restore_block2_keeps_its_adaptation_after_the_young_phase():
    """The default of ETA and the others (and Tent's with `auto_young_restore=false`): block2 stays as adapted."""
    assert method_config("tent", blocks=["auto"]).auto_young_restore and method_config("surgical").auto_young_restore
    assert not method_config("eta", blocks=["auto"]).auto_young_restore
    method = make("tent", auto_young=3, auto_young_restore=False)
    source = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    for i in range(8):
        method.step(shifted(i))
    assert method.last.adapted == "block1" and method.n_method_resets == 0
    assert any(not torch.equal(p, source[n]) for n, p in _stage(method, "block2").items())


def test_auto_young_settings_are_validated():
    with pytest.raises(ConfigError, match="auto_young must be >= 0"):
        method_config("eta", blocks=["auto"], auto_young=-1)
    with pytest.raises(ConfigError, match="expected int | 'domain'"):
        method_config("eta", blocks=["auto"], auto_young="always")
    with pytest.raises(ConfigError, match="applies to blocks: auto only"):
        method_config("eta", blocks=["block1"], auto_young=5)
    with pytest.raises(ConfigError, match="applies to blocks: auto only"):
        method_config("tent", blocks=["block1"], auto_young_restore=not method_config("tent").auto_young_restore)
    with pytest.raises(ConfigError, match="unknown key|not a valid key|valid keys"):
        method_config("eta", blocks=["auto"], auto_yuong=3)
    with pytest.raises(ValueError, match="auto_young_restore restores the second stage"):
        make("cotta", auto_young_restore=True)  # a teacher holds another copy of the blocks
    assert method_config("eta", blocks=["auto"], auto_young="domain").auto_young == "domain"
    assert method_config("deyo", blocks=["auto"], auto_young=10).auto_young == 10


def test_auto_young_override_from_the_command_line_and_yaml(tmp_path):
    from tta_surgical.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("method: {name: eta, blocks: [auto], auto_young: domain}\n")
    cfg = load_config(path, overrides=["method.auto_young=4"])
    assert cfg.method.auto_young == 4


# ---------------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("name", [*ADAPTING, "tent-restore"])
def test_auto_resume_equals_uninterrupted(name):
    batches = stream(2, 5, 3)
    settings = {}
    if name == "tent-restore":  # the checkpoint falls in the young phase, the restore after it (batch 6)
        name, settings = "tent", {"auto_young": 2}
    full = make(name, **settings)
    for x in batches[:4]:
        full.step(x)
    buffer = io.BytesIO()
    torch.save(full.state_dict(), buffer)
    expected = [(full.step(x), full.last.adapted, full.last.bn_stats) for x in batches[4:]]
    resumed = make(name, **settings)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for x, (logits, adapted, bn) in zip(batches[4:], expected):
        assert torch.equal(resumed.step(x), logits)
        assert (resumed.last.adapted, resumed.last.bn_stats) == (adapted, bn)


@pytest.mark.parametrize("name", ("eta", "cotta", "rotta"))
def test_auto_reset_restores_the_policy_and_replays_exactly(name):
    batches = stream(2, 4, 2)
    method = make(name)
    first = choices(method, batches)
    outputs = []
    method.reset()
    for x in batches:
        outputs.append(method.step(x))
    method2 = make(name)
    assert [method2.step(x).tolist() for x in batches] == [o.tolist() for o in outputs]
    assert choices(make(name), batches) == first


def test_nan_batch_reports_nothing_adapted_and_changes_no_state():
    method = make()
    method.step(shifted(0))
    state = snapshot(method)
    x = shifted(1)
    x[0, 0, 0, 0] = float("nan")
    method.step(x)
    assert method.last.adapted == "none" and method.last.skipped
    assert_equal(snapshot(method), state)


# ---------------------------------------------------------------------------------------------------- the engine


def test_engine_records_every_decision_counts_them_and_resumes_exactly(tmp_path, data_root):
    """A real run (resnet20, 2 corruptions x 2 batches, continual): every results line says what was adapted and
    with which statistics, summary.json counts the choices, and a run resumed after a crash equals an uninterrupted
    one, decisions included."""
    cfg = tiny_cfg("eta", "method.blocks=[auto]", "stream.reset=never")
    full = run(cfg, tmp_path / "full", data=data_root, record_predictions=True)
    lines = read_lines(tmp_path / "full")
    assert all(r["selected"] in {"none", "block1", "block2", "block1-2"} for r in lines)
    assert all(r["bn_stats"] in {"source", "batch"} for r in lines)
    counts: dict[str, int] = {}
    for r in lines:
        key = f"{r['selected']}, {r['bn_stats']}"
        counts[key] = counts.get(key, 0) + 1
    assert full["selection_counts"] == counts and sum(counts.values()) == full["n_batches"] == 4
    assert "auto: batches per choice" in (tmp_path / "full" / "summary.md").read_text()

    def crash(batch_index: int, record: dict) -> None:
        if batch_index == 2:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, tmp_path / "crashy", data=data_root, on_batch=crash, record_predictions=True)
    resumed = run(cfg, tmp_path / "crashy", data=data_root, resume=True, record_predictions=True)
    again = read_lines(tmp_path / "crashy")
    keys = ("batch_index", "correct", "pred", "selected", "bn_stats", "method_reset")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in lines]
    assert resumed["selection_counts"] == full["selection_counts"] and resumed["errors"] == full["errors"]



def test_auto_under_time_pressure_keeps_both_records(tmp_path, data_root):
    """`blocks: auto` on a stream that does not wait: a line says whether the batch got an update (`adapted`, the
    time machinery's) and, separately, what auto chose (`selected`); one key must not overwrite the other."""
    time_keys = ("stream.arrival.kind=constant", "stream.arrival.speed=1", "runtime.cost_mode=fixed",
                 "runtime.cost_ratio=2.5", "runtime.forward_ms=10")  # fmt: skip
    cfg = tiny_cfg("eta", "method.blocks=[auto]", "stream.reset=never", *time_keys)
    summary = run(cfg, tmp_path / "t", data=data_root)
    lines = read_lines(tmp_path / "t")
    assert all(isinstance(r["adapted"], bool) for r in lines)
    assert all(r["selected"] in {"none", "block1", "block2", "block1-2"} for r in lines)
    assert summary["n_adapted_batches"] == sum(r["adapted"] for r in lines) < len(lines)
    assert all(r["selected"] == "none" for r in lines if not r["adapted"])  # predicted only: nothing adapted


def test_guard_judges_nothing_while_auto_serves_the_source_model(tmp_path, data_root):
    """Clean images with Dirichlet-ordered labels: auto serves the source model (nothing adapted), so the drift
    guard has nothing to judge; its `norm` reference would see only the label shift and call it drift."""
    shift = ("stream.label_shift=dirichlet", "stream.dirichlet_delta=0.1", "stream.reset=never")
    cfg = tiny_cfg("eta", "method.blocks=[auto]", *shift, "stream.domains=[none]", n=96)
    summary = run(cfg, tmp_path / "t", data=data_root)
    assert set(summary["selection_counts"]) == {"none, source"}
    assert summary["guard_reference"] == "norm" and summary["n_guard_checks"] == 0 == summary["n_guard_alarms"]
    fixed = run(tiny_cfg("eta", *shift, "stream.domains=[none]", n=96), tmp_path / "f", data=data_root)
    assert fixed["n_guard_checks"] > 0  # the same stream with a fixed selection is checked

def test_fixed_selections_write_no_decision_fields(tmp_path, data_root):
    summary = run(tiny_cfg("tent", "stream.n_examples=16"), tmp_path / "t", data=data_root)
    assert summary["selection_counts"] is None
    assert all("selected" not in r for r in read_lines(tmp_path / "t"))


# ---------------------------------------------------------------------------------------------------- the signals


def test_gaussian_kl_is_zero_on_the_source_statistics_and_grows_with_the_shift():
    mean, var = torch.zeros(4), torch.ones(4)
    assert float(signals.gaussian_kl(mean, var, mean, var)) == pytest.approx(0.0, abs=1e-6)
    small = float(signals.gaussian_kl(mean + 0.1, var, mean, var))
    large = float(signals.gaussian_kl(mean + 1.0, 2 * var, mean, var))
    assert small == pytest.approx(0.5 * 0.01, rel=1e-3) and large > small


def test_source_reference_is_frozen_and_measures_the_input_shift():
    net = source_net()
    reference = signals.SourceReference(net)
    _, clean_shift = reference.probe(clean(0))
    logits, noisy_shift = reference.probe(shifted(0))
    assert torch.allclose(logits, net.eval()(shifted(0)), atol=1e-6)
    assert clean_shift.shape == noisy_shift.shape and float(noisy_shift.mean()) > 3 * float(clean_shift.mean())
    assert all(not p.requires_grad for p in reference.model.parameters())


def test_prior_drift_agreement_and_block_rgn():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(signals.prior_drift(probs, torch.tensor([1.0, 0.0]))) == pytest.approx(0.0, abs=1e-5)
    assert float(signals.prior_drift(probs, torch.tensor([0.5, 0.5]))) == pytest.approx(math.log(2), rel=1e-3)
    a, b = torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([[2.0, 1.0], [1.0, 0.0]])
    assert float(signals.agreement(a, b)) == 0.5
    p = torch.ones(4)
    assert signals.block_rgn({"block1": [(p, 0.5 * p)], "block2": [(p, None)]}) == {"block1": 0.5, "block2": 0.0}
