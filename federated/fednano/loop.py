"""FedNano's in-process round loop (``federated.mode: inprocess``, ``method: fednano``).

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang et al., arXiv 2506.14824 (https://arxiv.org/abs/2506.14824).

Same round structure, client sampling, checkpoints and round metrics as
:func:`adaptsim.federated.local_sim.run_inprocess`, with FedNano's pieces: the per-process
:class:`~.system.FedNanoSystem`, split-training clients (:func:`.task.client_fit`), FedAvg or
Fisher merging (:func:`.fisher.aggregate`) and extra traffic keys, kept apart from the arrays
Flower would carry (``bytes_up``/``bytes_down``: adapters, plus the Fisher with Fisher merging):

- ``bytes_activations_up`` / ``bytes_gradients_down``: what split training moved (tokens and
  answer ids up; token gradients and losses down), including the Fisher pass;
- ``bytes_fisher_up``: the part of ``bytes_up`` that is Fisher;
- ``bytes_model_download``: one-time downloads of clients seen for the first time (connector
  and embeddings; the whole server model too for the PEFT baseline).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

from adaptsim.federated.config import FedExperimentConfig
from adaptsim.federated.fednano.fisher import aggregate
from adaptsim.federated.fednano.system import get_system
from adaptsim.federated.fednano.task import client_fit, evaluate
from adaptsim.federated.local_sim import RoundReplies, sample_clients, save_checkpoint

__all__ = ["run_inprocess_fednano", "SPLIT_KEYS"]

log = logging.getLogger(__name__)

SPLIT_KEYS = ("bytes_activations_up", "bytes_gradients_down", "split_round_trips", "bytes_fisher_up")


def run_inprocess_fednano(cfg: FedExperimentConfig, run_dir: Path | None = None,
                          on_round: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Runs the FedNano rounds sequentially in this process.

    Args:
        cfg: the experiment (``federated.method == "fednano"``).
        run_dir: where checkpoints go (``None``: none).
        on_round: called with all round metrics so far after every round.

    Returns:
        The round metrics (CORE's keys plus :data:`SPLIT_KEYS`, ``bytes_model_download`` and
        per-question accuracies ``accuracy_q0..q2``).

    Raises:
        RuntimeError: if a round gets fewer than ``min_replies`` replies.
    """
    fed = cfg.federated
    system = get_system(cfg)
    global_arrays = dict(system.initial)
    states: dict[str, dict | None] = {str(k): None for k in range(fed.num_clients)}
    seen: set[int] = set()
    rounds: list[dict] = []
    last_eps = {str(k): (math.inf if not fed.dp.enabled else 0.0) for k in range(fed.num_clients)}
    for r in range(fed.rounds):
        t0 = time.perf_counter()
        replies = RoundReplies()
        split = dict.fromkeys(SPLIT_KEYS, 0)
        download = 0
        for k in sample_clients(fed.num_clients, fed.clients_per_round, fed.seed, r):
            cid = str(k)
            if k not in seen:
                download += system.download_bytes()
                seen.add(k)
            replies.traffic.sent_down(cid, global_arrays)
            try:
                out, n, met, states[cid] = client_fit(system, global_arrays, system.clients[k], cfg, states[cid],
                                                      client_id=k, round_idx=r)
            except (ValueError, FloatingPointError, RuntimeError) as exc:
                if isinstance(exc, ValueError) and "federated." in str(exc):
                    raise  # a config error, not a client failure
                log.exception("round %d: client %d failed", r + 1, k)
                replies.failures += 1
                continue
            replies.add(k, out, n, met, last_eps)
            for key in SPLIT_KEYS:
                split[key] += int(met[key])
        replies.check(r, fed.min_replies)
        if replies.has_examples:
            global_arrays = aggregate(replies.results, fed.fednano.aggregation, fed.fednano.fisher_eps)
        ev = evaluate(system, global_arrays, batch_size=fed.eval_batch_size)
        rounds.append({"round": r + 1, "accuracy": ev["accuracy"], "loss": ev["loss"],
                       **{k: ev[k] for k in ev if k.startswith("accuracy_q")},
                       "epsilon": dict(last_eps), **replies.traffic.totals(), **split,
                       "bytes_model_download": download, "seconds": time.perf_counter() - t0,
                       "replies": len(replies.results), "failures": replies.failures,
                       "budget_spent": replies.spent, "train_loss": replies.train_loss})
        log.info("fednano round %d/%d: accuracy %.4f, adapters up %d B, activations up %d B, %.1f s", r + 1,
                 fed.rounds, ev["accuracy"], rounds[-1]["bytes_up"], split["bytes_activations_up"],
                 rounds[-1]["seconds"])
        if run_dir is not None:
            save_checkpoint(run_dir, r + 1, global_arrays, states, rounds)
        if on_round is not None:
            on_round(rounds)
    return rounds
