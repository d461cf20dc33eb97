"""Flower strategy of the adaptsim ServerApp: Flower's ``FedAvg`` with adaptsim's round rules.

Subclasses :class:`flwr.serverapp.strategy.FedAvg` (Flower 1.41 Message API) and changes:

- ``configure_train``: samples the same clients as the in-process loop
  (:func:`adaptsim.federated.local_sim.sample_clients` over partition ids; the node of each
  partition is learnt in the round-0 handshake) instead of Flower's unseeded ``random.sample``,
  and counts the bytes sent down from the arrays actually sent.
- ``aggregate_train``: aggregates with adaptsim's :func:`~adaptsim.federated.aggregation.fedavg`
  (the function the in-process loop and the exactness test use) instead of Flower's
  ``aggregate_arrayrecords``; counts bytes up; keeps each client's epsilon; logs every failed
  or missing reply and completes the round when at least ``federated.min_replies`` replies
  arrived (else raises, as the in-process loop does). Flower's ``FedAvg`` aggregates whatever
  arrived and has no minimum-replies rule.
- evaluation is central (the server's global test set, :meth:`central_evaluate`, passed as
  ``evaluate_fn``) so the accuracy matches the in-process loop; client-side evaluation is off.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from adaptsim.federated.aggregation import fedavg
from adaptsim.federated.privacy import mirror_epsilon, privacy_label
from adaptsim.federated.comm import array_bytes
from adaptsim.federated.flower_glue import arrays_to_record, record_to_arrays, write_rounds
from adaptsim.federated.local_sim import sample_clients, save_checkpoint
from adaptsim.federated.task import evaluate, get_model, load_data

__all__ = ["AdaptsimFedAvg"]

logger = logging.getLogger(__name__)


class AdaptsimFedAvg(FedAvg):
    """FedAvg over named arrays with seeded client sampling, byte counting and ``min_replies``.

    Args:
        cfg: the :class:`~adaptsim.federated.config.FedExperimentConfig`.
        node_of_partition: partition id -> Flower node id (from the round-0 handshake).
        run_dir: where round metrics, checkpoints and plots are written after every round.
    """

    def __init__(self, cfg: Any, node_of_partition: dict[int, int], run_dir: Path) -> None:
        fed = cfg.federated
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=fed.clients_per_round,
                         min_available_nodes=fed.clients_per_round)
        self.cfg, self.node_of_partition, self.run_dir = cfg, dict(node_of_partition), Path(run_dir)
        self.rounds: list[dict[str, Any]] = []
        self.initial: dict[str, float] = {}
        no_dp = math.inf if not fed.dp.enabled else 0.0
        self.epsilon = {str(p): no_dp for p in range(fed.num_clients)}
        self._pending: dict[str, Any] = {}
        self._t0 = time.perf_counter()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Messages to the sampled clients' nodes (same sample as the in-process loop)."""
        fed = self.cfg.federated
        self._t0 = time.perf_counter()
        sampled = sample_clients(fed.num_clients, fed.clients_per_round, fed.seed, server_round - 1)
        absent = [p for p in sampled if p not in self.node_of_partition]
        for p in absent:
            logger.warning("round %d: client %d has no connected SuperNode; counted as a failure",
                           server_round, p)
        targets = [p for p in sampled if p in self.node_of_partition]
        config["server-round"] = server_round
        per_client = array_bytes(record_to_arrays(arrays))
        self._pending = {"sent": targets, "absent": absent, "bytes_down": per_client * len(targets)}
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        msgs = list(self._construct_messages(record, [self.node_of_partition[p] for p in targets],
                                             MessageType.TRAIN))
        # the SuperLink's error replies (e.g. "Node Unavailable") come from the SuperLink's own
        # node id; they name the message they answer, whose id is its object id
        self._pending["client_of_msg"] = {m.object_id: p for m, p in zip(msgs, targets)}
        return msgs

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the valid replies; raises if fewer than ``min_replies`` arrived.

        Raises:
            RuntimeError: if fewer than ``federated.min_replies`` valid replies arrived.
        """
        fed, replies = self.cfg.federated, list(replies)
        valid = [m for m in replies if not m.has_error()]
        client_of_msg, part_of = self._pending["client_of_msg"], {n: p for p, n in self.node_of_partition.items()}
        failed = [{"client": client_of_msg.get(m.metadata.reply_to_message_id, part_of.get(m.metadata.src_node_id)),
                   "reason": m.error.reason} for m in replies if m.has_error()]
        answered = {int(m.content["metrics"]["partition-id"]) for m in valid} | {f["client"] for f in failed}
        n_silent = max(len(self._pending["sent"]) - len(valid) - len(failed), 0)
        failed += [{"client": p, "reason": "no reply before the round timeout"}
                   for p in self._pending["sent"] if p not in answered][:n_silent]
        for f in failed:
            logger.warning("round %d: client %s failed (%s); completing the round with the replies it has",
                           server_round, f["client"], f["reason"])
        failures = len(failed) + len(self._pending["absent"])
        if len(valid) < fed.min_replies:
            raise RuntimeError(f"round {server_round}: {len(valid)} replies < min_replies={fed.min_replies}")
        results, bytes_up, spent, losses = [], 0, [], []
        for m in valid:
            arrays, met = record_to_arrays(m.content["arrays"]), m.content["metrics"]
            pid, n = int(met["partition-id"]), int(met["num-examples"])
            bytes_up += array_bytes(arrays)
            results.append((arrays, n))
            eps = float(met["epsilon"])  # with DP the audit value never drops below what was seen
            self.epsilon[str(pid)] = mirror_epsilon(self.epsilon.get(str(pid)), eps) if fed.dp.enabled else eps
            if int(met["budget-spent"]):
                spent.append(pid)
            elif n > 0:
                losses.append((float(met["loss"]), n))
        train_loss = sum(l * n for l, n in losses) / sum(n for _, n in losses) if losses else math.nan
        self._pending.update(bytes_up=bytes_up, replies=len(valid), failures=failures, budget_spent=sorted(spent),
                             train_loss=train_loss, failed=failed)
        if not any(n > 0 for _, n in results):
            logger.warning("round %d: every replying client has spent its budget; model unchanged", server_round)
            return None, MetricRecord({"train-loss": train_loss})
        return arrays_to_record(fedavg(results)), MetricRecord({"train-loss": train_loss})

    def central_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Global test-set evaluation (``evaluate_fn``); records the round and writes outputs."""
        from adaptsim.federated.runner import write_fed_outputs

        global_arrays = record_to_arrays(arrays)
        ev = evaluate(get_model(self.cfg), global_arrays, load_data(self.cfg)[1], self.cfg.federated.eval_batch_size)
        if server_round == 0:
            self.initial = {"accuracy": ev["accuracy"], "loss": ev["loss"]}
        else:
            p = self._pending
            self.rounds.append({"round": server_round, "accuracy": ev["accuracy"], "loss": ev["loss"],
                                "epsilon": dict(self.epsilon), "privacy": privacy_label(self.cfg.federated.dp),
                                "bytes_up": p["bytes_up"],
                                "bytes_down": p["bytes_down"], "seconds": time.perf_counter() - self._t0,
                                "replies": p["replies"], "failures": p["failures"],
                                "budget_spent": p["budget_spent"], "train_loss": p["train_loss"],
                                "failed": p["failed"]})
            save_checkpoint(self.run_dir, server_round, global_arrays, {}, self.rounds)
            write_fed_outputs(self.cfg, self.rounds, self.run_dir)
            logger.info("round %d: accuracy %.4f, replies %d, failures %d", server_round, ev["accuracy"],
                        p["replies"], p["failures"])
        write_rounds(self.run_dir, self.rounds, self.initial)
        return MetricRecord({"accuracy": ev["accuracy"], "loss": ev["loss"]})
