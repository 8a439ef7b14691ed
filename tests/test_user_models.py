"""Contracts of "bring your own model": block maps given as data, torchvision:/module: models with checkpoints and
input normalisation, the `blocks` command on them, and the top-level `tta_surgical.blocks` / `tta_surgical.corrupt`.

No downloads: caches point at empty temporary folders, and models get random weights or checkpoints the tests write.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import tta_surgical
from tta_surgical import hub
from tta_surgical.config import ModelConfig, load_config
from tta_surgical.models import (
    BlockMapError,
    block_map,
    block_spec_source,
    create_model,
    create_model_from_config,
    select_params,
    set_block_map,
    unit_map,
)
from tta_surgical.models.external import ExternalModelError

REPO = Path(__file__).resolve().parents[1]

MODULE_SOURCE = """
import torch
from torch import nn


class Unit(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class TinyNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Unit(8), Unit(8))
        self.layer2 = nn.Sequential(Unit(8), Unit(8))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def tiny(num_classes=10):
    return TinyNet(num_classes)


def not_a_model():
    return 3
"""


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's caches, or sees a data folder it did not ask for."""
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(hub.DATA_ENV, raising=False)


@pytest.fixture(scope="module")
def byom(tmp_path_factory):
    """The importable module `byom_models` (factory `tiny`) in a temporary folder on sys.path."""
    folder = tmp_path_factory.mktemp("byom")
    (folder / "byom_models.py").write_text(MODULE_SOURCE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        import byom_models

        yield byom_models
    sys.modules.pop("byom_models", None)


def meta_tv(name: str) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, pretrained=False)[0]


# ------------------------------------------------------------------------------------------- block maps as data

MERGED = {"input": ["conv1", "bn1"], "block1": ["layer1", "layer2"], "block2": ["layer3", "layer4"], "head": "fc"}


def test_override_from_a_dict_sets_blocks_and_derives_units():
    model = meta_tv("torchvision:resnet18")
    set_block_map(model, MERGED)
    assert block_spec_source(model) == "given"
    bm = block_map(model)
    assert list(bm) == ["input", "block1", "block2", "head"]
    assert bm["block1"] == [n for n, _ in model.named_parameters() if n.startswith(("layer1.", "layer2."))]
    # units: the residual units of each stage named in the block, in order
    um = unit_map(model)
    assert [u for u in um if u.startswith("block1.")] == ["block1.0", "block1.1", "block1.2", "block1.3"]
    assert all(n.startswith("layer2.0.") for n in um["block1.2"])
    bn = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d) for p in ("weight", "bias")}
    expected = [n for n, _ in model.named_parameters() if n.startswith(("layer3.", "layer4.")) and n in bn]
    assert [n for n, _ in select_params(model, "block2", "norm")] == expected and len(expected) == 2 * 2 * 5
    # the map travels with copies of the model (methods snapshot and copy models)
    assert block_map(copy.deepcopy(model)) == bm


def test_override_with_explicit_units():
    model = meta_tv("torchvision:resnet18")
    units = {"block1.0": ["layer1"], "block1.1": ["layer2"]}
    set_block_map(model, {**MERGED, **units})
    um = unit_map(model)
    assert list(um)[:3] == ["input", "block1.0", "block1.1"]
    assert all(n.startswith("layer2.") for n in um["block1.1"])


def _base(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "input": ["conv1", "bn1"],
        "block1": ["layer1"],
        "block2": ["layer2"],
        "block3": ["layer3"],
        "block4": ["layer4"],
        "head": ["fc"],
    }
    for key, value in changes.items():
        if value is None:
            base.pop(key)
        else:
            base[key] = value
    return base


