"""Models from outside the zoo: `torchvision:<name>`, `timm:<name>`, `module:<python.path>:<factory>`.

`create_model` (zoo.py) sends every name with a `:` here. What each source means:

- `torchvision:<name>`: `torchvision.models.get_model(name)`; pretrained = the architecture's DEFAULT weights,
  read from `<data_root>/weights/<file>` or torch's hub cache (`$TORCH_HOME/hub/checkpoints`), downloaded there
  when online. Input normalisation default: the weights' mean/std (ImageNet).
- `timm:<name>` (needs `pip install timm`, the `timm` extra): `timm.create_model(name)`; pretrained = timm's
  default weights from the Hugging Face cache, downloaded when online (set `HF_HUB_OFFLINE=1` to fail fast
  when offline). Normalisation default: the model's `pretrained_cfg` mean/std.
- `module:<python.path>:<factory>`: `factory()` (or `factory(num_classes=N)` when N is given) imported from
  your module (the working directory is on the import path). The factory is trusted to return the weights
  you want unless a checkpoint is given; `pretrained` only records whether it does. Normalisation default:
  none (your model receives [0, 1] images; set `mean`/`std` when it expects normalised input). Its input size
  is unknown: `ModelInfo.input_size` says 224, which only `bench` uses (for its random batches).

A checkpoint (`checkpoint=`) replaces the pretrained weights and is loaded strictly with `weights_only=True`.
When pretrained weights cannot be obtained, `allow_random=True` continues with random init and says so in
`ModelInfo.warnings` and a `UserWarning`; otherwise it is an error. The models take [0, 1] images: the
normalisation runs in a forward pre-hook (`_common.attach_input_norm`), so parameter names stay the model's.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from .. import hub
from ._common import IMAGENET_MEAN, IMAGENET_STD, attach_input_norm, describe_norm
from .weights import WeightSpec, load_checkpoint, weight_file

__all__ = ["SOURCES", "ExternalModelError", "create_external", "is_external", "parse_name", "weights_status"]

SOURCES = ("torchvision", "timm", "module")
AUTO = "auto"
Norm = Sequence[float] | str | None


def is_external(name: str) -> bool:
    """True for `source:...` names (the zoo's names never hold a colon)."""
    return ":" in name


def parse_name(name: str) -> tuple[str, str]:
    """`torchvision:resnet18` -> ("torchvision", "resnet18"); a clear error for malformed names."""
    source, _, target = name.partition(":")
    if source not in SOURCES:
        raise ValueError(
            f"unknown model source {source!r} in {name!r}; valid: torchvision:<name>, timm:<name>, "
            "module:<python.path>:<factory>, or a zoo name (see `tta-surgical blocks --help`)"
        )
    if not target or (source == "module" and target.count(":") != 1) or (source != "module" and ":" in target):
        form = "module:<python.path>:<factory>" if source == "module" else f"{source}:<name>"
        raise ValueError(f"malformed model name {name!r}; expected {form}")
    return source, target


class ExternalModelError(ValueError):
    """An external model cannot be built: timm missing, a module or factory not found, a factory's bad result."""


@dataclass
class _Built:
    """An external architecture before weights: the model, its defaults and how to get its pretrained weights."""

    model: nn.Module
    dataset: str
    input_size: int
    mean: Sequence[float] | None
    std: Sequence[float] | None
    pretrained_problem: str | None = None  # why pretrained weights are unavailable (None: loaded or not asked)
    weights: str = "random init"
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- torchvision


def _torchvision_weights(target: str) -> object | None:
    try:
        return tvm.get_model_weights(target).DEFAULT
    except (ValueError, AttributeError):
        return None


def _torchvision_spec(target: str, enum: object) -> WeightSpec:
    url = enum.url  # type: ignore[attr-defined]
    return WeightSpec(
        f"torchvision:{target}",
        url.rsplit("/", 1)[-1],
        url,
        None,
        source=f"torchvision {type(enum).__name__}.{enum.name}",  # type: ignore[attr-defined]
        torch_hub=True,
    )


def _build_torchvision(target: str, pretrained: bool, num_classes: int | None, data_root: object) -> _Built:
    valid = tvm.list_models(module=tvm)
    if target not in valid:
        raise KeyError(f"unknown torchvision classification model {target!r}; valid: {', '.join(valid)}")
    enum = _torchvision_weights(target)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = tvm.get_model(target, weights=None, **kwargs)
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    if enum is not None:
        tf = enum.transforms()  # type: ignore[attr-defined]
        size = int(tf.crop_size[0]) if getattr(tf, "crop_size", None) else size
        mean, std = tuple(getattr(tf, "mean", mean)), tuple(getattr(tf, "std", std))
    built = _Built(model, "imagenet", size, mean, std)
    if pretrained:
        if enum is None:
            built.pretrained_problem = f"torchvision publishes no weights for {target!r}"
        elif num_classes not in (None, 1000):
            raise ValueError(
                f"torchvision:{target} pretrained weights have 1000 classes, not {num_classes}: pass "
                "pretrained=false with model.checkpoint=<your fine-tuned weights>, or drop num_classes"
            )
        else:
            spec = _torchvision_spec(target, enum)
            try:
                path = weight_file(spec, data_root)  # type: ignore[arg-type]
            except FileNotFoundError as err:
                built.pretrained_problem = str(err)
            else:
                load_checkpoint(model, spec.loader(path))
                built.weights = str(path)
    return built


# ----------------------------------------------------------------------------------------------- timm


def _import_timm() -> object:
    try:
        import timm
    except ImportError:
        raise ExternalModelError(
            "timm:<name> models need timm, which is not installed: pip install timm (or pip install "
            "'tta-surgical[timm]')"
        ) from None
    return timm


def _timm_cached(cfg: dict) -> bool:
    """Whether timm's default weights for this model are already in the local Hugging Face cache."""
    repo = cfg.get("hf_hub_id")
    if not repo:
        return False
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(repo, f), str)
        for f in (cfg.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin")
    )


