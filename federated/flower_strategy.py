"""The one Flower strategy adapter: any registered federated method on Flower's own ``FedAvg``.

:class:`FedMethodStrategy` subclasses :class:`flwr.serverapp.strategy.FedAvg` (Flower 1.41
Message API) and uses only public API: ``Strategy.start`` runs the rounds, messages are built
with ``Message(content, message_type, dst_node_id)``, replies are read through
``Message.has_error`` / ``content`` / ``metadata.src_node_id``. What it adds:

- the ``min_replies`` rule (Flower's ``FedAvg`` aggregates whatever arrived) and failure records
  (``failed``: ``{client, reason}`` for every sampled client without a valid reply: the error a
  reply from its node carried, an error the SuperLink sent on its behalf, or "no reply before the
  round timeout");
- node-bound partitions: a partition is served by the node bound to it at the round-0
  handshake (:func:`adaptsim.federated.server_app.bind_partitions`); a reply's partition is that
  of its ``metadata.src_node_id``, a reply claiming another partition or ``num-examples`` above
  its partition's known size (:meth:`~adaptsim.federated.methods.base.FedMethod.partition_sizes`)
  is a failure record and is not aggregated; refused nodes are never sampled;
- seeded client sampling over partition ids, the same sample as the in-process engine
  (:func:`adaptsim.federated.local_sim.sample_clients`; the node of each partition is learnt in
  the round-0 handshake) instead of Flower's unseeded ``random.sample``.

Everything else is the method's and the shared bookkeeping's
(:class:`adaptsim.federated.rounds.RoundBook`): aggregation, ε audit trail, bytes, central
evaluation (``evaluate_fn``; client-side evaluation is off), the round record, checkpoints and
``metrics.json``, exactly as in process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from adaptsim.federated.flower_glue import arrays_to_record, metrics_from_record, record_to_arrays, write_rounds
from adaptsim.federated.local_sim import sample_clients
from adaptsim.federated.methods import fed_method
from adaptsim.federated.rounds import RoundBook, RoundReplies

__all__ = ["FedMethodStrategy", "SILENT"]

logger = logging.getLogger(__name__)

#: The failure reason of a sampled client that sent nothing before the round timeout.
SILENT = "no reply before the round timeout"


class FedMethodStrategy(FedAvg):
    """Flower's ``FedAvg`` driving a federated method, with ``min_replies`` and failure records.

    Args:
        cfg: the :class:`~adaptsim.federated.config.FedExperimentConfig`.
        node_of_partition: partition id -> Flower node id (from the round-0 handshake).
        run_dir: where round records, checkpoints and plots are written after every round.
        refused: the handshake's refused nodes (``{node, partition, reason}``); a sampled
            partition without a bound node fails with its refusal reason.

    Attributes:
        replies: the current round's :class:`~adaptsim.federated.rounds.RoundReplies`.
        book: the shared :class:`~adaptsim.federated.rounds.RoundBook` (``rounds``, ``epsilon``).
    """

    def __init__(self, cfg: Any, node_of_partition: dict[int, int], run_dir: Path,
                 refused: list[dict] | None = None) -> None:
        fed = cfg.federated
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=fed.clients_per_round,
                         min_available_nodes=fed.clients_per_round)
        self.cfg, self.node_of_partition, self.run_dir = cfg, dict(node_of_partition), Path(run_dir)
        self.method = fed_method(cfg)
        self.book = RoundBook(cfg, self.method, self.run_dir, on_round=self._write)
        self.initial: dict[str, float] = {}
        self.replies: RoundReplies | None = None
        self._targets: list[int] = []
        self._global: dict = {}
        self.refused = list(refused or [])
        self._sizes = self.method.partition_sizes()

    def start_run(self, grid: Grid, timeout: float) -> None:
        """``Strategy.start`` from the method's initial arrays, with central evaluation."""
        self.start(grid, arrays_to_record(self.method.initial_arrays()), num_rounds=self.cfg.federated.rounds,
                   timeout=timeout, evaluate_fn=self.central_evaluate)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Train messages to the sampled clients' nodes (same sample as the in-process engine)."""
        fed = self.cfg.federated
        self.replies = self.book.open(server_round - 1, sample_clients(fed.num_clients, fed.clients_per_round,
                                                                       fed.seed, server_round - 1))
        self._global = record_to_arrays(arrays)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self._targets, msgs = [], []
        for p in self.replies.sampled:
            if p not in self.node_of_partition:
                why = [r["reason"] for r in self.refused if r["partition"] == p]
                self.replies.fail(p, "; ".join(why) or "no connected SuperNode")
                continue
            self._targets.append(p)
            self.replies.sent(p, self._global)
            msgs.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=self.node_of_partition[p]))
        return msgs

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The method's aggregation of the valid replies; failure records for the others.

        Raises:
            RuntimeError: if fewer than ``federated.min_replies`` valid replies arrived.
        """
        replies, rr = list(replies), self.replies
        part_of = {n: p for p, n in self.node_of_partition.items()}
        answered: set[int] = set()
        bad: dict[int, str] = {}
        for m in replies:
            if m.has_error():
                continue
            src = m.metadata.src_node_id
            pid = part_of.get(src)  # the partition is the node's, not what the reply says
            if pid not in self._targets or pid in answered or pid in bad:
                logger.warning("round %d: ignored a reply from node %s (no sampled partition bound to it)",
                               server_round, src)
                continue
            met = metrics_from_record(m.content["metrics"])
            claimed, n = int(met.pop("partition_id", pid)), int(met.pop("num_examples"))
            if claimed != pid:
                bad[pid] = f"node {src} is bound to partition {pid} but its reply says partition {claimed}"
            elif n < 0 or (self._sizes is not None and n > self._sizes[pid]):
                bad[pid] = (f"node {src}: num-examples={n} outside [0, {self._sizes[pid] if self._sizes else 'inf'}]"
                            f", the size of partition {pid}")
            else:
                answered.add(pid)
                rr.add(pid, record_to_arrays(m.content[self.arrayrecord_key]), n, met)
        # an error reply names its client by the node it came from; the SuperLink's own error
        # replies (e.g. "Node Unavailable") come from the SuperLink's node and name no client
        reason_of, unattributed = {}, []
        for m in replies:
            if m.has_error():
                p = part_of.get(m.metadata.src_node_id)
                if p in self._targets and p not in answered and p not in bad and p not in reason_of:
                    reason_of[p] = m.error.reason
                else:
                    unattributed.append(m.error.reason)
        for p in self._targets:
            if p not in answered:
                rr.fail(p, bad.get(p) or reason_of.get(p) or (unattributed.pop(0) if unattributed else SILENT))
        new = self.book.aggregate(rr, self._global)
        return arrays_to_record(new), MetricRecord({"train-loss": rr.train_loss})

    def central_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """``evaluate_fn``: round 0 evaluates the initial arrays; later rounds close the round
        (evaluation, round record, checkpoint, ``metrics.json``, ``flower_rounds.json``)."""
        global_arrays = record_to_arrays(arrays)
        if server_round == 0:
            ev = self.method.evaluate(global_arrays)
            self.initial = {"accuracy": ev["accuracy"], "loss": ev["loss"]}
            write_rounds(self.run_dir, self.book.rounds, self.initial, self.refused)
        else:
            ev = self.book.close(self.replies, global_arrays)
        return MetricRecord({"accuracy": float(ev["accuracy"]), "loss": float(ev["loss"])})

    def _write(self, rounds: list[dict]) -> None:
        from adaptsim.federated.runner import write_fed_outputs

        write_fed_outputs(self.cfg, rounds, self.run_dir)
        write_rounds(self.run_dir, rounds, self.initial, self.refused)