@pytest.mark.parametrize(
    "mapping, pattern",
    [
        (_base(head=None), r"needs input, block1 \.\.\. blockN .* and head"),
        (_base(block3=None), r"numbered without gaps"),
        (_base(stage1=["layer1"]), r"unknown key 'stage1'"),
        (_base(block4=["layer5"]), r"'layer5' \(in block4\) names no module or parameter of ResNet; its top-level"),
        (
            _base(block4=None),
            r"'layer4\.0\.conv1\.weight', .*\(\+\d+ more\) of ResNet are in no block \(15 in all\).*model\.block_map",
        ),
        (_base(block2=["layer1", "layer2"]), r"'layer1\.0\.conv1\.weight' of ResNet is in several blocks"),
        (_base(block4=["layer4", "relu"], block5=["relu"], head=["fc"]), r"\['block5'\] of ResNet match no parameter"),
        (_base(block1="layer1."), r"malformed name 'layer1\.'"),
        (_base(block1=3), r"needs a non-empty list"),
        (_base(**{"block1.1": ["layer1"]}), r"number the units of block1 as block1\.0"),
        (
            _base(
                block1=["layer1", "layer2"],
                block2=["layer3"],
                block3=["layer4"],
                block4=None,
                **{"block1.0": ["layer1"], "block1.1": ["layer3"], "block2.0": ["layer2"]},
            ),
            r"unit block1\.1 holds .*layer3.* which belong to block block2; a unit must lie inside its block",
        ),
    ],
)
def test_override_validation_errors(mapping, pattern):
    model = meta_tv("torchvision:resnet18")
    with pytest.raises(BlockMapError, match=pattern):
        set_block_map(model, mapping)
    assert block_spec_source(model) == "built-in (registered)", "a rejected map is never attached"


def test_override_from_yaml_file_and_config(tmp_path):
    path = tmp_path / "blocks.yaml"
    path.write_text(yaml.safe_dump(MERGED))
    model = meta_tv("torchvision:resnet18")
    set_block_map(model, path)
    assert list(block_map(model)) == ["input", "block1", "block2", "head"]
    cfg = load_config(
        overrides=["model.name=torchvision:resnet18", "model.pretrained=false", f"model.block_map={path}"]
    )
    model, _ = create_model_from_config(cfg.model)
    assert block_spec_source(model) == "given" and len(block_map(model)) == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("- conv1\n- layer1\n")
    with pytest.raises(BlockMapError, match="must hold a mapping"):
        set_block_map(model, bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        set_block_map(model, tmp_path / "nope.yaml")


def test_override_rescues_a_model_inference_cannot_read():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1))
            self.fc = nn.Linear(8, 2)

    model = Plain()
    with pytest.raises(TypeError, match=r"8 parameter\(s\) unassigned: features\.0\.weight"):
        tta_surgical.blocks(model)
    table = tta_surgical.blocks(
        model, {"input": ["features.0"], "block1": ["features.2", "features.3"], "head": ["fc"]}
    )
    assert list(table) == ["input", "block1", "head"] and table.units("block1") == ["block1.0"]
    assert [n for n, _ in select_params(model, "block1")] == [
        "features.2.weight",
        "features.2.bias",
        "features.3.weight",
        "features.3.bias",
    ]


# ------------------------------------------------------------------------------------------- module: models


def _save(state: dict[str, torch.Tensor], path: Path, nest: str | None = "state_dict", prefix: str = "module.") -> Path:
    sd = {prefix + k: v for k, v in state.items()}
    torch.save({nest: sd, "epoch": 3} if nest else sd, path)
    return path


def test_module_factory_with_a_checkpoint(byom, tmp_path, images32):
    torch.manual_seed(1)
    reference = byom.tiny().eval()
    ckpt = _save(reference.state_dict(), tmp_path / "tiny.pt")
    cfg = ModelConfig(name="module:byom_models:tiny", checkpoint=str(ckpt))
    model, info = create_model_from_config(cfg)
    assert isinstance(model, byom.TinyNet) and not model.training
    assert info.weights == str(ckpt) and info.pretrained and info.dataset == "custom"
    assert info.num_classes == 10 and "raw [0, 1]" in info.normalization
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    with torch.no_grad():
        assert torch.equal(model(images32), reference(images32))  # default for module: no normalisation
    assert list(block_map(model)) == ["input", "block1", "block2", "head"]
    assert block_map(model)["input"] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    # a bare state dict without prefixes loads too; num_classes reaches the factory
    torch.manual_seed(2)
    three = byom.tiny(num_classes=3)
    bare = _save(three.state_dict(), tmp_path / "bare.pt", nest=None, prefix="")
    model3, info3 = create_model("module:byom_models:tiny", checkpoint=bare, num_classes=3)
    assert model3.fc.out_features == 3 and info3.num_classes == 3
    assert torch.equal(model3.fc.weight, three.fc.weight)


