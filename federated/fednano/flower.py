"""FedNano on Flower (simulation engine and SuperLink/SuperNode deployment): thin glue.

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang et al., arXiv 2506.14824 (https://arxiv.org/abs/2506.14824).

How split training maps onto Flower (documented departure, docs/methods/fednano.md): Flower's
Message API has no client-initiated call into the running ServerApp, so a ClientApp cannot ask
the server for token gradients in the middle of its local round. Flower carries the adapter
exchange (global NanoAdapters down, trained NanoAdapters (+ Fisher) up, as ``ArrayRecord``);
the per-step split forward/backward goes through the same :class:`~.task.SplitChannel` as in
process, whose server model is the server's frozen model rebuilt bit-identically in the
ClientApp's process (deterministic pretraining, shared disk cache) and reachable only through
the channel. The bytes such an exchange would move are counted by the channel and reported per
round (``bytes_activations_up``/``bytes_gradients_down``), exactly as in process; they are
*not* carried by Flower. A real deployment would put a split-inference service next to the
SuperLink.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from adaptsim.federated.fednano.fisher import aggregate
from adaptsim.federated.fednano.loop import SPLIT_KEYS
from adaptsim.federated.flower_glue import (arrays_to_record, experiment_from_run_config, record_to_arrays,
                                            state_get, state_put, write_rounds)
from adaptsim.federated.flower_strategy import AdaptsimFedAvg
from adaptsim.federated.local_sim import save_checkpoint

__all__ = ["client_train", "FedNanoStrategy", "run_fednano_server"]

logger = logging.getLogger(__name__)


def _kebab(key: str) -> str:
    return key.replace("_", "-")


def client_train(msg: Message, context: Context) -> Message:
    """ClientApp ``train`` for ``method: fednano``: global adapters in, trained adapters out.

    Raises:
        RuntimeError: if this node missed the round-0 handshake.
    """
    import torch

    from adaptsim.federated.fednano.system import get_system
    from adaptsim.federated.fednano.task import client_fit

    cfg = experiment_from_run_config(context.run_config)
    pid, nparts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    state = state_get(context)
    if "a_seed" not in state:
        raise RuntimeError(f"client {pid}: no seed from the server (missed the round-0 handshake)")
    cfg = dataclasses.replace(cfg, federated=dataclasses.replace(cfg.federated, a_seed=int(state["a_seed"])))
    if nparts != cfg.federated.num_clients:
        raise ValueError(f"node num-partitions={nparts} differs from federated.num_clients={cfg.federated.num_clients}")
    if cfg.federated.num_threads:
        torch.set_num_threads(cfg.federated.num_threads)
    system = get_system(cfg)
    server_round = int(msg.content["config"]["server-round"])
    arrays, n, met, state["client"] = client_fit(system, record_to_arrays(msg.content["arrays"]),
                                                 system.clients[pid], cfg, state.get("client"),
                                                 client_id=pid, round_idx=server_round - 1)
    state_put(context, state)
    metrics = MetricRecord({"num-examples": n, "partition-id": pid, "epsilon": float(met["epsilon"]),
                            "loss": float(met["loss"]), "budget-spent": int(met["budget_spent"]),
                            "steps": int(met["steps"]), **{_kebab(k): int(met[k]) for k in SPLIT_KEYS}})
    return Message(RecordDict({"arrays": arrays_to_record(arrays), "metrics": metrics}), reply_to=msg)


class FedNanoStrategy(AdaptsimFedAvg):
    """:class:`AdaptsimFedAvg` (sampling, failures, ``min_replies``, byte counting) with FedNano's
    aggregation (FedAvg or Fisher merging), split-traffic bookkeeping and central evaluation."""

    def __init__(self, cfg: Any, node_of_partition: dict[int, int], run_dir: Path) -> None:
        super().__init__(cfg, node_of_partition, run_dir)
        self._seen: set[int] = set()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Parent's messages; also counts one-time model downloads of first-time clients."""
        from adaptsim.federated.fednano.system import get_system

        msgs = list(super().configure_train(server_round, arrays, config, grid))
        new = [p for p in self._pending["sent"] if p not in self._seen]
        self._seen.update(new)
        self._pending["bytes_model_download"] = len(new) * get_system(self.cfg).download_bytes()
        return msgs

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Parent's bookkeeping (failures, bytes up, epsilon); FedNano's aggregation of the arrays."""
        replies = list(replies)
        download = self._pending.get("bytes_model_download", 0)
        arrays, metrics = super().aggregate_train(server_round, replies)
        valid = [m for m in replies if not m.has_error()]
        split = {k: sum(int(m.content["metrics"][_kebab(k)]) for m in valid) for k in SPLIT_KEYS}
        self._pending.update(split, bytes_model_download=download)
        if arrays is None:
            return None, metrics
        results = [(record_to_arrays(m.content["arrays"]), int(m.content["metrics"]["num-examples"])) for m in valid]
        nc = self.cfg.federated.fednano
        return arrays_to_record(aggregate(results, nc.aggregation, nc.fisher_eps)), metrics

    def central_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Global test-set evaluation at the server; records the round and writes the run folder."""
        from adaptsim.federated.fednano.system import get_system
        from adaptsim.federated.fednano.task import evaluate
        from adaptsim.federated.runner import write_fed_outputs

        global_arrays = record_to_arrays(arrays)
        ev = evaluate(get_system(self.cfg), global_arrays, batch_size=self.cfg.federated.eval_batch_size)
        if server_round == 0:
            self.initial = {"accuracy": ev["accuracy"], "loss": ev["loss"]}
        else:
            p = self._pending
            self.rounds.append({"round": server_round, "accuracy": ev["accuracy"], "loss": ev["loss"],
                                **{k: ev[k] for k in ev if k.startswith("accuracy_q")},
                                "epsilon": dict(self.epsilon), "bytes_up": p["bytes_up"],
                                "bytes_down": p["bytes_down"], **{k: p[k] for k in SPLIT_KEYS},
                                "bytes_model_download": p["bytes_model_download"],
                                "seconds": time.perf_counter() - self._t0, "replies": p["replies"],
                                "failures": p["failures"], "budget_spent": p["budget_spent"],
                                "train_loss": p["train_loss"], "failed": p["failed"]})
            save_checkpoint(self.run_dir, server_round, global_arrays, {}, self.rounds)
            write_fed_outputs(self.cfg, self.rounds, self.run_dir)
            logger.info("fednano round %d: accuracy %.4f, replies %d", server_round, ev["accuracy"], p["replies"])
        write_rounds(self.run_dir, self.rounds, self.initial)
        return MetricRecord({"accuracy": ev["accuracy"], "loss": ev["loss"]})


def run_fednano_server(grid: Grid, cfg: Any, node_of_partition: dict[int, int], run_dir: Path,
                       timeout: float) -> None:
    """ServerApp body for ``method: fednano``: :class:`FedNanoStrategy` from the initial adapters."""
    from adaptsim.federated.fednano.system import get_system

    strategy = FedNanoStrategy(cfg, node_of_partition, run_dir)
    strategy.start(grid, arrays_to_record(get_system(cfg).initial), num_rounds=cfg.federated.rounds,
                   timeout=timeout, evaluate_fn=strategy.central_evaluate)
    logger.info("run folder: %s", run_dir)

