"""In-process federated simulation: a sequential round loop over the same pure functions.

Paper: FFA-LoRA, "Improving LoRA in Privacy-preserving Federated Learning", Sun et al., ICLR 2024,
https://arxiv.org/abs/2403.12313.

Each round: sample ``clients_per_round`` clients (seeded by ``seed`` and the round), send them
the global arrays (bytes down), run :func:`adaptsim.federated.task.client_fit` for each (bytes
up), FedAvg the replies weighted by examples, evaluate on the global test set, checkpoint. The
Flower modes (simulation engine, deployment) run the same ``client_fit``/``fedavg``/``evaluate``
and write the same round metrics. A client that raises counts as a failure; the round completes
if at least ``min_replies`` replies arrived.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from adaptsim.cl.rundir import dumps_json, loads_json
from adaptsim.federated.aggregation import fedavg
from adaptsim.federated.comm import RoundTraffic
from adaptsim.federated.config import FedExperimentConfig
from adaptsim.federated.privacy import NodeDPStore, mirror_epsilon, privacy_label
from adaptsim.federated.task import client_dataset, client_fit, evaluate, get_model, initial_arrays, load_data

log = logging.getLogger(__name__)

__all__ = ["run_inprocess", "sample_clients", "RoundReplies", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint"]


class RoundReplies:
    """What one round's clients sent back: arrays, traffic, ε, losses, budget-spent clients.

    Shared by the in-process loops (LoRA/FFA-LoRA here, FedNano in ``fednano/loop.py``).
    """

    def __init__(self) -> None:
        self.traffic = RoundTraffic()
        self.results: list[tuple[dict, int]] = []
        self.failures = 0
        self.spent: list[int] = []
        self.losses: list[tuple[float, int]] = []

    def add(self, k: int, out: dict, n: int, met: dict, last_eps: dict[str, float]) -> None:
        """Record client ``k``'s reply (``out`` arrays over ``n`` examples, metrics ``met``)."""
        self.traffic.sent_up(str(k), out)
        self.results.append((out, n))
        last_eps[str(k)] = mirror_epsilon(last_eps.get(str(k)), float(met["epsilon"]))  # audit trail
        if met["budget_spent"]:
            self.spent.append(k)
        elif n > 0:
            self.losses.append((met["loss"], n))

    def check(self, round_idx: int, min_replies: int) -> None:
        """Raise when fewer than ``min_replies`` replies arrived in round ``round_idx``."""
        if len(self.results) < min_replies:
            raise RuntimeError(f"round {round_idx + 1}: {len(self.results)} replies < min_replies={min_replies}")

    @property
    def has_examples(self) -> bool:
        return any(n > 0 for _, n in self.results)

    @property
    def train_loss(self) -> float:
        """Example-weighted mean training loss of the clients that trained (nan if none)."""
        if not self.losses:
            return math.nan
        return sum(l * n for l, n in self.losses) / sum(n for _, n in self.losses)


