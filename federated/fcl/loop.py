"""The in-process federated continual-learning loop.

Setting (issue "Federated continual learning"): N clients; each experience of the global stream
is split across the clients (Dirichlet label skew within the experience, or IID); the experience
runs ``rounds`` federated rounds before the next one arrives. In a round every client runs its
strategy's ``train_experience`` on its share, returns ``shareable_state()``; the server's copy
of the strategy aggregates (``Strategy.aggregate_shared``; by default parameters weighted by
examples, statistics added up exactly) and every client, and the server's own copy of the
strategy, loads the aggregate. Strategies with ``statistics_round`` (MOS) get one more round per
experience without training (``collect_statistics``), for the class statistics under the final
global adapters; the contract is in :mod:`adaptsim.strategies.sharing`. After each experience
the server's strategy is evaluated on the test sets of the experiences so far: the accuracy
matrix ``R[t, k]`` of the centralised runs, and each client's accuracy (:func:`client_accuracy`:
the global model on the classes that client has trained on so far).

DP (``dp``, a :class:`~adaptsim.federated.fcl.dp.FCLPrivacy`): every client trains with the DP
fit of its round, its statistics are noised before upload, a client whose budget is spent leaves
the round; each round record carries every client's epsilon so far.

Checkpoints (``checkpoint``): after each experience the loop hands over :func:`loop_state`:
every client's and the server's ``state_dict()``, the last aggregate, ``R``, the per-client
accuracy, the round records, the per-client seen classes, the RNG states (``rng0``, which every
client call restarts from, and the global torch/numpy/python states that the server's
``end_experience`` and the evaluation continue from) and the DP accountants
(:meth:`~adaptsim.federated.fcl.dp.FCLPrivacy.state_dict`). ``resume=`` that state continues
from the next experience and ends where an uninterrupted run ends.

Supported: all clients join at the start and see every experience in step; a client whose share
of an experience is empty skips training that round (its weight is 0). Late joiners and clients
out of step are not supported yet.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from adaptsim.cl.evaluate import predictions
from adaptsim.cl.scenarios import Experience, Stream
from adaptsim.federated.partition import partition_indices
from adaptsim.strategies.sharing import check_sharing

__all__ = ["split_experience", "client_accuracy", "run_fcl", "loop_state"]

log = logging.getLogger(__name__)


def split_experience(exp: Experience, num_clients: int, method: str, *, alpha: float, seed: int,
                     min_partition_size: int = 1) -> list[Experience]:
    """The clients' shares of ``exp``'s training data (test data stays global).

    Dirichlet draws are redrawn until every client holds ``min_partition_size`` examples; where
    no draw does (strong skew, few examples per experience: alpha 0.1 with 10 clients), the
    first draw is kept and some clients get an empty share, so they sit the experience out.
    """
    y = exp.train.y.numpy()
    try:
        parts = partition_indices(y, num_clients, method, alpha=alpha, seed=seed,
                                  min_partition_size=min(min_partition_size, max(1, len(y) // num_clients)))
    except ValueError as e:
        if method != "dirichlet" or "no draw" not in str(e):
            raise
        parts = partition_indices(y, num_clients, method, alpha=alpha, seed=seed, min_partition_size=0)
        log.info("experience %s: %d of %d clients have no data (alpha=%g)", exp.id,
                 sum(len(p) == 0 for p in parts), num_clients, alpha)
    return [dataclasses.replace(exp, train=exp.train.subset(np.sort(idx))) for idx in parts]


def client_accuracy(preds: list[torch.Tensor], labels: list[torch.Tensor],
                    seen: list[set[int]]) -> list[float]:
    """Each client's accuracy: the global model's top-1 accuracy on the union test set restricted
    to the classes that client has had training data of so far (NaN for a client with none yet).

    Args:
        preds, labels: per evaluated experience, the global model's predictions and the labels.
        seen: per client, the classes of its shares so far.
    """
    p, y = torch.cat(preds), torch.cat(labels)
    out = []
    for classes in seen:
        mask = torch.isin(y, torch.tensor(sorted(classes), dtype=y.dtype))
        out.append(float((p[mask] == y[mask]).float().mean()) if classes and bool(mask.any()) else float("nan"))
    return out


def _rng_states() -> dict[str, Any]:
    import random

    st = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "numpy": (st[0], torch.from_numpy(st[1].copy()), *st[2:]),
           "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_states(st: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(st["torch"].cpu())  # (checkpoints may be loaded onto the run's device)
    n = st["numpy"]
    np.random.set_state((n[0], n[1].cpu().numpy(), *n[2:]))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])


def _global_to_tensors(agg) -> dict[str, torch.Tensor] | None:
    return None if agg is None else {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in agg.to_arrays().items()}


def loop_state(server, clients, agg, R, per_client, records, seen, rng0, dp) -> dict[str, Any]:
    """What :func:`run_fcl` needs to continue after an experience (``torch.load(weights_only=True)``-able).

    Under DP only the accountants travel, never the noise seeds (with ``dp.reproducible`` the
    generators are derived from the run seed, experience, round and client anyway)."""
    return {"server": server.state_dict(), "clients": [c.state_dict() for c in clients],
            "global": _global_to_tensors(agg), "R": R, "client_accuracy": per_client, "rounds": records,
            "seen": [sorted(s) for s in seen], "rng0": rng0, "rng": _rng_states(),
            "dp": dp.state_dict() if dp is not None else None}


def run_fcl(stream: Stream, make_strategy: Callable[[], Any], fit: Callable, *, num_clients: int,
            rounds: int = 1, partition: str = "dirichlet", alpha: float = 0.5, seed: int = 0,
            eval_batch_size: int = 256, on_experience: Callable[[int, dict], None] | None = None,
            dp: Any = None, device: Any = "cpu", checkpoint: Callable[[int, dict], None] | None = None,
            resume: dict[str, Any] | None = None, stop_after: int | None = None) -> dict[str, Any] | None:
    """Runs the stream federated; returns the accuracy matrix, the per-client accuracy after each
    experience, per-round records, the server and client strategies and the last aggregate
    (``global``).

    Args:
        stream: the global stream.
        make_strategy: builds one strategy instance (called ``num_clients + 1`` times: the clients
            and the server; each must start from the same state).
        fit: the ``FitFn`` handed to ``train_experience``.
        num_clients, rounds, partition, alpha, seed: the setting (see the module docstring).
        on_experience: called after each experience with ``(t, record)``.
        dp: an :class:`~adaptsim.federated.fcl.dp.FCLPrivacy` for sample-level DP (``fit`` is then
            replaced by its per-client DP fit on ``device``), or ``None``.
        checkpoint: called after each experience with ``(t, loop_state(...))``.
        resume: a state ``checkpoint`` got: the run continues after its experience.
        stop_after: stop (return ``None``) before experience ``stop_after`` (a killed run).

    Raises:
        ValueError: the strategy does not implement sharing.
    """
    server = make_strategy()
    check_sharing(server.name, server.config)
    clients = [make_strategy() for _ in range(num_clients)]
    if dp is not None:  # the sharing contract: statistics are built from clipped features
        for c in clients:
            c.dp_feature_clip = dp.clip
    # Each client call starts from the torch RNG state a freshly built strategy sees, as a Flower
    # client rebuilt every round does: so lazily built parameters (MOS's first adapter set) start
    # equal on every client, and persisted clients reach exactly what rebuilt ones reach.
    rng0 = torch.get_rng_state()
    T = len(stream)
    evals = [e.eval_view() for e in stream.experiences]
    R: list[list[float]] = []
    agg = None
    records: list[dict[str, Any]] = []
    seen: list[set[int]] = [set() for _ in clients]  # classes each client has trained on so far
    per_client: list[list[float]] = []  # per experience, per client (client_accuracy)
    start = 0
    if resume is not None:
        from adaptsim.strategies.sharing import SharedState

        server.load_state_dict(resume["server"])
        for c, st in zip(clients, resume["clients"], strict=True):
            c.load_state_dict(st)
        if resume["global"] is not None:
            agg = SharedState.from_arrays({k: v.cpu().numpy() for k, v in resume["global"].items()})
        R, per_client, records = list(resume["R"]), list(resume["client_accuracy"]), list(resume["rounds"])
        seen = [set(s) for s in resume["seen"]]
        if dp is not None:
            dp.load_state_dict(resume["dp"])
        start = len(R)
        past = list(stream.experiences[:start])
        server.on_resume(past)
        for k, c in enumerate(clients):
            c.on_resume([split_experience(e, num_clients, partition, alpha=alpha, seed=seed * 1000 + t)[k]
                         for t, e in enumerate(past)])
        rng0 = resume["rng0"].cpu()
        _set_rng_states(resume["rng"])
    for t, exp in enumerate(stream.experiences):
        if t < start:
            continue
        if stop_after is not None and t >= stop_after:
            return None
        shares = split_experience(exp, num_clients, partition, alpha=alpha, seed=seed * 1000 + t)
        sizes = [len(s.train) for s in shares]
        server.begin_experience(exp)
        t0 = time.perf_counter()
        extra = ["statistics"] if getattr(server, "statistics_round", False) else []
        for r, kind in enumerate(["train"] * rounds + extra):
            states, secs = [], []
            for k, (c, share) in enumerate(zip(clients, shares)):
                if len(share.train) == 0:
                    continue
                tc = time.perf_counter()
                torch.set_rng_state(rng0)
                if kind == "train":
                    c.train_experience(share, fit if dp is None else dp.fit_for(k, t, r, device))
                    if dp is not None and dp.skipped(k):
                        continue  # DP budget spent: the client leaves the round
                else:
                    c.collect_statistics(share)
                state = c.shareable_state()
                states.append(state if dp is None else dp.release(k, t, r, state, exp.classes))
                secs.append(time.perf_counter() - tc)
            ts = time.perf_counter()
            if states:  # (under DP every client may have left the round: the global state stays)
                agg = server.aggregate_shared(states)
                for c in [*clients, server]:
                    c.load_shared_state(agg)
            up = [s.nbytes() for s in states]
            down = agg.nbytes() if states else {}
            server_s = time.perf_counter() - ts
            records.append({"experience": t, "round": r, "kind": kind, "clients": len(states),
                            "client_sizes": sizes, "client_seconds": secs, "server_seconds": server_s,
                            "bytes_up": {k: int(sum(u[k] for u in up)) for k in ("arrays", "stats")},
                            "bytes_down": {k: int(v) * len(clients) for k, v in down.items()},
                            **({"epsilon": dp.epsilons()} if dp is not None else {})})
        server.end_experience()
        for k, share in enumerate(shares):
            seen[k].update(int(c) for c in share.train.y.unique().tolist())
        preds = [predictions(server, e, eval_batch_size) for e in evals[: t + 1]]
        labels = [e.test.y for e in evals[: t + 1]]
        row = [float((p == y).float().mean()) if len(y) else float("nan") for p, y in zip(preds, labels)]
        R.append(row + [float("nan")] * (T - len(row)))
        per_client.append(client_accuracy(preds, labels, seen))
        rec = {"experience": t, "accuracy": row, "client_accuracy": per_client[-1],
               "seconds": time.perf_counter() - t0}
        log.info("fcl after experience %d: %s", t, " ".join(f"{a:.3f}" for a in row))
        if checkpoint is not None:
            checkpoint(t, loop_state(server, clients, agg, R, per_client, records, seen, rng0, dp))
        if on_experience is not None:
            on_experience(t, rec)
    return {"R": R, "client_accuracy": per_client, "rounds": records, "server": server, "clients": clients,
            "global": agg}
