"""Contracts of the model zoo, weight registry and block maps (tests/test_models.py).

Shape-only checks build models on the meta device (no memory, no init cost), so even ViT-B/16 and
WRN-28-10 are covered in milliseconds; accuracy checks use the real shared checkpoints.
"""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tta_surgical import hub
from tta_surgical.models import (
    MODELS,
    WEIGHTS,
    BlockSpec,
    block_map,
    block_names,
    create_model,
    load_checkpoint,
    norm_layers,
    resolve_blocks,
    select_params,
    unit_map,
    unit_names,
)
from tta_surgical.models.blocks import NORM_TYPES
from tta_surgical.models.cifar import AvgPadShortcut, CifarResNet, PadShortcut, WideResNet
from tta_surgical.registry import UnknownNameError


def meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        model, _ = create_model(name, pretrained=False)
    return model


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's caches, or sees a data folder it did not ask for."""
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(hub.DATA_ENV, raising=False)


def cifar_test(data_root: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with open(data_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    x = torch.from_numpy(np.asarray(d["data"][:n], dtype=np.uint8).reshape(-1, 3, 32, 32)).float() / 255
    return x, torch.tensor(d["labels"][:n])


def n_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> int:
    # one thread: on the shared 2-core test machine, oversubscribed threads are several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return sum(
                int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch)
            )
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- block maps


@pytest.mark.parametrize("name", MODELS.names())
def test_every_parameter_in_exactly_one_block_and_unit(name):
    model = meta_model(name)
    all_names = [n for n, _ in model.named_parameters()]
    for mapping in (block_map(model), unit_map(model)):
        flat = [p for names in mapping.values() for p in names]
        assert sorted(flat) == sorted(all_names) and len(flat) == len(set(flat))
        keys = list(mapping)
        assert keys[0] == "input" and keys[-1] == "head"
        assert all(mapping.values()), "no empty block"
    blocks = block_names(model)
    assert blocks[1:-1] == [f"block{k}" for k in range(1, len(blocks) - 1)]
    # each unit lies inside the block its name says
    bm = block_map(model)
    for unit, names in unit_map(model).items():
        assert set(names) <= set(bm[unit.split(".")[0]])


def test_block_counts_per_architecture():
    assert block_names(meta_model("resnet20")) == ["input", "block1", "block2", "block3", "head"]
    assert block_names(meta_model("resnet50"))[-2:] == ["block4", "head"]
    assert len(unit_names(meta_model("resnet56"))) == 2 + 27
    assert len(unit_names(meta_model("resnet26"))) == 2 + 12
    assert len(unit_names(meta_model("wrn28_10"))) == 2 + 12
    vit = meta_model("vit_b_16")
    assert block_names(vit) == ["input", "block1", "block2", "block3", "block4", "head"]
    assert set(block_map(vit)["input"]) == {
        "conv_proj.weight",
        "conv_proj.bias",
        "class_token",
        "encoder.pos_embedding",
    }
    assert block_map(vit)["head"] == ["encoder.ln.weight", "encoder.ln.bias", "heads.head.weight", "heads.head.bias"]
    assert all("encoder_layer_4." in n for n in unit_map(vit)["block2.1"])


def test_bn1_trap_final_norm_vs_stem_norm():
    # WRN: bn1 is the FINAL norm -> head; the CIFAR ResNet's bn1 is the stem norm -> input
    wrn = block_map(meta_model("wrn28_10"))
    assert wrn["input"] == ["conv1.weight"]
    assert wrn["head"] == ["bn1.weight", "bn1.bias", "fc.weight", "fc.bias"]
    r20 = block_map(meta_model("resnet20"))
    assert r20["input"] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert block_map(meta_model("resnet26"))["head"] == ["bn.weight", "bn.bias", "fc.weight", "fc.bias"]


