"""SimpleCIL: class prototypes on frozen pretrained features with a cosine classifier.

Paper: Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need" (IJCV 2024), https://arxiv.org/abs/2303.07338.
The standard strong baseline for pretrained-model CL: nothing is trained; each class's row of
the classifier is the mean of its training features (computed in float64 from per-class sums and
counts, then stored in float32).

Federated: a client shares the sums and counts of the current experience's classes; the server
adds them up, so the federated prototypes are the pooled-data prototypes exactly. Under DP
(``fcl.dp``) the features are clipped to ``dp_feature_clip`` and the sums and counts noised
before upload (:mod:`adaptsim.federated.fcl.dp`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn
from adaptsim.strategies.base import Strategy, register_strategy
from adaptsim.strategies.components.heads import CosinePrototypeClassifier, features_of
from adaptsim.strategies.sharing import ClassStats, SharedState, class_stats


@dataclass(frozen=True)
class SimpleCILConfig:
    """SimpleCIL has no hyper-parameters beyond the backbone."""


@register_strategy("simplecil", SimpleCILConfig)
class SimpleCIL(Strategy):
    """Prototype (class-mean) cosine classifier on frozen features."""

    sharing = "prototype statistics (per-class sums and counts)"
    dp_releases = {"train": 2}  # counts, sums (sharing contract, DP)
    dp_feature_clip: float | None = None  # set by the fcl loop under DP

    def __init__(self, config, backbone, info, **kw) -> None:
        super().__init__(config, backbone, info, **kw)
        self.classifier = CosinePrototypeClassifier(backbone.embed_dim, info.n_classes).to(self.device)
        self._last_stats: ClassStats | None = None

    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        self._last_stats = class_stats(features_of(self, exp.train), exp.train.y, self.info.n_classes,
                                       clip=self.dp_feature_clip)
        self.set_prototypes_from(self._last_stats)
        self.end_experience()
        return {}

    @torch.no_grad()
    def set_prototypes_from(self, stats: ClassStats) -> None:
        """Rows of the classes present in ``stats`` become their float64 means (stored float32)."""
        means = torch.from_numpy(stats.means())
        for c in stats.classes():
            self.classifier.prototypes[c] = means[c].to(self.classifier.prototypes.dtype)
            self.classifier.has_proto[c] = True

    def shareable_state(self) -> SharedState:
        if self._last_stats is None:
            raise RuntimeError("simplecil shares after train_experience")
        return SharedState(weight=int(self._last_stats.counts.sum()), stats={"prototypes": self._last_stats})

    def load_shared_state(self, state: SharedState) -> None:
        self.set_prototypes_from(state.stats["prototypes"])

    frozen_features = True

    def predict_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(feats)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_from_features(self.features(x))

    def modules(self):
        return {"classifier": self.classifier}

    def trainable_parameter_count(self) -> int:
        return 0
