"""Federated continual learning as a federated method (``fcl``): the ``fcl`` run kind over Flower.

The ``fcl`` run kind (:mod:`adaptsim.federated.fcl.runkind`) with ``fcl.engine: simulation`` or
``deployment`` builds a :class:`~adaptsim.federated.config.FedExperimentConfig` with
``federated.method: fcl`` whose ``federated.fcl`` holds the whole FCL experiment, and hands it to
the ordinary Flower launchers; the generic ClientApp/ServerApp then drive this method. Server
round ``r`` (0-based) is round ``r % P`` of experience ``r // P``, ``P = fcl.rounds`` (+1 for
strategies with a statistics round, MOS). It follows the contract of
:mod:`adaptsim.strategies.sharing`, exactly as the in-process loop
(:func:`adaptsim.federated.fcl.loop.run_fcl`) does:

- **client** (:meth:`FCL.client_fit`): a freshly built strategy (same seeds as in process) loads
  the global :class:`~adaptsim.strategies.sharing.SharedState` (not in round 0), trains on its
  share of the experience (:func:`~adaptsim.federated.fcl.loop.split_experience`, same seed) or
  collects statistics, and returns ``shareable_state()``;
- **server** (:meth:`FCL.aggregate`): its own copy of the strategy, kept in this object for the
  whole run, calls ``aggregate_shared`` on the states in partition order (statistics are added
  up exactly, not averaged), loads the aggregate, and ends the experience after its last round;
  :meth:`FCL.evaluate` then gives the accuracy row ``R[t, :t+1]`` (round key ``fcl``).

On the wire a state is flat named arrays: ``arrays/<name>``, ``stats/<kind>/counts|sums|outer``,
``fcl/weight``, ``fcl/meta`` (JSON bytes), plus ``fcl/round`` (rounds done; global only) and
``fcl/partition`` (the sender; client replies only). The round record's ``fcl`` key holds what
the in-process loop writes to ``fcl_rounds.json`` (bytes by kind count the states, not the
counters) and the accuracy row after an experience's last round.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from adaptsim.federated.fcl.config import FCLExperimentConfig
from adaptsim.federated.methods.base import ClientResult, FedMethod, register_fed_method
from adaptsim.strategies.sharing import SharedState

__all__ = ["FCL", "fcl_system"]

_SYSTEMS: dict[str, "_System"] = {}


class _System:
    """What one process builds once per FCL experiment: stream, strategy factory, fit, shares."""

    def __init__(self, cfg: FCLExperimentConfig) -> None:
        import torch

        from adaptsim.cl.runner import prepare
        from adaptsim.cl.train import fit
        from adaptsim.federated.fcl.runkind import _make_strategy_factory
        from adaptsim.strategies import get_strategy

        self.cfg = cfg
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        self.device = device = cfg.train.resolved_device()
        self.stream = prepare(cfg)
        self.make = _make_strategy_factory(cfg, self.stream, device)
        self.fit = lambda phase: fit(phase, device=device)
        self.rounds = cfg.fcl.rounds
        self.statistics = bool(getattr(get_strategy(cfg.strategy.name)[1], "statistics_round", False))
        self.per_experience = self.rounds + int(self.statistics)
        self._shares: dict[int, list] = {}
        self.evals = [e.eval_view() for e in self.stream.experiences]

    def phase(self, round_idx: int) -> tuple[int, int, str]:
        """(experience, round within it, ``train`` or ``statistics``) of 0-based server round."""
        t, k = divmod(int(round_idx), self.per_experience)
        return t, k, "train" if k < self.rounds else "statistics"

    def shares(self, t: int) -> list:
        """The clients' shares of experience ``t`` (the in-process loop's split and seed)."""
        from adaptsim.federated.fcl.loop import split_experience

        if t not in self._shares:
            f = self.cfg.fcl
            self._shares[t] = split_experience(self.stream.experiences[t], f.num_clients, f.partition,
                                               alpha=f.dirichlet_alpha, seed=f.partition_seed * 1000 + t)
        return self._shares[t]


def fcl_system(raw: Mapping[str, Any]) -> _System:
    """The per-process :class:`_System` of the FCL experiment ``raw`` (built once)."""
    key = json.dumps(raw, sort_keys=True, default=str)
    if key not in _SYSTEMS:
        _SYSTEMS[key] = _System(FCLExperimentConfig.from_raw(raw, "federated.fcl"))
    return _SYSTEMS[key]


def _nbytes(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    return {"arrays": int(sum(v.nbytes for k, v in arrays.items() if k.startswith("arrays/"))),
            "stats": int(sum(v.nbytes for k, v in arrays.items() if k.startswith("stats/")))}


@register_fed_method("fcl", FCLExperimentConfig)
class FCL(FedMethod):
    """A CL strategy inside every client (options: the FCL experiment in ``federated.fcl``)."""

    run_kind = "federated"  # run through the ``fcl`` run kind (fcl.engine), which builds federated.fcl
    run_kind_description = "federated continual learning (built by the fcl run kind)"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._server: Any = None
        self._record: dict[str, Any] = {}
        self.rows: dict[int, list[float]] = {}

    @classmethod
    def check(cls, cfg: Any) -> None:
        """``federated.fcl`` must hold an FCL experiment (the ``fcl`` run kind sets it).

        Raises:
            ConfigError: naming the field.
        """
        from adaptsim.cl.config import ConfigError

        if not cfg.federated.fcl:
            raise ConfigError("federated.fcl is empty: method fcl is run by the fcl run kind "
                              "(kind: fcl, with fcl.engine: simulation or deployment)")
        if cfg.federated.dp.enabled:
            raise ConfigError("federated.dp: DP for method fcl runs in-process only for now "
                              "(kind: fcl with fcl.engine: inprocess and fcl.dp; docs/federated.md)")

    def system(self) -> _System:
        return fcl_system(self.cfg.federated.fcl)

    # -- server ------------------------------------------------------------------------------
    def initial_arrays(self) -> dict[str, np.ndarray]:
        return {"fcl/round": np.zeros(1, np.int64)}

    def server_strategy(self) -> Any:
        """The server's copy of the strategy (built on first use, kept for the run)."""
        if self._server is None:
            from adaptsim.strategies.sharing import check_sharing

            self._server = self.system().make()
            check_sharing(self._server.name, self._server.config)
        return self._server

    def aggregate(self, results: Sequence[tuple[Mapping[str, np.ndarray], int]],
                  global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``aggregate_shared`` of the server's strategy on the client states (partition order)."""
        s = self.system()
        r = int(np.asarray(global_arrays["fcl/round"]).reshape(-1)[0])
        t, k, kind = s.phase(r)
        server = self.server_strategy()
        if k == 0:
            server.begin_experience(s.stream.experiences[t])
        sent = sorted((a for a, n in results if n > 0), key=lambda a: int(np.asarray(a["fcl/partition"])[0]))
        agg = server.aggregate_shared([SharedState.from_arrays(a) for a in sent])
        server.load_shared_state(agg)
        out = agg.to_arrays()
        up = [_nbytes(a) for a in sent]
        down = _nbytes(out)
        self._record = {"experience": t, "round": k, "kind": kind, "clients": len(sent),
                        "client_sizes": [len(x.train) for x in s.shares(t)],
                        "bytes_up": {q: int(sum(u[q] for u in up)) for q in ("arrays", "stats")},
                        "bytes_down": {q: int(v) * s.cfg.fcl.num_clients for q, v in down.items()}, "row": None}
        if k == s.per_experience - 1:
            server.end_experience()
        return {**out, "fcl/round": np.array([r + 1], np.int64)}

    def evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """After an experience's last round: its row ``R[t, :t+1]``; ``accuracy`` is the
        test-size-weighted mean of the latest row (0 before the first), ``loss`` is 0."""
        from adaptsim.cl.evaluate import evaluate_stream

        s = self.system()
        done = int(np.asarray(arrays["fcl/round"]).reshape(-1)[0])
        if done > 0 and self._server is not None:
            t, k, _ = s.phase(done - 1)
            if k == s.per_experience - 1 and t not in self.rows:
                self.rows[t] = evaluate_stream(self._server, s.evals[: t + 1], s.cfg.train.eval_batch_size)
                self._record["row"] = self.rows[t]
        if not self.rows:
            return {"accuracy": 0.0, "loss": 0.0, "num_examples": 0}
        t = max(self.rows)
        n = [len(e.test) for e in s.stream.experiences[: t + 1]]
        return {"accuracy": float(np.dot(self.rows[t], n) / sum(n)), "loss": 0.0, "num_examples": int(sum(n))}

    def round_metrics(self, replies: Any, evaluation: Mapping[str, float]) -> dict[str, Any]:
        return {"fcl": dict(self._record)}

    # -- client ------------------------------------------------------------------------------
    def client_fit(self, arrays: Mapping[str, np.ndarray], partition_id: int, client_state: dict | None, *,
                   round_idx: int, node_store: Any = None) -> ClientResult:
        """A rebuilt client's round: load the global state, train (or collect statistics) on its
        share, return its ``shareable_state`` (an empty share sends nothing, 0 examples)."""
        import torch

        s = self.system()
        t, _, kind = s.phase(round_idx)
        share = s.shares(t)[partition_id]
        tag = {"fcl/partition": np.array([partition_id], np.int64)}
        met = {"loss": 0.0, "epsilon": math.inf, "budget_spent": 0}
        if len(share.train) == 0:
            return tag, 0, met, {}
        client = s.make()
        rng = torch.get_rng_state()  # the state of a freshly built strategy, as in process
        if round_idx > 0:
            client.load_shared_state(SharedState.from_arrays(arrays))
        torch.set_rng_state(rng)
        if kind == "train":
            out = client.train_experience(share, s.fit) or {}
            if isinstance(out.get("loss"), (int, float)):
                met["loss"] = float(out["loss"])
        else:
            client.collect_statistics(share)
        return {**client.shareable_state().to_arrays(), **tag}, len(share.train), met, {}
