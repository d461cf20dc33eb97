"""Continual-learning metrics, all derived from one accuracy matrix.

``R[t, k]`` is the accuracy on experience ``k``'s test set after training through experience
``t`` (rows: training steps, columns: test experiences; every column is evaluated at every
step, so the upper triangle holds zero-shot / forward accuracies). ``n[k]`` is the size of
test set ``k``; ``b[k]`` (optional) is the accuracy of the model before any training.

Definitions (see docs/metrics.md):

* ``A_t``: accuracy on all test data seen so far, ``Σ_{k≤t} n_k R[t,k] / Σ_{k≤t} n_k`` (PILOT).
* ``avg_incremental_accuracy`` (Ā): ``mean_t A_t``;  ``A_last = A_{T-1}``.
* ``pilot_forgetting``: mean over groups ``k < T-1`` of ``max_{t≥k} R[t,k] − R[T-1,k]``.
* ``bwt``: ``mean_{k<T-1} (R[T-1,k] − R[k,k])`` (Lopez-Paz & Ranzato; Avalanche StreamBWT).
* ``fwt``: ``mean_{k≥1} (R[k-1,k] − b_k)``.
* MTIL (ZSCL): ``transfer`` = mean over k≥1 of ``mean_{t<k} R[t,k]``; ``average`` = mean over
  k of ``mean_t R[t,k]``; ``last`` = ``mean_k R[T-1,k]``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "seen_accuracy",
    "avg_incremental_accuracy",
    "pilot_forgetting",
    "bwt",
    "fwt",
    "mtil_metrics",
    "summarize",
]


def _check(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] > R.shape[1]:
        raise ValueError(f"R must be (steps, experiences) with steps <= experiences, got {R.shape}")
    return R


def seen_accuracy(R: np.ndarray, n: np.ndarray | list[int] | None = None) -> np.ndarray:
    """``A_t`` for every trained step t: accuracy over the union of test sets 0..t."""
    R = _check(R)
    n = np.ones(R.shape[1]) if n is None else np.asarray(n, dtype=float)
    return np.array([(R[t, : t + 1] * n[: t + 1]).sum() / n[: t + 1].sum() for t in range(R.shape[0])])


def avg_incremental_accuracy(R: np.ndarray, n=None) -> float:
    """Ā = mean over steps of ``A_t``."""
    return float(seen_accuracy(R, n).mean())


def pilot_forgetting(R: np.ndarray) -> float:
    """PILOT forgetting: best accuracy of each old group minus its final accuracy, averaged."""
    R = _check(R)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[k:, k].max() - R[T - 1, k] for k in range(T - 1)]))


def bwt(R: np.ndarray) -> float:
    """Backward transfer: final accuracy minus just-trained accuracy, over old experiences."""
    R = _check(R)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[T - 1, k] - R[k, k] for k in range(T - 1)]))


def fwt(R: np.ndarray, b: np.ndarray | list[float]) -> float:
    """Forward transfer against the untrained model's accuracies ``b``."""
    R = _check(R)
    b = np.asarray(b, dtype=float)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[k - 1, k] - b[k] for k in range(1, T)]))


def mtil_metrics(R: np.ndarray) -> dict[str, float]:
    """MTIL Transfer / Average / Last (ZSCL, ICCV 2023) for a square domain × step matrix."""
    R = _check(R)
    T = R.shape[0]
    transfer = [R[:k, k].mean() for k in range(1, T)]
    return {
        "transfer": float(np.mean(transfer)) if transfer else float("nan"),
        "average": float(R.mean(axis=0).mean()),
        "last": float(R[T - 1].mean()),
    }


def summarize(R: np.ndarray, n=None, b=None, multi_domain: bool = False) -> dict[str, object]:
    """All derived metrics of ``R`` as a JSON-ready dict."""
    R = _check(R)
    A = seen_accuracy(R, n)
    out: dict[str, object] = {
        "A_t": A.tolist(),
        "A_last": float(A[-1]),
        "avg_incremental_accuracy": float(A.mean()),
        "forgetting": pilot_forgetting(R),
        "bwt": bwt(R),
    }
    if b is not None:
        out["fwt"] = fwt(R, b)
    if multi_domain and R.shape[0] == R.shape[1]:
        out["mtil"] = mtil_metrics(R)
    return out
