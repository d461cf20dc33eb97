"""FedNano as a federated method: server-held frozen model, client NanoAdapters, Fisher merging.

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang et al., arXiv 2506.14824 (https://arxiv.org/abs/2506.14824). Options: the
``federated.fednano`` section (:class:`~adaptsim.federated.fednano.config.FedNanoConfig`). The
pieces are in :mod:`adaptsim.federated.fednano` (per-process system, split-training client fit,
Fisher merge, central evaluation). Round-record keys beyond the shared ones, kept apart from the
arrays Flower carries (``bytes_up``/``bytes_down``: adapters, plus the Fisher with Fisher merging):

- ``bytes_activations_up`` / ``bytes_gradients_down`` / ``split_round_trips``: what split
  training moved (tokens and answer ids up; token gradients and losses down), Fisher pass included;
- ``bytes_fisher_up``: the part of ``bytes_up`` that is Fisher;
- ``bytes_model_download``: one-time downloads of clients sampled for the first time (connector
  and embeddings; the whole server model too for the PEFT baseline);
- ``accuracy_q0..q2``: accuracy per question type.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from adaptsim.federated.fednano.config import FedNanoConfig
from adaptsim.federated.methods.base import ClientResult, FedMethod, register_fed_method

__all__ = ["FedNano"]


@register_fed_method("fednano", FedNanoConfig)
class FedNano(FedMethod):
    """FedNano (and its federated-PEFT baselines, ``federated.fednano.baseline``)."""

    run_kind = "fednano"
    run_kind_description = "FedNano: server-held frozen model, client NanoAdapters, Fisher merging (split training)"

    @classmethod
    def check(cls, cfg: Any) -> None:
        """DP is refused (split training hands the server tokens and labels); Fisher merging needs
        the NanoAdapters (``baseline: none``).

        Raises:
            ConfigError: naming the field.
        """
        from adaptsim.cl.config import ConfigError
        from adaptsim.federated.fednano.task import refuse_dp

        refuse_dp(cfg)
        nc = cfg.federated.fednano
        if nc.aggregation == "fisher" and nc.baseline != "none":
            raise ConfigError("federated.fednano.aggregation: fisher needs baseline: none")

    @classmethod
    def prepare(cls, cfg: Any) -> None:
        from adaptsim.federated.task import load_data

        cls.check(cfg)
        load_data(cfg)  # a missing data file is an error before any run folder exists

    def system(self):
        from adaptsim.federated.fednano.system import get_system

        return get_system(self.cfg)

    def initial_arrays(self) -> dict[str, np.ndarray]:
        return dict(self.system().initial)

    def aggregate(self, results: Sequence[tuple[Mapping[str, np.ndarray], int]],
                  global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """FedAvg or Fisher merging (``federated.fednano.aggregation``)."""
        from adaptsim.federated.fednano.fisher import aggregate

        nc = self.cfg.federated.fednano
        return aggregate(results, nc.aggregation, nc.fisher_eps)

    def evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        from adaptsim.federated.fednano.task import evaluate

        return evaluate(self.system(), dict(arrays), batch_size=self.cfg.federated.eval_batch_size)

    def round_metrics(self, replies: Any, evaluation: Mapping[str, float]) -> dict[str, Any]:
        from adaptsim.federated.fednano.task import SPLIT_KEYS

        return {**{k: v for k, v in evaluation.items() if k.startswith("accuracy_q")},
                **{k: int(replies.sum_metric(k)) for k in SPLIT_KEYS},
                "bytes_model_download": len(replies.first_time) * self.system().download_bytes()}

    def client_fit(self, arrays: Mapping[str, np.ndarray], partition_id: int, client_state: dict | None, *,
                   round_idx: int, node_store: Any = None) -> ClientResult:
        from adaptsim.federated.fednano.task import client_fit

        system = self.system()
        return client_fit(system, dict(arrays), system.clients[partition_id], self.cfg, client_state,
                          client_id=partition_id, round_idx=round_idx)
