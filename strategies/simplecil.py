"""SimpleCIL: class prototypes on frozen pretrained features with a cosine classifier.

Paper: Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need" (IJCV 2024), https://arxiv.org/abs/2303.07338.
The standard strong baseline for pretrained-model CL: nothing is trained; each class's row of
the classifier is the mean of its training features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn
from adaptsim.strategies.base import Strategy, register_strategy
from adaptsim.strategies.components.heads import CosinePrototypeClassifier, features_of


@dataclass(frozen=True)
class SimpleCILConfig:
    """SimpleCIL has no hyper-parameters beyond the backbone."""


@register_strategy("simplecil", SimpleCILConfig)
class SimpleCIL(Strategy):
    """Prototype (class-mean) cosine classifier on frozen features."""

    def __init__(self, config, backbone, info, **kw) -> None:
        super().__init__(config, backbone, info, **kw)
        self.classifier = CosinePrototypeClassifier(backbone.embed_dim, info.n_classes).to(self.device)

    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        feats = features_of(self, exp.train)
        self.classifier.set_prototypes(feats, exp.train.y.to(self.device))
        self.end_experience()
        return {}

    frozen_features = True

    def predict_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(feats)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_from_features(self.features(x))

    def modules(self):
        return {"classifier": self.classifier}

    def trainable_parameter_count(self) -> int:
        return 0
