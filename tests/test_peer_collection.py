"""The harness that times our runs against the TTA collection's methods (benchmarks/peer_collection.py): the parts
that do not need the collection itself (it is imported from a checkout given on the command line)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.studies.peer_collection import stream_yaml, summarise, table
from benchmarks.studies.peer_worker import PEER_METHODS, read_domain
from tta_surgical.config import load_config
from tta_surgical.methods import METHODS


def test_every_compared_method_is_ours_too():
    assert set(PEER_METHODS) <= set(METHODS.names())
    assert {"tent", "eta", "eata", "sar", "deyo", "roid", "cotta", "rotta"} == set(PEER_METHODS)


def test_stream_file_is_the_collections_continual_setting(tmp_path):
    path = tmp_path / "stream.yaml"
    path.write_text(stream_yaml(tmp_path / "c10c", ["fog", "snow"], 400, 200))
    spec = load_config(stream=str(path)).stream
    assert spec.source == "cifar10c" and spec.path == str(tmp_path / "c10c")
    assert spec.domains == ("fog", "snow") and spec.severities == (5,) and spec.order == "sequential"
    assert spec.n_examples == 400 and spec.batch_size == 200 and spec.reset == "never"


def _folder(tmp_path, sidecar: bool):
    """A CIFAR-10-C folder with one corruption: make-cifar10c's layout (one severity + sidecar) or the official one
    (five stacked severities, labels repeated)."""
    rows = 6
    labels = np.arange(rows) % 10
    if sidecar:
        images = np.full((rows, 32, 32, 3), 5, np.uint8) + np.arange(rows, dtype=np.uint8)[:, None, None, None]
        (tmp_path / "fog.json").write_text(json.dumps({"rows": {"5": [0, rows]}}))
        np.save(tmp_path / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    else:
        images = np.concatenate([np.full((rows, 32, 32, 3), s, np.uint8) for s in range(1, 6)])
        images += np.tile(np.arange(rows, dtype=np.uint8), 5)[:, None, None, None] * 10
        np.save(tmp_path / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    np.save(tmp_path / "fog.npy", images)
    return labels


@pytest.mark.parametrize("sidecar", [True, False])
def test_worker_reads_the_first_rows_of_severity_5(tmp_path, sidecar):
    labels = _folder(tmp_path, sidecar)
    x, y = read_domain(tmp_path, "fog", 5, 4)
    assert x.shape == (4, 32, 32, 3) and y.dtype == np.int64
    assert y.tolist() == labels[:4].tolist()
    expected = [5 + i for i in range(4)] if sidecar else [5 + 10 * i for i in range(4)]
    assert x[:, 0, 0, 0].tolist() == expected


def _round(k: int, ours_wall: float, peer_wall: float, ours_cpu: float, peer_cpu: float) -> dict:
    timing = {"data_s": 0.5, "step_s": ours_wall - 1.0, "checkpoint_s": 0.4, "other_s": 0.1}
    ours = {"images_per_s": 1000 / ours_wall, "step_s": ours_wall - 1.0, "process_s": ours_wall + 5, "n_batches": 5,
            "n_images": 1000, "online_error": 30.0, "cpu_s": ours_cpu, "timing": timing}  # fmt: skip
    peer = {"images_per_s": 1000 / peer_wall, "step_s": peer_wall - 0.2, "process_s": peer_wall + 3,
            "online_error": 30.25, "cpu_s": peer_cpu, "other_s": 0.2}  # fmt: skip
    return {"round": k, "ours": ours, "peer": peer}


def test_summary_takes_medians_and_the_spread_of_the_per_round_ratios():
    rounds = [_round(1, 10.0, 12.0, 4.0, 5.0), _round(2, 10.0, 11.0, 4.0, 4.4), _round(3, 8.0, 12.0, 4.0, 6.0)]
    row = summarise("tent", rounds)
    assert row["ratio"] == pytest.approx(1.2) and row["ratio_min"] == pytest.approx(1.1)
    assert row["ratio_max"] == pytest.approx(1.5)
    assert row["cpu_ratio"] == pytest.approx(1.25) and row["cpu_ratio_min"] == pytest.approx(1.1)
    assert row["error_gap"] == pytest.approx(-0.25) and row["n_images"] == 1000
    assert row["ours_ms_per_batch"]["checkpoint_s"] == pytest.approx(80.0)  # 0.4 s over 5 batches
    text = table([row])
    assert "| tent | 3 | 1000 |" in text and "1.20 (1.10-1.50)" in text and "1.25 (1.10-1.50)" in text


def test_summary_without_cpu_times_says_so():
    rounds = [_round(1, 10.0, 12.0, 4.0, 5.0)]
    rounds[0]["ours"]["cpu_s"] = None  # code from before cpu_s_this_session existed
    row = summarise("eta", rounds)
    assert math.isnan(row["cpu_ratio"]) and row["ratio"] == pytest.approx(1.2)


def test_cpu_breakdown_splits_each_sides_cpu_time_at_the_step():
    rounds = [_round(1, 10.0, 12.0, 4.0, 5.0), _round(2, 10.0, 11.0, 4.2, 5.5), _round(3, 8.0, 12.0, 4.4, 5.0)]
    for r, (ours_step, peer_step) in zip(rounds, [(3.9, 4.9), (4.0, 5.0), (4.1, 5.1)]):
        r["ours"]["step_cpu_s"], r["peer"]["step_cpu_s"] = ours_step, peer_step
    c = summarise("tent", rounds)["cpu_ms_per_batch"]  # 5 batches: ms per batch = 200 * seconds
    assert c["ours_step"] == pytest.approx(800.0) and c["ours_outside"] == pytest.approx(40.0)
    assert c["peer_step"] == pytest.approx(1000.0) and c["peer_outside"] == pytest.approx(20.0)
    assert "| tent | 800.0 | 40.0 | 1000.0 | 20.0 | 1.25 |" in table([summarise("tent", rounds)])
    rounds[0]["ours"]["step_cpu_s"] = None  # a round from code without the field is left out
    assert summarise("tent", rounds)["cpu_ms_per_batch"]["ours_outside"] == pytest.approx(50.0)
    for r in rounds:
        r["ours"]["step_cpu_s"] = None
    row = summarise("tent", rounds)
    assert row["cpu_ms_per_batch"] is None and "inside the step" not in table([row])
