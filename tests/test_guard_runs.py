"""The drift guard end to end on resnet20 and short real streams: a drifting configuration (surgical entropy on all
layers at lr 0.01) it must see and, with `runtime.on_collapse=reset`, stop; a stable one (Tent) it must leave alone;
replay and resume give the live run's alarms; what the results lines and the summary carry. The detectors as pure
functions of results lines are in tests/test_guards.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tta_surgical.config import ConfigError, load_config
from tta_surgical.engine import RESULTS_FILE, run
from tta_surgical.guards import DRIFT_KINDS, CollapseMonitor, DriftMonitor, Guard, replay_alarms

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("gaussian_noise", "fog", "brightness")


def cfg_for(config: str, *extra: str, n: int = 300, batch: int = 100):
    """Three corruptions x `n` images, continual; the guard checks every batch over a 300-image window."""
    return load_config(
        REPO / "configs" / f"{config}.yaml",
        overrides=[
            f"stream.domains=[{','.join(DOMAINS)}]",
            f"stream.n_examples={n}",
            f"stream.batch_size={batch}",
            "stream.reset=never",
            "runtime.device=cpu",
            "runtime.progress=false",
            "runtime.guard_every=1",
            "runtime.guard_window=300",
            *extra,
        ],
    )


DRIFTING = ("surgical_all", "optim.lr=0.01")  # every parameter at 10x the shipped lr: confident drift, no one class


def lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / RESULTS_FILE).read_text().splitlines() if x.strip()]


class Crash(Exception):
    pass


def crash_and_resume(cfg, at: int, out: Path, data_root) -> dict:
    """Run `cfg` into `out`, crash after batch `at`'s line is written, resume; the resumed run's summary."""

    def crash(i: int, _rec: dict) -> None:
        if i == at:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, out, data=data_root, on_batch=crash)
    return run(cfg, out, data=data_root, resume=True)


@pytest.fixture(scope="module")
def drifting_warn(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("guard") / "warn"
    return out, run(cfg_for(*DRIFTING, "runtime.on_collapse=warn"), out, data=data_root)


def test_drifting_configuration_is_seen_and_its_alarms_judged_true(drifting_warn):
    """The old monitor (one class only) raised nothing here; the guard sees confident drift, and after the run the
    labels say the adapted model was worse than the reference on the batches each alarm judged."""
    out, summary = drifting_warn
    assert summary["n_collapse_warnings"] == 0  # no class concentration: the one-class detector stays silent
    assert summary["n_guard_alarms"] >= 2 and summary["guard_alarms_by_detector"]["confident_drift"] >= 1
    assert summary["guard_reference"] == "norm" and summary["n_guard_checks"] == 9
    assert sum(summary["false_alarms_by_detector"].values()) == 0 and summary["unjudged_alarms"] == 0
    checked = summary["guard_checked_errors"]
    assert checked["adapted"] > checked["reference"] + 20  # the drift is real: 60-75% error against norm's ~28%
    recs = lines(out)
    assert [r["batch_index"] for r in recs if r.get("alarms")] == [a["batch"] for a in summary["guard_alarms"]]
    assert all({"ref_flip", "ref_entropy", "ref_agree", "ref_correct"} <= r.keys() for r in recs)
    md = (out / "summary.md").read_text()
    assert "drift from the reference (norm) suspected" in md and "false alarms (after the fact, with labels)" in md


def test_reset_on_drift_restores_the_method_and_beats_leaving_it(drifting_warn, tmp_path, data_root):
    _, warned = drifting_warn
    summary = run(cfg_for(*DRIFTING, "runtime.on_collapse=reset"), tmp_path / "reset", data=data_root)
    recs = lines(tmp_path / "reset")
    alarmed = [r["batch_index"] for r in recs if r.get("alarms")]
    assert alarmed and summary["n_resets"] == sum(1 for b in alarmed if b + 1 < len(recs))
    assert all(recs[b + 1]["reset"] for b in alarmed if b + 1 < len(recs))  # the next batch starts from the source
    assert set(a["detector"] for a in summary["guard_alarms"]) <= set(DRIFT_KINDS)
    assert summary["mean_error"] < warned["mean_error"] - 10  # ~47% against ~70% left alone


def test_stop_on_drift_ends_the_run_at_the_first_alarm(drifting_warn, tmp_path, data_root):
    _, warned = drifting_warn
    summary = run(cfg_for(*DRIFTING, "runtime.on_collapse=stop"), tmp_path / "stop", data=data_root)
    first = warned["guard_alarms"][0]["batch"]
    assert summary["stopped_on_collapse_at_batch"] == first and summary["n_batches"] == first + 1


def test_stable_configuration_is_left_alone(tmp_path, data_root):
    """Tent with its shipped settings adapts (it differs from norm) but does not drift: no alarm, no reset."""
    summary = run(cfg_for("tent", "runtime.on_collapse=reset"), tmp_path / "tent", data=data_root)
    assert summary["n_guard_alarms"] == 0 and summary["n_resets"] == 0
    assert summary["n_guard_checks"] == 9
    assert any(r["ref_agree"] < 1.0 for r in lines(tmp_path / "tent"))  # it adapted: the reference disagrees


def test_replay_and_resume_give_the_live_alarms(drifting_warn, tmp_path, data_root):
    out, summary = drifting_warn
    rt = cfg_for(*DRIFTING).runtime
    guard = Guard(
        CollapseMonitor(rt.collapse_window, rt.collapse_share, rt.collapse_entropy_ratio),
        DriftMonitor(rt.guard_window, flip=rt.guard_flip),
    )
    replayed = replay_alarms(lines(out), guard)
    assert [(a.batch, a.detector) for a in replayed] == [(a["batch"], a["detector"]) for a in summary["guard_alarms"]]

    resumed = crash_and_resume(cfg_for(*DRIFTING, "runtime.on_collapse=warn"), 4, tmp_path / "part", data_root)
    assert resumed["guard_alarms"] == summary["guard_alarms"] and resumed["errors"] == summary["errors"]


def test_checks_every_kth_batch_and_picks_the_reference_per_method(tmp_path, data_root):
    summary = run(cfg_for("tent", "runtime.guard_every=2"), tmp_path / "every2", data=data_root)
    checked = [r["batch_index"] for r in lines(tmp_path / "every2") if "ref_flip" in r]
    assert checked == [0, 2, 4, 6, 8] and summary["n_guard_checks"] == 5
    for config in ("source", "norm", "lame"):  # nothing adapts, nothing to reset: the one-class detector only
        s = run(cfg_for(config, "stream.n_examples=100"), tmp_path / config, data=data_root)
        assert s["guard_reference"] is None and not any("ref_flip" in r for r in lines(tmp_path / config))
    on_source = run(cfg_for("surgical_block1", "method.bn_stats=source", n=100), tmp_path / "src", data=data_root)
    assert on_source["guard_reference"] == "source"  # the reference normalises as the method does
    off = run(cfg_for("tent", "runtime.on_collapse=off", n=100), tmp_path / "off", data=data_root)
    assert off["guard_reference"] is None and not any("ref_flip" in r for r in lines(tmp_path / "off"))


@pytest.fixture(scope="module")
def drifting_fallback(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("guard") / "fallback"
    return out, run(cfg_for(*DRIFTING, "runtime.on_collapse=fallback"), out, data=data_root)


def test_fallback_serves_the_reference_after_an_alarm_and_judges_the_adapted_model(drifting_warn, drifting_fallback):
    """After the first alarm the method is reset and the reference's predictions are served (the detectors go on
    judging the adapted model in the shadow): the served error falls far below the unguarded run's."""
    (_, warned), (out, summary) = drifting_warn, drifting_fallback
    recs = lines(out)
    first = next(r["batch_index"] for r in recs if r.get("alarms"))
    assert recs[first + 1]["reset"] and not any(r.get("served") for r in recs[: first + 1])
    served = [r for r in recs if r.get("served") == "reference"]
    assert served and served[0]["batch_index"] == first + 1
    assert all(r["correct"] == r["ref_correct"] and "adapted_correct" in r for r in served)
    assert any(r["adapted_correct"] < r["correct"] for r in served)  # the shadow model is worse: it is not served
    assert summary["n_batches_served_by_reference"] == len(served) and summary["n_fallbacks"] >= 1
    assert sum(summary["false_alarms_by_detector"].values()) == 0  # judged on the adapted model, not the served one
    assert summary["mean_error"] < warned["mean_error"] - 20  # ~33% against ~70% left alone
    assert "served by the reference" in (out / "summary.md").read_text()


