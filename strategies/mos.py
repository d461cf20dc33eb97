"""MOS: model surgery for pre-trained-model-based class-incremental learning.

Paper: Sun, Zhou, Ye, Zhan, "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental
Learning", AAAI 2025, https://arxiv.org/abs/2412.09441. Official code: sun-hailong/AAAI25-MOS
(identical in LAMDA-PILOT). Facts below marked "official" come from reading that code.

Per task t (class-incremental, exemplar-free):

1. One adapter set (a bottleneck adapter beside the MLP of every block) is trained. It is
   carried over: task t starts from the weights task t-1 ended with. After every optimiser step
   (t >= 1) it is merged toward the mean of the stored sets: ``theta_t <- (1-beta) theta_t +
   beta mean(theta_0..theta_{t-1})`` (:func:`~adaptsim.strategies.mos_adapters.ema_merge_`).
2. Loss: cross-entropy over the current classes (other logits -inf) + ``reg`` x orthogonality
   loss (official, not in the paper): the Gram matrix of [stored class means; batch features]
   / 0.8 with identity targets.
3. The set is stored (frozen) as adapter set t. Mean and covariance (+1e-4 I) of each new
   class's features under it are kept; for t >= 1 the linear head is re-aligned on Gaussian
   samples of every seen class (official; SLCA's classifier alignment).
4. A frozen cosine prototype classifier gets the new classes' mean features under adapter set 0.

Inference (training-free self-refined adapter retrieval): prototype logits (adapter 0) give an
initial task; the head on that task's features re-predicts the task until it is stable (at most
4 rounds); the answer is ``softmax(head) + softmax((t+1) * prototype logits)``
(:mod:`~adaptsim.strategies.mos_retrieval`).

Departures (each also stated where it happens):

* ``merge_mode="official"`` (default) reproduces the official code, which also merges inside
  every forward pass: before each block, all layers of the set in use are merged once more (L
  merges per forward); in evaluation this drifts the *stored* sets 1..t (their targets are the
  snapshots taken when they were stored, the official prefix sums); the class statistics are
  taken under a separate "carry" copy of the current set that drifts the same way and seeds the
  next task. ``merge_mode="paper"`` (option) merges once per optimiser step, as the paper
  describes, and never changes stored sets.
* Cosine schedules step once per epoch (``schedule_unit="epoch"``, official); ``step`` decays them
  every optimiser step. The head starts as timm's (trunc-normal std 0.02, zero bias:
  ``head_init="timm"``, official, whose head is the one timm builds); ``torch`` = ``nn.Linear``'s.
* Classifier alignment draws all ``crct_epochs`` epochs of Gaussian samples up front (official:
  at the start of each epoch); each epoch still trains on its own fresh samples.
* Gaussian sampling uses a float64 Cholesky factor (official: float32 ``MultivariateNormal``),
  which avoids failures when a class has fewer samples than feature dimensions.
* The ``multi-centroid`` statistics option of the official code is not implemented.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn, Phase
from adaptsim.strategies.base import BaseStrategyConfig, Strategy, register_strategy
from adaptsim.strategies.components.heads import CosinePrototypeClassifier
from adaptsim.strategies.components.parallel_adapter import wrap_blocks_with_parallel_adapter
from adaptsim.strategies.mos_adapters import MOSAdapterLayer, ema_merge_
from adaptsim.strategies.mos_retrieval import RETRIEVAL_MODES
from adaptsim.strategies.mos_stats import MOSStatsMixin

log = logging.getLogger(__name__)

__all__ = ["MOS", "MOSConfig"]


@dataclass(frozen=True)
class MOSConfig(BaseStrategyConfig):
    """MOS settings. Every default is the official code's (``exps/mos_cifar.json``, CIFAR-100 B0
    Inc5, and the code's fixed constants): ``merge_mode`` official, per-epoch cosine, timm head
    init, the official budgets. The options that are not official: ``merge_mode="paper"``,
    ``schedule_unit="step"``, ``head_init="torch"``, ``retrieval`` ``batched``/``lazy`` (same
    predictions as the official ``loop``, faster; ``lazy`` only with ``paper``), and
    ``ca_samples_per_class``/``eval_batch_size`` when set. The tiny offline scenarios
    (``scenarios/split_mnist_mos.yaml``) scale the budgets down and say so.

    Attributes:
        epochs: adapter training epochs per task (official ``tuned_epoch`` 20).
        lr: adapter learning rate (official ``init_lr`` 0.03); the head uses ``head_lr_scale * lr``.
        batch_size: training batch size (48).
        weight_decay: SGD weight decay of adapters, head and classifier alignment (5e-4).
        optimizer: ``sgd`` (momentum 0.9) as in the official code.
        head_lr_scale: head learning-rate factor (official 0.1).
        rank: adapter bottleneck width (official ``ffn_num`` 16).
        adapter_scale: adapter output scale (0.1).
        adapter_dropout: dropout on the bottleneck in training (0.1).
        reg: weight of the orthogonality loss (0.1).
        orth_temperature: divisor of the orthogonality Gram matrix (0.8).
        adapter_momentum: merge weight beta (0.1); 0 disables merging.
        merge_mode: ``official`` (default: the official code's merges inside every forward,
            which also drift stored sets at evaluation) or ``paper`` (one merge per optimiser
            step, stored sets immutable).
        schedule_unit: ``epoch`` (official ``CosineAnnealingLR(T_max=epochs)`` stepped per epoch,
            for the adapter phase and the alignment) or ``step`` (cosine decays every step).
        head_init: ``timm`` (official: trunc-normal std 0.02, zero bias, as timm initialises the
            ViT head the official code trains) or ``torch`` (``nn.Linear``'s Kaiming-uniform).
        crct_epochs: classifier-alignment epochs (30); 0 disables alignment.
        ca_lr: classifier-alignment learning rate (0.005).
        ca_samples_per_class: Gaussian samples per class per alignment epoch; ``None`` means
            ``5 * batch_size`` (official). It is also the alignment batch size.
        ca_stats: ``covariance`` (full) or ``variance`` (diagonal, official ImageNet-A).
        ensemble: add the prototype view to the head view at inference (official ``ensemble``).
        max_iter: maximum retrieval rounds (official ``MAX_ITER`` 4).
        retrieval: ``batched`` (one pass over all adapter sets), ``lazy`` (only the sets the
            retrieval visits, mixed ids per pass) or ``loop`` (one pass per set, official);
            all give the same predictions.
        eval_batch_size: batch size of the statistics/prototype feature passes.
    """

    epochs: int = 20
    lr: float = 0.03
    batch_size: int = 48
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    head_lr_scale: float = 0.1
    rank: int = 16
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1
    reg: float = 0.1
    orth_temperature: float = 0.8
    adapter_momentum: float = 0.1
    merge_mode: str = "official"
    schedule_unit: str = "epoch"
    head_init: str = "timm"
    crct_epochs: int = 30
    ca_lr: float = 0.005
    ca_samples_per_class: int | None = None
    ca_stats: str = "covariance"
    ensemble: bool = True
    max_iter: int = 4
    retrieval: str = "batched"
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge_mode not in ("paper", "official"):
            raise ValueError(f"merge_mode must be 'paper' or 'official', got {self.merge_mode!r}")
        if self.schedule_unit not in ("step", "epoch"):
            raise ValueError(f"schedule_unit must be 'step' or 'epoch', got {self.schedule_unit!r}")
        if self.head_init not in ("timm", "torch"):
            raise ValueError(f"head_init must be 'timm' or 'torch', got {self.head_init!r}")
        if self.retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval must be one of {RETRIEVAL_MODES}, got {self.retrieval!r}")
        if self.merge_mode == "official" and self.retrieval == "lazy":
            raise ValueError("retrieval='lazy' cannot reproduce merge_mode='official' (the official "
                             "drift needs every stored set in every forward): use 'batched' or 'loop'")
        if self.ca_stats not in ("covariance", "variance"):
            raise ValueError(f"ca_stats must be 'covariance' or 'variance', got {self.ca_stats!r}")
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        if not 0.0 <= self.adapter_momentum <= 1.0:
            raise ValueError("adapter_momentum must be in [0, 1]")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError("adapter_dropout must be in [0, 1)")
        for f in ("reg", "head_lr_scale", "adapter_scale"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0")
        if self.orth_temperature <= 0:
            raise ValueError("orth_temperature must be > 0")
        if self.crct_epochs < 0:
            raise ValueError("crct_epochs must be >= 0")
        if self.ca_lr <= 0:
            raise ValueError("ca_lr must be > 0")
        if self.ca_samples_per_class is not None and self.ca_samples_per_class < 2:
            raise ValueError("ca_samples_per_class must be >= 2 or None")
        if self.max_iter < 1:
            raise ValueError("max_iter must be >= 1")
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be >= 1")


@register_strategy("mos", MOSConfig)
class MOS(MOSStatsMixin, Strategy):
    """MOS on a frozen timm ViT: adapter sets per task, EMA merge, retrieval at inference."""

    SUPPORTED_SCENARIOS = frozenset({"class_incremental", "multi_domain"})

    def __init__(self, config: MOSConfig, backbone, info, **kw) -> None:
        super().__init__(config, backbone, info, **kw)
        if getattr(backbone, "kind", None) != "timm":
            raise ValueError(f"MOS needs a timm ViT backbone, got {getattr(backbone, 'name', backbone)!r}")
        dim = backbone.embed_dim
        self.layers = nn.ModuleList()

        def make(i: int) -> MOSAdapterLayer:
            layer = MOSAdapterLayer(dim, config.rank, config.adapter_scale, config.adapter_dropout)
            self.layers.append(layer)
            return layer

        wrappers = wrap_blocks_with_parallel_adapter(backbone, list(range(len(backbone.blocks))), make)
        self.layers.to(self.device).eval()
        self.head = nn.Linear(dim, info.n_classes).to(self.device)
        if config.head_init == "timm":  # timm's ViT head init (trunc_normal_ std .02, zero bias)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.prototypes = CosinePrototypeClassifier(dim, info.n_classes).to(self.device)
        self.cls2task = torch.full((info.n_classes,), -1, dtype=torch.long, device=self.device)
        self.class_means: dict[int, torch.Tensor] = {}
        self.class_covs: dict[int, torch.Tensor] = {}
        self._merge_now: list[str] = []  # official mode: sets merged before every block
        if config.merge_mode == "official":
            for w in wrappers:
                w.register_forward_pre_hook(lambda mod, args: self._official_block_merge())

    # -- adapter-set bookkeeping ---------------------------------------------------------------
    @property
    def stored(self) -> list[str]:
        """Names of the stored adapter sets, in task order (bank id = task id)."""
        return [n for n in self.layers[0].names if n.startswith("t")]

    def _sources(self, name: str) -> list[str]:
        """The stored sets whose mean is the merge target of ``name`` (its predecessors)."""
        stored = self.stored
        k = stored.index(name) if name in stored else len(stored) - (name == "carry")
        return stored[:k]

    def _merge(self, names: list[str]) -> None:
        official = self.config.merge_mode == "official"
        for name in names:
            src = self._sources(name)
            for layer in self.layers:
                ema_merge_(layer, name, src, self.config.adapter_momentum, use_snapshots=official)

    def _official_block_merge(self) -> None:
        if self._merge_now:
            self._merge(self._merge_now)

    def features_under(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Pooled features (B, D) of images ``x`` under adapter set ``name`` (grad flows to it)."""
        from adaptsim.strategies.mos_retrieval import features_from_tokens, stem_tokens

        official = self.config.merge_mode == "official"
        self._merge_now = [name] if official and self._sources(name) else []
        try:
            return features_from_tokens(self.backbone, self.layers, stem_tokens(self.backbone, x), name)
        finally:
            self._merge_now = []

    # -- training ------------------------------------------------------------------------------
    def _orth_loss(self, feats: torch.Tensor) -> torch.Tensor:
        """Official orthogonality loss on [stored class means; batch features] (K+B, D)."""
        if self.class_means:
            means = torch.stack([self.class_means[c] for c in sorted(self.class_means)])  # (K, D)
            feats = torch.cat([means, feats], 0)
        sim = feats @ feats.T / self.config.orth_temperature  # (K+B, K+B)
        return F.cross_entropy(sim, torch.arange(sim.shape[0], device=sim.device))

    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        cfg = self.config
        t = len(self.stored)
        name = f"t{t}"
        prev = "carry" if "carry" in self.layers[0].names else (self.stored[-1] if t else None)
        for layer in self.layers:
            layer.add(name, copy_from=prev)  # carried over from the previous task, not re-initialised
            if prev == "carry":
                layer.remove("carry")
        classes = torch.tensor(sorted(exp.classes), device=self.device)
        self.cls2task[classes] = t
        cur = torch.zeros(self.info.n_classes, dtype=torch.bool, device=self.device)
        cur[classes] = True

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            feats = self.features_under(x, name)  # (B, D)
            logits = self.head(feats).masked_fill(~cur, float("-inf"))  # current classes only
            return F.cross_entropy(logits, y) + cfg.reg * self._orth_loss(feats)

        after_step = (lambda: self._merge([name])) if t > 0 and cfg.adapter_momentum > 0 else None
        adapter_params = [p for layer in self.layers for p in layer.params(name)]
        groups = [{"params": adapter_params, "lr": cfg.lr},
                  {"params": list(self.head.parameters()), "lr": cfg.lr * cfg.head_lr_scale}]
        self.layers.train()
        try:
            stats = fit(Phase("mos_adapters", groups, loss_fn, exp.train, cfg.epochs, cfg.lr,
                              cfg.batch_size, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                              schedule_unit=cfg.schedule_unit, after_step=after_step, seed=t))
        finally:
            self.layers.eval()
        for layer in self.layers:
            layer.freeze(name)  # stored as adapter set t
            if cfg.merge_mode == "official":
                layer.snapshot(name)
                layer.add("carry", copy_from=name, trainable=False)
        self._update_statistics(exp, name)
        if t > 0 and cfg.crct_epochs > 0:
            stats.update({f"ca_{k}": v for k, v in self._align_classifier(fit).items()})
        self.end_experience()
        return stats

    # -- state ---------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"adapters": self.layers, "head": self.head, "prototypes": self.prototypes}

    def trainable_parameter_count(self) -> int:
        """Parameters trained per task: one adapter set (weights and biases) and the head."""
        cfg, dim = self.config, self.backbone.embed_dim
        per_layer = cfg.rank * (dim + 1) + dim * cfg.rank + dim
        return len(self.layers) * per_layer + sum(p.numel() for p in self.head.parameters())

    def run_metrics(self) -> dict[str, Any]:
        n = len(self.stored)
        return {"adapter_sets": n, "stored_adapter_params": n * (self.trainable_parameter_count()
                                                                 - sum(p.numel() for p in self.head.parameters())),
                "merge_mode": self.config.merge_mode, "retrieval": self.config.retrieval}

    def extra_state(self) -> dict[str, Any]:
        classes = sorted(self.class_means)
        dim = self.backbone.embed_dim
        return {
            "adapter_names": list(self.layers[0].names),
            "snapshot_names": list(self.layers[0].snapshots.keys()),
            "cls2task": self.cls2task.cpu(),
            "stat_classes": classes,
            "means": torch.stack([self.class_means[c] for c in classes]).cpu() if classes else torch.zeros(0, dim),
            "covs": torch.stack([self.class_covs[c] for c in classes]).cpu() if classes else torch.zeros(0, dim),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for layer in self.layers:
            for n in state["adapter_names"]:
                if n not in layer.names:
                    layer.add(n, trainable=False)
                layer.freeze(n)
            for key in state["snapshot_names"]:
                part = {"A": layer.bank._A, "B": layer.bank._B}.get(key[-1])
                ref = part[key[:-2]] if part is not None else layer.up_bias[key[:-2]]
                layer.snapshots[key] = nn.Parameter(torch.zeros_like(ref), requires_grad=False)
        self.cls2task = state["cls2task"].to(self.device)
        self.class_means = {c: m.to(self.device) for c, m in zip(state["stat_classes"], state["means"])}
        self.class_covs = {c: v.to(self.device) for c, v in zip(state["stat_classes"], state["covs"])}
