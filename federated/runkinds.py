"""The federated run kinds, ``federated`` (LoRA / FFA-LoRA) and ``fednano``.

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


def _from_raw(raw: Mapping[str, Any], source: str):
    from adaptsim.federated.config import load_fed_experiment

    return load_fed_experiment(raw, source)


def _checked(method_is_fednano: bool):
    def from_raw(raw: Mapping[str, Any], source: str):
        from adaptsim.cl.config import ConfigError

        cfg = _from_raw(raw, source)
        if (cfg.federated.method == "fednano") != method_is_fednano:
            want = "fednano" if cfg.federated.method == "fednano" else "federated"
            raise ConfigError(f"federated.method={cfg.federated.method!r} runs as kind {want!r}, "
                              f"not {'fednano' if method_is_fednano else 'federated'!r}")
        return cfg

    return from_raw


def _run(cfg, rd, **kw):
    from adaptsim.federated.runner import run_rounds

    return run_rounds(cfg, rd, **kw)


def _prepare_data(cfg) -> None:
    from adaptsim.federated.fednano.task import refuse_dp
    from adaptsim.federated.task import load_data

    refuse_dp(cfg)  # FedNano's split training hands the server tokens and labels: no DP
    load_data(cfg)  # a missing data file is an error before any run folder exists


def _prepare(cfg) -> None:
    """Load the data and draw the partitions before a run folder exists: a missing data file, a
    partition that cannot be drawn (too many clients, ``min_partition_size``) or a
    ``dp.delta >= 1/n_k`` for some client is a config error."""
    from adaptsim.cl.config import ConfigError
    from adaptsim.federated.partition import partition_indices
    from adaptsim.federated.task import load_data

    f = cfg.federated
    train, _ = load_data(cfg)
    try:
        parts = partition_indices(train.targets, f.num_clients, f.partition, alpha=f.dirichlet_alpha,
                                  seed=f.partition_seed, min_partition_size=f.min_partition_size)
    except ValueError as exc:
        raise ConfigError(f"federated: cannot partition {len(train.targets)} training samples over "
                          f"{f.num_clients} clients: {exc}") from None
    if f.dp.enabled:
        from adaptsim.federated.privacy import check_delta

        for k, idx in enumerate(parts):
            check_delta(f.dp.delta, len(idx), k)


def _is_fednano(raw: Mapping[str, Any]) -> bool:
    fed = raw.get("federated")
    return isinstance(fed, Mapping) and fed.get("method") == "fednano"


def register() -> None:
    """Entry point of group ``adaptsim.run_kinds``: registers ``federated`` and ``fednano``."""
    from adaptsim.cl.runkinds import RunKind, register_run_kind

    common = dict(run=_run, label=lambda cfg: cfg.federated.method,
                  summary=federated_summary, threads_key="federated.num_threads",
                  seed_keys=("federated.seed",))
    register_run_kind(RunKind(
        name="federated",
        description="federated LoRA / FFA-LoRA on Flower (in-process, simulation engine, SuperLink), Opacus DP",
        config_from_raw=_checked(False), prepare=_prepare,
        matches=lambda raw: "federated" in raw and not _is_fednano(raw), **common))
    register_run_kind(RunKind(
        name="fednano",
        description="FedNano: server-held frozen model, client NanoAdapters, Fisher merging (split training)",
        config_from_raw=_checked(True), prepare=_prepare_data, matches=_is_fednano, **common))
