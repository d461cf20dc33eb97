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
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from adaptsim.cl.backbones import BackboneConfig
from adaptsim.cl.config import (ConfigError, apply_overrides, from_dict, read_yaml, to_dict,
                                unknown_key_error)
from adaptsim.cl.scenarios import GENERATORS
from adaptsim.cl.train import TrainConfig

__all__ = ["RunConfig", "ExperimentBase", "ScenarioSpec", "StrategySpec", "ExperimentConfig",
           "load_experiment", "experiment_from_raw", "parse_scenario", "parse_strategy", "switch_strategy"]


@dataclass(frozen=True)
class RunConfig:
    """Attributes: seed, out_dir (parent of run folders), name (run folder name; default
    ``<yaml stem>-<strategy>-<time>``), checkpoint (after each experience), plots."""

    seed: int = 0
    out_dir: str = "runs"
    name: str | None = None
    checkpoint: bool = True
    plots: bool = True


class ExperimentBase:
    """What every run kind's config shares: ``to_raw``, ``config_hash`` and strict ``from_raw``.

    Subclasses are frozen dataclasses naming their top-level ``SECTIONS`` (in YAML order), the
    ``REQUIRED`` ones, and ``PARSERS`` for sections that are not a plain dataclass (a parser
    takes the raw section and returns the value); every other section is built with
    :func:`adaptsim.cl.config.from_dict` from its field's type. Each has ``run: RunConfig`` and
    ``source: str``.
    """

    SECTIONS: ClassVar[tuple[str, ...]] = ()
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    PARSERS: ClassVar[dict[str, Callable[[Any], Any]]] = {}

    def to_raw(self) -> dict[str, Any]:
        """The resolved config as plain YAML-ready data (round-trips through :meth:`from_raw`)."""
        out = {}
        for k in self.SECTIONS:
            v = getattr(self, k)
            out[k] = v.to_raw() if hasattr(v, "to_raw") else to_dict(v)
        return out

    def config_hash(self) -> str:
        """Short hash of everything but the run folder's name and location."""
        raw = self.to_raw()
        raw["run"] = {k: v for k, v in raw["run"].items() if k not in ("name", "out_dir")}
        return hashlib.sha1(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any], source: str = ""):
        """Build the config from a raw mapping, strictly (unknown sections and keys raise)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source or 'config'}: top level must be a mapping")
        for key in raw:
            if key not in cls.SECTIONS:
                raise unknown_key_error("<top level>", str(key), list(cls.SECTIONS))
        for required in cls.REQUIRED:
            if required not in raw:
                raise ConfigError(f"config needs a '{required}' section")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k in cls.SECTIONS:
            if k in cls.PARSERS:
                kwargs[k] = cls.PARSERS[k](raw.get(k))
            elif k in raw:
                kwargs[k] = from_dict(hints[k], raw.get(k), k)
        return cls(**kwargs, source=str(source))


@dataclass(frozen=True)
class ScenarioSpec:
    generator: str
    args: Any

    def to_raw(self) -> dict[str, Any]:
        return {"generator": self.generator, **to_dict(self.args)}


@dataclass(frozen=True)
class StrategySpec:
    name: str
    config: Any

    def to_raw(self) -> dict[str, Any]:
        return {"name": self.name, **to_dict(self.config)}


def _named_section(raw: Any, section: str, key: str, registry_get) -> tuple[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"section '{section}' must be a mapping with a '{key}' key")
    raw = dict(raw)
    if key not in raw:
        raise ConfigError(f"section '{section}' needs '{key}'")
    name = raw.pop(key)
    if not isinstance(name, str):
        raise ConfigError(f"{section}.{key} must be a name, got {name!r}")
    try:
        cfg_cls = registry_get(name)[0]
    except KeyError as exc:
        raise ConfigError(f"{section}.{key}: {exc.args[0]}") from None
    return name, from_dict(cfg_cls, raw, section, extra_valid=(key,))


def parse_scenario(raw: Any) -> ScenarioSpec:
    return ScenarioSpec(*_named_section(raw, "scenario", "generator", GENERATORS.get))


def parse_strategy(raw: Any) -> StrategySpec:
    from adaptsim.strategies import get_strategy

    return StrategySpec(*_named_section(raw, "strategy", "name", get_strategy))


@dataclass(frozen=True)
class ExperimentConfig(ExperimentBase):
    """A continual-learning run: a stream, a backbone and a strategy."""

    SECTIONS: ClassVar[tuple[str, ...]] = ("scenario", "strategy", "backbone", "train", "run")
    REQUIRED: ClassVar[tuple[str, ...]] = ("scenario", "strategy")
    PARSERS: ClassVar[dict[str, Callable[[Any], Any]]] = {"scenario": parse_scenario,
                                                          "strategy": parse_strategy}

    scenario: ScenarioSpec
    strategy: StrategySpec
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str = ""


SECTIONS = ExperimentConfig.SECTIONS


def experiment_from_raw(raw: Mapping[str, Any], source: str = "") -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a raw mapping (strict)."""
    return ExperimentConfig.from_raw(raw, source)


def switch_strategy(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
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
    raw = dict(read_yaml(path))
    raw.pop("kind", None)
    raw = apply_overrides(switch_strategy(raw, overrides), overrides)
    return experiment_from_raw(raw, source=str(path))
