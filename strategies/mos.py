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

Federated (``kind: fcl``, contract in :mod:`adaptsim.strategies.sharing`; docs/methods/mos.md):
the current experience's adapter set and the head are trained federated (FedAvg per round); a
statistics round then sums the clients' per-class feature sums and outer products under the
final global adapters (and under set 0 for the prototypes), so the class means and covariances
are the pooled ones; the server stores the set, sets them and runs the classifier alignment,
and its aggregate carries the whole model. Needs ``merge_mode="paper"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
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
from adaptsim.strategies.mos_stats import _COV_EPS, MOSStatsMixin
from adaptsim.strategies.sharing import (ClassStats, SharedState, aggregate_shared, class_stats, flatten_state,
                                         unflatten_state)

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
    sharing = "current adapter set and head (FedAvg per round); exact class statistics (statistics round)"
    statistics_round = True
    dp_releases = {"statistics": 5}  # class counts, sums, outer products; prototype counts, sums (DP)
    dp_feature_clip: float | None = None  # set by the fcl loop under DP

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
        # federated (see the module docstring): set once a shared state was made or loaded
        self._federated = False
        self._open: str | None = None  # the set trained federated, not finished yet
        self._trained: str | None = None  # the set the last train_experience trained
        self._examples = 0
        self._pending: tuple[dict[str, ClassStats], int, str] | None = None  # statistics to share
        self._fit: FitFn | None = None
        #: server copy: the aggregated float64 statistics of the last finished experience
        self.federated_stats: ClassStats | None = None
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

    def _start_set(self, exp: Experience) -> str:
        """Adds the set of a new task, carried over from the previous one (not re-initialised)."""
        t = len(self.stored)
        name = f"t{t}"
        prev = "carry" if "carry" in self.layers[0].names else (self.stored[-1] if t else None)
        for layer in self.layers:
            layer.add(name, copy_from=prev)
            if prev == "carry":
                layer.remove("carry")
        self.cls2task[torch.tensor(sorted(exp.classes), device=self.device)] = t
        return name

    def _train_set(self, exp: Experience, fit: FitFn, name: str) -> dict[str, float]:
        """Trains set ``name`` and the head on ``exp`` (CE over its classes + orthogonality loss)."""
        cfg = self.config
        t = self.layers[0].names.index(name)
        for layer in self.layers:  # trainable (a federated round re-opens the set it continues)
            for p in layer.params(name):
                p.requires_grad_(True)
        cur = torch.zeros(self.info.n_classes, dtype=torch.bool, device=self.device)
        cur[torch.tensor(sorted(exp.classes), device=self.device)] = True

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
            layer.freeze(name)
        self._trained, self._examples, self._fit = name, len(exp.train), fit
        return stats

    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        if self._federated:  # a federated round: train (or continue) the open set, no finishing
            if self._open is None:
                self._open = self._start_set(exp)
            elif sorted(exp.classes) != self._set_classes(self._open):
                raise RuntimeError(f"mos: set {self._open} is still open (its statistics round is missing)")
            return self._train_set(exp, fit, self._open)
        cfg = self.config
        name = self._start_set(exp)
        t = len(self.stored) - 1
        stats = self._train_set(exp, fit, name)  # stored (frozen) as adapter set t
        if cfg.merge_mode == "official":
            for layer in self.layers:
                layer.snapshot(name)
                layer.add("carry", copy_from=name, trainable=False)
        self._update_statistics(exp, name)
        if t > 0 and cfg.crct_epochs > 0:
            stats.update({f"ca_{k}": v for k, v in self._align_classifier(fit).items()})
        self.end_experience()
        return stats

    # -- federated -----------------------------------------------------------------------------
    @classmethod
    def federated_config_error(cls, config: MOSConfig) -> str | None:
        if config.merge_mode != "paper":
            return ("needs strategy.merge_mode='paper': the official mode's in-forward merges drift the "
                    "statistics set by each client's number of forward passes, so no statistics are pooled")
        return None

    def _set_classes(self, name: str) -> list[int]:
        return [int(c) for c in (self.cls2task == self.layers[0].names.index(name)).nonzero().flatten()]

    @torch.no_grad()
    def collect_statistics(self, exp: Experience) -> None:
        """Statistics round: class sums/outer products of ``exp`` under the open set, sums under set 0."""
        self._federated = True
        if self._open is None:
            raise RuntimeError("mos: collect_statistics needs a set trained federated (train rounds first)")
        t = self.layers[0].names.index(self._open)
        both = self._batches(exp.train.x, [0, t] if t else [0])  # (1 or 2, N, D)
        y, n = exp.train.y, self.info.n_classes
        clip = self.dp_feature_clip
        stats = {"class": class_stats(both[-1], y, n, outer=True, clip=clip),
                 "proto": class_stats(both[0], y, n, clip=clip)}
        self._pending = (stats, len(exp.train), self._open)

    def shareable_state(self) -> SharedState:
        """Training round: the trained set and the head; statistics round: the class statistics."""
        self._federated = True
        if self._pending is not None:
            stats, n, name = self._pending
            self._pending = None
            return SharedState(weight=n, stats=stats, meta={"phase": "statistics", "set": name})
        name = self._trained
        if name is None:
            raise RuntimeError("mos shares after train_experience")
        arrays = {f"set/{i}/{part}": p.detach().cpu().numpy().copy()
                  for i, layer in enumerate(self.layers) for part, p in zip("ABb", layer.params(name))}
        arrays.update({f"head/{k}": p.detach().cpu().numpy().copy() for k, p in self.head.named_parameters()})
        return SharedState(arrays, self._examples,
                           meta={"phase": "train", "set": name, "classes": self._set_classes(name)})

    def aggregate_shared(self, states: list[SharedState]) -> SharedState:
        """Server: FedAvg of the set and head, or (statistics round) the experience finished from
        the summed statistics; returns the whole model (what a rebuilt client loads)."""
        agg = aggregate_shared(states)
        name = agg.meta["set"]
        with torch.random.fork_rng(devices=[]):  # the server's bookkeeping draws no client randomness
            if agg.meta["phase"] == "train":
                self._load_set_and_head(name, agg)
            else:  # alignment trains: outside no_grad
                self._finish_federated(name, agg.stats["class"], agg.stats["proto"])
        arrays, skeleton = flatten_state(self.state_dict())
        return SharedState(arrays, agg.weight, meta={"mos_state": skeleton, "open": self._open})

    @torch.no_grad()
    def _load_set_and_head(self, name: str, agg: SharedState) -> None:
        """Server: the averaged set ``name`` and head of a training round (the set added if new)."""
        if name not in self.layers[0].names:
            for layer in self.layers:
                layer.add(name, trainable=False)
        for i, layer in enumerate(self.layers):
            for part, p in zip("ABb", layer.params(name)):
                p.copy_(torch.from_numpy(agg.arrays[f"set/{i}/{part}"]).to(p.device, p.dtype))
        for k, p in self.head.named_parameters():
            p.copy_(torch.from_numpy(agg.arrays[f"head/{k}"]).to(p.device, p.dtype))
        self.cls2task[torch.tensor(agg.meta["classes"], device=self.device)] = self.layers[0].names.index(name)
        self._open = name

    def _finish_federated(self, name: str, cs: ClassStats, cp: ClassStats) -> None:
        """Server: stores set ``name``; pooled class means/covariances (float64 sums, + eps I),
        prototypes under set 0; classifier alignment (seeded by the task, so reproducible)."""
        cfg = self.config
        for layer in self.layers:
            layer.freeze(name)
        self.federated_stats = cs
        means, covs = cs.means(), cs.covariances()
        eye = np.eye(means.shape[1])
        for c in cs.classes():
            self.class_means[c] = torch.from_numpy(means[c]).to(self.device, torch.float32)
            cov = torch.from_numpy(covs[c] + _COV_EPS * eye).to(self.device, torch.float32)
            self.class_covs[c] = cov.diagonal().clone() if cfg.ca_stats == "variance" else cov
        pm = torch.from_numpy(cp.means())
        for c in cp.classes():
            self.prototypes.prototypes[c] = pm[c].to(self.prototypes.prototypes.dtype)
            self.prototypes.has_proto[c] = True
        self._open = None
        t = self.layers[0].names.index(name)
        if t > 0 and cfg.crct_epochs > 0:
            from adaptsim.cl.train import fit as default_fit

            fit = self._fit or (lambda phase: default_fit(phase, device=self.device))
            self._align_classifier(fit, seed=t)

    def load_shared_state(self, state: SharedState) -> None:
        """Loads the server's aggregate: the whole model (a freshly built MOS reaches the server's)."""
        if "mos_state" not in state.meta:
            raise ValueError("mos loads the server's aggregate (MOS.aggregate_shared), not a client state")
        with torch.random.fork_rng(devices=[]):
            self.load_state_dict(unflatten_state(state.arrays, state.meta["mos_state"]))
        self._open = state.meta["open"]
        self._federated = True

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
