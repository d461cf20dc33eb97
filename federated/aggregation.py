"""Server aggregation (FedAvg weighted by examples) and LoRA weight-delta helpers.

Paper: FFA-LoRA, Sun et al., ICLR 2024, https://arxiv.org/abs/2403.12313. With A frozen and
shared, ``sum_k p_k s B_k A = s (sum_k p_k B_k) A``: FedAvg of B is the average of the clients'
weight deltas. With A trained (vanilla LoRA) ``mean(B_k) mean(A_k) != mean(B_k A_k)``.
Pure numpy; no torch, no Flower.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["fedavg", "lora_pairs", "delta_w", "mean_delta_w"]


def fedavg(results: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Weighted average of the clients' arrays, weights = number of examples.

    Replies with ``num_examples == 0`` (e.g. a client whose privacy budget is spent) carry no
    weight and are skipped.

    Args:
        results: ``[(arrays, num_examples), ...]``; every entry with a positive weight must hold
            the same names and shapes.

    Returns:
        name -> averaged array (float64 accumulation, cast back to the input dtype).

    Raises:
        ValueError: if no reply has a positive weight, or names/shapes differ.
    """
    used = [(a, n) for a, n in results if n > 0]
    if not used:
        raise ValueError("fedavg: no reply with num_examples > 0")
    total = float(sum(n for _, n in used))
    keys = set(used[0][0])
    out: dict[str, np.ndarray] = {}
    for arrays, _ in used:
        if set(arrays) != keys:
            raise ValueError(f"fedavg: replies hold different arrays: {sorted(keys ^ set(arrays))}")
    for k in sorted(keys):
        ref = np.asarray(used[0][0][k])
        acc = np.zeros(ref.shape, dtype=np.float64)
        for arrays, n in used:
            a = np.asarray(arrays[k])
            if a.shape != ref.shape:
                raise ValueError(f"fedavg: array {k!r} has shape {a.shape} vs {ref.shape}")
            acc += (n / total) * a
        out[k] = acc.astype(ref.dtype)
    return out


def lora_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs ``...lora_A[_i]`` with ``...lora_B[_i]`` names: ``[(a_name, b_name), ...]``."""
    pairs = []
    for n in sorted(names):
        stem, sep, tail = n.rpartition("lora_B")
        if sep and (tail == "" or tail.startswith("_")):
            pairs.append((f"{stem}lora_A{tail}", n))
    return pairs


def delta_w(arrays: Mapping[str, np.ndarray], scaling: float,
            frozen: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Weight deltas ``s * B @ A`` of every LoRA pair in ``arrays``.

    Args:
        arrays: holds ``...lora_B*`` (out, r) and, for vanilla LoRA, ``...lora_A*`` (r, in).
        scaling: alpha / r.
        frozen: A matrices not in ``arrays`` (FFA-LoRA's shared frozen A).

    Returns:
        B name -> (out, in) float64 delta.

    Raises:
        KeyError: if an A matrix is in neither mapping.
    """
    src = dict(frozen or {})
    src.update(arrays)
    return {b: scaling * (np.asarray(src[b], np.float64) @ np.asarray(src[a], np.float64))
            for a, b in lora_pairs(list(src))}


def mean_delta_w(results: Sequence[tuple[Mapping[str, np.ndarray], int]], scaling: float,
                 frozen: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Example-weighted mean of the clients' weight deltas (the target FedAvg should reach)."""
    used = [(a, n) for a, n in results if n > 0]
    total = float(sum(n for _, n in used))
    out: dict[str, np.ndarray] = {}
    for arrays, n in used:
        for k, d in delta_w(arrays, scaling, frozen).items():
            out[k] = out.get(k, 0.0) + (n / total) * d
    return out
