"""PILoRA: prototype-guided incremental LoRA for (federated) class-incremental learning.

Paper: Guo et al., "PILoRA: Prototype Guided Incremental LoRA for Federated Class-Incremental
Learning", ECCV 2024, https://arxiv.org/abs/2401.02094; official code Ghy0501/PILoRA (read for
the facts below; this is our own code). Departures are listed in ``docs/methods/pilora.md``.

* **Incremental LoRA** (:mod:`adaptsim.strategies.pilora_lora`): each experience adds a new
  rank-``rank`` LoRA on the q and v projections of the chosen ViT blocks (official: block 0);
  old LoRAs are frozen. Training uses only the newest LoRA; prediction uses
  ``W0 + sum_k B_k A_k`` (``merge="sum"``) or the official server merge (``merge="official"``).
* **Losses**: ``l_dce + pl_weight * l_pl + ort_weight * l_ort + l1_weight * ||A_t||_1`` with the
  distance-based CE and prototype learning loss of :mod:`adaptsim.strategies.pilora_proto` and
  the orthogonality loss ``sum_{k<t} |A_k A_t^T|`` between the old and the newest LoRA.
* **Classifier**: learnable prototypes (one per class, ``N(0, proto_init_std^2)`` init), only
  the current experience's trained (the others are frozen negatives in the CE); prediction =
  the nearest prototype among the seen classes.

Federated (``kind: fcl``): a client shares the newest LoRA (FedAvg, weighted by examples), its
copy of the current classes' prototypes and the per-class sums and counts of its training
features. The server (:meth:`PILoRA.aggregate_shared`) runs the exact default aggregation, then
replaces the prototypes by the re-weighted ones (:func:`~adaptsim.strategies.pilora_proto.reweight_prototypes`)
and ships the whole model (old LoRAs, all prototypes) so a freshly built client reaches it.
Under DP (``fcl.dp``) the LoRA and prototypes are trained by DP-SGD and the feature statistics
come from one pass over the share after training (features clipped to ``dp_feature_clip``; each
example counted once, not once per epoch), noised before upload (:mod:`adaptsim.federated.fcl.dp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn, Phase
from adaptsim.strategies.base import BaseStrategyConfig, Strategy, register_strategy
from adaptsim.strategies.pilora_lora import (MERGE_MODES, IncrementalQVLoRA, inject_incremental_lora, l1_loss,
                                             layer_seed, lora_terms, orthogonality_loss)
from adaptsim.strategies.pilora_proto import dce_loss, prototype_distance, reweight_prototypes
from adaptsim.strategies.sharing import ClassStats, SharedState, class_stats
from adaptsim.strategies.sharing import aggregate_shared as exact_aggregate

__all__ = ["PILoRAConfig", "PILoRA"]


@dataclass(frozen=True)
class PILoRAConfig(BaseStrategyConfig):
    """PILoRA settings (defaults: the official scripts ``train_d.sh``/``train_q.sh`` and ``options.py``).

    Attributes:
        epochs: local epochs per ``train_experience`` call, i.e. per federated round (official
            ``local_ep`` 10); centralised: the epochs of an experience.
        lr: learning rate of the prototypes (official ``centers_lr`` 2e-3 in the scripts).
        lora_lr: learning rate of the LoRA (official ``encoders_lr`` 1e-5).
        batch_size: local batch size (official ``local_bs`` 64 in the scripts).
        optimizer: official ``adam`` (a new optimiser every round, lr constant within it).
        weight_decay: official 1e-5 on every parameter group.
        rank: LoRA rank of each experience's LoRA (official ``r = 4``).
        lora_blocks: ViT blocks whose ``qkv`` gets the q/v LoRA (official ``lora_layer=[0]``: the
            first block only); ``null`` = every block.
        temperature: ``T`` of the distance-based CE ``CE(-d / T)`` (official 1.0).
        pl_weight: ``lambda``, weight of the prototype learning loss (official 0.001).
        ort_weight: ``gamma``, weight of the orthogonality loss (official 0.5).
        l1_weight: weight of the L1 norm of the newest LoRA's A matrices (official 0.01; in the
            code, not in the paper's loss).
        proto_init_std: prototypes start as ``proto_init_std * N(0, 1)`` (official 0.1).
        reweight: server-side prototype re-weighting (``false``: example-weighted FedAvg of the
            prototypes, the ablation).
        reweight_temperature: ``tau`` of the re-weighting softmax (official 0.2).
        loss_classes: prototypes in the distance-based CE: ``all`` (official: every class's,
            the unseen ones frozen at their random init, act as negatives) or ``seen``.
        merge: inference LoRA: ``sum`` (``W0 + sum_k B_k A_k``, the paper) or ``official`` (the
            official server model: one LoRA ``(A_0 + A_t, B_0 + B_t)``).
        round_schedule: ``R`` to decay the learning rates over the rounds of an experience as the
            official code does (round ``r`` uses ``lr * (1 + cos(pi r / R)) / 2``; official
            ``R = epochs = 30`` global rounds); ``null`` (default): constant.
        seed: seed of the LoRA and prototype initialisations (equal on every client).
    """

    epochs: int = 10
    lr: float = 2e-3
    lora_lr: float = 1e-5
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 1e-5
    rank: int = 4
    lora_blocks: tuple[int, ...] | None = (0,)
    temperature: float = 1.0
    pl_weight: float = 0.001
    ort_weight: float = 0.5
    l1_weight: float = 0.01
    proto_init_std: float = 0.1
    reweight: bool = True
    reweight_temperature: float = 0.2
    loss_classes: str = "all"
    merge: str = "sum"
    round_schedule: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_lr <= 0:
            raise ValueError("lora_lr must be > 0")
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.lora_blocks is not None and not self.lora_blocks:
            raise ValueError("lora_blocks must name at least one block (or be null for all)")
        for name in ("temperature", "reweight_temperature", "proto_init_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("pl_weight", "ort_weight", "l1_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.loss_classes not in ("all", "seen"):
            raise ValueError(f"loss_classes must be 'all' or 'seen', got {self.loss_classes!r}")
        if self.merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {MERGE_MODES}, got {self.merge!r}")
        if self.round_schedule is not None and self.round_schedule < 1:
            raise ValueError("round_schedule must be >= 1 or null")


class _Prototypes(nn.Module):
    """The (n_classes, D) prototype matrix (a buffer: training uses a per-experience leaf)."""

    def __init__(self, n_classes: int, dim: int, std: float, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("prototypes", std * torch.randn(n_classes, dim, generator=gen))


@register_strategy("pilora", PILoRAConfig)
class PILoRA(Strategy):
    """Incremental q/v LoRA per experience with a learnable prototype classifier."""

    sharing = "newest LoRA (FedAvg) + prototypes re-weighted on the server from client prototypes and feature means"
    dp_releases = {"train": 2}  # feature counts, sums (sharing contract, DP)
    dp_feature_clip: float | None = None  # set by the fcl loop under DP

    def __init__(self, config: PILoRAConfig, backbone, info, **kw) -> None:
        super().__init__(config, backbone, info, **kw)
        layers = inject_incremental_lora(backbone.blocks, config.lora_blocks, config.rank)
        self.lora = nn.ModuleDict(layers).to(self.device)
        self.protos = _Prototypes(info.n_classes, backbone.embed_dim, config.proto_init_std,
                                  config.seed).to(self.device)
        self.lora_names: list[str] = []   # one per experience, in order
        self.round = 0                    # train_experience calls on the newest experience
        self.current_classes: list[int] = []
        self._feat: ClassStats | None = None
        self._examples = 0

    # -- structure -----------------------------------------------------------------------------
    def _layers(self) -> list[IncrementalQVLoRA]:
        return list(self.lora.values())

    def _add_lora(self, name: str) -> None:
        for key, layer in self.lora.items():
            layer.requires_grad_(False)  # old LoRAs stay as they are (the new one trains)
            layer.add(name, layer_seed(self.config.seed, key, len(self.lora_names)))
        self.lora_names.append(name)

    def _use(self, mode: str) -> None:
        for layer in self._layers():
            layer.use(lora_terms(layer, mode))

    def _current_params(self) -> list[nn.Parameter]:
        return [p for layer in self._layers() for p in layer.pair(self.lora_names[-1])]

    # -- training ------------------------------------------------------------------------------
    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        cfg, name = self.config, f"e{exp.id}"
        if not self.lora_names or self.lora_names[-1] != name:  # a new experience: a new LoRA
            self._add_lora(name)
            self.round = 0
            self.current_classes = [int(c) for c in exp.classes]
        cur_idx = torch.tensor(self.current_classes, device=self.device)
        others = range(self.info.n_classes) if cfg.loss_classes == "all" else self.seen_classes
        old = [c for c in others if c not in self.current_classes]  # frozen negatives
        old_protos = self.protos.prototypes[torch.tensor(old, dtype=torch.long, device=self.device)]
        cur = nn.Parameter(self.protos.prototypes[cur_idx].clone())
        lut = torch.full((self.info.n_classes,), -1, dtype=torch.long, device=self.device)
        lut[torch.tensor(old + self.current_classes, dtype=torch.long, device=self.device)] = torch.arange(
            len(old) + len(self.current_classes), device=self.device)
        C, D = self.info.n_classes, self.backbone.embed_dim
        counts = torch.zeros(C, dtype=torch.long)
        sums = torch.zeros(C, D, dtype=torch.float64)
        layers = self._layers()
        dp = self.dp_feature_clip is not None

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            feats = self.backbone(x)
            dist = prototype_distance(feats, torch.cat([old_protos, cur]))
            loss = dce_loss(dist, lut[y], temperature=cfg.temperature, pl_weight=cfg.pl_weight)
            if cfg.l1_weight:
                loss = loss + cfg.l1_weight * l1_loss(layers)
            if cfg.ort_weight and len(self.lora_names) > 1:
                loss = loss + cfg.ort_weight * orthogonality_loss(layers)
            if dp:  # DP: the statistics come from one pass after training (below)
                return loss
            with torch.no_grad():  # the client's class feature means (official: over every local epoch)
                yc = y.cpu()
                counts.add_(torch.bincount(yc, minlength=C))
                sums.index_add_(0, yc, feats.detach().cpu().double())
            return loss

        factor = 1.0
        if cfg.round_schedule:
            factor = 0.5 * (1 + math.cos(math.pi * self.round / cfg.round_schedule))
        groups = [{"params": [cur], "lr": cfg.lr * factor},
                  {"params": self._current_params(), "lr": cfg.lora_lr * factor}]
        self._use("current")
        try:
            stats = fit(Phase("pilora", groups, loss_fn, exp.train, cfg.epochs, cfg.lr * factor, cfg.batch_size,
                              optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, schedule="constant"))
            if dp:
                self._feat = self._feature_stats(exp)
        finally:
            self._use(cfg.merge)
        with torch.no_grad():
            self.protos.prototypes[cur_idx] = cur.detach()
        self.round += 1
        self._examples = len(exp.train)
        if not dp:
            self._feat = ClassStats(counts.numpy().astype(np.int64), sums.numpy())
        self.end_experience()
        return stats

    @torch.no_grad()
    def _feature_stats(self, exp: Experience) -> ClassStats:
        """DP: class sums and counts of the share's features (one pass, clipped to ``dp_feature_clip``)."""
        bs = 256
        feats = torch.cat([self.backbone(exp.train.x[i : i + bs].to(self.device)) for i in range(0, len(exp.train), bs)])
        return class_stats(feats, exp.train.y, self.info.n_classes, clip=self.dp_feature_clip)

    # -- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self._use(self.config.merge)
        feats = self.backbone(x.to(self.device))
        return self.mask_unseen(-prototype_distance(feats, self.protos.prototypes) / self.config.temperature)

    # -- federated -----------------------------------------------------------------------------
    def _lora_arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for key, layer in self.lora.items():
            for n in names:
                for kind, p in zip(("A_q", "B_q", "A_v", "B_v"), layer.pair(n)):
                    out[f"lora/{key}/{kind}/{n}"] = p.detach().cpu().numpy().copy()
        return out

    def shareable_state(self) -> SharedState:
        """The newest LoRA, this client's prototypes of the current classes, its feature statistics."""
        if self._feat is None:
            raise RuntimeError("pilora shares after train_experience")
        arrays = self._lora_arrays(self.lora_names[-1:])
        idx = torch.tensor(self.current_classes, device=self.device)
        arrays["proto_current"] = self.protos.prototypes[idx].cpu().numpy().copy()
        meta = {"experience": self.lora_names[-1], "classes": list(self.current_classes), "round": self.round,
                "seen_classes": [int(c) for c in self.seen_classes]}
        return SharedState(arrays, self._examples, {"features": self._feat}, meta)

    def aggregate_shared(self, states: list[SharedState]) -> SharedState:
        """Exact default aggregation, then the prototype re-weighting; adds the old LoRAs and all
        prototypes of the server's copy, so the aggregate is the whole model."""
        agg = exact_aggregate(states)
        classes = agg.meta["classes"]
        if self.config.reweight:
            protos = np.stack([s.arrays["proto_current"] for s in states])
            means = np.stack([s.stats["features"].means()[classes] for s in states])
            has = np.stack([s.stats["features"].present()[classes] for s in states])
            cur = reweight_prototypes(protos, means, has, self.config.reweight_temperature)
        else:
            cur = agg.arrays["proto_current"]
        arrays = {k: v for k, v in agg.arrays.items() if k != "proto_current"}
        old = [n for n in self.lora_names if n != agg.meta["experience"]]
        arrays.update(self._lora_arrays(old))
        full = self.protos.prototypes.detach().cpu().numpy().copy()
        full[classes] = cur.astype(full.dtype)
        arrays["prototypes"] = full
        meta = {**agg.meta, "lora_names": old + [agg.meta["experience"]]}
        return SharedState(arrays, agg.weight, {}, meta)

    @torch.no_grad()
    def load_shared_state(self, state: SharedState) -> None:
        names = list(state.meta["lora_names"])
        if self.lora_names != names[: len(self.lora_names)]:
            raise ValueError(f"pilora: local LoRAs {self.lora_names} are not a prefix of the global {names}")
        for n in names[len(self.lora_names):]:
            self._add_lora(n)
        for key, layer in self.lora.items():
            for n in names:
                for kind, p in zip(("A_q", "B_q", "A_v", "B_v"), layer.pair(n)):
                    p.copy_(torch.from_numpy(np.asarray(state.arrays[f"lora/{key}/{kind}/{n}"])).to(p))
        self.protos.prototypes.copy_(torch.from_numpy(np.asarray(state.arrays["prototypes"])).to(self.protos.prototypes))
        for c in state.meta["seen_classes"]:
            if c not in self.seen_classes:
                self.seen_classes.append(int(c))
        self.round = int(state.meta["round"])
        self.current_classes = [int(c) for c in state.meta["classes"]]
        self._use(self.config.merge)

    # -- state ---------------------------------------------------------------------------------
    def modules(self):
        return {"lora": self.lora, "protos": self.protos}

    def extra_state(self):
        return {"lora_names": list(self.lora_names), "round": self.round, "current_classes": list(self.current_classes)}

    def load_extra_state(self, state) -> None:
        for n in state["lora_names"][len(self.lora_names):]:
            self._add_lora(n)
        self.round = int(state["round"])
        self.current_classes = [int(c) for c in state["current_classes"]]
        self._use(self.config.merge)

    def trainable_parameter_count(self) -> int:
        return super().trainable_parameter_count() + self.protos.prototypes.numel()

    def run_metrics(self):
        return {"loras": len(self.lora_names)}
