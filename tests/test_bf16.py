"""bf16 autocast against fp32 with tolerances sized to bf16, on the real pretrained ResNet-20 and real images.

tests/test_methods.py checks bf16 on a tiny random net at rtol = atol = 0.1 on logits of about +-0.5, which a
wrong cast passes (e.g. the model's parameters held in bf16 instead of autocast over fp32 parameters: Adam's small
steps then round away, and the update direction here drops to cosine ~0.5). bf16 keeps 8 significant bits
(relative rounding 2^-9 per operation): here, logits that reach 20-30 differ from fp32 by at most 1.2% of their
largest magnitude and ~0.2% on average, Tent's entropy by <= 1%, 0-3 of 64 predictions flip, and the adapted
parameters move in the same direction (cosine 0.975). The bounds below leave about 2x headroom over that (CPU).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tta_surgical.config import OptimConfig, load_config, method_config
from tta_surgical.corruptions import corrupt
from tta_surgical.data.cifar import load_cifar10
from tta_surgical.engine import run
from tta_surgical.methods import build_method, entropy
from tta_surgical.models import create_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shifted_batches(data_root) -> list[torch.Tensor]:
    """5 batches of 64 real test images with Gaussian noise (severity 3): a shift Tent really adapts to."""
    images, _ = load_cifar10(data_root)
    x = torch.from_numpy(images[:320]).permute(0, 3, 1, 2).float() / 255
    x = corrupt(x, "gaussian_noise", 3, seed=0)
    return list(x.split(64))


def test_bf16_tent_is_close_to_fp32_within_bf16_precision(shifted_batches, data_root):
    source, _ = create_model("resnet20", data=data_root)
    fp32 = build_method(copy.deepcopy(source), method_config("tent"), OptimConfig())
    bf16 = build_method(copy.deepcopy(source), method_config("tent"), OptimConfig(), autocast_dtype="bf16")
    agree = total = 0
    for x in shifted_batches:
        a, b = fp32.step(x), bf16.step(x)
        assert b.dtype == torch.bfloat16 and a.dtype == torch.float32  # autocast was in effect, and only there
        b = b.float()
        scale = float(a.abs().max())
        assert scale > 5  # real logits, not the +-0.5 of a random net
        diff = (a - b).abs()
        assert 0 < float(diff.max()) <= 0.03 * scale, (float(diff.max()), scale)
        assert float(diff.mean()) <= 0.004 * scale, (float(diff.mean()), scale)
        ha, hb = float(entropy(a)), float(entropy(b))
        assert abs(ha - hb) <= 0.02 * ha, (ha, hb)
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        total += len(x)
    assert agree >= 0.97 * total, (agree, total)
    assert bf16.n_updates == fp32.n_updates == len(shifted_batches) and bf16.n_skipped == 0
    # Both adapted the same BN affines the same way (Adam's sign-like steps differ element-wise under rounding).
    start = dict(source.named_parameters())
    da = torch.cat([(p - start[n]).flatten() for n, p in fp32.params()])
    db = torch.cat([(p - start[n]).flatten() for n, p in bf16.params()])
    assert float(da.norm()) > 0.05
    assert float(torch.nn.functional.cosine_similarity(da, db, dim=0)) > 0.9


def test_bf16_engine_run_on_cpu_predicts_like_fp32(tmp_path, data_root):
    """The CPU share of the GPU bf16 test in test_engine.py: `runtime.precision=bf16` through the engine."""
    import json

    stream = ["stream.domains=[gaussian_noise,brightness]", "stream.severities=[5]", "stream.n_examples=40",
              "stream.batch_size=20", "stream.reset=never", "runtime.device=cpu", "runtime.progress=false"]  # fmt: skip

    def cfg(*extra: str):
        return load_config(REPO / "configs" / "tent.yaml", overrides=[*stream, *extra])

    def preds(folder: str) -> list[int]:
        lines = (tmp_path / folder / "results.jsonl").read_text().splitlines()
        return [p for line in lines for p in json.loads(line)["pred"]]

    a = run(cfg(), tmp_path / "fp32", data=data_root, record_predictions=True)
    b = run(cfg("runtime.precision=bf16"), tmp_path / "bf16", data=data_root, record_predictions=True)
    assert (a["precision"], b["precision"]) == ("fp32", "bf16")
    pa, pb = preds("fp32"), preds("bf16")
    assert len(pa) == len(pb) == 80
    assert sum(x == y for x, y in zip(pa, pb)) >= 77  # at most 3 of 80 predictions flip
    assert abs(a["online_error"] - b["online_error"]) <= 3 * 100 / 80
    assert b["n_skipped_updates"] == b["n_nonfinite_batches"] == 0
