"""A sweep axis (or cell key) `base` picks each cell's config file: one YAML per method in one grid."""

from __future__ import annotations

from pathlib import Path

import pytest

from tta_surgical.config import ConfigError
from tta_surgical.sweep import load_sweep
from tta_surgical.sweep.spec import sweep_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_base_axis_gives_each_cell_its_method_config():
    sweep = sweep_from_dict(
        {
            "kind": "run",
            "stream": "streams/cifar10c_continual.yaml",
            "overrides": ["stream.n_examples=100"],
            "axes": {"base": ["configs/tent.yaml", "configs/norm.yaml"], "stream.seed": [0, 1]},
        },
        source=REPO / "configs" / "sweeps" / "x.yaml",
    )
    assert [c.config["method"]["name"] for c in sweep.cells] == ["tent", "tent", "norm", "norm"]
    assert [c.axes["stream.seed"] for c in sweep.cells] == [0, 1, 0, 1]
    assert len({c.id for c in sweep.cells}) == 4
    assert all(c.config["stream"]["n_examples"] == 100 for c in sweep.cells)


def test_base_cells_with_blocks_only_where_the_method_adapts(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "kind: run\n"
        f"stream: {REPO / 'streams' / 'cifar10c_continual.yaml'}\n"
        "cells:\n"
        f"  - {{base: {REPO / 'configs' / 'norm.yaml'}}}\n"
        f"  - {{base: {REPO / 'configs' / 'tent.yaml'}, method.blocks: [block1], method.kind: all}}\n"
    )
    sweep = load_sweep(path)
    assert [c.config["method"]["name"] for c in sweep.cells] == ["norm", "tent"]
    assert sweep.cells[1].config["method"]["blocks"] == ["block1"]
    path.write_text(
        "kind: run\n"
        f"stream: {REPO / 'streams' / 'cifar10c_continual.yaml'}\n"
        f"cells:\n  - {{base: {REPO / 'configs' / 'norm.yaml'}, method.blocks: [block1]}}\n"
    )
    with pytest.raises(ConfigError, match="cell 0 .*method.blocks; valid keys in section 'method' for method 'norm'"):
        load_sweep(path)
    path.write_text(
        f"kind: run\nstream: {REPO / 'streams' / 'cifar10c_continual.yaml'}\ncells:\n  - {{base: nope.yaml}}\n"
    )
    with pytest.raises(ConfigError, match="base: 'nope.yaml' not found"):
        load_sweep(path)
