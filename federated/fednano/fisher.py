"""FedNano aggregation, pure functions over named numpy arrays: FedAvg and diagonal-Fisher merging.

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang et al., arXiv 2506.14824 (https://arxiv.org/abs/2506.14824). The paper's exact
weighting is not public; this is standard Fisher merging (Matena & Raffel, "Merging Models with
Fisher-Weighted Averaging", NeurIPS 2022, https://arxiv.org/abs/2111.09832) with example counts:

    theta* = sum_k (n_k F_k + eps) * theta_k / sum_k (n_k F_k + eps)

``eps`` is part of each client's *weight*, in the numerator and the denominator alike (Matena &
Raffel's floor), so an entry whose Fisher is near zero on every client becomes the plain mean of
the clients' values instead of shrinking toward 0 (an earlier version added ``eps`` to the
denominator only, which pulled such entries to zero). Entries whose Fisher is exactly zero on
every client take the FedAvg value (``fallback="fedavg"``, the default; ``"none"`` keeps the
formula's unweighted mean). A client uploads its Fisher next to its adapters, under the prefix
:data:`FISHER_PREFIX`; those bytes are counted like any other upload.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["FISHER_PREFIX", "fedavg_arrays", "fisher_merge", "split_fisher", "with_fisher", "aggregate"]

FISHER_PREFIX = "fisher::"


def _check(params: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> None:
    if not params:
        raise ValueError("aggregation needs at least one client result")
    if len(params) != len(weights):
        raise ValueError(f"{len(params)} parameter sets but {len(weights)} weights")
    names = list(params[0])
    for p in params[1:]:
        if list(p) != names:
            raise ValueError(f"clients sent different parameter names: {sorted(p)} vs {sorted(names)}")


def fedavg_arrays(params: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int]) -> dict[str, np.ndarray]:
    """Example-weighted mean ``sum_k n_k theta_k / sum_k n_k`` (float64 accumulation, float32 out).

    Raises:
        ValueError: on no clients, mismatched names, or a zero total of examples.
    """
    _check(params, num_examples)
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError("fedavg: the clients report zero examples in total")
    return {k: (sum(n * np.asarray(p[k], np.float64) for p, n in zip(params, num_examples)) / total).astype(np.float32)
            for k in params[0]}


def fisher_merge(params: Sequence[Mapping[str, np.ndarray]], fishers: Sequence[Mapping[str, np.ndarray]],
                 num_examples: Sequence[int], eps: float = 1e-8, fallback: str = "fedavg") -> dict[str, np.ndarray]:
    """Diagonal-Fisher merging ``sum_k w_k theta_k / sum_k w_k``, ``w_k = n_k F_k + eps``, per entry.

    Args:
        params: per client, name -> parameter array.
        fishers: per client, name -> diagonal Fisher (same names and shapes, >= 0).
        num_examples: per client, n_k.
        eps: floor added to every client's weight (> 0).
        fallback: ``"fedavg"`` (default): entries whose Fisher is zero on every client take the
            example-weighted FedAvg value; ``"none"``: the formula as is (there: the unweighted
            mean of the clients' values).

    Returns:
        name -> merged array (float32).

    Raises:
        ValueError: on mismatched names/shapes, a negative Fisher, eps <= 0 or a bad fallback.
    """
    _check(params, num_examples)
    if len(fishers) != len(params):
        raise ValueError(f"{len(params)} parameter sets but {len(fishers)} Fisher sets")
    if not eps > 0:
        raise ValueError(f"fisher_eps must be > 0, got {eps}")
    if fallback not in ("fedavg", "none"):
        raise ValueError(f"fallback must be 'fedavg' or 'none', got {fallback!r}")
    out = {}
    avg = fedavg_arrays(params, num_examples) if fallback == "fedavg" else None
    for k in params[0]:
        num = np.zeros(np.shape(params[0][k]), np.float64)
        den = np.zeros_like(num)
        mass = np.zeros_like(num)
        for p, f, n in zip(params, fishers, num_examples):
            fk = np.asarray(f[k], np.float64)
            if fk.shape != num.shape:
                raise ValueError(f"Fisher of {k!r} has shape {fk.shape}, parameter {num.shape}")
            if (fk < 0).any():
                raise ValueError(f"Fisher of {k!r} has negative entries")
            w = n * fk + eps
            num += w * np.asarray(p[k], np.float64)
            den += w
            mass += fk
        merged = num / den
        if avg is not None:
            merged = np.where(mass > 0, merged, avg[k])
        out[k] = merged.astype(np.float32)
    return out


def with_fisher(params: Mapping[str, np.ndarray], fisher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One upload: the parameters plus their Fisher under ``fisher::<name>``."""
    return {**params, **{FISHER_PREFIX + k: v for k, v in fisher.items()}}


def split_fisher(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inverse of :func:`with_fisher`: ``(parameters, Fisher)`` (Fisher empty if none was sent)."""
    params = {k: v for k, v in arrays.items() if not k.startswith(FISHER_PREFIX)}
    fisher = {k[len(FISHER_PREFIX):]: v for k, v in arrays.items() if k.startswith(FISHER_PREFIX)}
    return params, fisher


def aggregate(results: Sequence[tuple[Mapping[str, np.ndarray], int]], aggregation: str,
              eps: float = 1e-8) -> dict[str, np.ndarray]:
    """Aggregates client uploads ``(arrays, n)``: ``"fedavg"`` or ``"fisher"``.

    Clients with ``n == 0`` (e.g. a spent DP budget) are left out.

    Raises:
        ValueError: for an unknown aggregation, no client with data, or Fisher missing.
    """
    live = [(a, n) for a, n in results if n > 0]
    if not live:
        raise ValueError("aggregate: no client result with examples")
    split = [split_fisher(a) for a, _ in live]
    params, ns = [p for p, _ in split], [n for _, n in live]
    if aggregation == "fedavg":
        return fedavg_arrays(params, ns)
    if aggregation == "fisher":
        fishers = [f for _, f in split]
        if any(set(f) != set(p) for p, f in zip(params, fishers)):
            raise ValueError("fisher aggregation: a client did not send a Fisher for every parameter")
        return fisher_merge(params, fishers, ns, eps)
    raise ValueError(f"federated.fednano.aggregation must be 'fedavg' or 'fisher', got {aggregation!r}")
