"""What both round engines share: a round's replies, the server's bookkeeping, the round record.

The in-process engine (:func:`adaptsim.federated.local_sim.run_inprocess`) and the Flower
strategy adapter (:class:`adaptsim.federated.flower_strategy.FedMethodStrategy`) differ only in
how arrays reach the clients; both fill a :class:`RoundReplies` and hand it to one
:class:`RoundBook`, which applies the ``min_replies`` rule, keeps each client's ε audit trail,
aggregates through the method, evaluates, builds the round record and writes the checkpoint.

Round record keys (every method): ``round, accuracy, loss, epsilon {client: eps}, privacy,
bytes_up, bytes_down, seconds, replies, failures, failed [{client, reason}], budget_spent
[clients], train_loss``, then the method's :meth:`~adaptsim.federated.methods.base.FedMethod.round_metrics`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from adaptsim.federated.comm import RoundTraffic
from adaptsim.federated.privacy import mirror_epsilon, privacy_label

__all__ = ["RoundReplies", "RoundBook"]

log = logging.getLogger(__name__)


class RoundReplies:
    """What one round's clients sent back: arrays, metrics, traffic and failures.

    Args:
        round_no: the 1-based server round.
        sampled: the clients sampled this round.
        first_time: those of them sampled for the first time in this run.
    """

    def __init__(self, round_no: int, sampled: list[int], first_time: list[int] | None = None) -> None:
        self.round_no, self.sampled, self.first_time = round_no, list(sampled), list(first_time or [])
        self.traffic = RoundTraffic()
        self.results: list[tuple[dict, int]] = []
        self.metrics: list[tuple[int, dict]] = []
        self.failed: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def sent(self, k: int, arrays: Mapping[str, np.ndarray]) -> None:
        """The global arrays went down to client ``k``."""
        self.traffic.sent_down(str(k), arrays)

    def add(self, k: int, arrays: dict, n: int, metrics: Mapping[str, Any]) -> None:
        """Client ``k``'s reply: ``arrays`` over ``n`` examples, with its metrics."""
        self.traffic.sent_up(str(k), arrays)
        self.results.append((arrays, int(n)))
        self.metrics.append((int(k), dict(metrics)))

    def fail(self, k: int, reason: str, exc_info: bool = False) -> None:
        """Client ``k`` sent no usable reply (logged; the round goes on if ``min_replies`` allow)."""
        self.failed.append({"client": int(k), "reason": reason})
        log.warning("round %d: client %s failed (%s); completing the round with the replies it has",
                    self.round_no, k, reason, exc_info=exc_info)

    @property
    def failures(self) -> int:
        return len(self.failed)

    @property
    def spent(self) -> list[int]:
        """Clients whose privacy budget is spent (they did not train)."""
        return sorted(k for k, m in self.metrics if int(m.get("budget_spent", 0)))

    @property
    def has_examples(self) -> bool:
        return any(n > 0 for _, n in self.results)

    @property
    def train_loss(self) -> float:
        """Example-weighted mean training loss of the clients that trained (nan if none)."""
        used = [(float(m["loss"]), n) for (k, m), (_, n) in zip(self.metrics, self.results)
                if n > 0 and not int(m.get("budget_spent", 0))]
        return sum(l * n for l, n in used) / sum(n for _, n in used) if used else math.nan

    def sum_metric(self, key: str) -> float:
        """Sum of a numeric client metric over the replies (0 when none reported it)."""
        return sum(m.get(key, 0) for _, m in self.metrics)

    def check(self, min_replies: int) -> None:
        """Raises when fewer than ``min_replies`` replies arrived.

        Raises:
            RuntimeError: ``round R: N replies < min_replies=M``.
        """
        if len(self.results) < min_replies:
            raise RuntimeError(f"round {self.round_no}: {len(self.results)} replies < min_replies={min_replies}")


class RoundBook:
    """The server's bookkeeping across rounds, the same for every engine and method.

    Args:
        cfg: the experiment.
        method: its :class:`~adaptsim.federated.methods.base.FedMethod`.
        run_dir: where ``checkpoints/round_NNN.{npz,json}`` go (``None``: nowhere).
        rounds: round records so far (a resumed run).
        seen: clients sampled before (a resumed run).
        on_round: called with all round records after every round (writes ``metrics.json`` etc.).
    """

    def __init__(self, cfg: Any, method: Any, run_dir: Path | None = None, rounds: list[dict] | None = None,
                 seen: set[int] | None = None, on_round: Callable[[list[dict]], None] | None = None) -> None:
        self.cfg, self.method, self.run_dir, self.on_round = cfg, method, run_dir, on_round
        self.rounds: list[dict] = list(rounds or [])
        self.seen: set[int] = set(seen or ())
        fed = cfg.federated
        self.epsilon = {str(k): (math.inf if not fed.dp.enabled else 0.0) for k in range(fed.num_clients)}
        if self.rounds:
            self.epsilon.update(self.rounds[-1]["epsilon"])

    def open(self, round_idx: int, sampled: list[int]) -> RoundReplies:
        """A new round (0-based ``round_idx``) with its sampled clients."""
        new = [k for k in sampled if k not in self.seen]
        self.seen.update(sampled)
        return RoundReplies(round_idx + 1, sampled, new)

    def aggregate(self, replies: RoundReplies, global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global arrays: ``min_replies`` rule, ε audit trail, then the method's aggregation.

        Raises:
            RuntimeError: if fewer than ``federated.min_replies`` replies arrived.
        """
        dp = self.cfg.federated.dp.enabled
        for k, m in replies.metrics:  # with DP the audit trail never drops below what a client reported
            eps = float(m["epsilon"])
            self.epsilon[str(k)] = mirror_epsilon(self.epsilon.get(str(k)), eps) if dp else eps
        replies.check(self.cfg.federated.min_replies)
        if not replies.has_examples:
            log.warning("round %d: every replying client has spent its budget; model unchanged", replies.round_no)
            return dict(global_arrays)
        return self.method.aggregate(replies.results, global_arrays)

    def close(self, replies: RoundReplies, global_arrays: Mapping[str, np.ndarray],
              client_states: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Evaluates the new global arrays, appends the round record, checkpoints, calls ``on_round``."""
        from adaptsim.federated.local_sim import save_checkpoint

        ev = self.method.evaluate(global_arrays)
        record = {"round": replies.round_no, "accuracy": ev["accuracy"], "loss": ev["loss"],
                  "epsilon": dict(self.epsilon), "privacy": privacy_label(self.cfg.federated.dp),
                  **replies.traffic.totals(), "seconds": time.perf_counter() - replies.t0,
                  "replies": len(replies.results), "failures": replies.failures, "failed": list(replies.failed),
                  "budget_spent": replies.spent, "train_loss": replies.train_loss,
                  **self.method.round_metrics(replies, ev)}
        self.rounds.append(record)
        log.info("%s round %d/%d: accuracy %.4f, max epsilon %.3g, up %d B, down %d B, replies %d, failures %d, "
                 "%.1f s", self.cfg.federated.method, replies.round_no, self.cfg.federated.rounds, ev["accuracy"],
                 max(self.epsilon.values()), record["bytes_up"], record["bytes_down"], record["replies"],
                 record["failures"], record["seconds"])
        if self.run_dir is not None:
            save_checkpoint(self.run_dir, replies.round_no, dict(global_arrays), dict(client_states or {}),
                            self.rounds)
        if self.on_round is not None:
            self.on_round(self.rounds)
        return record
