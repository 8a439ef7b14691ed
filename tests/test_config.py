"""Contracts of the run config: YAML -> frozen tree -> dict round trip, unknown keys, typed overrides, validation."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from tta_surgical.config import (
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    StreamSpec,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    method_config,
    to_dict,
)


def _write(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_are_tent_on_resnet20():
    cfg = Config()
    assert cfg.model == ModelConfig(name="resnet20", pretrained=True, allow_random=False)
    m = cfg.method
    assert (m.name, m.blocks, m.kind, m.bn_stats, m.prior_strength) == ("tent", ("all",), "norm", "batch", 0.0)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.betas) == ("adam", 1e-3, (0.9, 0.999))
    assert isinstance(cfg.stream, StreamSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.name = "x"  # type: ignore[misc]


def test_yaml_round_trip(tmp_path):
    data = {
        "model": {"name": "resnet56", "pretrained": "ckpt/r56.pt"},
        "method": {"name": "surgical", "blocks": ["input", "block1"], "kind": "all", "steps": 2},
        "optim": {"name": "sgd", "lr": "1e-4", "momentum": 0.5, "betas": [0.8, 0.99]},
        "stream": {"domains": ["fog", "snow"], "severities": [3, 5], "n_examples": 400},
        "runtime": {"device": "cpu", "precision": "bf16", "seed": 3},
    }
    cfg = load_config(_write(tmp_path / "run.yaml", data))
    assert cfg.model.pretrained == "ckpt/r56.pt"
    assert cfg.method.blocks == ("input", "block1") and cfg.method.steps == 2
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)  # YAML reads 1e-4 as a string
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.stream.domains == ("fog", "snow") and cfg.stream.severities == (3, 5)
    # dict -> YAML -> Config is the identity, and the dump holds every field (defaults included)
    dump_yaml(cfg, tmp_path / "out" / "resolved.yaml")
    again = load_config(tmp_path / "out" / "resolved.yaml")
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    dumped = load_yaml(tmp_path / "out" / "resolved.yaml")
    assert set(dumped["stream"]) == {f.name for f in dataclasses.fields(StreamSpec)}
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_empty_or_missing_sections_take_defaults(tmp_path):
    assert load_config(_write(tmp_path / "e.yaml", "")) == Config()
    assert load_config(_write(tmp_path / "m.yaml", {"method": {"name": "norm"}})).optim == OptimConfig()
    assert load_config() == Config()


@pytest.mark.parametrize(
    "data, dotted",
    [
        ({"modle": {}}, "modle"),
        ({"model": {"nmae": "x"}}, "model.nmae"),
        ({"optim": {"learning_rate": 0.1}}, "optim.learning_rate"),
        ({"stream": {"domain": ["fog"]}}, "stream.domain"),
        ({"runtime": {"amp": True}}, "runtime.amp"),
    ],
)
def test_unknown_keys_rejected_with_dotted_path(tmp_path, data, dotted):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path / "bad.yaml", data))
    msg = str(err.value)
    assert dotted in msg and "valid keys" in msg
    section = dotted.split(".")[0] if "." in dotted else None
    sections = {"model": ModelConfig, "optim": OptimConfig, "stream": StreamSpec, "runtime": RuntimeConfig}
    cls = sections.get(section, Config)
    for f in dataclasses.fields(cls):  # the message lists every valid key at that level
        assert f.name in msg


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"stream": {"n_examples": "abc"}}, "stream.n_examples"),
        ({"method": {"steps": 1.5}}, "method.steps"),
        ({"method": {"episodic": "yes"}}, "method.episodic"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"model": {"name": 56}}, "model.name"),
        ({"model": "resnet20"}, "model"),
        ({"stream": {"domains": [1, 2]}}, "stream.domains[0]"),
    ],
)
def test_wrong_types_rejected(tmp_path, data, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(_write(tmp_path / "bad.yaml", data))


def test_overrides_typed_and_immutable():
    base = Config()
    cfg = apply_overrides(
        base,
        [
            "stream.n_examples=2000",
            "stream.domains=[gaussian_noise,fog]",
            "model.name=resnet56",
            "optim.lr=1e-3",
            "optim.weight_decay=1",  # an int where a float is expected
            "method.blocks=head",  # a scalar where a list is expected
            "method.name=surgical",
            "model.pretrained=false",
        ],
    )
    assert cfg.stream.n_examples == 2000 and cfg.stream.domains == ("gaussian_noise", "fog")
    assert cfg.model.name == "resnet56" and cfg.model.pretrained is False
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 1.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.method.blocks == ("head",)
    assert base == Config()  # the input tree is untouched
    assert apply_overrides(base, ["model.pretrained=ckpt/model.pt"]).model.pretrained == "ckpt/model.pt"
    assert apply_overrides(base, ["stream.n_examples="]).stream.n_examples is None
    assert apply_overrides(base, ["model={name: wrn28_10}"]).model == ModelConfig(name="wrn28_10")


def test_overrides_order_independent_for_cross_field_checks():
    # tent fixes its blocks; switching to surgical in a later override must still work
    cfg = apply_overrides(Config(), ["method.blocks=[block1]", "method.name=surgical"])
    assert cfg.method.name == "surgical" and cfg.method.blocks == ("block1",)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("stream.n_examples=abc", "stream.n_examples"),
        ("optim.lr=fast", "optim.lr"),
        ("runtime.channels_last=maybe", "runtime.channels_last"),
        ("optim.lrr=1", "valid keys in section 'optim'"),
        ("nope.x=1", "valid keys at the top level"),
        ("model.name.x=1", "not a section"),
        ("model=3", "is a section"),
        ("optim.lr", "section.key=value"),
        ("method.name=tnet", "unknown method .tnet.; valid: "),
    ],
)
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(Config(), [override])


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), ["method.block=[head]"])
    assert "method.block" in str(err.value)
    for f in dataclasses.fields(type(Config().method)):  # the keys of the method the config names (tent)
        assert f.name in str(err.value)


def test_stream_file_merges_over_config_stream(tmp_path):
    run = _write(tmp_path / "run.yaml", {"stream": {"n_examples": 1000, "batch_size": 50}, "method": {"name": "norm"}})
    stream = _write(tmp_path / "s.yaml", {"stream": {"domains": ["fog"], "batch_size": 64}})
    cfg = load_config(run, stream=stream, overrides=["stream.seed=7"])
    assert cfg.stream.domains == ("fog",) and cfg.stream.batch_size == 64  # the stream file wins
    assert cfg.stream.n_examples == 1000  # keys it does not set stay
    assert cfg.stream.seed == 7 and cfg.method.name == "norm"
    assert load_config(stream=stream).stream.batch_size == 64


def test_stream_file_must_have_one_stream_section(tmp_path):
    with pytest.raises(ConfigError, match="stream"):
        load_config(stream=_write(tmp_path / "s.yaml", {"domains": ["fog"]}))
    with pytest.raises(ConfigError, match="model"):
        load_config(stream=_write(tmp_path / "s2.yaml", {"stream": {}, "model": {"name": "x"}}))
    with pytest.raises(ConfigError, match="stream.severity"):
        load_config(stream=_write(tmp_path / "s3.yaml", {"stream": {"severity": 5}}))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: method_config("tnet"), r"unknown method 'tnet'; valid: .*tent"),
        (lambda: method_config("surgical", kind="bias"), "all, norm, conv"),
        (lambda: method_config("surgical", bn_stats="running"), "batch, source"),
        (lambda: method_config("tent", weighting="auto-snr"), "none, auto-rgn"),
        (lambda: method_config("tent", steps=0), "steps"),
        (lambda: method_config("norm", prior_strength=-1.0), "prior_strength"),
        (lambda: method_config("surgical", bn_stats="source", prior_strength=16.0), "bn_stats=batch"),
        (lambda: method_config("tent", e_margin=0.4), "valid keys in section 'method' for method 'tent'"),
        (lambda: method_config("source", blocks=("block1",)), "method.blocks"),
        (lambda: method_config("surgical", blocks=()), "blocks"),
        (lambda: OptimConfig(name="adamw"), "adam, sgd"),
        (lambda: OptimConfig(name="sgd", momentum=0.0, nesterov=True), "nesterov"),
        (lambda: OptimConfig(betas=(0.9, 1.0)), "betas"),
        (lambda: RuntimeConfig(device="tpu"), "auto, cpu, cuda"),
        (lambda: RuntimeConfig(precision="fp16"), "fp32, bf16"),
        (lambda: ModelConfig(name=""), "model.name"),
    ],
)
def test_enumerations_and_ranges_validated(make, needle):
    with pytest.raises(ConfigError, match=needle):
        make()


def test_enumeration_errors_from_yaml_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"runtime\.precision='fp16'.*fp32, bf16"):
        load_config(_write(tmp_path / "r.yaml", {"runtime": {"precision": "fp16"}}))


def test_method_section_is_checked_against_the_named_method(tmp_path):
    """The `method:` keys depend on `method.name`: each method's own settings, unknown ones listed."""
    cfg = load_config(_write(tmp_path / "m.yaml", {"method": {"name": "norm", "prior_strength": 8}}))
    assert type(cfg.method).__name__ == "NormSettings" and cfg.method.prior_strength == 8.0
    needle = r"method.kind; valid keys in section 'method' for method 'norm' \(method.name\)"
    with pytest.raises(ConfigError, match=needle):
        load_config(_write(tmp_path / "n.yaml", {"method": {"name": "norm", "kind": "all"}}))
    with pytest.raises(ConfigError, match="stream.reset=episodic"):
        load_config(_write(tmp_path / "e.yaml", {"method": {"name": "tent", "episodic": True}}))


