"""Joint training: the upper reference.

At experience t the head is re-initialised and trained on the union of all training data seen
so far (experiences 0..t), i.e. non-continual training on everything available. Its final
``A_last`` is the reference the continual methods are measured against. Features come from the
frozen backbone (cached), so the cost is that of training a linear head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn, Phase
from adaptsim.strategies.base import BaseStrategyConfig, Strategy, register_strategy
from adaptsim.strategies.components.heads import feature_dataset


@dataclass(frozen=True)
class JointConfig(BaseStrategyConfig):
    lr: float = 0.01
    optimizer: str = "adamw"
    epochs: int = 5


@register_strategy("joint", JointConfig)
class Joint(Strategy):
    """Retrain a linear head on all data seen so far at every step."""

    def __init__(self, config: JointConfig, backbone, info, **kw) -> None:
        super().__init__(config, backbone, info, **kw)
        self.head = nn.Linear(backbone.embed_dim, info.n_classes).to(self.device)
        self._seen_data: list = []

    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        self._seen_data.append(exp.train)
        data = ConcatDataset([feature_dataset(self, d) for d in self._seen_data])
        self.head.reset_parameters()
        cfg = self.config
        stats = fit(Phase("joint", list(self.head.parameters()),
                          lambda f, y: F.cross_entropy(self.mask_unseen(self.head(f)), y),
                          data, cfg.epochs, cfg.lr, cfg.batch_size, optimizer=cfg.optimizer,
                          weight_decay=cfg.weight_decay))
        self.end_experience()
        return stats

    def on_resume(self, past: list[Experience]) -> None:
        self._seen_data = [e.train for e in past]

    frozen_features = True

    def predict_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mask_unseen(self.head(feats))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_from_features(self.features(x))

    def modules(self):
        return {"head": self.head}
