"""Contracts of benchmarks/stream_timing.py: the JSON it writes, that its times add up, the ratio baseline, errors.

Tiny real streams (the CIFAR-10 test set corrupted on the fly, tens of images) with the pretrained resnet20, and an
`imagenet`-scenario run on a few staged JPEGs with a random resnet18 at 64x64; skipped without the shared data.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tta_surgical.config import load_config
from tta_surgical.models import create_model
from tta_surgical.streams import build_stream

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("gaussian_noise", "brightness")


def _script():
    spec = importlib.util.spec_from_file_location("stream_timing", REPO / "benchmarks" / "stream_timing.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def st():
    return _script()


@pytest.fixture(scope="module")
def cifar_result(st, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream_timing")
    argv = [
        "--corruptions", ",".join(DOMAINS), "--n-per-corruption", "20", "--batch-size", "10",
        "--methods", "tent", "--device", "cpu", "--data-root", str(data_root), "--out", str(out),
    ]  # fmt: skip
    assert st.main(argv) == 0
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
    md = (out / "cifar.md").read_text()
    assert "| source |" in md and "| tent |" in md and "data only" in md


def test_cifar_source_error_matches_an_independent_evaluation(cifar_result, data_root):
    _, res, _ = cifar_result
    cfg = load_config(REPO / "configs" / "source.yaml", stream=REPO / "streams" / "cifar10c_continual.yaml",
                      overrides=[f"stream.domains=[{','.join(DOMAINS)}]", "stream.n_examples=20",
                      "stream.batch_size=10"])  # fmt: skip
    model, _ = create_model("resnet20", data_root=data_root)
    wrong = {d: 0 for d in DOMAINS}
    with torch.inference_mode():
        for b in build_stream(cfg.stream, data_root=data_root, frost_dir=data_root / "frost"):
            wrong[b.domain] += int((model(b.x).argmax(1) != b.y).sum())
    src = res["methods"][0]
    assert src["errors"] == pytest.approx({d: 100 * w / 20 for d, w in wrong.items()})


def test_imagenet_scenario_stages_images_and_flags_the_error(st, data_root, tmp_path):
    argv = [
        "--scenario", "imagenet", "--model", "resnet18", "--no-pretrained", "--image-size", "64",
        "--corruptions", "brightness", "--n-per-corruption", "6", "--batch-size", "3", "--methods", "norm",
        "--no-warmup", "--no-data-pass", "--device", "cpu", "--data-root", str(data_root), "--out", str(tmp_path),
    ]  # fmt: skip
    assert st.main(argv) == 0
    res = json.loads((tmp_path / "imagenet.json").read_text())
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


def test_method_names_resolve_and_unknown_ones_are_refused(st):
    path, overrides = st.resolve_method("surgical:block1+block2")
    assert path.name == "surgical_block1.yaml" and overrides == ["method.blocks=[block1,block2]"]
    assert st.resolve_method("tent") == (REPO / "configs" / "tent.yaml", [])
    with pytest.raises(ValueError, match="surgical_block1"):
        st.resolve_method("tnet")
    with pytest.raises(ValueError, match="name the blocks"):
        st.resolve_method("surgical:")
    assert st.method_labels(["tent", "source", "norm", "tent"]) == ["source", "tent", "norm"]
    assert st.safe_label("surgical:block1+block2") == "surgical-block1+block2"
    with pytest.raises(SystemExit, match="unknown method 'tnet'"):
        st.main(["--methods", "source,tnet", "--out", "/nonexistent/never-written"])
    with pytest.raises(SystemExit, match="unknown corruption"):
        st.main(["--corruptions", "snowy", "--out", "/nonexistent/never-written"])


def test_ratios_and_table(st):
    rows = [
        {"label": "tent", "stream_s": 3.0, "step_s": 2.0, "total_s": 4.0},
        {"label": "source", "stream_s": 1.5, "step_s": 0.5, "total_s": 2.0},
    ]
    st.add_ratios(rows)
    assert rows[1]["stream_ratio_to_source"] == 1.0
    assert rows[0]["stream_ratio_to_source"] == 2.0 and rows[0]["step_ratio_to_source"] == 4.0
    assert rows[0]["total_ratio_to_source"] == 2.0
