"""PILoRA's prototype classifier, losses and the server's prototype re-weight module.

Part of PILoRA (Guo et al., ECCV 2024, https://arxiv.org/abs/2401.02094; official code
Ghy0501/PILoRA, ``CPN.py`` / ``VLT.compute_distance`` / ``utils.compute_weight``).

* Distance of a feature ``f`` (dim ``D``) to a prototype ``c``: ``d = sqrt(||f - c||^2 / D)``.
* Logits are ``-d / T``; the prediction is the nearest prototype.
* Loss ``l_dce + lambda * l_pl``: cross-entropy on ``-d / T`` (distance-based CE) plus the
  prototype learning loss ``l_pl`` = mean distance of each feature to its own class's prototype.
* Re-weighting (server): for every class trained this experience, each client ``i`` uploads its
  prototype ``c_i`` and (if it holds the class) its mean training feature ``mu_j``. Client ``i``
  scores ``s_i = 1 / sum_j ||c_i - mu_j||`` (over the clients ``j`` that hold the class); the
  scores are min-max normalised and ``w = softmax(s_norm / tau)``; the global prototype is
  ``sum_i w_i c_i``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["prototype_distance", "dce_loss", "reweight_prototypes"]


def prototype_distance(feats: torch.Tensor, protos: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, C) ``sqrt(||f - c||^2 / D)`` of features (B, D) to prototypes (C, D).

    The squared distance is clamped at ``eps`` before the square root (the official code takes
    the root unclamped; rounding can make it slightly negative, giving NaN).
    """
    sq = (feats.pow(2).sum(1, keepdim=True) + protos.pow(2).sum(1)[None, :] - 2 * feats @ protos.T)
    return (sq / feats.shape[1]).clamp_min(eps).sqrt()


def dce_loss(dist: torch.Tensor, target: torch.Tensor, *, temperature: float, pl_weight: float) -> torch.Tensor:
    """``CE(-dist / T, target) + pl_weight * mean_b dist[b, target_b]`` (``target``: column indices)."""
    ce = F.cross_entropy(-dist / temperature, target)
    pl = dist.gather(1, target[:, None]).mean()
    return ce + pl_weight * pl


def reweight_prototypes(protos: np.ndarray, means: np.ndarray, has: np.ndarray, temperature: float) -> np.ndarray:
    """The server's re-weighted prototypes (see the module docstring).

    Args:
        protos: (M, K, D) the M clients' prototypes of the K classes of this experience.
        means: (M, K, D) the clients' mean training features of those classes.
        has: (M, K) bool, client ``j`` holds samples of class ``k`` (only those means count).
        temperature: softmax temperature ``tau`` (official 0.2).

    Returns:
        (K, D) float64 global prototypes. A class no client holds, or whose scores are all equal
        (e.g. one client), gets uniform weights ``1 / M`` (the official code uses ``0.1``, i.e.
        1/M for its 10 clients per round, and divides by zero in the all-equal case).
    """
    protos = np.asarray(protos, np.float64)
    means = np.asarray(means, np.float64)
    M, K, _ = protos.shape
    out = np.empty(protos.shape[1:], np.float64)
    for k in range(K):
        holders = np.flatnonzero(has[:, k])
        w = np.full(M, 1.0 / M)
        if holders.size:
            dist = np.linalg.norm(protos[:, k, None, :] - means[None, holders, k, :], axis=-1)  # (M, J)
            score = 1.0 / np.maximum(dist.sum(1), np.finfo(np.float64).tiny)
            lo, hi = score.min(), score.max()
            if hi > lo:
                z = (score - lo) / (hi - lo) / temperature
                z = np.exp(z - z.max())
                w = z / z.sum()
        out[k] = w @ protos[:, k, :]
    return out