def test_module_factory_normalisation_as_config(byom, tmp_path, images32):
    torch.manual_seed(1)
    reference = byom.tiny().eval()
    ckpt = _save(reference.state_dict(), tmp_path / "tiny.pt", nest="model")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cfg = load_config(
        overrides=[
            "model.name=module:byom_models:tiny",
            f"model.checkpoint={ckpt}",
            f"model.mean={list(mean)}",
            f"model.std={list(std)}",
        ]
    )
    model, info = create_model_from_config(cfg.model)
    assert "mean (0.5, 0.4, 0.3)" in info.normalization
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(images32), reference((images32 - m) / s), atol=1e-6)
        # the normalisation lives in non-persistent buffers and a hook: keys stay the model's, copies keep it
        assert set(model.state_dict()) == set(reference.state_dict())
        assert torch.allclose(copy.deepcopy(model)(images32), model(images32))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model(images32[:, :1])


def test_checkpoint_mismatch_lists_missing_and_unexpected_keys(byom, tmp_path):
    state = byom.tiny().state_dict()
    state.pop("fc.weight")
    state["fc.extra"] = torch.zeros(1)
    ckpt = _save(state, tmp_path / "bad.pt")
    with pytest.raises(
        ValueError, match=r"missing 1 key\(s\), e\.g\. \['fc\.weight'\]; unexpected 1 key\(s\).*fc\.extra"
    ):
        create_model("module:byom_models:tiny", checkpoint=ckpt)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("module:byom_models:tiny", checkpoint=tmp_path / "absent.pt")


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("module:byom_nope:tiny", r"cannot import 'byom_nope'"),
        ("module:byom_models:tinyy", r"has no callable 'tinyy'.*'tiny'"),
        ("module:byom_models:not_a_model", r"returned a int, not an nn.Module"),
        ("module:byom_models", r"expected module:<python.path>:<factory>"),
        ("keras:resnet", r"unknown model source 'keras'"),
        ("torchvision:resnet19", r"unknown torchvision classification model 'resnet19'; valid: .*resnet18"),
    ],
)
def test_external_name_errors(byom, name, pattern):
    with pytest.raises((ExternalModelError, ValueError, KeyError), match=pattern):
        create_model(name, pretrained=False)


# ------------------------------------------------------------------------------------------- torchvision: models


def test_torchvision_model_takes_01_images_and_keeps_its_names(images32):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model, info = create_model("torchvision:resnet18", pretrained=False)
    assert (info.input_size, info.num_classes, info.dataset) == (224, 1000, "imagenet")
    assert info.normalization == "ImageNet mean/std" and info.weights == "random init" and not info.pretrained
    plain = resnet18().eval()
    plain.load_state_dict(model.state_dict())
    assert list(model.state_dict()) == list(plain.state_dict())
    m = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    s = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(images32), plain((images32 - m) / s), atol=1e-5)
    raw, raw_info = create_model("torchvision:resnet18", pretrained=False, mean=None, std=None)
    raw.load_state_dict(model.state_dict())
    assert "raw" in raw_info.normalization
    with torch.no_grad():
        assert torch.allclose(raw(images32), plain(images32), atol=1e-5)


def test_torchvision_pretrained_offline_needs_allow_random(tmp_path):
    with pytest.raises(FileNotFoundError, match="allow_random"):
        create_model("torchvision:resnet18", data=tmp_path)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        model, info = create_model("torchvision:resnet18", data=tmp_path, allow_random=True)
    assert not info.pretrained and info.weights == "random init"
    assert info.warnings and "RANDOMLY INITIALISED" in info.warnings[0]
    with pytest.raises(ValueError, match="1000 classes, not 10"):
        create_model("torchvision:resnet18", num_classes=10)


