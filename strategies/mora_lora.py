"""MoRA's fair baseline (``strategy.adapter: lora``): one plain LoRA derived from a MoRA config.

The comparison the MoRA paper makes is "sparse self-activated rank-1 experts vs one LoRA". For
it to be fair the LoRA must sit on the same layers with the same total rank, and both must get
the same head treatment. ``MoRA(config)`` with ``config.adapter == "lora"`` builds
:class:`MoRALoRA` from the same :class:`~adaptsim.strategies.mora.MoRAConfig` (so the same YAML
and the same overrides drive both; the registry name stays ``mora``) and it runs sequential LoRA fine-tuning
(:class:`~adaptsim.strategies.finetune.Finetune`, ``mode="lora"``) with the config of
:func:`lora_baseline_config`:

* ``targets``: MoRA's ``targets`` (the same wrapped linears);
* ``rank``: ``experts_per_task * n_experiences`` (MoRA's total rank per layer after the last task),
  ``alpha = rank`` (scale 1; MoRA's delta per rank is at most scale 1 under both gates);
* LoRA learning rate ``expert_lr``; the head is MoRA's ``head`` (``prototype`` or ``linear``), a
  linear head at MoRA's head ``lr``; the CE classes are MoRA's resolved ``loss_classes``;
* ``epochs``, ``batch_size``, ``optimizer``, ``weight_decay``: MoRA's.

MoRA-only fields (``top_k``, ``tau``, ``delta``, gate and statistics settings) are ignored.
"""

from __future__ import annotations

from typing import Any

from adaptsim.strategies.base import StreamInfo
from adaptsim.strategies.finetune import Finetune, FinetuneConfig
from adaptsim.strategies.mora import MoRAConfig

__all__ = ["MoRALoRA", "lora_baseline_config"]


def lora_baseline_config(cfg: MoRAConfig, n_experiences: int) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of MoRA's LoRA baseline (see the module docstring).

    Raises:
        ValueError: ``head="clip_text"`` (the baseline has no text head).
    """
    if cfg.head == "clip_text":
        raise ValueError("adapter='lora' supports head 'prototype' or 'linear', not 'clip_text'")
    rank = cfg.experts_per_task * max(1, n_experiences)
    return FinetuneConfig(mode="lora", epochs=cfg.epochs, batch_size=cfg.batch_size,
                          weight_decay=cfg.weight_decay, optimizer=cfg.optimizer, lr=cfg.expert_lr,
                          head_lr=cfg.lr, rank=rank, alpha=float(rank), targets=tuple(cfg.targets),
                          head=cfg.head, head_scale=cfg.head_scale, loss_classes=cfg.resolved_loss_classes)


class MoRALoRA(Finetune):
    """Sequential LoRA with MoRA's layers, total rank, head and learning rates.

    Args:
        config: a :class:`MoRAConfig`; kept as ``mora_config``, ``config`` holds the derived
            :class:`FinetuneConfig`.
        backbone, info, **kw: as :class:`Finetune`.
    """

    name = "mora"
    config_cls = MoRAConfig

    def __init__(self, config: MoRAConfig, backbone: Any, info: StreamInfo, **kw: Any) -> None:
        self.mora_config = config
        super().__init__(lora_baseline_config(config, info.n_experiences), backbone, info, **kw)

    def run_metrics(self) -> dict[str, Any]:
        c = self.config
        return {"adapter": "lora", "lora_rank": c.rank, "lora_alpha": c.alpha, "lora_targets": list(c.targets),
                "n_layers": len(self.lora), "head": c.head}
