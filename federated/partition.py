"""Seeded data partitioning over clients: IID and Dirichlet(alpha) label skew.

Pure functions of labels and a seed, so the Flower modes and the in-process loop get the same
split for a given ``(partition_id, num_partitions)``.

Decision: flwr-datasets is not used. Its partitioners (``IidPartitioner``,
``DirichletPartitioner``) work on Hugging Face ``datasets.Dataset`` objects and pull the whole HF
``datasets`` stack, while adaptsim's data are in-memory uint8 tensors. The Dirichlet split below
follows the same recipe as flwr-datasets' ``DirichletPartitioner`` (per class, proportions drawn
from ``Dir(alpha * 1_N)``; redrawn until every partition has ``min_partition_size`` samples);
it does not implement that class's ``self_balancing`` option.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["iid_partition", "dirichlet_partition", "partition_indices", "label_histogram"]


def iid_partition(n: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffles ``range(n)`` and splits it into ``num_partitions`` near-equal parts.

    Args:
        n: number of samples.
        num_partitions: number of clients.
        seed: RNG seed.

    Returns:
        ``num_partitions`` sorted index arrays, disjoint, covering ``range(n)``.

    Raises:
        ValueError: if ``num_partitions`` is < 1 or larger than ``n``.
    """
    if num_partitions < 1 or num_partitions > n:
        raise ValueError(f"num_partitions must be in [1, {n}], got {num_partitions}")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_partitions)]


def dirichlet_partition(labels: Sequence[int] | np.ndarray, num_partitions: int, alpha: float,
                        seed: int, min_partition_size: int = 2, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed split: for each class, its samples go to clients in ``Dir(alpha)`` proportions.

    Args:
        labels: (N,) integer labels.
        num_partitions: number of clients.
        alpha: Dirichlet concentration (small = strong skew, large = close to IID).
        seed: RNG seed (the whole result is a function of labels and seed).
        min_partition_size: redraw until every partition holds at least this many samples.
        max_tries: give up after this many draws.

    Returns:
        ``num_partitions`` sorted index arrays, disjoint, covering all samples.

    Raises:
        ValueError: on bad arguments, or if no draw meets ``min_partition_size``.
    """
    labels = np.asarray(labels)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_partition_size * num_partitions > len(labels):
        raise ValueError(f"min_partition_size={min_partition_size} x {num_partitions} partitions "
                         f"exceeds {len(labels)} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for attempt in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_partitions, alpha))  # (N,)
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        sizes = [len(p) for p in parts]
        if min(sizes) >= min_partition_size:
            if attempt:
                log.debug("dirichlet_partition: %d redraws to reach min size %d", attempt, min_partition_size)
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"dirichlet_partition: no draw in {max_tries} tries gave every partition "
                     f">= {min_partition_size} samples (alpha={alpha}); lower min_partition_size or raise alpha")


def partition_indices(labels: Sequence[int] | np.ndarray, num_partitions: int, method: str, *,
                      alpha: float = 0.5, seed: int = 0, min_partition_size: int = 2) -> list[np.ndarray]:
    """Dispatches to :func:`iid_partition` or :func:`dirichlet_partition`.

    Args:
        labels: (N,) labels.
        num_partitions: number of clients.
        method: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration.
        seed: RNG seed.
        min_partition_size: minimum samples per partition (Dirichlet).

    Returns:
        The index arrays.

    Raises:
        ValueError: on an unknown method.
    """
    if method == "iid":
        return iid_partition(len(labels), num_partitions, seed)
    if method == "dirichlet":
        return dirichlet_partition(labels, num_partitions, alpha, seed, min_partition_size)
    raise ValueError(f"partition must be 'iid' or 'dirichlet', got {method!r}")


def label_histogram(labels: Sequence[int] | np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """(num_partitions, n_classes) count matrix of the labels in each partition."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])