def test_switching_method_by_override_keeps_only_user_choices():
    base = Config()  # tent with its defaults
    norm = apply_overrides(base, ["method.name=norm"])
    assert norm.method.name == "norm" and not hasattr(norm.method, "blocks")
    # a non-default value the user set does not vanish silently when the method changes
    with pytest.raises(ConfigError, match="method.blocks"):
        apply_overrides(base, ["method.blocks=[block1]", "method.name=norm"])
    # order does not matter: the name is applied first, the other keys are checked against it
    a = apply_overrides(base, ["method.bn_stats=source", "method.name=surgical", "method.blocks=[block1]"])
    b = apply_overrides(base, ["method.name=surgical", "method.blocks=[block1]", "method.bn_stats=source"])
    assert a == b and a.method.kind == "all" and a.method.bn_stats == "source"  # surgical's default kind
    c = apply_overrides(base, ["method={blocks: [head], name: surgical}"])
    assert c.method.name == "surgical" and c.method.blocks == ("head",)


def test_method_config_builds_each_registered_method_with_defaults():
    from tta_surgical.methods import METHODS

    for name in METHODS.names():
        settings = method_config(name)
        assert settings.name == name and isinstance(settings, METHODS.get(name).Settings)
        assert from_dict(Config, to_dict(Config(method=settings))).method == settings  # round trip


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lr=-1e-3", r"optim\.lr must be a finite number >= 0"),
        ("optim.lr=.nan", r"optim\.lr must be a finite number >= 0"),
        ("optim.lr=.inf", r"optim\.lr must be a finite number >= 0"),
        ("optim.momentum=1.0", r"optim\.momentum must lie in \[0, 1\)"),
        ("optim.momentum=-0.1", r"optim\.momentum must lie in \[0, 1\)"),
        ("optim.momentum=.nan", r"optim\.momentum must lie in \[0, 1\)"),
        ("optim.weight_decay=-1e-4", r"optim\.weight_decay must be"),
        ("optim.weight_decay=.nan", r"optim\.weight_decay must be"),
        ("optim.weight_decay=.inf", r"optim\.weight_decay must be"),
        ("runtime.num_workers=-1", r"runtime\.num_workers must be >= 0 or null"),
        ("runtime.num_workers=1.5", r"runtime\.num_workers: expected"),
    ],
)
def test_numeric_ranges_are_checked(override, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(Config(), [override])


def test_numeric_range_boundaries_are_accepted():
    cfg = apply_overrides(
        Config(), ["optim.lr=0", "optim.momentum=0", "optim.weight_decay=0", "runtime.num_workers=0"]
    )
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.runtime.num_workers) == (0, 0, 0, 0)
    cfg = apply_overrides(Config(), ["optim.momentum=0.999", "optim.weight_decay=0.5", "runtime.num_workers=null"])
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.runtime.num_workers) == (0.999, 0.5, None)
