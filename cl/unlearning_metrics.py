"""Measurements of a continual-unlearning run beyond accuracies: forget quality, detector false
positives and weight histograms on retained data, and utility on an unrelated dataset.

* **Forget quality** (TOFU, Maini et al. 2024): the two-sample Kolmogorov-Smirnov test
  (``scipy.stats.ks_2samp``) between the true-class probabilities the unlearned model gives the
  forgotten training data and those a model retrained without it gives the same data. A high
  p-value means the two are indistinguishable (TOFU reports the p-value; 1 is best).
* **Detector false positives**: per detector, the share of retained test samples whose weight is
  at least :data:`FP_WEIGHT` (the unlearning LoRA then acts on data it should leave alone), and a
  histogram of its weights over :data:`HIST_EDGES` (the last bin holds the official 1.2 gate).
* **Utility** (TOFU's "real world" sets): a linear probe (logistic regression) on the features the
  unlearned model gives an unrelated dataset, fitted on its train split, accuracy on its test split.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["FP_WEIGHT", "HIST_EDGES", "forget_quality", "detector_fpr", "weight_histogram", "linear_probe"]

FP_WEIGHT = 0.5
HIST_EDGES = tuple(round(0.1 * i, 1) for i in range(11)) + (1.3,)


def forget_quality(p_model: Tensor, p_ref: Tensor) -> dict[str, float]:
    """KS test of true-class probabilities, unlearned model vs retrained reference.

    Args:
        p_model: (N,) the unlearned model's probability of the true class on the forget set.
        p_ref: (N,) the retrained model's, same samples.

    Returns:
        ``{"forget_quality": p-value, "forget_ks": KS statistic}`` (NaN when the set is empty).
    """
    from scipy.stats import ks_2samp

    if len(p_model) == 0 or len(p_ref) == 0:
        return {"forget_quality": float("nan"), "forget_ks": float("nan")}
    res = ks_2samp(np.asarray(p_model, dtype=np.float64), np.asarray(p_ref, dtype=np.float64))
    return {"forget_quality": float(res.pvalue), "forget_ks": float(res.statistic)}


def detector_fpr(wk: Tensor, retained: Tensor) -> list[float]:
    """Per detector, the share of retained samples with weight >= :data:`FP_WEIGHT`.

    Args:
        wk: (K, N) per-detector weights.
        retained: (N,) bool mask of retained samples.
    """
    if not bool(retained.any()):
        return [float("nan")] * len(wk)
    return [float((w[retained] >= FP_WEIGHT).float().mean()) for w in wk]


def weight_histogram(w: Tensor) -> list[int]:
    """Counts of ``w`` (N,) over :data:`HIST_EDGES` (values above the last edge go in the last bin)."""
    v = np.clip(np.asarray(w, dtype=np.float64), HIST_EDGES[0], HIST_EDGES[-1])
    return np.histogram(v, bins=np.array(HIST_EDGES))[0].astype(int).tolist()


def linear_probe(train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test_y: Tensor,
                 seed: int = 0) -> float:
    """Test accuracy of a logistic regression fitted on ``train_feats`` (N, D)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(train_feats) == 0 or len(test_feats) == 0:
        return float("nan")
    scaler = StandardScaler().fit(train_feats.numpy())
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(scaler.transform(train_feats.numpy()), train_y.numpy())
    return float((clf.predict(scaler.transform(test_feats.numpy())) == test_y.numpy()).mean())


def finite_mean(values: list[float]) -> float:
    """Mean of the non-NaN entries (NaN when there are none)."""
    keep = [v for v in values if not math.isnan(v)]
    return float(np.mean(keep)) if keep else float("nan")


def summary_numbers(row: dict[str, Any]) -> dict[str, float]:
    """The scalar extras of one evaluation row that a study aggregates."""
    out = {}
    for k in ("forget_quality", "forget_ks", "utility_acc", "utility_weight"):
        v = row.get(k)
        if isinstance(v, (int, float)) and not math.isnan(v):
            out[k] = float(v)
    fpr = [float(v) for v in row.get("detector_fpr") or [] if isinstance(v, (int, float))]
    if fpr and not math.isnan(finite_mean(fpr)):
        out["detector_fpr_mean"] = finite_mean(fpr)
    return out