class Toy(nn.Module):
    """layer1 and layer10 side by side: a naive string prefix would put layer10 into block1."""

    def __init__(self, blocks=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.layer10 = nn.Sequential(nn.Conv2d(4, 4, 1))
        self.fc = nn.Linear(4, 2)
        self._blocks = blocks or (
            ("input", ("stem",)),
            ("block1", ("layer1",)),
            ("block2", ("layer10",)),
            ("head", ("fc",)),
        )

    def block_spec(self) -> BlockSpec:
        units = (
            ("input", ("stem",)),
            ("block1.0", ("layer1.0",)),
            ("block1.1", ("layer1.1",)),
            ("block2.0", ("layer10.0",)),
            ("head", ("fc",)),
        )
        names = {n for n, _ in self._blocks}
        return BlockSpec(self._blocks, tuple(u for u in units if u[0].split(".")[0] in names))


def test_whole_component_matching():
    bm = block_map(Toy())
    assert bm["block1"] == ["layer1.0.weight", "layer1.0.bias", "layer1.1.weight", "layer1.1.bias"]
    assert bm["block2"] == ["layer10.0.weight", "layer10.0.bias"]


def test_orphan_and_duplicate_parameters_are_named():
    orphan = Toy((("input", ("stem",)), ("block1", ("layer1",)), ("head", ("fc",))))
    with pytest.raises(ValueError, match=r"layer10\.0\.weight.*no block"):
        block_map(orphan)
    dup = Toy((("input", ("stem",)), ("block1", ("layer1", "layer10")), ("block2", ("layer10",)), ("head", ("fc",))))
    with pytest.raises(ValueError, match=r"layer10\.0\.weight.*several blocks.*block1.*block2"):
        block_map(dup)


def test_broken_spec_is_refused_by_select_params():
    orphan = Toy((("input", ("stem",)), ("block1", ("layer1",)), ("head", ("fc",))))
    with pytest.raises(ValueError, match="no block"):
        select_params(orphan, "block1")


def test_wrapped_models_keep_their_block_map():
    model = meta_model("resnet20")
    wrapped = nn.DataParallel(model)
    bm = block_map(wrapped)
    assert bm["input"] == ["module.conv1.weight", "module.bn1.weight", "module.bn1.bias"]
    assert [n for n, _ in select_params(wrapped, "head")] == ["module.linear.weight", "module.linear.bias"]


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(TypeError, match="register_block_spec"):
        block_map(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------- resolve / select


def test_resolve_blocks_forms():
    m = meta_model("resnet20")
    assert resolve_blocks(m, "block1-2") == ["block1", "block2"]
    assert resolve_blocks(m, "block1-block3") == ["block1", "block2", "block3"]
    assert resolve_blocks(m, "input-block1") == ["input", "block1"]
    assert resolve_blocks(m, "block3-head") == ["block3", "head"]
    assert resolve_blocks(m, "all") == ["input", "block1", "block2", "block3", "head"]
    assert resolve_blocks(m, ["head", "input"]) == ["input", "head"]  # model order, not request order
    assert resolve_blocks(m, "head,block1.2") == ["block1.2", "head"]
    assert resolve_blocks(m, ["block2.1", "block2.0"]) == ["block2.0", "block2.1"]
    assert resolve_blocks(m, ["block1", "block1.0", "block1"]) == [
        "block1"
    ]  # a unit inside a chosen block adds nothing


@pytest.mark.parametrize("bad", ["block4", "block3-1", "layer1", "block1.9", "", "block1-9", "stem-head"])
def test_resolve_blocks_errors_list_valid_names(bad):
    m = meta_model("resnet20")
    with pytest.raises(ValueError) as err:
        resolve_blocks(m, bad)
    msg = str(err.value)
    assert "block1" in msg and ("block1.0" in msg or "range" in msg)


def test_select_params_kinds():
    m = meta_model("resnet20")
    norm_ids = {id(p) for mod in m.modules() if isinstance(mod, NORM_TYPES) for p in mod.parameters()}
    every = select_params(m, "block1")
    norm = select_params(m, "block1", kind="norm")
    conv = select_params(m, "block1", kind="conv")
    assert len(every) == 18 and len(norm) == 12 and len(conv) == 6
    assert all(id(p) in norm_ids for _, p in norm) and not any(id(p) in norm_ids for _, p in conv)
    order = [n for n, _ in m.named_parameters()]
    for sel in (every, norm, conv):
        idx = [order.index(n) for n, _ in sel]
        assert idx == sorted(idx), "model order"
    assert sorted(n for n, _ in norm + conv) == sorted(n for n, _ in every)
    assert [n for n, _ in select_params(m, "input", kind="affine")] == ["bn1.weight", "bn1.bias"]
    assert len(select_params(m)) == len(order)
    assert [n for n, _ in select_params(m, "block1.0", kind="conv")] == [
        "layer1.0.conv1.weight",
        "layer1.0.conv2.weight",
    ]
    with pytest.raises(ValueError, match="kind"):
        select_params(m, "block1", kind="bn")


def test_select_params_norm_kind_other_norms():
    gn = select_params(meta_model("resnet26_gn"), "all", kind="norm")
    assert gn and all(".bn" in "." + n for n, _ in gn)  # GroupNorm layers are named bn1/bn2/bn
    vit_norm = select_params(meta_model("vit_b_16"), "block1", kind="norm")
    assert len(vit_norm) == 3 * 2 * 2 and all(".ln_" in n for n, _ in vit_norm)
    vit_conv = [n for n, _ in select_params(meta_model("vit_b_16"), "input", kind="conv")]
    assert vit_conv == ["class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"]


def test_norm_layers():
    m = meta_model("resnet20")
    assert len(norm_layers(m)) == 19
    b1 = norm_layers(m, "block1")
    assert [n for n, _ in b1] == [f"layer1.{i}.bn{j}" for i in range(3) for j in (1, 2)]
    assert all(isinstance(mod, nn.BatchNorm2d) for _, mod in b1)
    assert [n for n, _ in norm_layers(meta_model("wrn28_10"), "head")] == ["bn1"]
    assert all(isinstance(mod, nn.GroupNorm) for _, mod in norm_layers(meta_model("resnet26_gn")))


# ------------------------------------------------------------------------------------------- architectures


def test_shortcuts():
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and not y[:, :8].any() and not y[:, 24:].any()
    z = AvgPadShortcut(16, 32, 2)(x)
    assert torch.allclose(z[:, :16], torch.nn.functional.avg_pool2d(x, 2)) and not z[:, 16:].any()


@pytest.mark.parametrize("name", ["resnet20", "resnet26", "resnet26_gn"])
def test_cifar_forward_and_internal_normalisation(name, images32):
    torch.manual_seed(0)
    model, info = create_model(name, pretrained=False)
    assert info.weights == "random init" and not info.pretrained and info.input_size == 32
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()
    out = model(images32)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    # the same network fed pre-normalised input with identity normalisation gives the same logits
    mean, std = model.mean.clone(), model.std.clone()
    model.mean.zero_()
    model.std.fill_(1)
    assert torch.allclose(model((images32 - mean) / std), out, atol=1e-5)


def test_wrn_state_dict_keys_match_robustbench_standard():
    names = ["conv1.weight"]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for b in (1, 2, 3):
        for i in range(4):
            p = f"block{b}.layer.{i}."
            names += [p + "bn1." + k for k in bn] + [p + "conv1.weight"]
            names += [p + "bn2." + k for k in bn] + [p + "conv2.weight"]
            if i == 0:
                names.append(p + "convShortcut.weight")
    names += ["bn1." + k for k in bn] + ["fc.weight", "fc.bias"]
    sd = meta_model("wrn28_10").state_dict()
    assert list(sd) == names
    assert sd["block1.layer.0.convShortcut.weight"].shape == (160, 16, 1, 1)
    assert sd["block3.layer.3.conv2.weight"].shape == (640, 640, 3, 3)
    assert sd["fc.weight"].shape == (10, 640) and sd["bn1.weight"].shape == (640,)


def test_small_wideresnet_forward_takes_raw_input():
    m = WideResNet(depth=10, widen_factor=1).eval()
    assert m.mean is None
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_imagenet_resnet18_forward(monkeypatch):
    model, info = create_model("resnet18", pretrained=False, num_classes=7)
    assert info.num_classes == 7 and info.params == 11_689_512 - 1000 * 513 + 7 * 513
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 7)
    from torchvision.models import ResNet

    assert isinstance(model, ResNet) and "mean" not in model.state_dict()


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        create_model("resnet21")
    msg = str(err.value)
    assert all(n in msg for n in ("resnet20", "wrn28_10", "vit_b_16"))


# ------------------------------------------------------------------------------------------- weights


def test_weight_registry_entries():
    for depth in (20, 32, 44, 56):
        spec = WEIGHTS.get(f"resnet{depth}")
        assert (
            spec.url
            == "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/" + spec.filename
        )
        assert len(spec.sha256) == 64 and spec.filename.startswith(f"resnet{depth}-{spec.sha256[:8]}")
    assert WEIGHTS.get("wrn28_10").url is None and "1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC" in WEIGHTS.get("wrn28_10").howto


def test_weight_and_cifar_checksums_equal_the_data_roots(data_sha256):
    """The registry's digests (and the CIFAR-10 test batch's) are those the data root's SHA256SUMS lists."""
    from tta_surgical.data.cifar import TEST_BATCH_SHA256

    listed = {rel: d for rel, d in data_sha256.items() if rel.startswith("weights/")}
    assert len(listed) == 4
    for depth in (20, 32, 44, 56):
        spec = WEIGHTS.get(f"resnet{depth}")
        assert listed.pop(f"weights/{spec.filename}") == spec.sha256, spec.filename
    assert not listed
    assert data_sha256["cifar-10-batches-py/test_batch"] == TEST_BATCH_SHA256


def test_shared_resnet20_loads_strictly_and_is_accurate(data_root):
    model, info = create_model("resnet20", data=data_root)
    assert info.pretrained and info.weights.endswith("resnet20-12fca82f.th") and info.params == 269_722
    x, y = cifar_test(data_root, 1000)
    assert abs(n_correct(model, x, y) - 915) <= 3  # 91.5% on the first 1000 (91.73% on all 10,000)


def test_shared_resnet56_loads_strictly_and_is_accurate(data_root, monkeypatch):
    monkeypatch.setenv(hub.DATA_ENV, str(data_root))  # found through $TTA_SURGICAL_DATA this time
    model, info = create_model("resnet56")
    assert info.pretrained and info.params == 853_018
    x, y = cifar_test(data_root, 500)  # 500 images keep the default suite fast on 2 shared cores
    assert abs(n_correct(model, x, y) - 470) <= 3  # 94.0% on the first 500 (93.39% on all 10,000)


@pytest.mark.parametrize(
    ("name", "params", "correct", "published"),
    [("resnet32", 464_154, 466, 92.63), ("resnet44", 658_586, 465, 93.10)],
)
def test_shared_resnet32_and_resnet44_load_strictly_and_are_accurate(data_root, name, params, correct, published):
    """The default-suite share of the slow full-test-set check below: the weights load into the architecture and
    classify the first 500 test images as measured here, within sampling error of the published accuracy."""
    model, info = create_model(name, data=data_root)
    assert info.pretrained and info.params == params and info.weights.endswith(WEIGHTS.get(name).filename)
    x, y = cifar_test(data_root, 500)
    got = n_correct(model, x, y)
    assert abs(got - correct) <= 3
    assert abs(got / 5 - published) <= 3.5  # 3 standard errors of an accuracy near 93% on 500 images


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "acc"), [("resnet20", 91.73), ("resnet32", 92.63), ("resnet44", 93.10), ("resnet56", 93.39)]
)
def test_shared_resnets_full_test_set_accuracy(data_root, name, acc):
    model, _ = create_model(name, data=data_root)
    x, y = cifar_test(data_root, 10_000)
    assert abs(n_correct(model, x, y) / 100 - acc) <= 0.05


