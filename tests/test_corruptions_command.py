"""`tta-surgical corruptions`: the parameter table it prints and the `--preview` grid it writes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from test_cifar_c_official_params import OFFICIAL_CIFAR

from tta_surgical.cli import main
from tta_surgical.commands.corruptions import grid_origin
from tta_surgical.corruptions import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, corrupt, to_uint8
from tta_surgical.corruptions.params import IMAGENET

TILE, PAD, SCALE = 32, 4, 3  # the preview's image size, the grid's padding and upscaling


def _table(capsys, *args: str) -> dict[str, list[str]]:
    assert main(["corruptions", *args]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ALL_CORRUPTIONS:
            rows[cells[0]] = cells[1:]
    return rows


def _value(cell: str):
    value = ast.literal_eval(cell)
    return tuple(float(v) for v in value) if isinstance(value, tuple) else (float(value),)


def test_table_lists_the_official_cifar_parameters(capsys):
    rows = _table(capsys)  # --preset cifar is the default
    assert list(rows) == list(ALL_CORRUPTIONS)
    for name, cells in rows.items():
        assert cells[0] == ("benchmark" if name in BENCHMARK_CORRUPTIONS else "extra") and len(cells) == 6, name
        if name == "zoom_blur":
            assert cells[1:] == ["7 factors to 1.06", "12 factors to 1.11", "16 factors to 1.15",
                                 "21 factors to 1.20", "26 factors to 1.25"]  # fmt: skip
            continue
        for severity, (cell, official) in enumerate(zip(cells[1:], OFFICIAL_CIFAR[name], strict=True), start=1):
            want = tuple(float(v) for v in official) if isinstance(official, tuple) else (float(official),)
            assert _value(cell) == pytest.approx(want, abs=5e-5), f"{name} s{severity}"  # printed to 4 decimals


def test_imagenet_preset_prints_the_imagenet_table(capsys):
    rows = _table(capsys, "--preset", "imagenet")
    assert list(rows) == list(ALL_CORRUPTIONS)
    assert [_value(c)[0] for c in rows["gaussian_noise"][1:]] == IMAGENET["gaussian_noise"]
    assert [_value(c) for c in rows["glass_blur"][1:]] == [tuple(map(float, v)) for v in IMAGENET["glass_blur"]]
    with pytest.raises(SystemExit):
        main(["corruptions", "--preset", "svhn"])
    assert "invalid choice: 'svhn'" in capsys.readouterr().err


def test_preview_grid_holds_each_corruption_at_each_severity(tmp_path: Path, data_root: Path, capsys):
    from torchvision.io import read_image

    from tta_surgical.data.cifar import load_cifar10

    out, index, seed = tmp_path / "grid.png", 7, 3
    argv = ["corruptions", "--preview", str(out), "--data-root", str(data_root), "--index", str(index)]
    assert main([*argv, "--frost-dir", str(data_root / "frost"), "--seed", str(seed)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    grid = read_image(str(out))
    columns = [f"clean #{index}", *(f"severity {s}" for s in range(1, 6))]
    x0, y0 = grid_origin(list(ALL_CORRUPTIONS), columns, PAD)
    step = TILE * SCALE + PAD
    assert tuple(grid.shape) == (3, y0 + len(ALL_CORRUPTIONS) * step, x0 + 6 * step)

    def tile(row: int, col: int) -> torch.Tensor:  # one tile, the nearest-neighbour upscaling undone
        y, x = y0 + row * step, x0 + col * step
        return grid[:, y : y + TILE * SCALE : SCALE, x : x + TILE * SCALE : SCALE]

    images, _ = load_cifar10(data_root)
    x = torch.from_numpy(images[index : index + 1]).permute(0, 3, 1, 2).float() / 255
    for row, name in enumerate(ALL_CORRUPTIONS):
        tiles = [tile(row, col) for col in range(6)]
        assert torch.equal(tiles[0], to_uint8(x[0])), f"{name}: the first column is the clean image"
        for severity in range(1, 6):
            want = to_uint8(corrupt(x, name, severity, seed=seed, preset="cifar", frost_dir=data_root / "frost")[0])
            assert torch.equal(tiles[severity], want), f"{name} severity {severity}"
            assert not torch.equal(tiles[severity], tiles[0]), f"{name} severity {severity} shows the clean image"
