"""What a strategy shares in federated continual learning, and how the server aggregates it.

A client's strategy returns a :class:`SharedState` from ``Strategy.shareable_state()``:

* ``arrays``: named parameters (adapters, heads), averaged by the server weighted by
  ``weight`` (the client's number of training examples), as FedAvg does;
* ``stats``: :class:`ClassStats`, sufficient statistics of features per class (counts, sums and,
  where a strategy needs covariances, sums of outer products), which the server *adds up*. Means
  and covariances computed from the sums equal those of the pooled data: the aggregation is
  exact, not an average of client means.

``Strategy.load_shared_state(state)`` takes the aggregate back. Statistics are kept in float64;
float32 features summed in float64 are exact unless their exponents span more than about
``53 - 24 - log2(n)`` bits, so the federated sums are bit-identical to the pooled ones on
ordinary features (a test checks it on real features).

Which strategies share what is declared by the class attribute ``Strategy.sharing``
(``None``: no federated support); :func:`check_sharing` refuses the others with the list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["ClassStats", "SharedState", "aggregate_shared", "check_sharing", "class_stats", "sharing_strategies"]


@dataclass
class ClassStats:
    """Per-class sufficient statistics of features (float64).

    Attributes:
        counts: (C,) int64 number of samples per class.
        sums: (C, D) float64 sum of features per class.
        outer: (C, D, D) float64 sum of ``f f^T`` per class, or ``None`` when not needed.
    """

    counts: np.ndarray
    sums: np.ndarray
    outer: np.ndarray | None = None

    def __add__(self, other: "ClassStats") -> "ClassStats":
        if (self.outer is None) != (other.outer is None) or self.sums.shape != other.sums.shape:
            raise ValueError("ClassStats of different shapes or kinds cannot be added")
        outer = None if self.outer is None else self.outer + other.outer
        return ClassStats(self.counts + other.counts, self.sums + other.sums, outer)

    def classes(self) -> list[int]:
        """Classes with at least one sample."""
        return [int(c) for c in np.flatnonzero(self.counts)]

    def means(self) -> np.ndarray:
        """(C, D) float64 class means (rows of empty classes are 0)."""
        n = np.maximum(self.counts, 1)[:, None]
        return self.sums / n

    def covariances(self) -> np.ndarray:
        """(C, D, D) float64 unbiased covariances from the sums (classes with < 2 samples: 0)."""
        if self.outer is None:
            raise ValueError("these ClassStats hold no outer products")
        mu = self.means()
        n = self.counts.astype(np.float64)[:, None, None]
        cov = self.outer - n * np.einsum("cd,ce->cde", mu, mu)
        return np.where(n > 1, cov / np.maximum(n - 1, 1), 0.0)

    def nbytes(self) -> int:
        return int(self.counts.nbytes + self.sums.nbytes + (0 if self.outer is None else self.outer.nbytes))


def class_stats(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, *, outer: bool = False) -> ClassStats:
    """:class:`ClassStats` of ``feats`` (N, D) with integer ``labels`` (N,), in float64."""
    f = feats.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    counts = torch.bincount(y, minlength=n_classes)
    sums = torch.zeros(n_classes, f.shape[1], dtype=torch.float64).index_add_(0, y, f)
    out = None
    if outer:
        out = torch.zeros(n_classes, f.shape[1], f.shape[1], dtype=torch.float64)
        for c in torch.unique(y).tolist():
            fc = f[y == c]
            out[c] = fc.T @ fc
    return ClassStats(counts.numpy().astype(np.int64), sums.numpy(), None if out is None else out.numpy())


@dataclass
class SharedState:
    """What one client shares after a round (see the module docstring)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    weight: int = 0
    stats: dict[str, ClassStats] = field(default_factory=dict)

    def nbytes(self) -> dict[str, int]:
        """Bytes by kind: ``arrays`` and ``stats``."""
        return {"arrays": int(sum(a.nbytes for a in self.arrays.values())),
                "stats": int(sum(s.nbytes() for s in self.stats.values()))}


def aggregate_shared(states: list[SharedState]) -> SharedState:
    """Server side: arrays averaged weighted by ``weight``, statistics added up exactly.

    Raises:
        ValueError: no states, or clients disagree on names / shapes.
    """
    if not states:
        raise ValueError("aggregate_shared needs at least one client state")
    names, kinds = set(states[0].arrays), set(states[0].stats)
    for s in states[1:]:
        if set(s.arrays) != names or set(s.stats) != kinds:
            raise ValueError("clients shared different arrays or statistics")
    total = sum(s.weight for s in states)
    arrays = {}
    for k in sorted(names):
        if total <= 0:
            raise ValueError("arrays need a positive total weight")
        acc = sum(np.asarray(s.arrays[k], np.float64) * s.weight for s in states) / total
        arrays[k] = acc.astype(states[0].arrays[k].dtype)
    stats = {}
    for k in sorted(kinds):
        acc = states[0].stats[k]
        for s in states[1:]:
            acc = acc + s.stats[k]
        stats[k] = acc
    return SharedState(arrays, total, stats)


def sharing_strategies() -> list[str]:
    """Registered strategies that implement sharing (``Strategy.sharing`` set)."""
    from adaptsim.strategies.base import get_strategy, list_strategies

    return [n for n in list_strategies() if getattr(get_strategy(n)[1], "sharing", None)]


def check_sharing(name: str) -> None:
    """Raises ValueError when strategy ``name`` cannot run inside federated clients."""
    from adaptsim.strategies.base import get_strategy

    cls = get_strategy(name)[1]
    if not getattr(cls, "sharing", None):
        raise ValueError(f"strategy {name!r} does not implement federated sharing "
                         f"(shareable_state/load_shared_state); those that do: {', '.join(sharing_strategies())}")
