"""Sequential fine-tuning: the lower bound of every continual-learning table.

Two modes (``mode``):

* ``head``: a linear head over all classes on frozen (cached) features, trained with
  cross-entropy over all seen classes on the current experience only. Old classes are not
  protected, so the head drifts toward the newest classes (catastrophic forgetting).
* ``lora``: LoRA on the attention ``qkv`` projections of the backbone plus the linear head,
  trained sequentially with no protection (plain sequential LoRA, the MoRA baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn, Phase
from adaptsim.strategies.base import BaseStrategyConfig, Strategy, register_strategy
from adaptsim.strategies.components.heads import feature_dataset


@dataclass(frozen=True)
class FinetuneConfig(BaseStrategyConfig):
    """Attributes: mode (``head`` or ``lora``), rank/alpha/targets of the LoRA mode."""

    mode: str = "head"
    lr: float = 0.01
    optimizer: str = "adamw"
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("qkv",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("head", "lora"):
            raise ValueError(f"mode must be 'head' or 'lora', got {self.mode!r}")
        if self.rank < 1:
            raise ValueError("rank must be >= 1")


@register_strategy("finetune", FinetuneConfig)
class Finetune(Strategy):
    """Sequential training with no protection against forgetting."""

    def __init__(self, config: FinetuneConfig, backbone, info, **kw) -> None:
        super().__init__(config, backbone, info, **kw)
        self.head = nn.Linear(backbone.embed_dim, info.n_classes).to(self.device)
        self.lora = nn.ModuleDict()
        if config.mode == "lora":
            from adaptsim.strategies.adapters import inject_lora

            layers = inject_lora(backbone.model, list(config.targets), config.rank, config.alpha)
            self.lora = nn.ModuleDict({k.replace(".", "_"): v for k, v in layers.items()})
            self.lora.to(self.device)

    def _seen_ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.mask_unseen(logits), y)

    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        cfg = self.config
        if cfg.mode == "head":
            data = feature_dataset(self, exp.train)
            params = list(self.head.parameters())
            loss_fn = lambda f, y: self._seen_ce(self.head(f), y)  # noqa: E731
        else:
            data = exp.train
            params = list(self.head.parameters()) + [p for p in self.lora.parameters() if p.requires_grad]
            loss_fn = lambda x, y: self._seen_ce(self.head(self.backbone(x)), y)  # noqa: E731
        stats = fit(Phase("finetune", params, loss_fn, data, cfg.epochs, cfg.lr, cfg.batch_size,
                          optimizer=cfg.optimizer, weight_decay=cfg.weight_decay))
        self.end_experience()
        return stats

    @property
    def frozen_features(self) -> bool:  # type: ignore[override]
        return self.config.mode == "head"

    def predict_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mask_unseen(self.head(feats))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_from_features(self.features(x))

    def modules(self):
        return {"head": self.head, "lora": self.lora}
