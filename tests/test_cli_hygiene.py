"""CLI hygiene (issue 11): overrides anywhere, one YAML reader, messages that name flags, --help for every option,
a labelled `corruptions --preview` from the data root, output permissions and the mean/online error note."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from tta_surgical import cli
from tta_surgical.config import ConfigError, load_yaml, read_yaml
from tta_surgical.render import ERROR_NOTE, compare_markdown, summary_markdown

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tta_surgical"
# The package and the benchmark studies that moved out of it (issue 20): the same rules hold for both.
SOURCES = (PACKAGE, REPO / "benchmarks" / "studies")
SMALL_SWEEP = REPO / "configs" / "sweeps" / "online_blocks_small.yaml"


def _sources() -> list[Path]:
    return [path for root in SOURCES for path in sorted(root.rglob("*.py"))]


# ------------------------------------------------------------------------------------------------ overrides anywhere


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "a.b=1", "--config", "c.yaml", "x.y=[1, 2]", "--stream", "s.yaml", "--resume", "m.n=z"],
        ["compare", "--configs", "c1.yaml", "c2.yaml", "a.b=1", "--stream", "s.yaml", "x.y=[1, 2]", "m.n=z"],
        ["finetune", "a.b=1", "--config", "c.yaml", "x.y=[1, 2]", "--out", "o", "m.n=z"],
        ["report", "a.b=1", "--options", "block1", "x.y=[1, 2]", "--plot", "m.n=z"],
        ["sweep", "f.yaml", "a.b=1", "--dry-run", "x.y=[1, 2]", "--out", "o", "m.n=z"],
    ],
    ids=lambda argv: argv[0],
)
def test_overrides_anywhere_in_command_line_order(argv):
    args = cli.parse_args(argv)
    assert args.overrides == ["a.b=1", "x.y=[1, 2]", "m.n=z"]
    if argv[0] == "compare":
        assert args.configs == ["c1.yaml", "c2.yaml"] and args.stream == "s.yaml"
    if argv[0] == "sweep":
        assert args.file == "f.yaml" and args.dry_run and args.out == "o"
    if argv[0] == "run":
        assert args.config == "c.yaml" and args.stream == "s.yaml" and args.resume


def test_option_values_and_existing_files_are_never_taken_for_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("lr=1.yaml").write_text("method: {name: tent}\n")
    args = cli.parse_args(["compare", "--configs", "lr=1.yaml", "k.v=2", "--stream", "s.yaml", "--out", "a=b"])
    assert args.configs == ["lr=1.yaml"] and args.out == "a=b" and args.overrides == ["k.v=2"]
    args = cli.parse_args(["run", "--config", "c.yaml", "--ou", "x=y", "--data-root=d=e", "--", "p.q=3"])
    assert args.out == "x=y" and args.data_root == "d=e" and args.overrides == ["p.q=3"]
    # a word that is not key=value ends in parse_override's one-line error, not in argparse's
    assert cli.parse_args(["run", "--config", "c.yaml", "stray"]).overrides == ["stray"]


def test_unknown_word_is_reported_with_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["run", "--config", "c.yaml", "--reusme", "optim.lr=1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert (
        err.startswith("usage: tta-surgical run ")
        and "tta-surgical run: error: unrecognized arguments: --reusme" in err
    )


def test_commands_without_overrides_keep_plain_argparse(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["blocks", "resnet20", "a.b=1"])
    assert "tta-surgical blocks: error: unrecognized arguments: a.b=1" in capsys.readouterr().err


def test_sweep_dry_run_takes_an_override_after_the_options(tmp_path, capsys):
    from tta_surgical.sweep import load_sweep

    out = tmp_path / "sw"
    assert cli.main(["sweep", str(SMALL_SWEEP), "--dry-run", "--out", str(out), "stream.n_examples=100"]) == 0
    printed = capsys.readouterr().out
    with_override = load_sweep(SMALL_SWEEP, overrides=["stream.n_examples=100"], check_models=False)
    without = load_sweep(SMALL_SWEEP, check_models=False)
    assert all(c.id in printed for c in with_override.cells)
    assert not any(c.id in printed for c in without.cells)


def test_run_takes_overrides_before_and_after_options(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    rc = cli.main(
        ["run", "stream.n_examples=20", "--config", "configs/norm.yaml", "stream.batch_size=10", "--stream",
         str(REPO / "streams" / "quickstart.yaml"), "--out", str(out), "--data-root", str(data_root),
         "--no-progress", "stream.domains=[fog]"]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 20 and summary["n_batches"] == 2 and list(summary["errors"]) == ["fog"]
    # the same folder again: the message names the flags, not Python arguments
    capsys.readouterr()
    assert cli.main(["run", "--config", "configs/norm.yaml", "--out", str(out), "stream.n_examples=20"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "resume=" not in err


# ------------------------------------------------------------------------------------------------ one YAML reader


def test_every_yaml_read_goes_through_schema_read_yaml():
    """Outside the schema layer the package parses YAML only to normalise values it just dumped (a round trip)."""
    offenders = []
    for path in _sources():
        if path.name == "schema.py" and path.parent == PACKAGE:
            continue
        for m in re.finditer(r"yaml\.(safe_load|load|full_load|unsafe_load)\((.{0,30})", path.read_text()):
            if not m.group(2).startswith("yaml.safe_dump("):
                offenders.append(f"{path.relative_to(REPO)}: {m.group(0)}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("a: [1, 2\nb: 3\n", "2:2", "expected ',' or ']'"),
        ("a: b: c\n", "1:5", "mapping values are not allowed here"),
        ("optim:\n  lr: 1\n  lr: 2\n", "3:3", "found the key 'lr' twice (first on line 2)"),
        ("x: !!python/object:os.system 1\n", "1:4", "could not determine a constructor"),
        ("ok: 1\na: \x07\n", "2:4", "the character '\\x07' is not allowed"),
    ],
)
def test_malformed_yaml_is_one_line_with_file_line_column(tmp_path, text, where, what):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_yaml(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}:{where}: invalid YAML: ") and what in msg, msg


def test_yaml_reader_edge_cases(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"a: 1\nb: \xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml:2: not UTF-8 text"):
        read_yaml(tmp_path / "latin1.yaml")
    with pytest.raises(FileNotFoundError, match="block map file not found"):
        read_yaml(tmp_path / "absent.yaml", "block map file")
    (tmp_path / "merge.yaml").write_text("base: &b {lr: 1, name: adam}\noptim:\n  <<: *b\n  lr: 2\n")
    assert load_yaml(tmp_path / "merge.yaml")["optim"] == {"lr": 2, "name": "adam"}  # merge keys may be overridden
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_malformed_block_map_is_one_line_through_the_cli(tmp_path, capsys):
    path = tmp_path / "map.yaml"
    path.write_text("input: [conv1, bn1]\nblock1: [layer1\n")
    assert cli.main(["blocks", "resnet20", "--block-map", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tta-surgical blocks: error: {path}:3:1: invalid YAML: ") and "\n" not in err


# ------------------------------------------------------------------------------------------------ messages and help


def _message_strings() -> list[tuple[str, int, str]]:
    """Every string constant inside a `raise ...(...)` or a print/warn/error call of the package."""
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "print", "warn", "error",
            ):  # fmt: skip
                target = node
            else:
                continue
            for sub in ast.walk(target):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    found.append((str(path.relative_to(REPO)), node.lineno, sub.value))
    return found


def test_messages_name_cli_flags_not_python_arguments():
    python_words = re.compile(
        r"\b(resume|overwrite|fresh)=(True|False)\b|<data_root>|(?<![.\w])(data_root|frost_dir|out_dir|max_parallel)\b"
    )
    bad = [f"{p}:{line}: {s!r}" for p, line, s in _message_strings() if python_words.search(s)]
    assert not bad, bad


def test_every_option_of_every_command_is_explained_by_help():
    _, subs = cli._build()
    assert set(subs) == set(cli.COMMANDS)
    for name, parser in subs.items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = action.option_strings[0] if action.option_strings else action.metavar or action.dest
            assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 10, (name, label)
            assert str(label) in text, (name, label)


# ------------------------------------------------------------------------------------------------ corruptions --preview


def test_corruptions_preview_uses_the_data_root_and_labels_the_grid(tmp_path, data_root, monkeypatch, capsys):
    from PIL import Image

    from tta_surgical import hub

    def no_download(*a, **k):
        raise AssertionError("the preview tried to download although the data root has the textures")

    monkeypatch.setattr(hub, "download", no_download)
    monkeypatch.setenv("TTA_SURGICAL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TTA_SURGICAL_DATA", str(data_root))  # no --data-root: the environment names it
    png = tmp_path / "grid.png"
    assert cli.main(["corruptions", "--preview", str(png), "--index", "3"]) == 0
    assert "columns clean #3, severity 1" in capsys.readouterr().out
    grid = np.asarray(Image.open(png).convert("L"))
    rows, cols, tile = 19, 6, 96  # 32 px tiles at 3x
    height, width = grid.shape
    left, top = width - cols * (tile + 4), height - rows * (tile + 4)
    assert left > 40 and top > 8  # room for the labels
    for i in range(rows):  # every row has its corruption's name on the left
        band = grid[top + i * (tile + 4) : top + i * (tile + 4) + tile, :left]
        assert (band < 128).sum() > 20, i
    for j in range(cols):  # every column has its heading on top
        band = grid[:top, left + j * (tile + 4) : left + j * (tile + 4) + tile]
        assert (band < 128).sum() > 20, j
    assert not (tmp_path / "empty-cache").exists()
    assert cli.main(["corruptions", "--preview", str(png), "--index", "10000"]) == 2
    assert "--index 10000 is not a CIFAR-10 test image; choose 0..9999" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ outputs


def test_make_cifar10c_outputs_are_0644(tmp_path, data_root):
    old = os.umask(0o022)
    try:
        out = tmp_path / "c10c"
        argv = ["make-cifar10c", "--out", str(out), "--corruptions", "fog", "--severities", "5", "--limit", "10",
                "--data-root", str(data_root), "--no-progress"]  # fmt: skip
        assert cli.main(argv) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"fog.npy": 0o644, "fog.json": 0o644, "labels.npy": 0o644}


def test_tables_explain_mean_versus_online_error():
    a = {"method": "norm", "model": "resnet20", "errors": {"fog": 10.0, "snow": 40.0}, "mean_error": 25.0,
         "online_error": 30.0, "errors_by_round": [24.0, 26.0]}  # fmt: skip
    md = summary_markdown(a)
    assert ERROR_NOTE in md and "| mean error % by round | 24.00 / 26.00 |" in md
    assert "unweighted mean of the per-domain errors" in ERROR_NOTE and "all images of the stream" in ERROR_NOTE
    assert ERROR_NOTE in compare_markdown({"a": a, "b": a})
    assert "by round" not in summary_markdown({**a, "errors_by_round": [25.0]})


def test_readme_outputs_explain_every_summary_and_results_field(tmp_path, data_root):
    from tta_surgical.config import load_config
    from tta_surgical.engine import RESULTS_FILE, run

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    outputs = readme[readme.index("## Outputs") : readme.index("## Sweeps")]
    cfg = load_config(
        overrides=["method.name=norm", "stream.order=mixed", "stream.reset=never", "stream.domains=[fog,contrast]",
                   "stream.n_examples=20", "stream.batch_size=10", "runtime.device=cpu", "runtime.progress=false"]
    )  # fmt: skip
    summary = run(cfg, tmp_path / "r", data=data_root, record_predictions=True)
    line = json.loads((tmp_path / "r" / RESULTS_FILE).read_text().splitlines()[0])
    assert "by_domain" in line and "pred" in line  # the optional fields are there to be checked too
    missing = [k for k in [*summary, *summary["timing_this_session"], *line] if f"`{k}`" not in outputs]
    assert not missing, f"README.md ## Outputs does not explain {missing}"
