"""O3's soft weight: a two-Gaussian CDF score → sigmoid weight, then the official post-processing.

Paper: "On Large Language Model Continual Unlearning" (O3), Gao et al., ICLR 2025,
https://arxiv.org/abs/2407.10223; official code https://github.com/GCYZSL/O3-LLM-UNLEARNING.

The raw weight is the official ``obtain_weights`` formula ``w = sigmoid(10 (1 - |F(x) - F(2 x0 - x)|) - 2)``
(range ``[sigmoid(-2), sigmoid(8)]`` = [0.119, 0.9997]). Both official evaluation paths then turn
the raw weight into a near-binary gate (:func:`postprocess_weight`):

* ``scienceqa`` (``ScienceQA_expriment/eval_o3.py``): ``w > 0.9 → 1.2``, ``0.3 < w ≤ 0.4 → w``,
  else 0 (raw weights in (0.4, 0.9] are gated off as well, as in the official code);
* ``tofu`` (``TOFU_experiment/src/ood/run_ood.py``): ``w ≥ 0.32 → 1``, ``0.2 < w < 0.32 → 10 w²``,
  else 0;
* ``none``: the raw sigmoid (adaptsim's earlier behaviour), optionally rescaled onto [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["POSTPROCESS", "postprocess_weight", "SoftWeight", "W_LO", "W_HI"]

POSTPROCESS = ("scienceqa", "tofu", "none")

# sigmoid(10 * (1 - |dF|) - 2) ranges over [sigmoid(-2), sigmoid(8)]
W_LO, W_HI = float(torch.sigmoid(torch.tensor(-2.0))), float(torch.sigmoid(torch.tensor(8.0)))


def postprocess_weight(w: np.ndarray, kind: str) -> np.ndarray:
    """The official gate applied to raw sigmoid weights.

    Args:
        w: raw weights (B,) in [sigmoid(-2), sigmoid(8)].
        kind: ``scienceqa``, ``tofu`` or ``none`` (identity).

    Returns:
        Gated weights (B,) (``scienceqa`` values lie in {0} ∪ (0.3, 0.4] ∪ {1.2}).

    Raises:
        ValueError: for an unknown ``kind``.
    """
    w = np.asarray(w, dtype=np.float64)
    if kind == "scienceqa":
        return np.where(w > 0.9, 1.2, np.where((w > 0.3) & (w <= 0.4), w, 0.0))
    if kind == "tofu":
        return np.where(w >= 0.32, 1.0, np.where(w > 0.2, 10.0 * w ** 2, 0.0))
    if kind == "none":
        return w
    raise ValueError(f"detector.postprocess must be one of {POSTPROCESS}, got {kind!r}")


class SoftWeight:
    """Two-Gaussian CDF soft weight (official ``weighting_func_gmm`` + ``obtain_weights``).

    Both Gaussians get the held-out split's std and weight 0.5, as in the official code; the
    centre ``x0`` is the midpoint of the two means.

    Args:
        kind: ``symmetric`` (official) or ``one_sided``: scores above ``x0`` get the sigmoid's top
            (meant for scores that rise towards the request's data, i.e. ``local_sign: 1``).
        rescale: map the raw weight's range linearly onto [0, 1] (only with ``postprocess='none'``).
        postprocess: the official gate applied to the raw sigmoid (:func:`postprocess_weight`).
    """

    def __init__(self, kind: str = "symmetric", rescale: bool = False, postprocess: str = "none") -> None:
        if rescale and postprocess != "none":
            raise ValueError("detector.rescale needs detector.postprocess='none' (the official gates "
                             "threshold the raw sigmoid)")
        self.kind, self.rescale, self.postprocess = kind, rescale, postprocess
        self.means = (0.0, 0.0)
        self.std = 1.0
        self.x0 = 0.0

    def fit(self, fit_scores: np.ndarray, held_scores: np.ndarray) -> "SoftWeight":
        m1, m2 = float(np.mean(fit_scores)), float(np.mean(held_scores))
        self.means = (m1, m2)
        self.std = max(float(np.std(held_scores)), 1e-6)
        self.x0 = 0.5 * (m1 + m2)
        return self

    def cdf(self, s: np.ndarray) -> np.ndarray:
        from scipy.stats import norm

        return 0.5 * (norm.cdf(s, self.means[0], self.std) + norm.cdf(s, self.means[1], self.std))

    def raw(self, scores: np.ndarray) -> np.ndarray:
        """Raw sigmoid weights (B,) before post-processing or rescaling."""
        s = np.asarray(scores, dtype=np.float64)
        gap = np.abs(self.cdf(s) - self.cdf(2 * self.x0 - s))
        w = 1.0 / (1.0 + np.exp(-(10.0 * (1.0 - gap) - 2.0)))
        if self.kind == "one_sided":
            w = np.where(s >= self.x0, W_HI, w)
        return w

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """Weights (B,) for OCSVM scores (B,)."""
        w = postprocess_weight(self.raw(scores), self.postprocess)
        if self.rescale:
            w = np.clip((w - W_LO) / (W_HI - W_LO), 0.0, 1.0)
        return w
