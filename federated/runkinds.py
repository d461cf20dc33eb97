"""The federated run kinds, ``federated`` (LoRA / FFA-LoRA) and ``fednano``, from the method registry.

Registered into :mod:`adaptsim.cl.runkinds` through the ``adaptsim.run_kinds`` entry point
(``pyproject.toml``), because ``adaptsim.cl`` never imports ``adaptsim.federated``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["register", "federated_summary"]


def federated_summary(m: Mapping[str, Any]) -> dict[str, float]:
    """Final/best accuracy, ε (max over clients), bytes, seconds and failures of a federated run."""
    s = m.get("summary") or {}
    out: dict[str, float] = {}
    for k, name in (("final_accuracy", "final_accuracy"), ("best_accuracy", "best_accuracy"),
                    ("final_loss", "final_loss"), ("max_epsilon", "epsilon"), ("bytes_up", "bytes_up"),
                    ("bytes_down", "bytes_down"), ("seconds", "train_seconds"), ("failures", "failures")):
        v = s.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v)):
            out[name] = float(v)
    return out


def _kind_of_raw(raw: Mapping[str, Any]) -> str | None:
    """The run kind of a raw config: its method's ``run_kind`` (``None`` without a federated section;
    an unknown method runs as ``federated``, whose strict loader then names the registered ones)."""
    from adaptsim.federated.config import FederatedConfig
    from adaptsim.federated.methods import fed_method_class

    if "federated" not in raw:
        return None
    fed = raw["federated"] if isinstance(raw["federated"], Mapping) else {}
    try:
        return fed_method_class(str(fed.get("method", FederatedConfig.method))).run_kind
    except KeyError:
        return "federated"


def _config_from_raw(kind: str):
    def from_raw(raw: Mapping[str, Any], source: str):
        from adaptsim.cl.config import ConfigError
        from adaptsim.federated.config import load_fed_experiment
        from adaptsim.federated.methods import fed_method_class

        cfg = load_fed_experiment(raw, source)
        want = fed_method_class(cfg.federated.method).run_kind
        if want != kind:
            raise ConfigError(f"federated.method={cfg.federated.method!r} runs as kind {want!r}, not {kind!r}")
        return cfg

    return from_raw


def _run(cfg, rd, **kw):
    from adaptsim.federated.runner import run_rounds

    return run_rounds(cfg, rd, **kw)


def _prepare(cfg) -> None:
    """The method's checks before a run folder exists (missing data, undrawable partitions,
    ``dp.delta >= 1/n_k``, refused options are config errors)."""
    from adaptsim.federated.methods import fed_method_class

    fed_method_class(cfg.federated.method).prepare(cfg)


def register() -> None:
    """Entry point of group ``adaptsim.run_kinds``: one run kind per distinct ``run_kind`` of the
    registered federated methods (``federated`` and ``fednano``)."""
    from adaptsim.cl.runkinds import RunKind, register_run_kind
    from adaptsim.federated.methods import fed_method_class, list_fed_methods

    kinds: dict[str, str] = {}
    for name in list_fed_methods():
        cls = fed_method_class(name)
        kinds.setdefault(cls.run_kind, cls.run_kind_description)
    for kind, description in kinds.items():
        register_run_kind(RunKind(
            name=kind, description=description, config_from_raw=_config_from_raw(kind), prepare=_prepare,
            matches=lambda raw, kind=kind: _kind_of_raw(raw) == kind, run=_run,
            label=lambda cfg: cfg.federated.method, summary=federated_summary,
            threads_key="federated.num_threads", seed_keys=("federated.seed",)))