def test_torchvision_checkpoint_with_own_classes(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    finetuned = resnet18(num_classes=10)
    ckpt = _save(finetuned.state_dict(), tmp_path / "r18_10.pt")
    model, info = create_model_from_config(
        ModelConfig(name="torchvision:resnet18", checkpoint=str(ckpt), num_classes=10)
    )
    assert info.pretrained and info.num_classes == 10 and torch.equal(model.fc.weight, finetuned.fc.weight)


# ------------------------------------------------------------------------------------------- the blocks command


def _rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}


def test_blocks_command_on_torchvision_models(capsys, tmp_path):
    from tta_surgical.cli import main

    assert main(["blocks", "torchvision:convnext_tiny"]) == 0
    out = capsys.readouterr().out
    assert "random init" in out and "not found locally" in out and "block map: inferred (stages)" in out
    rows = _rows(out)
    assert rows["block2"][1:3] == ["31", "992,256"] and rows["block2"][-2:] == ["features.2,", "features.3"]
    assert rows["total"][1:3] == ["182", "28,589,128"] and "block1.0" not in out
    assert main(["blocks", "torchvision:resnet18"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["block1"][1:3] == ["12", "147,968"] and rows["head"][-1] == "fc"
    assert main(["blocks", "torchvision:vit_b_16", "--units"]) == 0
    out = capsys.readouterr().out
    assert "block4.2" in out and "86,567,656" in out
    path = tmp_path / "blocks.yaml"
    path.write_text(yaml.safe_dump(MERGED))
    assert main(["blocks", "torchvision:resnet18", "--block-map", str(path), "--units"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert f"block map: given from {path}" in out and "block3" not in rows
    assert rows["block1"][1:3] == ["27", "673,536"] and "block1.3" in rows


def test_blocks_command_errors(capsys, tmp_path):
    from tta_surgical.cli import main

    assert main(["blocks", "torchvision:resnet19"]) == 2
    assert "resnet18" in capsys.readouterr().err
    path = tmp_path / "blocks.yaml"
    path.write_text(yaml.safe_dump({"input": ["conv1"], "block1": ["layer1"], "head": ["fc"]}))
    assert main(["blocks", "torchvision:resnet18", "--block-map", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'bn1.weight'" in err and "in no block" in err


# ------------------------------------------------------------------------------------------- tta_surgical.blocks


def test_top_level_blocks_table():
    model = meta_tv("torchvision:resnet18")
    table = tta_surgical.blocks(model)
    assert list(table) == ["input", "block1", "block2", "block3", "block4", "head"] == table.names
    assert len(table) == 6 and "block1.1" in table and "layer1" not in table
    names = [n for n, _ in table["block1"]]
    assert names == [n for n, _ in model.named_parameters() if n.startswith("layer1.")]
    assert all(isinstance(p, nn.Parameter) for _, p in table.params("block1"))
    assert table["block1"][0][1] is dict(model.named_parameters())[names[0]]
    assert table.numel("block1") == 147_968 and sum(table.counts().values()) == table.total == 11_689_512
    assert table.units("block1") == ["block1.0", "block1.1"] and table.units()[0] == "input"
    assert table.prefixes("head") == ("fc",) and table.source == "built-in (registered)"
    text = str(table)
    assert text.splitlines()[0].split() == ["block", "tensors", "params", "%", "prefixes"]
    assert "147,968" in text and text.splitlines()[-1].startswith("total")
    assert "block1.0" in table.format(units=True) and "block1.0" not in text
    with pytest.raises(KeyError, match="unknown block 'block9'; valid: input, block1"):
        table["block9"]
    given = tta_surgical.blocks(model, block_map=MERGED)
    assert list(given) == ["input", "block1", "block2", "head"] and given.source == "given"
    assert list(block_map(model)) == list(given), "the given map is attached to the model"


def test_import_of_the_package_is_light():
    code = "import sys, tta_surgical; assert callable(tta_surgical.blocks) and callable(tta_surgical.corrupt); "
    code += "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- tta_surgical.corrupt


def test_top_level_corrupt_wraps_the_engine(images32):
    from tta_surgical.corruptions import corrupt as engine_corrupt

    y = tta_surgical.corrupt(images32, "fog", severity=3, seed=0)
    assert y.shape == images32.shape and y.dtype == images32.dtype and 0 <= y.min() and y.max() <= 1
    assert torch.equal(y, engine_corrupt(images32, "fog", 3, seed=0))
    assert torch.equal(y, tta_surgical.corrupt(images32, "fog", severity=3, seed=0)), "a seed reproduces"
    assert not torch.equal(y, tta_surgical.corrupt(images32, "fog", severity=3, seed=1))
    assert not torch.equal(y, tta_surgical.corrupt(images32, "fog", severity=5, seed=0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(
        tta_surgical.corrupt(images32, "gaussian_noise", 2, generator=g),
        engine_corrupt(images32, "gaussian_noise", 2, seed=0),
    )


@pytest.mark.parametrize(
    "make, name, severity, error, pattern",
    [
        (lambda x: x[:, :1], "fog", 3, ValueError, r"shape \(B, 3, H, W\)"),
        (lambda x: x[0], "fog", 3, ValueError, r"shape \(B, 3, H, W\)"),
        (lambda x: x * 255, "fog", 3, ValueError, r"must lie in \[0, 1\].*divide 0-255 images by 255"),
        (lambda x: (x * 255).to(torch.uint8), "fog", 3, TypeError, r"x.float\(\) / 255"),
        (lambda x: x, "fogg", 3, KeyError, r"unknown corruption 'fogg'; valid: .*fog"),
        (lambda x: x, "fog", 6, ValueError, r"severity must be an integer in 1\.\.5"),
    ],
)
def test_top_level_corrupt_errors(images32, make, name, severity, error, pattern):
    with pytest.raises(error, match=pattern):
        tta_surgical.corrupt(make(images32), name, severity=severity)


@pytest.mark.gpu
def test_top_level_corrupt_on_cuda(images32):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = images32.cuda()
    y = tta_surgical.corrupt(x, "fog", severity=3, seed=0)
    assert y.device == x.device and torch.equal(y, tta_surgical.corrupt(x, "fog", severity=3, seed=0))


# ------------------------------------------------------------------------------------------- a run on a module: model


def test_engine_runs_a_module_model_with_a_block_map_file(byom, tmp_path, data_root):
    """`run` builds the model from the config (checkpoint, normalisation, block map) and adapts only block1."""
    from tta_surgical.engine import run

    torch.manual_seed(0)
    ckpt = _save(byom.tiny().state_dict(), tmp_path / "tiny.pt")
    blocks = tmp_path / "blocks.yaml"
    blocks.write_text(
        yaml.safe_dump({"input": ["conv1", "bn1"], "block1": ["layer1"], "block2": ["layer2"], "head": ["fc"]})
    )
    cfg = load_config(
        REPO / "configs" / "surgical_block1.yaml",
        overrides=[
            "model.name=module:byom_models:tiny",
            f"model.checkpoint={ckpt}",
            f"model.block_map={blocks}",
            "model.mean=[0.49,0.48,0.45]",
            "model.std=[0.25,0.24,0.26]",
            "stream.domains=[brightness]",
            "stream.severities=[5]",
            "stream.n_examples=32",
            "stream.batch_size=16",
            "runtime.device=cpu",
            "runtime.progress=false",
        ],
    )
    summary = run(cfg, tmp_path / "out", data=data_root)
    assert summary["model"] == "module:byom_models:tiny" and summary["model_pretrained"] is True
    assert summary["adapted_tensors"] == 6  # layer1: 2 units x (conv weight, bn weight, bn bias)
    assert summary["n_images"] == 32
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["model"]["block_map"] == str(blocks) and saved["model"]["mean"] == [0.49, 0.48, 0.45]
