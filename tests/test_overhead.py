"""The engine's per-batch work outside the step, made cheaper without changing a result (issue 22, last item).

- the input guard (`methods.base.all_finite`) answers exactly what `torch.isfinite(x).all()` answers;
- the results line's statistics come from one host sync (`guards.collapse.prediction_stats`) and equal the separate
  reads they replace;
- host memory reuse (`runtime.host_memory`, `tta_surgical.hostmem`) is applied by a run when asked and only then,
  changes no results line, and does not block resuming a run made with the other setting.
"""

from __future__ import annotations

import json
import platform

import pytest
import torch

from tta_surgical import engine, hostmem
from tta_surgical.config import load_config
from tta_surgical.guards.collapse import batch_prediction_stats, prediction_stats
from tta_surgical.methods.base import all_finite
from tta_surgical.runfolder import config_differences, plain_config
from tta_surgical.schema import ConfigError

CASES = {
    "finite": torch.rand(4, 3, 8, 8),
    "nan": torch.rand(4, 3, 8, 8).index_put_((torch.tensor([2]),), torch.tensor(float("nan"))),
    "inf": torch.rand(4, 3, 8, 8).index_put_((torch.tensor([0]),), torch.tensor(float("inf"))),
    "minus_inf": torch.rand(2, 5).index_put_((torch.tensor([1]),), torch.tensor(float("-inf"))),
    "inf_and_minus_inf": torch.tensor([float("inf"), float("-inf"), 1.0]),
    # Finite elements whose sum overflows float32: the fast path's sum is inf, the answer must still be True.
    "overflowing_sum": torch.full((1000,), 3.0e38),
    "bf16": torch.rand(4, 3, dtype=torch.bfloat16),
    "bf16_nan": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16),
    "float64_large": torch.tensor([1e300, 1e300], dtype=torch.float64),
    "int": torch.arange(12).reshape(3, 4),
    "empty": torch.zeros(0, 3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_input_guard_gives_the_elementwise_answer(name):
    x = CASES[name]
    assert all_finite(x) is bool(torch.isfinite(x).all())


def _old_stats(logits: torch.Tensor, y: torch.Tensor) -> tuple:
    """What the engine read before: the four statistics, then finiteness in a second sync."""
    return (*batch_prediction_stats(logits, y), bool(torch.isfinite(logits).all()))


def test_one_sync_statistics_equal_the_separate_reads():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (64,), generator=g)
    cases = [torch.randn(64, 10, generator=g) * s for s in (0.1, 1.0, 30.0)]
    cases.append(torch.full((64, 10), -5.0).index_fill_(1, torch.tensor([3]), 60.0))  # fully confident: entropy 0
    bad = torch.randn(64, 10, generator=g)
    bad[5, 2] = float("nan")
    cases += [bad, torch.randn(64, 10, generator=g).to(torch.bfloat16)]
    for logits in cases:
        new = prediction_stats(logits, y)
        assert new[:4] == batch_prediction_stats(logits, y)
        assert new == _old_stats(logits, y) or (new[4] is False and _old_stats(logits, y)[4] is False)
        assert isinstance(new[4], bool)
    assert prediction_stats(bad, y)[4] is False and prediction_stats(cases[0], y)[4] is True


def test_host_memory_setting_is_checked():
    with pytest.raises(ConfigError, match="host_memory"):
        load_config(overrides=["runtime.host_memory=always"])
    assert load_config().runtime.host_memory == "reuse"


def test_resume_ignores_the_host_memory_setting():
    a = plain_config(load_config(overrides=["runtime.host_memory=reuse"]))
    b = plain_config(load_config(overrides=["runtime.host_memory=system"]))
    assert config_differences(a, b) == []


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_reuse_sets_a_threshold_once():
    first = hostmem.reuse_freed_memory()
    assert first is not None and first >= 32 << 20
    assert hostmem.reuse_freed_memory() == first  # idempotent: applied once per process


def _tiny(tmp_path, name, host_memory, data_root, monkeypatch, calls):
    monkeypatch.setattr(engine, "reuse_freed_memory", lambda: calls.append(name))
    cfg = load_config(
        overrides=["method.name=tent", "stream.domains=[fog,contrast]", "stream.n_examples=24", "stream.batch_size=8",
                   "stream.reset=never", "runtime.device=cpu", "runtime.progress=false",
                   f"runtime.host_memory={host_memory}"]
    )  # fmt: skip
    engine.run(cfg, tmp_path / name, data=data_root)
    lines = [json.loads(s) for s in (tmp_path / name / engine.RESULTS_FILE).read_text().splitlines()]
    for rec in lines:
        rec.pop("latency_ms")
    return lines


def test_host_memory_is_applied_only_when_asked_and_changes_no_results_line(tmp_path, data_root, monkeypatch):
    calls: list[str] = []
    reuse = _tiny(tmp_path, "reuse", "reuse", data_root, monkeypatch, calls)
    system = _tiny(tmp_path, "system", "system", data_root, monkeypatch, calls)
    assert calls == ["reuse"]
    assert reuse == system and len(reuse) == 6
    assert all(rec["finite"] is True for rec in reuse)
