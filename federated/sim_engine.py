"""Simulation mode: the same ClientApp/ServerApp on Flower's simulation engine (Ray backend).

Flower 1.41 deprecates ``flwr.simulation.run_simulation`` in favour of ``flwr run`` against a
SuperLink started with ``--simulation``; this module does exactly that on a free loopback port,
with a private ``FLWR_HOME``: ``flwr run <repo> <connection> --federation-config
"num-supernodes=N client-resources-num-cpus=1 init-args-num-cpus=C"``. Ray runs the ClientApps
in long-lived actors, so the per-process model cache of :mod:`adaptsim.federated.task` is hit
from the second message on (unlike deployment, where every message starts a ``flwr-clientapp``).

Flower 1.41's managed local SuperLink (connection address ``":local:"``) is not used: it is
started detached on fixed ports, with no pid recorded and no command that stops it, so it would
outlive the run and be shared by concurrent runs (docs/federated.md, "Managed local SuperLink").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from adaptsim.federated.deploy import LocalFederation
from adaptsim.federated.flower_glue import launch_run_config, read_rounds

__all__ = ["run_simulation_mode", "simulation_federation_config"]

logger = logging.getLogger(__name__)


def simulation_federation_config(cfg: Any, num_cpus: int | None = None) -> dict[str, Any]:
    """``--federation-config`` of a simulation: one virtual SuperNode per client.

    Args:
        cfg: the experiment.
        num_cpus: CPUs Ray may use (default: all); each ClientApp actor asks for one.
    """
    cpus = num_cpus or os.cpu_count() or 1
    return {"num-supernodes": cfg.federated.num_clients, "backend": "ray",
            "client-resources-num-cpus": 1, "init-args-num-cpus": cpus}


def run_simulation_mode(cfg: Any, run_dir: str | Path, *, num_cpus: int | None = None,
                        round_timeout: float = 600.0) -> list[dict[str, Any]]:
    """Runs ``cfg`` on Flower's simulation engine; the ServerApp writes the run folder.

    Args:
        cfg: a :class:`~adaptsim.federated.config.FedExperimentConfig`.
        run_dir: the run folder (created by the runner).
        num_cpus: CPUs for Ray (default: all).
        round_timeout: seconds the server waits for one round's replies.

    Returns:
        One metrics dict per round (same keys as the in-process loop).

    Raises:
        RuntimeError: if the run fails (see ``run_dir/flower/logs``).
    """
    run_dir = Path(run_dir)
    for attempt in range(1, _RAY_START_ATTEMPTS + 1):
        with LocalFederation(run_dir / "flower" / f"attempt_{attempt}", 0, simulation=True) as fed:
            try:
                fed.run(launch_run_config(cfg, run_dir, round_timeout),
                        federation_config=simulation_federation_config(cfg, num_cpus))
                break
            except RuntimeError:
                # Ray waits a hard-coded 30 s for its raylet; on an overloaded machine that start
                # can time out before any client ran. Only that failure is retried.
                if _RAY_START_TIMEOUT not in fed.log_text("flwr_run") or attempt == _RAY_START_ATTEMPTS:
                    raise
                logger.warning("Ray did not start in time (attempt %d); retrying", attempt)
    return read_rounds(run_dir)


_RAY_START_ATTEMPTS = 3
_RAY_START_TIMEOUT = "The current node timed out during startup"
