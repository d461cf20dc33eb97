"""Classifier heads and feature helpers shared by strategies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from adaptsim.cl.data import ImageTensorDataset

__all__ = ["CosinePrototypeClassifier", "features_of", "feature_dataset"]


class CosinePrototypeClassifier(nn.Module):
    """Frozen cosine classifier whose rows are class-mean features (SimpleCIL, MOS ``fc``).

    Rows of classes without a prototype score -inf.
    """

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(n_classes, dim))
        self.register_buffer("has_proto", torch.zeros(n_classes, dtype=torch.bool))

    @torch.no_grad()
    def set_prototypes(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Set each present class's row to the mean of its features."""
        for c in labels.unique():
            self.prototypes[c] = feats[labels == c].mean(0)
            self.has_proto[c] = True

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(feats, dim=-1) @ F.normalize(self.prototypes, dim=-1).T
        return logits.masked_fill(~self.has_proto, float("-inf"))


def features_of(strategy, ds: ImageTensorDataset) -> torch.Tensor:
    """Pooled backbone features of a whole dataset, through the feature cache when present."""
    cache = strategy.feature_cache
    if cache is not None:
        return cache.get(strategy.backbone, ds.x, key=ds.fingerprint).to(strategy.device)
    from adaptsim.cl.features import extract_features

    return extract_features(strategy.backbone, ds.x, progress=strategy.progress).to(strategy.device)


def feature_dataset(strategy, ds: ImageTensorDataset) -> TensorDataset:
    """A ``TensorDataset`` of (features, labels) for head-only training."""
    return TensorDataset(features_of(strategy, ds), ds.y.to(strategy.device))
