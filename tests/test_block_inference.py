"""Contracts of block-map inference (tta_surgical/models/infer.py) on the torchvision and timm families.

Every model is built once per module with random weights (no downloads), on the meta device where its
constructor allows (shapes are all a block map needs), so the whole file takes a few seconds.
"""

from __future__ import annotations

import pytest
import torch
from _extras import require
from torch import nn

from tta_surgical.models import (
    MODELS,
    BlockInferenceError,
    block_map,
    block_names,
    block_spec_source,
    create_model,
    infer_block_spec,
    resolve_blocks,
    select_params,
    unit_map,
)
from tta_surgical.models.partition import partition as _partition

# family -> (number of stages, prefixes of the first stage, input prefixes, head prefixes)
TORCHVISION = {
    "resnet18": (4, ("layer1",), ("conv1", "bn1"), ("fc",)),
    "wide_resnet50_2": (4, ("layer1",), ("conv1", "bn1"), ("fc",)),
    "resnext50_32x4d": (4, ("layer1",), ("conv1", "bn1"), ("fc",)),
    "regnet_y_400mf": (4, ("trunk_output.block1",), ("stem",), ("fc",)),
    "mobilenet_v2": (7, ("features.1",), ("features.0",), ("features.18", "classifier")),
    "mobilenet_v3_small": (5, ("features.1",), ("features.0",), ("features.12", "classifier")),
    "efficientnet_b0": (7, ("features.1",), ("features.0",), ("features.8", "classifier")),
    "efficientnet_v2_s": (6, ("features.1",), ("features.0",), ("features.7", "classifier")),
    "convnext_tiny": (4, ("features.1",), ("features.0",), ("classifier",)),
    "vit_b_16": (
        4,
        tuple(f"encoder.layers.encoder_layer_{i}" for i in range(3)),
        ("conv_proj", "class_token", "encoder.pos_embedding"),
        ("encoder.ln", "heads"),
    ),
    "swin_t": (4, ("features.1",), ("features.0",), ("norm", "head")),
}
TIMM = {
    "resnet18": (4, ("layer1",), ("conv1", "bn1"), ("fc",)),
    "convnext_atto": (4, ("stages.0",), ("stem",), ("head",)),
    "vit_tiny_patch16_224": (
        4,
        tuple(f"blocks.{i}" for i in range(3)),
        ("cls_token", "pos_embed", "patch_embed"),
        ("norm", "head"),
    ),
    "efficientnet_b0": (7, ("blocks.0",), ("conv_stem", "bn1"), ("conv_head", "bn2", "classifier")),
}


def _build(name: str) -> nn.Module:
    """Random weights on the meta device, or on the CPU where a constructor computes on tensors (RegNet)."""
    try:
        with torch.device("meta"):
            model, _ = create_model(name, pretrained=False)
    except (NotImplementedError, RuntimeError):
        model, _ = create_model(name, pretrained=False)
    return model


@pytest.fixture(scope="module")
def models():
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name.startswith("timm:"):
            require("timm")  # skipped on a laptop without timm, a failure in CI (which installs the extra)
        if name not in cache:
            cache[name] = _build(name)
        return cache[name]

    return get


CASES = [(f"torchvision:{n}", *v) for n, v in TORCHVISION.items()] + [(f"timm:{n}", *v) for n, v in TIMM.items()]


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("name, n_stages, first_stage, stem, head", CASES)
def test_inferred_map_partitions_and_follows_the_structure(models, name, n_stages, first_stage, stem, head):
    model = models(name)
    every = [n for n, _ in model.named_parameters()]
    bm, um = block_map(model), unit_map(model)
    for mapping in (bm, um):  # the partition assertion: every parameter in exactly one block / unit
        flat = [p for names in mapping.values() for p in names]
        assert sorted(flat) == sorted(every) and len(flat) == len(set(flat))
        assert all(mapping.values())
    assert list(bm) == ["input", *[f"block{k}" for k in range(1, n_stages + 1)], "head"]
    assert bm["input"] == [n for n in every if _under(n, stem)]
    assert bm["head"] == [n for n in every if _under(n, head)]
    # units are blockK.i, each inside its block, numbered from 0
    for unit, names in um.items():
        if unit not in ("input", "head"):
            block, i = unit.split(".")
            assert set(names) <= set(bm[block]) and int(i) >= 0
    assert all(f"block{k}.0" in um for k in range(1, n_stages + 1))
    # surgical selection: block1 is exactly the first stage
    chosen = [n for n, _ in select_params(model, ["block1"], "all")]
    assert chosen == [n for n in every if _under(n, first_stage)]
    assert resolve_blocks(model, "block1-2") == ["block1", "block2"]


