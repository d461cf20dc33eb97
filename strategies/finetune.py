"""Sequential fine-tuning: the lower bound of every continual-learning table.

Two modes (``mode``):

* ``head``: a linear head over all classes on frozen (cached) features, trained with
  cross-entropy over all seen classes on the current experience only. Old classes are not
  protected, so the head drifts toward the newest classes (catastrophic forgetting).
* ``lora``: LoRA on the attention ``qkv`` projections of the backbone plus the linear head,
  trained sequentially with no protection (plain sequential LoRA, the MoRA baseline).

``head="prototype"`` (LoRA mode only) swaps the linear head for the frozen cosine head on class
prototypes of the frozen pretrained features (:mod:`adaptsim.strategies.components.proto_head`),
the head MoRA uses by default; ``head_lr`` gives the linear head its own learning rate. Both
exist so that MoRA's LoRA baseline can get MoRA's head treatment (``mora_lora``).

Federated (``kind: fcl``, :mod:`adaptsim.strategies.sharing`): a client shares the linear head
and, in ``lora`` mode, every LoRA parameter (``lora_*``), weighted by its number of examples
(FedAvg per round), plus the seen classes; every round continues from the averaged parameters
(the class mask and loss are the centralised ones). ``head="prototype"`` is refused federated:
its rows are local class means, which an example-weighted average would not pool exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn, Phase
from adaptsim.strategies.base import BaseStrategyConfig, Strategy, register_strategy
from adaptsim.strategies.components.heads import feature_dataset
from adaptsim.strategies.components.proto_head import FrozenPrototypeHead, add_frozen_prototypes
from adaptsim.strategies.sharing import SharedState


@dataclass(frozen=True)
class FinetuneConfig(BaseStrategyConfig):
    """Sequential fine-tuning settings.

    Attributes:
        mode: ``head`` (linear head on cached frozen features) or ``lora``.
        lr: learning rate (of everything, unless ``head_lr`` is set).
        rank, alpha, targets: the LoRA of ``mode="lora"`` (scale ``alpha / rank``; name suffixes
            of the wrapped ``nn.Linear``s).
        head: ``"linear"`` (default, trained) or ``"prototype"`` (``mode="lora"`` only): a frozen
            cosine head on prototypes of the frozen pretrained features (LoRA off), each fixed
            when its class first appears; nothing in it trains.
        head_lr: learning rate of the linear head (``None``, default = ``lr``).
        head_scale: logit scale of the prototype head (default 100).
        loss_classes: classes in the CE softmax: ``"seen"``, ``"current"`` or ``None`` (default)
            = ``"seen"`` for the linear head, ``"current"`` for the prototype head.
    """

    mode: str = "head"
    lr: float = 0.01
    optimizer: str = "adamw"
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("qkv",)
    head: str = "linear"
    head_lr: float | None = None
    head_scale: float = 100.0
    loss_classes: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("head", "lora"):
            raise ValueError(f"mode must be 'head' or 'lora', got {self.mode!r}")
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.head not in ("linear", "prototype"):
            raise ValueError(f"head must be 'linear' or 'prototype', got {self.head!r}")
        if self.head == "prototype" and self.mode != "lora":
            raise ValueError("head='prototype' needs mode='lora' (on frozen features it is simplecil)")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ValueError(f"head_lr must be > 0 or null, got {self.head_lr}")
        if self.head_scale <= 0:
            raise ValueError(f"head_scale must be > 0, got {self.head_scale}")
        if self.loss_classes not in (None, "seen", "current"):
            raise ValueError(f"loss_classes must be 'seen', 'current' or null, got {self.loss_classes!r}")


class _FrozenInHeadMode:
    """``frozen_features``: ``config.mode == "head"`` on an instance, ``False`` on the class (a
    factory asking the class, as the fcl run kind does, must not share one backbone between
    LoRA copies: each injects its own LoRA)."""

    def __get__(self, obj, objtype=None) -> bool:
        return False if obj is None else obj.config.mode == "head"


@register_strategy("finetune", FinetuneConfig)
class Finetune(Strategy):
    """Sequential training with no protection against forgetting."""

    sharing = "LoRA adapter and head parameters (FedAvg per round)"

    def __init__(self, config: FinetuneConfig, backbone, info, **kw) -> None:
        super().__init__(config, backbone, info, **kw)
        if config.head == "prototype":
            self.head: nn.Module = FrozenPrototypeHead(backbone.embed_dim, info.n_classes,
                                                       config.head_scale).to(self.device)
        else:
            self.head = nn.Linear(backbone.embed_dim, info.n_classes).to(self.device)
        self.lora = nn.ModuleDict()
        if config.mode == "lora":
            from adaptsim.strategies.adapters import inject_lora

            layers = inject_lora(backbone.model, list(config.targets), config.rank, config.alpha)
            self.lora = nn.ModuleDict({k.replace(".", "_"): v for k, v in layers.items()})
            self.lora.to(self.device)

    def _class_mask(self, exp: Experience) -> torch.Tensor:
        rule = self.config.loss_classes or ("seen" if self.config.head == "linear" else "current")
        if rule == "seen":
            return self.seen_mask()
        mask = torch.zeros(self.info.n_classes, dtype=torch.bool, device=self.device)
        mask[torch.as_tensor(list(exp.classes), device=self.device)] = True
        return mask

    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        cfg = self.config
        mask = self._class_mask(exp)

        def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.masked_fill(~mask, float("-inf")), y)

        head = [{"params": list(self.head.parameters()), "lr": cfg.head_lr or cfg.lr}]
        if cfg.head == "prototype":  # new classes' rows, on the frozen backbone (LoRA off)
            self.backbone.eval()
            add_frozen_prototypes(self.head, self.backbone, exp.train.x, exp.train.y)
            head = []
        if cfg.mode == "head":
            data = feature_dataset(self, exp.train)
            params = head
            loss_fn = lambda f, y: ce(self.head(f), y)
        else:
            data = exp.train
            params = head + [{"params": [p for p in self.lora.parameters() if p.requires_grad], "lr": cfg.lr}]
            loss_fn = lambda x, y: ce(self.head(self.backbone(x)), y)
        stats = fit(Phase("finetune", params, loss_fn, data, cfg.epochs, cfg.lr, cfg.batch_size,
                          optimizer=cfg.optimizer, weight_decay=cfg.weight_decay))
        self._examples = len(exp.train)
        self.end_experience()
        return stats

    # -- federated -----------------------------------------------------------------------------
    @classmethod
    def federated_config_error(cls, config: FinetuneConfig) -> str | None:
        if config.head == "prototype":
            return "head='prototype' holds local class means (use head='linear', or simplecil)"
        return None

    def _shared_params(self) -> dict[str, nn.Parameter]:
        """The parameters a client shares: the head's and every ``lora_*`` of the LoRA layers."""
        out = {f"head.{k}": p for k, p in self.head.named_parameters()}
        out.update({f"lora.{k}": p for k, p in self.lora.named_parameters()
                    if k.rpartition(".")[2].startswith("lora_")})
        return out

    def shareable_state(self) -> SharedState:
        arrays = {k: p.detach().cpu().numpy().copy() for k, p in self._shared_params().items()}
        return SharedState(arrays, getattr(self, "_examples", 0), meta={"seen_classes": list(self.seen_classes)})

    @torch.no_grad()
    def load_shared_state(self, state: SharedState) -> None:
        params = self._shared_params()
        if set(state.arrays) != set(params):
            raise ValueError(f"finetune: shared arrays {sorted(state.arrays)} != {sorted(params)}")
        for k, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(state.arrays[k])).to(p.device, p.dtype))
        for c in state.meta.get("seen_classes", []):
            if c not in self.seen_classes:
                self.seen_classes.append(int(c))

    frozen_features = _FrozenInHeadMode()  # type: ignore[assignment]

    def predict_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mask_unseen(self.head(feats))  # the prototype head's unseen rows are -inf already

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_from_features(self.features(x))

    def modules(self):
        return {"head": self.head, "lora": self.lora}
