"""Stream plans for long and ragged streams (issue 11): a segment's single-image last batch joins the previous batch
(every other plan byte-identical), `n_examples: all` (0 is an error), and `rounds` (the domain sequence repeated,
keyed per round in results and summarised per round)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tta_surgical.config import ConfigError, apply_overrides, load_config, to_dict
from tta_surgical.corruptions import BENCHMARK_CORRUPTIONS
from tta_surgical.engine import RESULTS_FILE, run
from tta_surgical.metrics import ErrorMeter, domain_key, round_of
from tta_surgical.streams import StreamSpec, batch_bounds, load_stream_spec, plan_fingerprint, plan_stream

LABELS = np.random.default_rng(0).permutation(np.arange(10000) % 10)
FIFTEEN = BENCHMARK_CORRUPTIONS  # the shipped streams' domains, in their order

# Fingerprints of plans with no single-image batch, computed with the planner before this change (commit d2a2eb7):
# the merge rule and the rounds field must leave every one of them unchanged.
UNCHANGED = {
    "continual": (
        dict(domains=FIFTEEN, n_examples=10000, reset="never"),
        "6becf2ff9527916444d8912a15f428d4031d7ac96a33b8db3ed82d7bd1ba200a",
    ),
    "dirichlet": (
        dict(domains=FIFTEEN, n_examples=10000, reset="never", label_shift="dirichlet", batch_size=64),
        "f1a8edf7127ed9e3d5cc2d83295c0575f6a8520c1d6be5f8daa2cf601e72f826",
    ),
    "gradual": (
        dict(domains=FIFTEEN, n_examples=10000, reset="never", order="gradual", severities=(1, 2, 3, 4, 5)),
        "17f24c8a141f9f309a21e92ad6c041b291c7315cac2a1e29f270df42e7baa678",
    ),
    "mixed": (
        dict(domains=FIFTEEN, n_examples=10000, reset="never", order="mixed"),
        "c75bbba71894f889ad1fe5afbd2504a3c777339e914051f1e73e0ae425e05781",
    ),
    "reset": (
        dict(domains=FIFTEEN, n_examples=10000, reset="per_domain"),
        "77cae58971c973930c2800756f0495abb2882ee4700fa71f1b9455b7b2097c9a",
    ),
    "ragged": (
        dict(domains=("fog", "snow"), severities=(3, 5), n_examples=250, batch_size=100, reset="never"),
        "6d37fa24c5dc296fc81292434b5579891bea65ec57744243008a0dce9e6729d7",
    ),
    "gradual_tail2": (
        dict(order="gradual", domains=("fog", "snow"), n_examples=130, batch_size=64, shuffle=True, reset="never"),
        "8276ba7a3ec269aadb54dfafad09b330546daf548303d1e0c2319c1c452d2556",
    ),
    "mixed_dirichlet": (
        dict(
            order="mixed",
            label_shift="dirichlet",
            domains=("fog", "snow", "contrast"),
            n_examples=300,
            batch_size=64,
            reset="never",
        ),  # fmt: skip
        "1d026c9887cc09bf3db4cd0f265d435c7315c690ce4dab0559f6c470b5b7f4c8",
    ),
    "every_n": (
        dict(domains=("fog",), n_examples=500, batch_size=64, reset="every_n", reset_every=3),
        "c5705c4383536e97240cdafb05225efb97529b668a1d8c17fe35afbc09b064f9",
    ),
    "per_class": (
        dict(per_class=7, domains=("fog",), batch_size=16),
        "1ef66dfce74e852c55fa3f42c538b149906c8696aa26c439b44002e4ea8ec67a",
    ),
}


@pytest.mark.parametrize("name", list(UNCHANGED))
def test_plans_without_a_single_image_batch_are_byte_identical(name):
    kw, fingerprint = UNCHANGED[name]
    plan = plan_stream(StreamSpec(**kw), LABELS)
    assert all(len(p) <= kw.get("batch_size", 200) for p in plan)
    assert plan_fingerprint(plan) == fingerprint
    assert plan_fingerprint(plan_stream(StreamSpec(**kw, rounds=1), LABELS)) == fingerprint


# ------------------------------------------------------------------------------------------------ single-image batches


@pytest.mark.parametrize(
    ("n", "bs", "sizes"),
    [
        (201, 100, [100, 101]),
        (200, 100, [100, 100]),
        (202, 100, [100, 100, 2]),
        (101, 50, [50, 51]),
        (1, 100, [1]),  # a one-image segment has no previous batch to join
        (3, 1, [1, 1, 1]),  # batch_size 1 is the user's choice
        (5, 2, [2, 3]),
        (0, 10, []),
    ],
)
def test_batch_bounds(n, bs, sizes):
    bounds = batch_bounds(n, bs)
    assert [e - a for a, e in bounds] == sizes
    assert [a for a, _ in bounds] == [sum(sizes[:i]) for i in range(len(sizes))]  # contiguous, in order


def test_batch_bounds_never_leave_a_single_image_batch_behind():
    for n in range(1, 60):
        for bs in range(2, 12):
            sizes = [e - a for a, e in batch_bounds(n, bs)]
            assert sum(sizes) == n and max(sizes) <= bs + 1
            assert 1 not in sizes or n == 1
            assert sizes[:-1] == [bs] * (len(sizes) - 1)  # only the last batch of a segment changes


@pytest.mark.parametrize("order", ["sequential", "gradual", "mixed"])
def test_single_image_tail_joins_the_previous_batch_of_its_segment(order):
    kw = dict(domains=("fog", "snow"), severities=(2, 4), n_examples=201, batch_size=100, reset="never", order=order)
    if order == "mixed":  # one segment: 2 domains x 799 images = 1598 = a batch of 1597 + a tail of 1
        kw.update(severities=(2,), n_examples=799, batch_size=1597)
    spec = StreamSpec(**kw)
    plan = plan_stream(spec, LABELS)
    assert min(len(p) for p in plan) > 1
    assert any(len(p) == spec.batch_size + 1 for p in plan)
    segments: list[list[np.ndarray]] = []
    for b, p in enumerate(plan):  # still one domain and severity per batch (except mixed)
        if order != "mixed":
            assert len(set(p.domain_ids.tolist())) == 1 and len(set(p.item_severities.tolist())) == 1
        new = b == 0 or (p.domain_index, p.severity) != (plan[b - 1].domain_index, plan[b - 1].severity)
        segments.append([p.indices]) if new else segments[-1].append(p.indices)
    for parts in segments:  # every image exactly once per segment (a mixed stream draws each per domain)
        flat = np.concatenate(parts)
        assert len(flat) == len(set(flat.tolist())) or order == "mixed"
    assert sum(len(p) for p in plan) == {"sequential": 4 * 201, "gradual": 2 * 3 * 201, "mixed": 2 * 799}[order]
    assert [p.batch_index for p in plan] == list(range(len(plan)))


def test_summary_counts_merged_batches_and_results_show_them(tmp_path, data_root):
    cfg = load_config(
        overrides=[
            "method.name=norm",
            "stream.domains=[fog,contrast]",
            "stream.n_examples=21",
            "stream.batch_size=10",
            "stream.reset=never",
            "runtime.device=cpu",
            "runtime.progress=false",
        ]  # fmt: skip
    )
    summary = run(cfg, tmp_path / "r", data=data_root)
    counts = [json.loads(x)["count"] for x in (tmp_path / "r" / RESULTS_FILE).read_text().splitlines()]
    assert counts == [10, 11, 10, 11]
    assert summary["n_single_image_batches_merged"] == 2 and summary["n_images"] == 42


# ------------------------------------------------------------------------------------------------ n_examples: all


def test_n_examples_all_and_zero(tmp_path):
    assert StreamSpec(n_examples="all").n_examples is None == StreamSpec().n_examples is None
    with pytest.raises(ConfigError, match=r"stream\.n_examples=0 selects no images \(0 no longer means all\); write "
                       r"stream\.n_examples=all"):  # fmt: skip
        StreamSpec(n_examples=0)
    with pytest.raises(ConfigError, match=r"stream\.n_examples=-5 selects no images; write stream\.n_examples=all"):
        load_config(overrides=["stream.n_examples=-5"])
    with pytest.raises(ConfigError, match=r"stream\.n_examples: expected int \| 'all' \| None, got 'some'"):
        load_config(overrides=["stream.n_examples=some"])
    path = tmp_path / "s.yaml"
    path.write_text("stream:\n  domains: [fog]\n  n_examples: all\n")
    spec = load_stream_spec(path)
    assert spec.n_examples is None and to_dict(spec)["n_examples"] is None  # stored as null: same hash as before
    cfg = apply_overrides(load_config(stream=path), ["stream.n_examples=all"])
    assert cfg.stream == spec
    plan = plan_stream(spec, LABELS)
    assert sum(len(p) for p in plan) == len(LABELS)


# ------------------------------------------------------------------------------------------------ rounds


def test_rounds_repeat_the_sequence_with_the_same_images_and_noise():
    one = StreamSpec(domains=("fog", "snow"), n_examples=300, batch_size=64, reset="never", shuffle=True)
    first = plan_stream(one, LABELS)
    three = plan_stream(dataclasses.replace(one, rounds=3), LABELS)
    assert len(three) == 3 * len(first)
    n_blocks = 1 + max(p.domain_index for p in first)
    for b, p in enumerate(three):
        q = first[b % len(first)]
        assert p.batch_index == b and p.round == b // len(first)
        assert p.domain_index == q.domain_index + p.round * n_blocks
        assert (p.domain, p.severity, p.noise_seed) == (q.domain, q.severity, q.noise_seed)
        assert np.array_equal(p.indices, q.indices) and np.array_equal(p.domain_ids, q.domain_ids)
    assert plan_fingerprint(three[: len(first)]) == plan_fingerprint(first)  # the first round hashes as before
    assert plan_fingerprint(three) != plan_fingerprint(first * 3)  # later rounds are told apart


@pytest.mark.parametrize(
    ("reset", "expected"),
    [
        ("per_domain", lambda b, p: b > 0 and b % 2 == 0),  # 2 batches per domain; rounds start new domains
        ("never", lambda b, p: False),
        ("every_n", lambda b, p: b > 0 and b % 3 == 0),  # the stream's batch index, across rounds
        ("episodic", lambda b, p: b > 0),
    ],
)
def test_resets_across_rounds(reset, expected):
    spec = StreamSpec(domains=("fog", "snow"), n_examples=20, batch_size=10, reset=reset, reset_every=3, rounds=2)
    plan = plan_stream(spec, LABELS)
    assert len(plan) == 8
    assert [p.reset_before for p in plan] == [expected(b, p) for b, p in enumerate(plan)]


def test_rounds_must_be_positive():
    with pytest.raises(ConfigError, match=r"stream\.rounds must be an integer >= 1, got 0"):
        load_config(overrides=["stream.rounds=0"])


def test_round_keys_and_errors_by_round():
    assert domain_key("fog", 5, False) == "fog" and domain_key("fog", 5, True, 1) == "fog@5/r2"
    assert round_of("fog@5/r2") == 2 and round_of("fog") == 1 and round_of("fog@5") == 1
    meter = ErrorMeter()
    for key, correct, count in [("fog/r1", 5, 10), ("snow/r1", 10, 10), ("fog/r2", 8, 10), ("snow/r2", 6, 20)]:
        meter.update(key, correct, count)
    mean, online = meter.by_round()
    assert mean == pytest.approx([25.0, 45.0]) and online == pytest.approx([25.0, 100 * (1 - 14 / 30)])


def test_a_run_over_rounds_reports_each_round_and_resumes(tmp_path, data_root):
    cfg = load_config(
        overrides=[
            "method.name=norm",
            "stream.domains=[fog,contrast]",
            "stream.n_examples=30",
            "stream.batch_size=10",
            "stream.reset=never",
            "stream.rounds=3",
            "runtime.device=cpu",
            "runtime.progress=false",
        ]  # fmt: skip
    )
    whole = run(cfg, tmp_path / "whole", data=data_root)
    assert list(whole["errors"]) == [f"{d}/r{r}" for r in (1, 2, 3) for d in ("fog", "contrast")]
    # norm keeps no state between batches and every round has the same images and noise: equal rounds
    assert len(set(whole["errors_by_round"])) == 1 and len(whole["errors_by_round"]) == 3
    assert whole["errors_by_round"][0] == pytest.approx(whole["mean_error"])
    assert whole["online_errors_by_round"] == pytest.approx([whole["online_error"]] * 3)
    assert whole["errors"]["fog/r1"] == whole["errors"]["fog/r3"] and "3 rounds" in whole["stream"]
    lines = [json.loads(x) for x in (tmp_path / "whole" / RESULTS_FILE).read_text().splitlines()]
    assert [x["domain"] for x in lines[::3]] == ["fog/r1", "contrast/r1", "fog/r2", "contrast/r2", "fog/r3",
                                                  "contrast/r3"]  # fmt: skip

    class Crash(Exception):
        pass

    def crash(batch_index: int, record: dict) -> None:
        if batch_index == 10:  # inside the second round
            raise Crash

    with pytest.raises(Crash):
        run(cfg, tmp_path / "resumed", data=data_root, on_batch=crash)
    resumed = run(cfg, tmp_path / "resumed", data=data_root, resume=True)
    assert resumed["resumed_from_batch"] == 9  # the checkpoint at the start of contrast/r2
    for key in ("errors", "errors_by_round", "online_errors_by_round", "mean_error", "n_images"):
        assert resumed[key] == whole[key], key
