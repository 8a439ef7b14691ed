"""Fuzz contract of the config / stream loaders and the dotted-override parser (issue 11).

Random keys, values, types and YAML fragments, seeded (the same cases every run): every input either loads or
fails with a one-line `ConfigError` (a `ValueError`) whose message names the key, or for malformed YAML the file,
line and column; never another exception type. A handful of the same inputs go through the CLI: exit status 2,
one line on stderr, no traceback.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tta_surgical import cli
from tta_surgical.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    load_stream_file,
    parse_override,
    to_dict,
)
from tta_surgical.methods import METHODS
from tta_surgical.streams import StreamSpec, load_stream_spec

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = to_dict(Config())


def method_keys(name: str) -> list[str]:
    """The keys of the `method:` section of the registered method `name`."""
    return sorted(to_dict(from_dict(Config, {"method": {"name": name}}).method))


# Every dotted key of the schema: the defaults' keys plus each registered method's own settings.
SCHEMA_KEYS = sorted(
    {f"{s}.{k}" for s, sec in DEFAULTS.items() for k in sec}
    | {f"method.{k}" for name in METHODS.names() for k in method_keys(name)}
)
SECTIONS = sorted(DEFAULTS)


# ------------------------------------------------------------------------------------------------ generators


def rand_text(rng: random.Random, n: int = 8) -> str:
    alphabet = "abcxyz_019 .-=:,[]{}#&*!|>'\"\t\n\\/%@`~é中\x07"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


def rand_scalar(rng: random.Random) -> Any:
    kind = rng.randrange(14)
    if kind == 0:
        return rng.randint(-3, 3)
    if kind == 1:
        return rng.choice([0, 1, 2, 5, 200, 10**30, -(10**20)])
    if kind == 2:
        return rng.choice([0.0, -0.0, 0.5, 1e-3, 1e308, -1.5, math.nan, math.inf, -math.inf])
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return rng.choice(["all", "auto", "none", "benchmark", "1e-3", "1e4", "3", "-1", "null", "true", "[1, 2]"])
    if kind == 6:
        return rng.choice(["tent", "norm", "source", "fog", "cifar10", "mixed", "never", "bf16", "cpu", "block1"])
    return rand_text(rng)


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10)
    if depth < 2 and kind == 0:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 2 and kind == 1:
        return {rand_key(rng): rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if kind == 2:  # a list of plausible items
        return rng.sample(["fog", "snow", "block1", "head", "all", 1, 3, 5, 0.9, 0.999], rng.randint(0, 4))
    return rand_scalar(rng)


def rand_key(rng: random.Random) -> Any:
    kind = rng.randrange(10)
    if kind < 5:
        return rng.choice(SCHEMA_KEYS).split(".")[-1]
    if kind < 7:
        return rand_text(rng, 6) or "k"
    if kind == 7:
        return rng.choice([1, 2.5, True, None])
    return rng.choice(["lr", "name", "blocks", "domains", "n_examples", "rounds", "seed", "nope", "episodic"])


def show(key: object) -> str:
    """A key as the loader's messages write it: a plain name as is, anything else as its repr (one line)."""
    return key if isinstance(key, str) and key and key.isprintable() and key.strip() == key else repr(key)


