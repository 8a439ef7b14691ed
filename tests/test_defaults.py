"""Each default lives in one place: the code. Shipped YAMLs hold only differences; CLI, API and sweeps agree."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from _toy_methods import TinyNet

import tta_surgical
from tta_surgical.config import Config, default_optim, from_dict, load_config, method_config, to_dict
from tta_surgical.finetune.config import FinetuneConfig
from tta_surgical.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("finetune"))
FINETUNE_CONFIGS = sorted((REPO / "configs").glob("finetune*.yaml"))


def _leaves(data: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


def _without(data: dict, path: tuple[str, ...]) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return data


@pytest.mark.parametrize(
    "path, schema",
    [(p, Config) for p in RUN_CONFIGS] + [(p, FinetuneConfig) for p in FINETUNE_CONFIGS],
    ids=lambda v: v.name if isinstance(v, Path) else v.__name__,
)
def test_shipped_yaml_sets_only_what_differs_from_the_code(path, schema):
    """A key that restates a default would shadow a later change of that default in the code (and the YAML and the
    code would silently disagree): removing any key of a shipped config must change the config it builds. The
    method's name is the config's identity and stays."""
    data = yaml.safe_load(path.read_text()) or {}
    full = from_dict(schema, data)
    redundant = [
        ".".join(leaf)
        for leaf in _leaves(data)
        if leaf != ("method", "name") and from_dict(schema, _without(data, leaf)) == full
    ]
    assert not redundant, f"{path.name} restates the code's defaults for {redundant}: delete those keys"


def test_the_check_above_can_fail(tmp_path):
    """The redundancy check flags a restated default (here Tent's learning rate)."""
    data = {"method": {"name": "tent"}, "optim": {"lr": 1e-3}}
    full = from_dict(Config, data)
    assert from_dict(Config, _without(data, ("optim", "lr"))) == full


@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_cli_api_and_defaults_build_the_same_optimiser(name):
    """`configs/<method>.yaml` (the CLI), `tta_surgical.adapt` (the API) and the registry agree on the optimiser."""
    expected = default_optim(name)
    assert Config(method=method_config(name)).optim == expected
    shipped = REPO / "configs" / f"{name}.yaml"
    if shipped.is_file():
        assert load_config(shipped).optim == expected
    if METHODS.get(name).adapts:
        source = lambda n: (torch.rand(n, 3, 8, 8), torch.zeros(n, dtype=torch.long))  # noqa: E731 - EATA's Fisher
        assert tta_surgical.adapt(TinyNet(), name, source_images=source).method.optim_cfg == expected


def _optimizer_kwargs(adapted) -> dict:
    group = adapted.method.optimizer.param_groups[0]
    return {k: group[k] for k in ("lr", "momentum", "nesterov")} | {"type": type(adapted.method.optimizer).__name__}


def test_memo_and_sar_get_their_authors_optimisers():
    memo = default_optim("memo")
    assert (memo.name, memo.lr, memo.momentum, memo.nesterov, memo.weight_decay) == ("sgd", 5e-3, 0.0, False, 0.0)
    sar = tta_surgical.adapt(TinyNet(), "sar")
    assert _optimizer_kwargs(sar) == {"lr": 1e-3, "momentum": 0.9, "nesterov": False, "type": "SGD"}
    # the API changes only the keys given, on top of the method's optimiser
    sar_lr = tta_surgical.adapt(TinyNet(), "sar", optim={"lr": 1e-4})
    assert _optimizer_kwargs(sar_lr) == {"lr": 1e-4, "momentum": 0.9, "nesterov": False, "type": "SGD"}
    tent = tta_surgical.adapt(TinyNet(), "tent")
    assert type(tent.method.optimizer).__name__ == "Adam"
    imagenet = tta_surgical.adapt(TinyNet(), "tent", regime="imagenet")
    assert _optimizer_kwargs(imagenet) == {"lr": 2.5e-4, "momentum": 0.9, "nesterov": True, "type": "SGD"}


def test_overrides_follow_the_method_and_the_regime():
    """The optimiser section starts from the method it names: switching the method (or the stream's data regime)
    switches the default optimiser, while a key the user set stays."""
    tent = load_config(REPO / "configs" / "tent.yaml")
    assert tent.optim == default_optim("tent")
    memo = load_config(REPO / "configs" / "tent.yaml", overrides=["method.name=memo"])
    assert memo.optim == default_optim("memo")
    memo_lr = load_config(REPO / "configs" / "tent.yaml", overrides=["method.name=memo", "optim.lr=1e-2"])
    assert memo_lr.optim.name == "sgd" and memo_lr.optim.lr == 1e-2 and memo_lr.optim.momentum == 0.0
    user_lr = load_config(REPO / "configs" / "tent.yaml", overrides=["optim.lr=1e-4"])
    switched = tta_surgical.config.apply_overrides(user_lr, ["method.name=memo"])
    assert switched.optim.name == "sgd" and switched.optim.lr == 1e-4  # the user's lr survives the switch
    imagenet = load_config(REPO / "configs" / "tent.yaml", overrides=["stream.source=imagenetc"])
    assert imagenet.optim == default_optim("tent", "imagenetc") and imagenet.optim.name == "sgd"
    assert to_dict(Config().optim) == to_dict(default_optim("tent"))


@pytest.mark.parametrize("name", ["tent", "sar", "memo", "norm"])
def test_methods_yaml_is_generated_from_the_registry(name, capsys):
    from tta_surgical import cli

    assert cli.main(["methods", name, "--yaml"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert from_dict(Config, data) == Config(method=method_config(name))
    assert set(data) == {"model", "method", "optim", "runtime"}
