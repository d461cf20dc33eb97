"""The in-process round engine: every federated method, rounds run sequentially in this process.

Each round: sample ``clients_per_round`` clients (seeded by ``seed`` and the round), send them
the global arrays (bytes down), run the method's ``client_fit`` for each (bytes up), aggregate
and evaluate through the method, checkpoint (:class:`adaptsim.federated.rounds.RoundBook`, shared
with the Flower strategy adapter, so both write the same round record). A client that raises
counts as a failure (a ``ConfigError`` ends the run); the round completes if at least
``min_replies`` replies arrived. A run continues from its last checkpoint with ``resume``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from adaptsim.cl.config import ConfigError
from adaptsim.cl.rundir import dumps_json, loads_json
from adaptsim.federated.config import FedExperimentConfig
from adaptsim.federated.privacy import NodeDPStore

log = logging.getLogger(__name__)

__all__ = ["run_inprocess", "sample_clients", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]


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
    """Runs the federated rounds of any registered method sequentially in this process.

    Args:
        cfg: the experiment (``federated.mode`` is not checked here).
        run_dir: where checkpoints (and in-process node DP state) go (``None``: none).
        resume: continue from the last checkpoint in ``run_dir``.
        stop_after: stop after this many rounds in total (simulates a killed run).
        on_round: called with all round records so far after every round.

    Returns:
        The round records (:mod:`adaptsim.federated.rounds`).

    Raises:
        RuntimeError: if a round gets fewer than ``min_replies`` replies.
        ConfigError: from the method's checks or a client's.
    """
    from adaptsim.federated.methods import fed_method
    from adaptsim.federated.rounds import RoundBook

    fed = cfg.federated
    method = fed_method(cfg)
    method.check(cfg)
    global_arrays = method.initial_arrays()
    states: dict[str, dict | None] = {str(k): None for k in range(fed.num_clients)}
    rounds: list[dict] = []
    start = 0
    if resume and run_dir is not None and (last := latest_checkpoint(run_dir)) is not None:
        global_arrays, states, rounds = load_checkpoint(run_dir, last)
        start = last
        log.info("resuming %s after round %d", run_dir, last)
    book = RoundBook(cfg, method, run_dir, rounds, seen={int(k) for k, s in states.items() if s is not None},
                     on_round=on_round)
    end = fed.rounds if stop_after is None else min(fed.rounds, stop_after)
    for r in range(start, end):
        replies = book.open(r, sample_clients(fed.num_clients, fed.clients_per_round, fed.seed, r))
        for k in replies.sampled:
            cid = str(k)
            replies.sent(k, global_arrays)
            store = (NodeDPStore(Path(run_dir) / "nodes" / cid, Path(run_dir).name, k)
                     if run_dir is not None and fed.dp.enabled else None)
            try:
                out, n, met, states[cid] = method.client_fit(global_arrays, k, states[cid], round_idx=r,
                                                             node_store=store)
            except ConfigError:
                raise
            except Exception as exc:  # a crashed client is a failed reply, not a failed round
                replies.fail(k, f"{type(exc).__name__}: {exc}", exc_info=True)
                continue
            replies.add(k, out, n, met)
        global_arrays = book.aggregate(replies, global_arrays)
        book.close(replies, global_arrays, states)
    return book.rounds
