"""Strict typed config: unknown keys, types, precedence, resolved round trip."""

from __future__ import annotations

import textwrap

import pytest

from adaptsim.cl.config import ConfigError, parse_overrides
from adaptsim.cl.experiment import experiment_from_raw, load_experiment

YAML = textwrap.dedent("""
    scenario:
      generator: class_incremental
      dataset: {name: digits}
      initial_increment: 4
      increment: 3
    backbone: {name: tiny_vit, img_size: 28}
    strategy: {name: finetune, lr: 0.05}
    run: {seed: 3}
""")


@pytest.fixture()
def yaml_path(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(YAML)
    return p


def test_precedence_defaults_yaml_cli(yaml_path):
    cfg = load_experiment(yaml_path)
    assert cfg.strategy.config.lr == 0.05          # YAML beats the default (0.01)
    assert cfg.strategy.config.epochs == 3         # default kept
    cfg = load_experiment(yaml_path, parse_overrides(["--strategy.lr=0.2", "--strategy.epochs", "7"]))
    assert cfg.strategy.config.lr == 0.2 and cfg.strategy.config.epochs == 7
    assert cfg.run.seed == 3                       # untouched by overrides


@pytest.mark.parametrize("override, section, suggestion", [
    ("--strategy.lrr=0.1", "strategy", "lr"),
    ("--scenario.incremnt=2", "scenario", "increment"),
    ("--backbone.img_sze=56", "backbone", "img_size"),
    ("--scenario.dataset.nme=digits", "scenario.dataset", "name"),
])
def test_unknown_key_names_section_valid_keys_and_suggestion(yaml_path, override, section, suggestion):
    with pytest.raises(ConfigError) as err:
        load_experiment(yaml_path, parse_overrides([override]))
    msg = str(err.value)
    assert f"'{section}'" in msg and "valid keys" in msg and f"did you mean '{suggestion}'" in msg


def test_unknown_top_level_section(yaml_path):
    with pytest.raises(ConfigError, match="did you mean 'strategy'"):
        load_experiment(yaml_path, {"strategyy": {"name": "x"}})


def test_unknown_strategy_lists_available(yaml_path):
    with pytest.raises(ConfigError) as err:
        load_experiment(yaml_path, parse_overrides(["--strategy.name=simplecl"]))
    assert "simplecil" in str(err.value) and "available" in str(err.value)


def test_type_and_value_errors(yaml_path):
    with pytest.raises(ConfigError, match="expected a number"):
        load_experiment(yaml_path, parse_overrides(["--strategy.lr=fast"]))
    with pytest.raises(ConfigError, match="lr must be > 0"):
        load_experiment(yaml_path, parse_overrides(["--strategy.lr=-1"]))
    with pytest.raises(ValueError, match="cannot be split"):
        from adaptsim.cl.scenarios import build_stream
        cfg = load_experiment(yaml_path, parse_overrides(["--scenario.increment=4"]))
        build_stream(cfg.scenario.generator, cfg.scenario.args)


def test_resolved_config_round_trips(yaml_path):
    cfg = load_experiment(yaml_path, parse_overrides(["--strategy.mode=head"]))
    again = experiment_from_raw(cfg.to_raw())
    assert again.to_raw() == cfg.to_raw()
    assert again.config_hash() == cfg.config_hash()


def test_switching_strategy_on_cli_starts_from_its_defaults(yaml_path, caplog):
    # the YAML's finetune settings (lr 0.05) must not leak into another strategy
    cfg = load_experiment(yaml_path, parse_overrides(["--strategy.name=joint", "--strategy.epochs=2"]))
    assert cfg.strategy.name == "joint"
    assert cfg.strategy.config.lr == 0.01 and cfg.strategy.config.epochs == 2
    assert "replaces the YAML's strategy 'finetune'" in caplog.text