def mutated_config(rng: random.Random) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The default config dict with one random change, and the ways an error message may name what changed."""
    data = {s: dict(sec) for s, sec in DEFAULTS.items()}
    choice = rng.randrange(10)
    if choice < 6:  # one schema key, a random value
        key = rng.choice(SCHEMA_KEYS)
        section, name = key.split(".")
        if section == "method" and name not in data["method"]:
            data["method"] = {"name": next(n for n in METHODS.names() if name in method_keys(n))}
        data[section][name] = rand_value(rng)
        return data, (key,)
    if choice < 8:  # an unknown key in a section, or at the top level
        key = rand_key(rng)
        if rng.random() < 0.5:
            section = rng.choice(SECTIONS)
            if key in data[section]:
                return data, ()
            data[section][key] = rand_value(rng)
            return data, (f"{section}.{key}", f"{section}.{show(key)}")
        if key in data:
            return data, ()
        data[key] = rand_value(rng)  # type: ignore[index]
        return data, (str(key), show(key))
    if choice == 8:  # a whole section replaced
        section = rng.choice(SECTIONS)
        data[section] = rand_value(rng)
        return data, (section,)
    name = rng.choice(METHODS.names())  # another method, with one of ITS keys set
    data["method"] = {"name": name}
    key = rng.choice(method_keys(name))
    data["method"][key] = rand_value(rng)
    return data, (f"method.{key}",)


def dotted_names(key: str) -> tuple[str, ...]:
    """How a message may name the dotted key of an override: the key, or the first part of it that is wrong
    (`model.x.y` -> `model.x`), each part as written or as its repr."""
    parts = key.split("=", 1)[0].strip().split(".")
    forms = []
    for i in range(1 if parts[0] not in SECTIONS else min(2, len(parts)), len(parts) + 1):
        forms += [".".join(parts[:i]), ".".join(map(show, parts[:i]))]
    return tuple(forms)


# ------------------------------------------------------------------------------------------------ the contract


def floats(tree: Any) -> list[float]:
    """Every float in a plain config tree."""
    if isinstance(tree, dict):
        return [f for v in tree.values() for f in floats(v)]
    if isinstance(tree, list):
        return [f for v in tree for f in floats(v)]
    return [tree] if isinstance(tree, float) else []


def check_error(err: BaseException, *names: str) -> None:
    """The contract of a refused input: a ConfigError (ValueError), one line, naming one of `names`."""
    assert isinstance(err, ConfigError), f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    if names:
        assert any(n in msg for n in names if n), f"{msg!r} names none of {names}"


def attempt(fn, *args, names: tuple[str, ...] = (), **kw) -> Any:
    try:
        return fn(*args, **kw)
    except ConfigError as err:
        check_error(err, *names)
        return err
    except Exception as err:  # noqa: BLE001 - the contract is that nothing else escapes
        pytest.fail(f"{type(err).__name__} escaped for {args!r}: {err}")


@pytest.mark.parametrize("seed", range(4))
def test_random_config_dicts_load_or_name_the_key(seed):
    rng = random.Random(seed)
    loaded = refused = 0
    for _ in range(500):
        data, names = mutated_config(rng)
        out = attempt(from_dict, Config, data, names=names)
        if isinstance(out, Config):
            loaded += 1
            assert from_dict(Config, to_dict(out)) == out  # what loads round-trips
            assert all(math.isfinite(v) for v in floats(to_dict(out))), to_dict(out)  # no NaN/inf setting loads
        else:
            refused += 1
    assert loaded > 20 and refused > 20, (loaded, refused)  # both branches are exercised


def yaml_value(rng: random.Random) -> str:
    """A value as a user types it on the command line: YAML of a random value, or a raw fragment."""
    if rng.random() < 0.6:
        value = rand_value(rng)
        try:
            return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        except yaml.YAMLError:
            return rand_text(rng)
    return rng.choice(["[", "{a: ", "]", "!!python/object:os.system ls", "*alias", "&a [1, *a]", "'x", '"\\q"',
                       "a: b: c", "- 1\n- 2", "{1: 2}", "[fog, snow", "1e-3", "", " ", "~", "@x", "%TAG"])  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_random_overrides_apply_or_name_the_key(seed):
    rng = random.Random(100 + seed)
    base = Config()
    applied = refused = 0
    for _ in range(500):
        r = rng.random()
        if r < 0.7:
            key = rng.choice(SCHEMA_KEYS)
        elif r < 0.8:
            key = rng.choice(SECTIONS)
        else:
            key = f"{rng.choice(SECTIONS)}.{rand_text(rng, 5)}" if rng.random() < 0.5 else rand_text(rng, 5)
        text = f"{key}={yaml_value(rng)}"
        names = (*dotted_names(key), repr(text))
        out = attempt(apply_overrides, base, [text], names=names)
        if isinstance(out, Config):
            applied += 1
            assert apply_overrides(out, []) is out
        else:
            refused += 1
    assert applied >= 10 and refused >= 10, (applied, refused)  # both outcomes are really exercised


@pytest.mark.parametrize("seed", range(2))
def test_random_override_words_parse_or_fail_in_one_line(seed):
    rng = random.Random(200 + seed)
    for _ in range(1000):
        text = rand_text(rng, 14)
        out = attempt(parse_override, text, names=(repr(text),))
        if not isinstance(out, ConfigError):
            keys, _ = out
            assert keys and all(keys) and ".".join(keys) == text.split("=", 1)[0].strip()


FRAGMENTS = [
    "model:\n  name: resnet20\n",
    "optim: {lr: 1e-3, name: adam}\n",
    "method:\n  name: tent\n  blocks: [block1]\n",
    "stream:\n  domains: [fog, snow]\n  n_examples: all\n",
    "runtime:\n\tdevice: cpu\n",  # a tab
    "model: [\n",
    "optim:\n  lr: 1e-3\n  lr: 2e-3\n",  # a duplicate key
    "stream: {domains: [fog, snow}\n",
    "method: !!python/object:os.system {}\n",
    "base: &b {lr: 1}\noptim: *b\n",
    "optim:\n  lr: *missing\n",
    "- just\n- a list\n",
    "'unterminated\n",
    "model:\n  name: resnet20\n name: x\n",  # bad indentation
    "stream:\n  severities: [1, 2, 3]\n  order: gradual\n",
    "\x07bell: 1\n",
    "runtime: {seed: 1, seed: 2}\n",
    "% not a directive\n",
    "key with spaces: 1\n",
    "? [complex, key]\n: 1\n",
    "",
    "# only a comment\n",
    "stream:\n  n_examples: 0\n",
    "stream:\n  rounds: 0\n",
]


def rand_yaml_text(rng: random.Random) -> str:
    parts = rng.sample(FRAGMENTS, rng.randint(1, 3))
    if rng.random() < 0.5:  # a random section of random content, dumped properly
        section = rng.choice([*SECTIONS, "nope"])
        try:
            parts.append(yaml.safe_dump({section: {rand_key(rng): rand_value(rng)}}, allow_unicode=True))
        except yaml.YAMLError:
            pass
    text = "".join(parts)
    if rng.random() < 0.3 and text:  # cut it anywhere
        text = text[: rng.randrange(len(text))]
    return text


def test_random_yaml_files_load_or_fail_with_file_line_column(tmp_path):
    rng = random.Random(300)
    outcomes = {"loaded": 0, "yaml": 0, "schema": 0}
    for i in range(300):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(rand_yaml_text(rng), encoding="utf-8")
        out = attempt(load_config, path, names=(str(path), "model", "method", "optim", "stream", "runtime", "nope"))
        if isinstance(out, Config):
            outcomes["loaded"] += 1
        elif "invalid YAML" in str(out):
            outcomes["yaml"] += 1
            assert str(out).startswith(f"{path}:"), str(out)
        else:
            outcomes["schema"] += 1
    assert all(n > 10 for n in outcomes.values()), outcomes


def test_random_stream_sections_load_or_name_the_key(tmp_path):
    rng = random.Random(400)
    stream_keys = [f.name for f in dataclasses.fields(StreamSpec)]
    loaded = refused = 0
    for i in range(400):
        section = {k: v for k, v in DEFAULTS["stream"].items() if rng.random() < 0.3}
        key = rng.choice(stream_keys) if rng.random() < 0.8 else rand_key(rng)
        section[key] = rand_value(rng)
        names = (f"stream.{key}", f"stream.{show(key)}")
        out = attempt(load_stream_spec, {"stream": section}, names=names)
        if isinstance(out, StreamSpec):
            loaded += 1
        else:
            refused += 1
        if i % 10 == 0:  # the same through a file
            path = tmp_path / f"s{i}.yaml"
            path.write_text(yaml.safe_dump({"stream": section}, allow_unicode=True), encoding="utf-8")
            same = attempt(load_stream_spec, path, names=names)
            assert type(same) is type(out)
            if isinstance(out, StreamSpec):
                assert same == out
    assert loaded > 20 and refused > 20, (loaded, refused)


def test_stream_file_shapes(tmp_path):
    for i, text in enumerate(["", "stream:\n", "stream: 3\n", "streams: {}\n", "stream: {}\nextra: 1\n", "[1]\n"]):
        path = tmp_path / f"s{i}.yaml"
        path.write_text(text, encoding="utf-8")
        out = attempt(load_stream_file, path, names=(str(path),))
        assert isinstance(out, ConfigError) or out == {}


# ------------------------------------------------------------------------------------------------ through the CLI


CLI_CASES = [
    # (file name, its text, command line with {f} for the file)
    ("bad.yaml", "optim:\n  lr: [1e-3\n", ["run", "--config", "{f}", "--stream", "streams/quickstart.yaml"]),
    ("bad_stream.yaml", "stream:\n  domains: [fog\n", ["run", "--config", "configs/tent.yaml", "--stream", "{f}"]),
    ("dup.yaml", "optim:\n  lr: 1\n  lr: 2\n", ["compare", "--configs", "{f}", "--stream", "streams/quickstart.yaml"]),
    ("bad_sweep.yaml", "kind: run\naxes: {a: [1, 2}\n", ["sweep", "{f}", "--dry-run"]),
    ("ok.yaml", "method: {name: tent}\n", ["run", "--config", "{f}", "stream.n_examples=0"]),
    ("ok.yaml", "method: {name: tent}\n", ["run", "stream.rounds=x", "--config", "{f}"]),
    ("ok.yaml", "method: {name: tent}\n", ["run", "--config", "{f}", "optim.lr=[1e-3"]),
    ("ok.yaml", "method: {name: tent}\n", ["run", "--config", "{f}", "model.nme=resnet20"]),
    ("bm.yaml", "input: [conv1\n", ["blocks", "resnet20", "--block-map", "{f}"]),
    ("bad.yaml", "model: {name: \x07}\n", ["finetune", "--config", "{f}"]),
]
# What the line must name: the key, or (malformed YAML: "") the file with line and column.
CLI_NAMES = ["", "", "", "", "stream.n_examples", "stream.rounds", "optim.lr", "model.nme", "", ""]


@pytest.mark.parametrize(("case", "name"), list(zip(CLI_CASES, CLI_NAMES)), ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_with_exit_2_and_one_line(case, name, tmp_path, capsys, monkeypatch):
    filename, text, argv = case
    monkeypatch.chdir(REPO)
    path = tmp_path / filename
    path.write_text(text, encoding="utf-8")
    argv = [a.replace("{f}", str(path)) for a in argv]
    rc = cli.main([*argv, "--out", str(tmp_path / "out")] if argv[0] in ("run", "compare", "sweep") else argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"tta-surgical {argv[0]}: error: "), err
    if name:
        assert name in err
    else:
        assert re.search(rf"{re.escape(str(path))}:\d+:\d+: invalid YAML: ", err), err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_cli_malformed_yaml_in_a_real_process_has_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: resnet20\noptim: {lr: 1e-3\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "tta_surgical", "run", "--config", str(path), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"tta-surgical run: error: {path}:4:1: invalid YAML: expected ',' or '}}', but " \
        "got '<stream end>' (while parsing a flow mapping)"  # fmt: skip