def sample_clients(num_clients: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """Seeded client sample of round ``round_idx`` (sorted ids; all clients when equal)."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_idx])
    return sorted(int(k) for k in rng.choice(num_clients, per_round, replace=False))


def save_checkpoint(run_dir: Path, round_no: int, global_arrays: dict[str, np.ndarray],
                    client_states: dict[str, dict | None], rounds: list[dict]) -> Path:
    """Writes ``checkpoints/round_NNN.npz`` (global arrays) and ``round_NNN.json`` (states, metrics)."""
    ck = Path(run_dir) / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    np.savez(ck / f"round_{round_no:03d}.npz", **global_arrays)
    payload = {"round": round_no, "client_states": client_states, "rounds": rounds}
    path = ck / f"round_{round_no:03d}.json"
    path.write_text(dumps_json(payload, indent=None))
    return path


def latest_checkpoint(run_dir: Path) -> int | None:
    """The last round with a complete checkpoint in ``run_dir`` (or None)."""
    done = sorted(int(p.stem.split("_")[1]) for p in (Path(run_dir) / "checkpoints").glob("round_*.json"))
    return done[-1] if done else None


def load_checkpoint(run_dir: Path, round_no: int) -> tuple[dict[str, np.ndarray], dict, list[dict]]:
    """Inverse of :func:`save_checkpoint`: ``(global_arrays, client_states, rounds)``."""
    ck = Path(run_dir) / "checkpoints"
    with np.load(ck / f"round_{round_no:03d}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    payload = loads_json((ck / f"round_{round_no:03d}.json").read_text())
    return arrays, payload["client_states"], payload["rounds"]


def run_inprocess(cfg: FedExperimentConfig, run_dir: Path | None = None, *, resume: bool = False,
                  stop_after: int | None = None,
                  on_round: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Runs the federated rounds sequentially in this process.

    Args:
        cfg: the experiment (``federated.mode`` is not checked here).
        run_dir: where checkpoints go (``None``: no checkpoints).
        resume: continue from the last checkpoint in ``run_dir``.
        stop_after: stop after this many rounds in total (simulates a killed run).
        on_round: called with all round metrics so far after every round.

    Returns:
        The round metrics: ``round, accuracy, loss, epsilon {client: eps}, bytes_up, bytes_down,
        seconds, replies, failures, budget_spent [clients], train_loss``.

    Raises:
        RuntimeError: if a round gets fewer than ``min_replies`` replies.
    """
    fed = cfg.federated
    model = get_model(cfg)
    _, test = load_data(cfg)
    parts = [client_dataset(cfg, k, fed.num_clients)[0] for k in range(fed.num_clients)]
    global_arrays = initial_arrays(cfg)
    states: dict[str, dict | None] = {str(k): None for k in range(fed.num_clients)}
    rounds: list[dict] = []
    start = 0
    if resume and run_dir is not None and (last := latest_checkpoint(run_dir)) is not None:
        global_arrays, states, rounds = load_checkpoint(run_dir, last)
        start = last
        log.info("resuming %s after round %d", run_dir, last)
    no_dp = math.inf if not fed.dp.enabled else 0.0
    last_eps = {str(k): no_dp for k in range(fed.num_clients)}
    if rounds:
        last_eps.update(rounds[-1]["epsilon"])
    end = fed.rounds if stop_after is None else min(fed.rounds, stop_after)
    for r in range(start, end):
        t0 = time.perf_counter()
        replies = RoundReplies()
        for k in sample_clients(fed.num_clients, fed.clients_per_round, fed.seed, r):
            cid = str(k)
            replies.traffic.sent_down(cid, global_arrays)
            try:
                store = (NodeDPStore(Path(run_dir) / "nodes" / cid, Path(run_dir).name, k)
                         if run_dir is not None and fed.dp.enabled else None)
                out, n, met, states[cid] = client_fit(model, global_arrays, parts[k], cfg, states[cid],
                                                      client_id=k, round_idx=r, node_store=store)
            except Exception:  # a crashed client is a failed reply, not a failed round
                log.exception("round %d: client %d failed", r + 1, k)
                replies.failures += 1
                continue
            replies.add(k, out, n, met, last_eps)
        replies.check(r, fed.min_replies)
        if replies.has_examples:
            global_arrays = fedavg(replies.results)
        else:
            log.warning("round %d: every sampled client has spent its budget; model unchanged", r + 1)
        ev = evaluate(model, global_arrays, test, fed.eval_batch_size)
        rounds.append({"round": r + 1, "accuracy": ev["accuracy"], "loss": ev["loss"],
                       "epsilon": dict(last_eps), **replies.traffic.totals(),
                       "seconds": time.perf_counter() - t0, "replies": len(replies.results),
                       "failures": replies.failures, "budget_spent": replies.spent,
                       "train_loss": replies.train_loss, "privacy": privacy_label(fed.dp)})
        log.info("round %d/%d: accuracy %.4f, max epsilon %.3g, up %d B, down %d B, %.1f s",
                 r + 1, fed.rounds, ev["accuracy"], max(last_eps.values()), rounds[-1]["bytes_up"],
                 rounds[-1]["bytes_down"], rounds[-1]["seconds"])
        if run_dir is not None:
            save_checkpoint(run_dir, r + 1, global_arrays, states, rounds)
        if on_round is not None:
            on_round(rounds)
    return rounds