def test_transitions_open_the_next_stage(models):
    """ConvNeXt's downsampling layers and Swin's patch merging start the stage after them (block and unit 0)."""
    for name, transition, stage in (
        ("torchvision:convnext_tiny", "features.2", "features.3"),
        ("torchvision:swin_t", "features.2", "features.3"),
    ):
        model = models(name)
        bm, um = block_map(model), unit_map(model)
        assert {n.split(".")[1] for n in bm["block2"]} == {transition.split(".")[1], stage.split(".")[1]}
        assert all(_under(n, (transition, f"{stage}.0")) for n in um["block2.0"])
        assert any(_under(n, (transition,)) for n in um["block2.0"])
    bm = block_map(models("torchvision:convnext_tiny"))
    assert "classifier.0.weight" in bm["head"]  # the final LayerNorm2d belongs to the head


def test_mobilenet_stages_follow_the_residual_structure(models):
    """A new stage starts at every inverted-residual unit without an identity shortcut (torchvision's rows)."""
    model = models("torchvision:mobilenet_v2")
    sizes = [len({n.split(".")[1] for n in names}) for b, names in block_map(model).items() if b.startswith("block")]
    assert sizes == [1, 2, 3, 4, 3, 3, 1]  # torchvision's inverted_residual_setting: n = 1, 2, 3, 4, 3, 3, 1
    assert len(unit_map(model)) == 2 + 17


def test_inference_agrees_with_the_hand_written_maps(models):
    """Where a hand-written or registered map exists, inference gives the same partition (blocks and units)."""
    names = [*MODELS.names(), "torchvision:resnet18", "torchvision:vit_b_16"]
    for name in names:
        model = models(name)
        assert block_spec_source(model) != "given" and not block_spec_source(model).startswith("inferred")
        spec = infer_block_spec(model)
        assert _partition(model, spec.blocks, "block") == block_map(model), name
        assert _partition(model, spec.units, "unit") == unit_map(model), name


def test_timm_and_torchvision_twins_get_the_same_blocks(models):
    tv, tm = models("torchvision:resnet18"), models("timm:resnet18")
    assert block_map(tv) == block_map(tm) and unit_map(tv) == unit_map(tm)
    count = lambda m: {b: sum(dict(m.named_parameters())[n].numel() for n in ns) for b, ns in block_map(m).items()}  # noqa: E731
    assert count(models("torchvision:efficientnet_b0")) == count(models("timm:efficientnet_b0"))


def test_wrapped_inferred_model_keeps_its_map(models):
    wrapped = nn.DataParallel(models("torchvision:convnext_tiny"))
    assert block_names(wrapped)[:2] == ["input", "block1"]
    assert all(n.startswith("module.features.1.") for n, _ in select_params(wrapped, "block1"))


class Plain(nn.Module):
    """No stages and no list of units: nothing to infer from."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1))
        self.fc = nn.Linear(8, 2)


class Unit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)


def test_inference_failure_names_the_unassigned_parameters():
    with pytest.raises(BlockInferenceError) as err:
        block_map(Plain())
    msg = str(err.value)
    assert "Plain" in msg and "8 parameter(s) unassigned" in msg
    assert "features.0.weight" in msg and "(+3 more)" in msg
    assert "block_map" in msg and "register_block_spec" in msg
    assert isinstance(err.value, TypeError)  # the unknown-architecture contract of block_spec


def test_stages_without_a_stem_are_refused():
    headless = nn.Sequential(nn.Sequential(Unit(), Unit()), nn.Sequential(Unit(), Unit()), nn.Linear(4, 2))
    with pytest.raises(BlockInferenceError, match=r"no input \(stem\)"):
        block_map(headless)


def test_inference_on_a_small_custom_net_matches_components_whole():
    """layer1 and layer10 side by side: both are stages, and layer10's parameters never fall into block1."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.layer1 = nn.Sequential(Unit(), Unit())
            self.layer10 = nn.Sequential(Unit())
            self.fc = nn.Linear(4, 2)

    bm = block_map(Net())
    assert bm["block1"] == [f"layer1.{i}.{m}.{p}" for i in range(2) for m in ("conv", "bn") for p in ("weight", "bias")]
    assert all(n.startswith("layer10.") for n in bm["block2"]) and bm["head"] == ["fc.weight", "fc.bias"]
    assert list(unit_map(Net())) == ["input", "block1.0", "block1.1", "block2.0", "head"]