def _copy_weights(data_root: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "data" / "weights" / "resnet20-12fca82f.th"
    dest.parent.mkdir(parents=True)
    dest.write_bytes((data_root / "weights" / "resnet20-12fca82f.th").read_bytes())
    return dest


def test_wrong_sha256_is_an_error_even_with_allow_random(data_root, tmp_path):
    dest = _copy_weights(data_root, tmp_path)
    raw = bytearray(dest.read_bytes())
    raw[-10] ^= 0xFF
    dest.write_bytes(bytes(raw))
    for allow in (False, True):
        with pytest.raises(hub.IntegrityError, match="SHA-256"):
            create_model("resnet20", data=tmp_path / "data", allow_random=allow)


def test_truncated_and_missing_checkpoints(data_root, tmp_path):
    dest = _copy_weights(data_root, tmp_path)
    dest.write_bytes(dest.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        create_model("resnet20", pretrained=dest)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("resnet20", pretrained=tmp_path / "nope.pt")


def test_local_checkpoint_path_loads(tmp_path):
    torch.manual_seed(1)
    src = CifarResNet(20)
    sd = {"module." + k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "mine.th"
    torch.save({"state_dict": sd, "best_prec1": 1.0}, path)
    model, info = create_model("resnet20", pretrained=str(path))
    assert info.weights == str(path) and info.pretrained
    for (n, a), (_, b) in zip(model.state_dict().items(), src.state_dict().items()):
        assert torch.equal(a, b), n
    # a checkpoint of another architecture is refused with the keys that differ
    torch.save(CifarResNet(32).state_dict(), tmp_path / "r32.pt")
    with pytest.raises(ValueError, match=r"unexpected .*layer1\.3"):
        create_model("resnet20", pretrained=tmp_path / "r32.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_checkpoint(CifarResNet(20, num_classes=100), path)


def test_torchvision_offline_needs_allow_random(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="allow_random") as err:
        create_model("resnet18")
    assert "resnet18-f37072fd.pth" in str(err.value)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        model, info = create_model("resnet18", allow_random=True)
    assert info.weights == "random init" and not info.pretrained and info.warnings
    assert info.input_size == 224 and info.num_classes == 1000


def test_models_without_public_weights(tmp_path):
    with torch.device("meta"):
        with pytest.raises(FileNotFoundError, match="no public pretrained weights"):
            create_model("resnet26")
        with pytest.raises(FileNotFoundError, match="1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC"):
            create_model("wrn28_10", data=tmp_path)
        with pytest.warns(UserWarning):
            _, info = create_model("wrn28_10", data=tmp_path, allow_random=True)
    assert not info.pretrained and info.params == 36_479_194
    with pytest.raises(ValueError, match="classes"):
        create_model("resnet20", num_classes=100)
    with pytest.raises(TypeError, match="pretrained"):
        create_model("resnet20", pretrained=1)


# ------------------------------------------------------------------------------------------- CLI


def test_blocks_command(capsys):
    from tta_surgical.cli import main

    assert main(["blocks", "resnet20"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["input"][1:4] == ["3", "464", "0.17"]
    assert lines["block3"][1:3] == ["18", "203,520"]
    assert lines["total"][1:3] == ["59", "269,722"]
    assert "block1.0" not in out
    assert main(["blocks", "vit_b_16", "--units"]) == 0
    out = capsys.readouterr().out
    assert "block4.2" in out and "86,567,656" in out


def test_blocks_command_unknown_model(capsys):
    from tta_surgical.cli import main

    assert main(["blocks", "nope"]) == 2
    assert "resnet20" in capsys.readouterr().err