def _build_timm(target: str, pretrained: bool, num_classes: int | None) -> _Built:
    timm = _import_timm()
    if not timm.is_model(target):  # type: ignore[attr-defined]
        close = timm.list_models(f"*{target.split('.')[0]}*")[:10]  # type: ignore[attr-defined]
        raise KeyError(f"unknown timm model {target!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(target, pretrained=False, **kwargs)  # type: ignore[attr-defined]
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    built = _Built(model, "imagenet", size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    if pretrained:
        from huggingface_hub import constants

        if not _timm_cached(cfg) and constants.HF_HUB_OFFLINE:
            built.pretrained_problem = (
                f"timm weights {cfg.get('hf_hub_id') or target} are not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE is set"
            )
        else:
            try:
                built.model = timm.create_model(target, pretrained=True, **kwargs)  # type: ignore[attr-defined]
                built.weights = f"timm {cfg.get('hf_hub_id') or target}"
            except Exception as err:  # noqa: BLE001 - network, hub and file errors all mean "unavailable"
                built.pretrained_problem = f"could not load timm weights for {target!r} ({type(err).__name__}: {err})"
    return built


# ----------------------------------------------------------------------------------------------- module


def _build_module(target: str, pretrained: bool, num_classes: int | None) -> _Built:
    module_path, factory_name = target.split(":")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` would: the user's own modules next to their configs
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as err:
        raise ExternalModelError(
            f"module:{target}: cannot import {module_path!r} ({err}); run from the folder that holds it or add "
            "that folder to PYTHONPATH"
        ) from err
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ExternalModelError(f"module:{target}: {module_path} has no callable {factory_name!r}; it has {names}")
    model = factory() if num_classes is None else factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise ExternalModelError(f"module:{target}: the factory returned a {type(model).__name__}, not an nn.Module")
    built = _Built(model, "custom", 224, None, None)
    built.weights = f"as built by {target}" if pretrained else "random init"
    return built


# ----------------------------------------------------------------------------------------------- entry point


def _resolve_norm(name: str, built: _Built, mean: Norm, std: Norm) -> tuple[Sequence[float] | None, ...]:
    if (mean == AUTO) != (std == AUTO):
        raise ValueError(f"{name}: give mean and std together (both auto, both null, or both numbers)")
    return (built.mean, built.std) if mean == AUTO else (mean, std)  # type: ignore[return-value]


def create_external(
    name: str,
    *,
    pretrained: bool,
    checkpoint: str | os.PathLike | None,
    allow_random: bool,
    num_classes: int | None,
    data_root: str | os.PathLike | None,
    mean: Norm = AUTO,
    std: Norm = AUTO,
) -> tuple[nn.Module, dict[str, object]]:
    """Build an external model and load its weights; return `(model, fields for ModelInfo)`.

    `pretrained` is ignored when `checkpoint` is given (the checkpoint is the weights).
    """
    source, target = parse_name(name)
    want = pretrained and checkpoint is None
    if source == "torchvision":
        built = _build_torchvision(target, want, num_classes, data_root)
    elif source == "timm":
        built = _build_timm(target, want, num_classes)
    else:
        built = _build_module(target, pretrained, num_classes)
    model = built.model
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} for model {name!r} does not exist")
        load_checkpoint(model, path)
        built.weights = str(path)
    elif built.pretrained_problem is not None:
        if not allow_random:
            raise FileNotFoundError(
                f"{built.pretrained_problem}. Pass model.checkpoint=<file>, model.pretrained=false, or "
                "model.allow_random=true to continue with a randomly initialised model (e.g. for timing)"
            )
        msg = f"{name}: pretrained weights unavailable, model is RANDOMLY INITIALISED ({built.pretrained_problem})"
        built.notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    mean_, std_ = _resolve_norm(name, built, mean, std)
    attach_input_norm(model, mean_, std_)
    model.eval()
    fields = {
        "dataset": built.dataset,
        "input_size": built.input_size,
        "weights": built.weights,
        "pretrained": checkpoint is not None or (pretrained and built.weights != "random init"),
        "warnings": tuple(built.notes),
        "normalization": describe_norm(mean_, std_),
    }
    return model, fields


def weights_status(name: str, data_root: str | os.PathLike | None = None) -> str:
    """Whether an external model's default pretrained weights are available locally (for `tta-surgical blocks`)."""
    source, target = parse_name(name)
    if source == "module":
        return f"whatever {target} loads (a checkpoint can be given with model.checkpoint)"
    if source == "timm":
        timm = _import_timm()
        pcfg = timm.get_pretrained_cfg(target) if timm.is_model(target) else None  # type: ignore[attr-defined]
        cfg = dict(pcfg.to_dict()) if pcfg is not None else {}
        where = "in the local Hugging Face cache" if _timm_cached(cfg) else "not in the local Hugging Face cache"
        return f"timm {cfg.get('hf_hub_id') or target} {where}"
    enum = _torchvision_weights(target)
    if enum is None:
        return "none published by torchvision"

    spec = _torchvision_spec(target, enum)
    root = hub.data_root(data_root)
    for folder in ([root / "weights"] if root else []) + [Path(torch.hub.get_dir()) / "checkpoints"]:
        if (folder / spec.filename).is_file():
            return f"{spec.source}: {spec.filename} found in {folder}"
    return f"{spec.source}: {spec.filename} not found locally ({spec.url})"
