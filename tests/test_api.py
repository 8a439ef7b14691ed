"""The Python API: `tta_surgical.adapt` on models outside the zoo, every registered method through it, and the
README's example executed as written."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torchvision

import tta_surgical
from tta_surgical.config import ConfigError
from tta_surgical.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
TINY = {"cotta": {"n_augmentations": 4}, "memo": {"n_augmentations": 4}, "rotta": {"memory_size": 10}}


def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def images(seed: int, n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_adapt_block1_moves_only_layer1_tensors():
    model = resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = tta_surgical.adapt(model, method="tent", blocks=["block1"], optim={"lr": 1e-2})
    assert {n.split(".")[0] for n, _ in adapted.params()} == {"layer1"}
    for s in range(2):
        logits = adapted(images(s))
        assert logits.shape == (8, 10)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("layer1.") for k in changed), sorted(changed)
    assert {n for n, _ in adapted.params()} <= changed  # every adapted tensor moved
    assert adapted.counters["n_updates"] == 2 and adapted.last.loss is not None


def test_predict_reset_and_state_round_trip():
    model = resnet18()
    pristine = copy.deepcopy(model.state_dict())
    adapted = tta_surgical.adapt(model, "surgical", blocks="block1-2", optim={"lr": 1e-2})
    first = adapted(images(0))
    adapted(images(1))
    state = copy.deepcopy(adapted.state_dict())
    a = adapted.predict(images(2))
    assert torch.equal(a, adapted.predict(images(2)))  # predict changes nothing
    nxt = adapted(images(2))
    adapted.reset()
    assert all(torch.equal(v, pristine[k]) for k, v in model.state_dict().items())
    assert torch.equal(adapted(images(0)), first)  # a reset replays exactly
    other = tta_surgical.adapt(resnet18(), "surgical", blocks="block1-2", optim={"lr": 1e-2})
    other.load_state_dict(state)
    assert torch.equal(other(images(2)), nxt)  # a restored state continues exactly


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_works_through_adapt(name):
    def source_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:  # for methods that need source samples (EATA)
        return images(99, n=min(n, 32)), torch.randint(0, 10, (min(n, 32),))

    adapted = tta_surgical.adapt(
        resnet18(), name, optim={"lr": 1e-3}, source_images=source_images, **TINY.get(name, {})
    )
    for s in range(2):
        out = adapted(images(s, n=16))
        assert out.shape == (16, 10) and torch.isfinite(out).all()
    assert adapted.counters["n_steps"] == 2


@pytest.mark.parametrize("family", ["mobilenet_v3_small", "regnet_y_400mf", "convnext_tiny"])
def test_inferred_block_maps_work_through_adapt(family):
    torch.manual_seed(0)
    model = torchvision.models.get_model(family, num_classes=10).eval()
    table = tta_surgical.blocks(model)
    first = list(table)[1]
    prefixes = {n for n, _ in table[first]}
    adapted = tta_surgical.adapt(model, "tent", blocks=[first], kind="all", optim={"lr": 1e-3})
    assert {n for n, _ in adapted.params()} == prefixes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted(images(0, n=8, size=64))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    params = dict(model.named_parameters())
    assert {k for k in changed if k in params} <= prefixes and changed & prefixes


def test_user_block_map_and_clear_errors():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 3),
    )  # fmt: skip
    block_map = {"input": ["0"], "block1": ["1"], "head": ["5"]}
    adapted = tta_surgical.adapt(model, "tent", block_map=block_map)
    assert [n for n, _ in adapted.params()] == ["1.weight", "1.bias"]
    with pytest.raises(ConfigError, match="valid keys in section 'method' for method 'tent'"):
        tta_surgical.adapt(resnet18(), "tent", e_margin=0.4)
    with pytest.raises(ConfigError, match="unknown method 'tnet'"):
        tta_surgical.adapt(resnet18(), "tnet")
    with pytest.raises(TypeError, match="nn.Module"):
        tta_surgical.adapt("resnet18")
    adapted = tta_surgical.adapt(resnet18())
    with pytest.raises(ValueError, match="batch"):
        adapted(torch.rand(0, 3, 32, 32))
    with pytest.raises(TypeError, match="images as floats"):
        adapted(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_readme_example_runs_as_written(capsys):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its API example (marker <!-- api-example -->)"
    exec(compile(match.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "block1" in out and "n_updates" in out


# ------------------------------------------------------------------------------------------------ bad input at the door

BAD_BATCHES = {
    "one channel": (lambda: torch.rand(4, 1, 32, 32), ValueError, r"\(B, 3, H, W\).*3 channels.*\(4, 1, 32, 32\)"),
    "float64": (lambda: torch.rand(4, 3, 32, 32, dtype=torch.float64), TypeError, r"float32; got torch.float64"),
    "uint8": (lambda: torch.zeros(4, 3, 32, 32, dtype=torch.uint8), TypeError, r"got torch.uint8 .*x.float\(\) / 255"),
    "bf16 without bf16 precision": (lambda: torch.rand(4, 3, 32, 32).bfloat16(), TypeError, r"precision='bf16'"),
    "3-D tensor": (lambda: torch.rand(3, 32, 32), ValueError, r"3-D tensor of shape \(3, 32, 32\)"),
    "batch of one": (lambda: torch.rand(1, 3, 32, 32), ValueError, r"B >= 2 images"),
    "not a tensor": (lambda: [[0.0]], TypeError, r"torch.Tensor of shape.*got a list"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_BATCHES))
@pytest.mark.parametrize("method", ["tent", "norm", "source"])
def test_bad_batches_fail_at_the_door_and_count_no_step(method, case):
    """One clear error naming what is expected, raised by tta-surgical itself (not from inside torch), and no step
    counted; a good batch afterwards works and counts one. `source` takes a batch of one (no batch statistics)."""
    make, error, pattern = BAD_BATCHES[case]
    adapted = tta_surgical.adapt(resnet18(), method)
    if method == "source" and case == "batch of one":
        adapted(make())
        assert adapted.counters["n_steps"] == 1
        return
    for call in (adapted, adapted.predict):
        with pytest.raises(error, match=pattern) as info:
            call(make())
        assert info.traceback[-1].path.name == "api.py"  # raised at the door
    assert adapted.counters["n_steps"] == 0
    adapted(images(0))
    assert adapted.counters["n_steps"] == 1


def test_batch_of_one_per_method_and_bf16_inputs():
    """B >= 2 exactly where a method normalises with the test batch's BatchNorm statistics; bf16 images are taken
    with precision="bf16"."""
    needs_two = {"norm", "tent", "surgical", "eta", "eata", "sar", "deyo", "roid", "cotta"}
    for name in METHODS:
        settings = {**TINY.get(name, {}), **({"fisher_alpha": 0.0} if name == "eata" else {})}
        adapted = tta_surgical.adapt(resnet18(), name, **settings)
        if name in needs_two:
            with pytest.raises(ValueError, match=f"method {name} normalises with the BatchNorm statistics"):
                adapted(images(0, n=1))
            assert adapted(images(0, n=2)).shape == (2, 10)  # 1x1 maps in layer4 at 32 px: two images suffice
        else:
            assert adapted(images(0, n=1)).shape == (1, 10)
    bf16 = tta_surgical.adapt(resnet18(), "tent", precision="bf16")
    assert bf16(images(0).bfloat16()).shape == (8, 10) and bf16(images(1)).shape == (8, 10)


def test_failed_step_is_not_counted():
    """An error raised inside the method (past the door's checks) is not a step either."""
    adapted = tta_surgical.adapt(resnet18(), "tent")

    def boom(x):
        raise RuntimeError("inside the method")

    adapted.method.forward_and_adapt = boom
    with pytest.raises(RuntimeError, match="inside the method"):
        adapted(images(0))
    assert adapted.counters["n_steps"] == 0


def test_norm_refuses_a_model_without_batchnorm(tmp_path):
    """`norm` adapts BatchNorm statistics only: on a model without BatchNorm it would be `source` under another
    name, so it is refused, in Python and on the command line alike."""
    vit = torchvision.models.vit_b_16(num_classes=10, image_size=32).eval()
    with pytest.raises(ValueError, match=r"has no BatchNorm layer \(its norm layers: LayerNorm x 25\).*method source"):
        tta_surgical.adapt(vit, "norm")
    tta_surgical.adapt(torchvision.models.vit_b_16(num_classes=10, image_size=32).eval(), "tent")  # tent: LN affines
    from tta_surgical.cli import main

    assert main(["run", "--config", str(REPO / "configs" / "norm.yaml"), "--out", str(tmp_path / "gn"),
                 "model.name=resnet26_gn", "model.pretrained=false", "stream.n_examples=8"]) == 2  # fmt: skip
    assert not (tmp_path / "gn" / "results.jsonl").exists()
