"""Weight registry: name -> where the file lives (filename, url, sha256) and how to read it (loader).

Files are looked for in the local data folder first (`data_root` / `$TTA_SURGICAL_DATA`, under
`weights/<filename>`), then in the package cache, downloading there through `tta_surgical.hub.fetch`
(SHA-256 verified). torchvision's ImageNet weights use torch's own hub cache (`$TORCH_HOME`) and its
hash-prefix check, so files a user already has from torchvision are reused. Checkpoints are always read
with `torch.load(..., weights_only=True, map_location="cpu")`.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, ViT_B_16_Weights

from .. import hub
from ..registry import Registry

__all__ = ["WEIGHTS", "WeightSpec", "load_checkpoint", "load_state_dict_file", "weight_file"]

StateDict = dict[str, torch.Tensor]

# Keys under which training scripts nest the model weights (akamaster: state_dict; TTT: net; others: model).
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict_file(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint file into a flat `{name: tensor}` dict.

    Accepts a plain state dict or a dict nesting it under `state_dict`/`model_state_dict`/`model`/`net`;
    strips DataParallel (`module.`) and torch.compile (`_orig_mod.`) prefixes. A missing, truncated or
    foreign file raises a clear error.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{p} holds objects other than tensors, which weights_only=True refuses ({err}). If you trust the "
            "file, re-save its weights only: torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"could not read checkpoint {p} (truncated or not a PyTorch checkpoint?): {err}") from err
    for key in _NESTED_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{p} is not a state dict (got {type(obj).__name__}); expected {{name: tensor}}")
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{p}: entry {key!r} is a {type(value).__name__}, not a tensor; is this a state dict?")
        for pre in _WRAPPER_PREFIXES:
            if key.startswith(pre):
                key = key[len(pre) :]
        out[key] = value
    return out


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load weights into `model` strictly, tolerating only missing `num_batches_tracked` buffers.

    Strict on everything that matters (every parameter and running statistic present, no unknown keys,
    shapes equal); `num_batches_tracked` is absent from many published checkpoints and unused in eval.
    `source` is a checkpoint path or a state dict.
    """
    sd = load_state_dict_file(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    where = f" from {source}" if isinstance(source, (str, os.PathLike)) else ""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:5]}")
        if bad_shape:
            parts.append(f"shape mismatch: {bad_shape[:3]} (wrong num_classes or architecture?)")
        raise ValueError(f"checkpoint{where} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=False)  # the only keys left out are num_batches_tracked (checked above)
    return model


@dataclass(frozen=True)
class WeightSpec:
    """One published weight file.

    `url=None` means "local path only" (no stable direct download): `howto` says how to obtain it.
    `sha256=None` means no published digest (the file is used as found). `torch_hub=True` keeps the file
    in torch's hub cache and checks the hash prefix in its name (torchvision's convention).
    """

    name: str
    filename: str
    url: str | None
    sha256: str | None
    loader: Callable[[Path], StateDict] = load_state_dict_file
    source: str = ""
    howto: str = ""
    torch_hub: bool = False
    meta: Mapping[str, object] = field(default_factory=dict)


WEIGHTS: Registry[WeightSpec] = Registry("weights")


def _add(spec: WeightSpec) -> None:
    WEIGHTS.register(spec.name, spec)


_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
for _name, _file, _sha in (
    ("resnet20", "resnet20-12fca82f.th", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
    ("resnet32", "resnet32-d509ac18.th", "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
    ("resnet44", "resnet44-014dd654.th", "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
    ("resnet56", "resnet56-4bfd9763.th", "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"),
):
    _add(WeightSpec(_name, _file, _AKAMASTER + _file, _sha, source="akamaster/pytorch_resnet_cifar10 (BSD-2-Clause)"))

_add(
    WeightSpec(
        "wrn28_10",
        "Standard.pt",
        None,
        None,
        source="RobustBench cifar10 Linf/corruptions 'Standard' (Google Drive id 1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC)",
        howto=(
            "the RobustBench 'Standard' WideResNet-28-10 has no stable direct URL or published SHA-256: download it "
            "from https://drive.google.com/uc?id=1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC (e.g. `gdown "
            "1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC -O Standard.pt`, or robustbench.utils.load_model(model_name="
            "'Standard', dataset='cifar10')), then put it at <data_root>/weights/Standard.pt or pass its path as "
            "pretrained=<path>"
        ),
    )
)


def _register_torchvision() -> None:
    for name, enum in (
        ("resnet18", ResNet18_Weights.IMAGENET1K_V1),
        ("resnet50", ResNet50_Weights.IMAGENET1K_V1),
        ("vit_b_16", ViT_B_16_Weights.IMAGENET1K_V1),
    ):
        _add(
            WeightSpec(
                name,
                enum.url.rsplit("/", 1)[-1],
                enum.url,
                None,
                source=f"torchvision {type(enum).__name__}.{enum.name}",
                torch_hub=True,
                meta={"acc@1": enum.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")},
            )
        )


_register_torchvision()


def _torch_hub_file(spec: WeightSpec) -> Path:
    """torchvision's weights in torch's hub cache, downloaded there when absent (hash prefix checked)."""
    assert spec.url is not None
    dest = Path(torch.hub.get_dir()) / "checkpoints" / spec.filename
    if dest.is_file():
        return dest
    m = re.search(r"-([0-9a-f]{8,})\.", spec.filename)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(spec.url, str(dest), hash_prefix=m.group(1) if m else None, progress=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise FileNotFoundError(
            f"could not download {spec.source} weights from {spec.url} to {dest} ({err}). Offline? Download the "
            f"file elsewhere and place it at {dest} or at <--data-root>/weights/{spec.filename}"
        ) from err
    return dest


def weight_file(spec: WeightSpec, data_root: str | os.PathLike | None = None) -> Path:
    """A verified local copy of `spec`'s file: `<data_root>/weights/` first, then the cache (downloading).

    Raises `FileNotFoundError` when it is nowhere and cannot be downloaded, `hub.IntegrityError` when a
    copy exists but its SHA-256 is wrong (never silently replaced).
    """
    root = hub.data_root(data_root)
    if root is not None and (root / "weights" / spec.filename).is_file():
        return hub.verify(
            root / "weights" / spec.filename, spec.sha256, hint=f"expected the {spec.source} file {spec.filename}"
        )
    if spec.torch_hub:
        return _torch_hub_file(spec)
    if spec.url is None:
        cached = hub.cache_dir("weights") / spec.filename
        if cached.is_file():
            return hub.verify(cached, spec.sha256)
        looked = [str(root / "weights" / spec.filename)] if root is not None else []
        looked.append(str(cached))
        raise FileNotFoundError(f"no local copy of {spec.filename} (looked in {', '.join(looked)}); {spec.howto}")
    return hub.fetch(
        spec.filename,
        spec.url,
        spec.sha256,
        cache_sub="weights",
        offline_hint=f"Offline? Put {spec.filename} in <--data-root>/weights/ (or set ${hub.DATA_ENV}).",
    )
