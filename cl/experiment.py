"""The experiment configuration: scenario, backbone, strategy, train and run sections.

YAML layout (every section optional except ``scenario`` and ``strategy``)::

    scenario:
      generator: class_incremental       # a name in adaptsim.cl.scenarios.GENERATORS
      dataset: {name: mnist5k}           # ... and that generator's own arguments
      initial_increment: 2
      increment: 2
    backbone: {name: imgfocus_vit_s14, img_size: 56}
    strategy:
      name: simplecil                    # a registered strategy; other keys: its config
    train: {device: auto, num_threads: 2}
    run: {seed: 0, out_dir: runs}

Precedence: dataclass defaults < YAML < dotted CLI overrides (``--strategy.lr=0.01``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from adaptsim.cl.backbones import BackboneConfig
from adaptsim.cl.config import (ConfigError, apply_overrides, from_dict, read_yaml, to_dict,
                                unknown_key_error)
from adaptsim.cl.scenarios import GENERATORS
from adaptsim.cl.train import TrainConfig

__all__ = ["RunConfig", "ScenarioSpec", "StrategySpec", "ExperimentConfig", "load_experiment",
           "experiment_from_raw", "parse_scenario", "parse_strategy"]


@dataclass(frozen=True)
class RunConfig:
    """Attributes: seed, out_dir (parent of run folders), name (run folder name; default
    ``<yaml stem>-<strategy>-<time>``), checkpoint (after each experience), plots."""

    seed: int = 0
    out_dir: str = "runs"
    name: str | None = None
    checkpoint: bool = True
    plots: bool = True


@dataclass(frozen=True)
class ScenarioSpec:
    generator: str
    args: Any


@dataclass(frozen=True)
class StrategySpec:
    name: str
    config: Any


@dataclass(frozen=True)
class ExperimentConfig:
    scenario: ScenarioSpec
    strategy: StrategySpec
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str = ""

    def to_raw(self) -> dict[str, Any]:
        """The resolved config as plain YAML-ready data (round-trips through the loader)."""
        return {
            "scenario": {"generator": self.scenario.generator, **to_dict(self.scenario.args)},
            "backbone": to_dict(self.backbone),
            "strategy": {"name": self.strategy.name, **to_dict(self.strategy.config)},
            "train": to_dict(self.train),
            "run": to_dict(self.run),
        }

    def config_hash(self) -> str:
        raw = self.to_raw()
        raw["run"] = {k: v for k, v in raw["run"].items() if k not in ("name", "out_dir")}
        return hashlib.sha1(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:12]


def _named_section(raw: Any, section: str, key: str, registry_get) -> tuple[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"section '{section}' must be a mapping with a '{key}' key")
    raw = dict(raw)
    if key not in raw:
        raise ConfigError(f"section '{section}' needs '{key}'")
    name = raw.pop(key)
    try:
        cfg_cls = registry_get(name)[0]
    except KeyError as exc:
        raise ConfigError(f"{section}.{key}: {exc.args[0]}") from None
    return name, from_dict(cfg_cls, raw, section)


def parse_scenario(raw: Any) -> ScenarioSpec:
    return ScenarioSpec(*_named_section(raw, "scenario", "generator", GENERATORS.get))


def parse_strategy(raw: Any) -> StrategySpec:
    from adaptsim.strategies import get_strategy

    return StrategySpec(*_named_section(raw, "strategy", "name", get_strategy))


SECTIONS = ("scenario", "strategy", "backbone", "train", "run")


def experiment_from_raw(raw: Mapping[str, Any], source: str = "") -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a raw mapping (strict)."""
    for key in raw:
        if key not in SECTIONS:
            raise unknown_key_error("<top level>", key, list(SECTIONS))
    for required in ("scenario", "strategy"):
        if required not in raw:
            raise ConfigError(f"config needs a '{required}' section")
    return ExperimentConfig(
        scenario=parse_scenario(raw["scenario"]),
        strategy=parse_strategy(raw["strategy"]),
        backbone=from_dict(BackboneConfig, raw.get("backbone"), "backbone"),
        train=from_dict(TrainConfig, raw.get("train"), "train"),
        run=from_dict(RunConfig, raw.get("run"), "run"),
        source=source,
    )


def _switch_strategy(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``--strategy.name=X`` naming another strategy than the YAML's starts from X's defaults.

    The YAML's settings belong to its own strategy (``--strategy.name=simplecil`` on a MOS YAML
    must not hand MOS's ``epochs``/``reg`` to SimpleCIL); the dropped keys are logged.
    """
    new = overrides.get("strategy.name")
    section = raw.get("strategy")
    if new is None or not isinstance(section, Mapping) or section.get("name") == new:
        return raw
    dropped = sorted(k for k in section if k != "name")
    if dropped:
        import logging

        logging.getLogger(__name__).warning(
            "--strategy.name=%s replaces the YAML's strategy %r; its settings %s are not used",
            new, section.get("name"), ", ".join(dropped))
    return {**raw, "strategy": {"name": new}}


def load_experiment(path: str, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read ``path`` (YAML), apply dotted ``overrides`` and build the typed config."""
    overrides = overrides or {}
    raw = apply_overrides(_switch_strategy(read_yaml(path), overrides), overrides)
    return experiment_from_raw(raw, source=str(path))
