"""Contracts of the stream timing (`benchmarks.studies.stream_timing`, `benchmarks/stream_timing.py`): the JSON it
writes, that its times add up, the ratio baseline, errors.

Tiny real streams (the CIFAR-10 test set corrupted on the fly, tens of images) with the pretrained resnet20 (through
the script, in a subprocess), and an `imagenet`-scenario run on a few staged JPEGs with a random resnet18 at 64x64
(through the package); skipped without the shared data.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.studies import stream_timing as st
from tta_surgical.config import load_config
from tta_surgical.data.context import DataContext
from tta_surgical.models import create_model
from tta_surgical.streams import build_stream

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("gaussian_noise", "brightness")


def _script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "stream_timing.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def cifar_result(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream_timing")
    done = _script(
        "--corruptions", ",".join(DOMAINS), "--n-per-corruption", "20", "--batch-size", "10", "--methods", "tent",
        "--device", "cpu", "--threads", "1", "--data-root", str(data_root), "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| source |" in done.stdout  # the table is printed too
    text = (out / "cifar.json").read_text()
    return out, json.loads(text), text


def test_cifar_json_is_complete_and_times_add_up(cifar_result):
    out, res, text = cifar_result
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    assert res["scenario"] == "cifar" and res["model"] == "resnet20" and res["model_pretrained"]
    assert res["error_meaningful"] is True
    s = res["stream"]
    assert s["corruptions"] == list(DOMAINS) and s["n_per_corruption"] == 20 and s["images"] == 40
    assert s["n_batches"] == 4 and s["batch_size"] == 10 and s["reset"] == "never" and s["image_size"] == 32
    # source is run although not asked for, and first: it is the ratio baseline
    assert [r["label"] for r in res["methods"]] == ["source", "tent"]
    for r in res["methods"]:
        assert r["images"] == 40 and r["n_batches"] == 4
        assert r["stream_fingerprint"] == s["fingerprint"]
        parts = r["step_s"] + r["data_s"] + r["checkpoint_s"] + r["other_s"]
        assert math.isclose(parts, r["stream_s"], rel_tol=0, abs_tol=1e-9)
        assert r["data_s"] > 0 and r["other_s"] >= 0
        assert 0 < r["step_s"] <= r["stream_s"] <= r["total_s"]
        assert math.isclose(r["setup_s"], r["total_s"] - r["stream_s"], abs_tol=1e-9)
        assert r["checkpoint_s"] > 0  # one domain boundary and the final checkpoint
        assert math.isclose(r["images_per_s"], 40 / r["stream_s"])
        assert set(r["errors"]) == set(DOMAINS) and all(0 <= e <= 100 for e in r["errors"].values())
        assert math.isclose(r["online_error"], sum(r["errors"].values()) / 2)  # equal-sized domains
        # the step time is the sum of the engine's own per-batch latencies
        lines = [json.loads(x) for x in (Path(r["out_dir"]) / "results.jsonl").read_text().splitlines()]
        assert len(lines) == 4 and math.isclose(sum(x["latency_ms"] for x in lines) / 1000, r["step_s"], rel_tol=1e-4)
        assert Path(r["out_dir"]).parent == out / "cifar" / "runs"
        assert (Path(r["out_dir"]) / "summary.json").is_file()
        assert not (Path(r["out_dir"]) / "state.pt").exists()  # checkpoints are dropped after the clock by default
    src, tent = res["methods"]
    assert src["stream_ratio_to_source"] == 1.0 and src["step_ratio_to_source"] == 1.0
    assert src["total_ratio_to_source"] == 1.0
    assert math.isclose(tent["stream_ratio_to_source"], tent["stream_s"] / src["stream_s"])
    assert tent["step_ratio_to_source"] > 1.0  # a forward + backward + Adam step costs more than a forward
    assert src["adapted_tensors"] == 0 and tent["adapted_tensors"] > 0
    d = res["data_only"]
    assert d["images"] == 40 and d["fingerprint"] == s["fingerprint"] and d["stream_s"] > 0
    assert res["target"]["applies"] is False and set(res["target"]["met"]) == {"source", "tent"}
    assert res["command"].startswith("python benchmarks/stream_timing.py --corruptions")
    assert res["versions"]["torch"] == torch.__version__ and res["machine"]["device_name"] == "cpu"
    assert {"date", "git"} <= set(res)
    md = (out / "cifar.md").read_text()
    assert "| source |" in md and "| tent |" in md and "data only" in md


def test_cifar_source_error_matches_an_independent_evaluation(cifar_result, data_root):
    _, res, _ = cifar_result
    cfg = load_config(REPO / "configs" / "source.yaml", stream=REPO / "streams" / "cifar10c_continual.yaml",
                      overrides=[f"stream.domains=[{','.join(DOMAINS)}]", "stream.n_examples=20",
                      "stream.batch_size=10"])  # fmt: skip
    model, _ = create_model("resnet20", data=data_root)
    wrong = {d: 0 for d in DOMAINS}
    with torch.inference_mode():
        for b in build_stream(cfg.stream, data=DataContext.resolve(data_root, data_root / "frost")):
            wrong[b.domain] += int((model(b.x).argmax(1) != b.y).sum())
    src = res["methods"][0]
    assert src["errors"] == pytest.approx({d: 100 * w / 20 for d, w in wrong.items()})


def test_imagenet_scenario_stages_images_and_flags_the_error(data_root, tmp_path):
    opts = st.StreamTimingOptions(
        scenario="imagenet", model="resnet18", pretrained=False, image_size=64, corruptions=("brightness",),
        n_per_corruption=6, batch_size=3, methods=("norm",), warmup=False, data_pass=False, device="cpu",
        data_root=str(data_root), out=tmp_path,
    )  # fmt: skip
    returned = st.run_stream_timing(opts, log=None)
    res = json.loads((tmp_path / "imagenet.json").read_text())
    assert res == json.loads(json.dumps(returned))
    s = res["stream"]
    assert s["source"] == "imagenet" and s["image_size"] == 64 and s["images"] == 6 and s["n_batches"] == 2
    staged = Path(s["path"])
    assert staged.parent == tmp_path / "images" and "CIFAR-10 test images upsampled" in s["images_from"]
    files = sorted(staged.glob("class*/*.jpg"))
    assert len(files) == 6
    from torchvision.io import read_image

    assert read_image(str(files[0])).shape == (3, 73, 73)  # resize_size(64): the stream then center-crops 64
    assert res["model_pretrained"] is False and res["error_meaningful"] is False
    assert res["data_only"] is None and [r["label"] for r in res["methods"]] == ["source", "norm"]
    assert "not meaningful" in (tmp_path / "imagenet.md").read_text()
    # a complete staging is reused, a larger one is restaged
    assert st.stage_cifar_images(str(data_root), staged, 6, 73) == (staged, 0.0)
    folder, secs = st.stage_cifar_images(str(data_root), staged, 7, 73)
    assert secs > 0 and len(list(folder.glob("class*/*.jpg"))) == 7


def test_method_labels_resolve_and_unknown_ones_are_refused(tmp_path):
    path, method = st.resolve_method("surgical:block1+block2")
    assert path is None and method.name == "surgical" and method.blocks == ("block1", "block2") and method.kind == "all"
    assert st.resolve_method(str(REPO / "configs" / "tent.yaml")) == (REPO / "configs" / "tent.yaml", None)
    with pytest.raises(ValueError, match="unknown bench method 'tnet'.*run config YAML"):
        st.resolve_method("tnet")
    with pytest.raises(ValueError, match="names no block"):
        st.resolve_method("surgical:")
    with pytest.raises(ValueError, match="the engine does not run"):
        st.resolve_method("reference_tent")
    with pytest.raises(FileNotFoundError):
        st.resolve_method("no/such/config.yaml")
    assert st.StreamTimingOptions(methods=("tent", "source", "norm", "tent")).labels() == ("source", "tent", "norm")
    with pytest.raises(ValueError, match="unknown bench method 'tnet'"):
        st.StreamTimingOptions(methods=("source", "tnet"))
    with pytest.raises(ValueError, match="repeats"):
        st.StreamTimingOptions(repeats=0)
    never = tmp_path / "never-written"
    with pytest.raises(ValueError, match="unknown corruption"):
        st.plan_stream_timing(st.StreamTimingOptions(corruptions=("snowy",), out=never, device="cpu"))
    assert not never.exists()


def test_a_label_and_its_yaml_give_the_same_run_config(data_root):
    opts = st.StreamTimingOptions(
        corruptions=DOMAINS, n_per_corruption=20, device="cpu", data_root=str(data_root), overrides=("optim.lr=0.01",)
    )
    for label, yaml in (("tent", "tent"), ("surgical:block1", "surgical_block1"), ("source", "source")):
        by_label = st.build_config(opts, label, domains=list(DOMAINS), n=20, image_path=None)
        by_yaml = st.build_config(opts, str(REPO / "configs" / f"{yaml}.yaml"), domains=list(DOMAINS), n=20,
                                  image_path=None)  # fmt: skip
        assert by_label == by_yaml and by_label.optim.lr == 0.01 and by_label.stream.reset == "never"


def test_the_script_refuses_bad_options_with_their_message(tmp_path):
    done = _script("--methods", "source,tnet", "--out", str(tmp_path / "never"))
    assert done.returncode != 0 and "unknown bench method 'tnet'" in done.stderr
    assert not (tmp_path / "never").exists()


def test_ratios_and_table():
    rows = [
        {"label": "tent", "stream_s": 3.0, "step_s": 2.0, "total_s": 4.0},
        {"label": "source", "stream_s": 1.5, "step_s": 0.5, "total_s": 2.0},
    ]
    st.add_ratios(rows)
    assert rows[1]["stream_ratio_to_source"] == 1.0
    assert rows[0]["stream_ratio_to_source"] == 2.0 and rows[0]["step_ratio_to_source"] == 4.0
    assert rows[0]["total_ratio_to_source"] == 2.0
    from benchmarks.studies.stream_timing import stream_markdown

    for r in rows:
        r.update(images_per_s=None, data_s=0.1, checkpoint_s=0.2, other_s=0.3, online_error=12.5, mean_error=None)
    result = {
        "scenario": "cifar", "model": "resnet20", "model_pretrained": True, "device": "cpu", "error_meaningful": True,
        "stream": {"n_corruptions": 2, "n_per_corruption": 20, "batch_size": 10, "image_size": 32, "images": 40},
        "methods": rows[::-1], "data_only": {"stream_s": 0.5, "images_per_s": 80.0, "build_s": 0.25},
        "target": {"applies": True, "limit_s": 10.0, "met": {"source": True, "tent": False}},
    }  # fmt: skip
    table = [line for line in stream_markdown(result).splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and len({line.count(" | ") for line in table}) == 1  # every row fills every column
    assert table[2].startswith("| source | 1.50 | – | 0.50 | 0.10 |") and "| 12.50 | – |" in table[2]
    assert table[4].startswith("| (data only: generation, no model) | 0.50 | 80 | – | 0.50 |")
    assert "Target (whole stream under 10 s): source: yes, tent: NO." in stream_markdown(result)