def test_fallback_leaves_a_stable_configuration_as_reset_does(tmp_path, data_root):
    reset = run(cfg_for("tent", "runtime.on_collapse=reset", n=200), tmp_path / "reset", data=data_root)
    fallback = run(cfg_for("tent", "runtime.on_collapse=fallback", n=200), tmp_path / "fb", data=data_root)
    assert fallback["errors"] == reset["errors"] and fallback["n_batches_served_by_reference"] == 0
    assert not any("served" in r for r in lines(tmp_path / "fb"))


def test_fallback_resume_equals_the_live_run(drifting_fallback, tmp_path, data_root):
    """The trust state is rebuilt from the kept lines: a crash while the reference is served resumes exactly."""
    _, live = drifting_fallback

    resumed = crash_and_resume(cfg_for(*DRIFTING, "runtime.on_collapse=fallback"), 5, tmp_path / "part", data_root)
    for key in ("errors", "guard_alarms", "n_batches_served_by_reference", "n_fallbacks", "n_trust_returns"):
        assert resumed[key] == live[key], key


def test_fallback_gives_a_stateless_method_a_reference_but_not_the_references(tmp_path, data_root):
    lame = run(cfg_for("lame", "runtime.on_collapse=fallback", n=100), tmp_path / "lame", data=data_root)
    assert lame["guard_reference"] == "source"  # LAME refines the source model's predictions: judged against it
    for config in ("source", "norm"):
        s = run(cfg_for(config, "runtime.on_collapse=fallback", n=100), tmp_path / config, data=data_root)
        assert s["guard_reference"] is None and "n_fallbacks" not in s


def test_guard_settings_are_checked():
    with pytest.raises(ConfigError, match="on_collapse=fallback serves the guard's reference"):
        cfg_for("tent", "runtime.on_collapse=fallback", "runtime.guard_reference=none")
    with pytest.raises(ConfigError, match="guard_every must be >= 1"):
        cfg_for("tent", "runtime.guard_every=0")
    with pytest.raises(ConfigError, match="guard_flip must lie in"):
        cfg_for("tent", "runtime.guard_flip=1.5")
    with pytest.raises(ConfigError, match="guard_reference"):
        cfg_for("tent", "runtime.guard_reference=teacher")
