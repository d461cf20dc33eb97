"""The ``fcl`` run kind over Flower (``fcl.engine: simulation | deployment``).

:func:`fed_experiment_of` turns the FCL experiment into an ordinary federated experiment with
``federated.method: fcl`` (:mod:`adaptsim.federated.methods.fcl`): every client in every round
(``clients_per_round = min_replies = num_clients``: the exact aggregation needs every share),
``rounds = experiences x (fcl.rounds [+ 1 statistics round])``, and the FCL experiment itself in
``federated.fcl``. :func:`run_fcl_flower` runs it with the existing launchers
(:func:`~adaptsim.federated.sim_engine.run_simulation_mode`,
:func:`~adaptsim.federated.deploy.run_deployment_mode`) and reads back, from the round records
the ServerApp wrote, the accuracy matrix and the per-round records the in-process loop returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["fed_experiment_of", "run_fcl_flower", "rounds_per_experience"]


def rounds_per_experience(cfg: Any) -> int:
    """``fcl.rounds``, plus one for strategies with a statistics round (MOS)."""
    from adaptsim.strategies import get_strategy

    return cfg.fcl.rounds + int(bool(getattr(get_strategy(cfg.strategy.name)[1], "statistics_round", False)))


def fed_experiment_of(cfg: Any, num_experiences: int, mode: str | None = None) -> Any:
    """The :class:`~adaptsim.federated.config.FedExperimentConfig` that runs ``cfg`` as method ``fcl``.

    Args:
        cfg: the :class:`~adaptsim.federated.fcl.config.FCLExperimentConfig`.
        num_experiences: the stream's length.
        mode: ``federated.mode`` (default: ``fcl.engine``).
    """
    from adaptsim.federated.config import load_fed_experiment

    f, raw = cfg.fcl, cfg.to_raw()
    fed = {"method": "fcl", "mode": mode or f.engine, "num_clients": f.num_clients,
           "clients_per_round": f.num_clients, "min_replies": f.num_clients,
           "rounds": num_experiences * rounds_per_experience(cfg), "seed": cfg.run.seed,
           "num_threads": max(0, cfg.train.num_threads), "eval_batch_size": cfg.train.eval_batch_size,
           "device": "cpu" if cfg.train.device == "cpu" else "auto", "fcl": raw}
    return load_fed_experiment({"backbone": raw["backbone"], "federated": fed,
                                "run": {**raw["run"], "plots": False}}, "fcl")


def results_of_rounds(rounds: list[dict], num_experiences: int) -> dict[str, Any]:
    """``{"R", "rounds"}`` as :func:`~adaptsim.federated.fcl.loop.run_fcl` returns them, from the
    round records of method ``fcl`` (key ``fcl``)."""
    R, recs = [], []
    for r in rounds:
        rec = dict(r["fcl"])
        row = rec.pop("row", None)
        if row is not None:
            R.append(list(row) + [float("nan")] * (num_experiences - len(row)))
        recs.append(rec)
    return {"R": R, "rounds": recs}


def run_fcl_flower(cfg: Any, stream: Any, run_dir: str | Path) -> dict[str, Any]:
    """Runs ``cfg`` on Flower (``fcl.engine``); the ServerApp writes its rounds into ``run_dir``.

    Returns:
        ``{"R": accuracy matrix rows, "rounds": per-round records}`` (as the in-process loop).

    Raises:
        RuntimeError: if the Flower run fails (see ``run_dir/flower``), or it ended without the
            accuracy row of every experience.
    """
    fcfg = fed_experiment_of(cfg, len(stream))
    if cfg.fcl.engine == "simulation":
        from adaptsim.federated.sim_engine import run_simulation_mode

        rounds = run_simulation_mode(fcfg, run_dir)
    else:
        from adaptsim.federated.deploy import run_deployment_mode

        rounds = run_deployment_mode(fcfg, run_dir)
    out = results_of_rounds(rounds, len(stream))
    if len(out["R"]) != len(stream):
        raise RuntimeError(f"the Flower run gave {len(out['R'])} of {len(stream)} accuracy rows; see {run_dir}/flower")
    return out
