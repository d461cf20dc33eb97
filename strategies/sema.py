"""SEMA: self-expanding mixture of adapters with representation descriptors.

Paper: Huiyi Wang, Haodong Lu, Lina Yao, Dong Gong, "Self-Expansion of Pre-trained Models with
Mixture of Adapters for Continual Learning", CVPR 2025, https://arxiv.org/abs/2403.18886.
Official code: https://github.com/huiyiwang01/SEMA-CL (read for facts, not copied).

Every block of the frozen ViT gets an AdaptFormer adapter in parallel with its MLP
(:mod:`adaptsim.strategies.components.parallel_adapter`). Blocks in ``[expand_from, expand_to)``
(fractions of depth; official: blocks 9-11 of 12) hold a :class:`SEMALayer`: a mixture of
adapters, one representation descriptor (RD, a linear autoencoder on the token mean) per adapter
and a softmax router whose old columns freeze. The other blocks hold one adapter trained on
task 1 only (as coded officially; the paper hardly mentions it).

Task 1: adapters + routers + head with cross-entropy over the task's classes (``epochs``, ``lr``),
then the RDs on reconstruction (``rd_epochs``, ``rd_lr``): two phases, two optimisers.
Task t > 1: scan the task's data in batches of ``detect_batch_size``; at the shallowest
expandable layer not yet expanded in this task whose ``min_k mean_batch |z_k| > exp_threshold``
(z against each RD's rolling error buffer), add an adapter + RD + router column, train them
(func then rd phase), freeze, keep scanning, and restart the scan after any expansion until a
full pass adds nothing. With no expansion only the head trains.

Reproduced from the official code by default, each with an option that turns it off:
``buffer_record="functional"`` (RD buffers also record the untrained new RD's errors during the
functional phase), ``adapter_bias`` (zero-initialised, trainable biases on the mixture adapters),
``schedule_unit="epoch"`` (cosine schedules step once per epoch), ``buffer_fill="truncate"`` (the
batch that first fills an RD buffer is cut to what fits).

Departures (also in docs/methods/sema.md):
* the scan runs under ``no_grad`` on the full network (official: with autograd, stopping at
  the expanding layer; same decisions);
* the RD phase and head-only phase train on pre-computed token means / features (the frozen
  network is deterministic here: no augmentation);
* cross-entropy masks every class outside the current experience (official: classes of past
  tasks), which is the same for class-incremental streams and also works for domain streams;
* options (off by default): ``router_fix``, ``detect_stat="mean_z"``, ``head="cosine"``,
  ``ca_epochs`` (classifier alignment), see :class:`SEMAConfig`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn, Phase
from adaptsim.strategies.adapters import BottleneckAdapter
from adaptsim.strategies.base import BaseStrategyConfig, Strategy, register_strategy
from adaptsim.strategies.components.parallel_adapter import wrap_blocks_with_parallel_adapter
from adaptsim.strategies.sema_modules import CosineHead, SEMALayer

__all__ = ["SEMA", "SEMAConfig", "expandable_range", "expansion_statistic"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SEMAConfig(BaseStrategyConfig):
    """SEMA settings (defaults: the official CIFAR config ``exps/sema_cifar.json``).

    Attributes:
        epochs: functional-phase epochs (official ``func_epoch`` 5).
        lr: functional-phase learning rate (``init_lr`` 0.005).
        batch_size: training batch size (32).
        weight_decay: SGD weight decay of both phases (5e-4).
        optimizer: ``sgd`` (official, momentum 0.9, cosine schedule to 0, official ``min_lr`` 0).
        schedule_unit: ``epoch`` (official ``CosineAnnealingLR(T_max=epochs)`` stepped once per
            epoch) or ``step`` (the cosine decays every optimiser step), for every SEMA phase.
        rd_epochs: RD-phase epochs (``rd_epoch`` 20).
        rd_lr: RD-phase learning rate (0.01).
        expand_from: first expandable block as a fraction of depth (floor; 0.75 -> block 9 of 12).
        expand_to: end (exclusive) of the expandable blocks as a fraction of depth (ceil).
        bottleneck: adapter width (``ffn_num`` 16).
        rd_dim: RD code width (128).
        buffer_size: RD error-buffer length (500).
        exp_threshold: expansion threshold on the z statistic (2 for CIFAR/IN-R, 1 for IN-A/VTAB).
        detect_batch_size: batch size of the expansion scan (128).
        shallow_adapters: give non-expandable blocks a task-1-only adapter (official code).
        adapter_bias: zero-initialised, trainable down and up biases on the expandable layers'
            adapters (official ``Adapter``); ``False`` = bias-free bank adapters (needed under
            Opacus: the up biases have no grad sampler).
        buffer_record: when the RD error buffers record: ``functional`` (official: in every
            training-mode forward, so also the untrained new RD's errors during the functional
            phase, then during the RD phase) or ``rd`` (the RD phase only).
        buffer_fill: ``truncate`` (official ``Records``: the batch that first fills a buffer is
            cut to what fits) or ``newest`` (that batch is kept whole, the oldest values roll out).
        router_fix: fix for the router imbalance (SEMA-CL issue #1): subtract
            ``router_fix_weight`` times each trained RD's z-score from its router logit, so the
            never-trained first column still routes and new columns cannot take over old data.
        router_fix_weight: weight of the z-score in the router logits when ``router_fix``.
        detect_stat: ``sample_z`` (official: batch mean of per-sample |z|) or ``mean_z`` (|z| of
            the batch-mean error against the buffer's standard error ``std/sqrt(B)``: a shift
            test, relative to the RD error spread, that fires on small offline streams).
        head: ``linear`` (official, Kaiming init) or ``cosine`` (logit-normalised).
        head_scale: logit scale of the cosine head.
        ca_epochs: classifier-alignment epochs after each task (0 = off, official): the head
            re-trained on features sampled from stored per-class Gaussians (diagonal).
        ca_lr: classifier-alignment learning rate.
        ca_samples: sampled features per seen class and alignment epoch.
    """

    epochs: int = 5
    lr: float = 0.005
    batch_size: int = 32
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    schedule_unit: str = "epoch"
    rd_epochs: int = 20
    rd_lr: float = 0.01
    expand_from: float = 0.75
    expand_to: float = 1.0
    bottleneck: int = 16
    rd_dim: int = 128
    buffer_size: int = 500
    exp_threshold: float = 2.0
    detect_batch_size: int = 128
    shallow_adapters: bool = True
    adapter_bias: bool = True
    buffer_record: str = "functional"
    buffer_fill: str = "truncate"
    router_fix: bool = False
    router_fix_weight: float = 1.0
    detect_stat: str = "sample_z"
    head: str = "linear"
    head_scale: float = 16.0
    ca_epochs: int = 0
    ca_lr: float = 0.01
    ca_samples: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.expand_from < self.expand_to <= 1.0:
            raise ValueError(f"expand_from/expand_to must satisfy 0 <= expand_from < expand_to <= 1, "
                             f"got {self.expand_from}, {self.expand_to}")
        for name in ("bottleneck", "rd_dim", "detect_batch_size", "ca_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.buffer_size < 3:
            raise ValueError("buffer_size must be >= 3 (z-scores need 3 stored errors)")
        if self.rd_epochs < 0 or self.ca_epochs < 0:
            raise ValueError("rd_epochs and ca_epochs must be >= 0")
        if self.rd_lr <= 0 or self.ca_lr <= 0:
            raise ValueError("rd_lr and ca_lr must be > 0")
        if self.exp_threshold < 0:
            raise ValueError("exp_threshold must be >= 0")
        if self.router_fix_weight <= 0:
            raise ValueError("router_fix_weight must be > 0")
        if self.detect_stat not in ("sample_z", "mean_z"):
            raise ValueError(f"detect_stat must be 'sample_z' or 'mean_z', got {self.detect_stat!r}")
        if self.schedule_unit not in ("step", "epoch"):
            raise ValueError(f"schedule_unit must be 'step' or 'epoch', got {self.schedule_unit!r}")
        if self.buffer_record not in ("functional", "rd"):
            raise ValueError(f"buffer_record must be 'functional' or 'rd', got {self.buffer_record!r}")
        if self.buffer_fill not in ("truncate", "newest"):
            raise ValueError(f"buffer_fill must be 'truncate' or 'newest', got {self.buffer_fill!r}")
        if self.head not in ("linear", "cosine"):
            raise ValueError(f"head must be 'linear' or 'cosine', got {self.head!r}")


def expandable_range(depth: int, expand_from: float, expand_to: float) -> range:
    """Block indices of the expandable layers for a backbone of ``depth`` blocks."""
    start = min(math.floor(expand_from * depth + 1e-9), depth - 1)
    end = max(math.ceil(expand_to * depth - 1e-9), start + 1)
    return range(start, end)


def expansion_statistic(layer: SEMALayer, errors: torch.Tensor, detect_stat: str) -> float:
    """The z statistic that decides expansion at one layer (expand when > ``exp_threshold``).

    Args:
        layer: the expandable layer (its RD buffers give mean and std).
        errors: (n_rd, B) reconstruction errors of a batch under each RD.
        detect_stat: ``sample_z``: ``min_k mean_b |z_kb|`` (official); ``mean_z``:
            ``min_k |mean_b(r_kb) - mu_k| / (std_k / sqrt(B))``.

    Returns:
        The statistic (min over the layer's RDs).
    """
    if detect_stat == "sample_z":
        stat = layer.z_scores(errors).mean(1)  # (n,)
    else:
        stat = torch.stack([rd.buffer.z(e.mean()[None])[0] * math.sqrt(e.numel())
                            for rd, e in zip(layer.rds, errors)])
    return float(stat.min())


class _ClassStats(nn.Module):
    """Per-class feature mean and variance (diagonal Gaussians) for classifier alignment."""

    def __init__(self, n_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_classes, dim))
        self.register_buffer("var", torch.zeros(n_classes, dim))
        self.register_buffer("has", torch.zeros(n_classes, dtype=torch.bool))


@register_strategy("sema", SEMAConfig)
class SEMA(Strategy):
    """Self-expanding mixture of parallel adapters (see module docstring)."""

    def __init__(self, config: SEMAConfig, backbone: nn.Module, info: Any, **kw: Any) -> None:
        super().__init__(config, backbone, info, **kw)
        dim = backbone.embed_dim
        self.expandable = list(expandable_range(len(backbone.blocks), config.expand_from, config.expand_to))
        self.layers = nn.ModuleDict()
        self.shallow = nn.ModuleDict()

        def make(i: int) -> nn.Module | None:
            if i in self.expandable:
                layer = SEMALayer(dim, config.bottleneck, config.rd_dim, config.buffer_size,
                                  bias=config.adapter_bias, truncate=config.buffer_fill == "truncate")
                layer.rd_route_weight = config.router_fix_weight if config.router_fix else 0.0
                self.layers[str(i)] = layer
                return layer
            if config.shallow_adapters:
                self.shallow[str(i)] = BottleneckAdapter(dim, config.bottleneck, scale=1.0)
                return self.shallow[str(i)]
            return None

        wrap_blocks_with_parallel_adapter(backbone, range(len(backbone.blocks)), make)
        self.layers.to(self.device)
        self.shallow.to(self.device)
        if config.head == "cosine":
            self.head: nn.Module = CosineHead(dim, info.n_classes, config.head_scale)
        else:
            self.head = nn.Linear(dim, info.n_classes)
            nn.init.kaiming_uniform_(self.head.weight, a=math.sqrt(5))
            nn.init.zeros_(self.head.bias)
        self.head.to(self.device)
        self.stats = _ClassStats(info.n_classes, dim).to(self.device)
        self.expansions: list[tuple[int, int]] = []
        self._added_for_task: set[int] = set()
        self._phase_seed = 0

    # -- helpers -------------------------------------------------------------------------------
    def _layer(self, i: int) -> SEMALayer:
        return self.layers[str(i)]  # type: ignore[return-value]

    def _masked_ce(self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.masked_fill(~mask, float("-inf")), y)

    def _seed(self) -> int:
        self._phase_seed += 1
        return self.experiences_seen * 1000 + self._phase_seed

    @torch.no_grad()
    def _pass(self, x: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Features (N, D) and token means [(N, D)] at ``layers`` of images ``x``, batched."""
        feats, xbars = [], [[] for _ in layers]
        for lay in layers:
            self._layer(lay).capture = True
        try:
            for s in range(0, len(x), self.config.detect_batch_size):
                feats.append(self.backbone(x[s:s + self.config.detect_batch_size].to(self.device)))
                for j, lay in enumerate(layers):
                    xbars[j].append(self._layer(lay).last_xbar)
        finally:
            for lay in layers:
                self._layer(lay).capture = False
        return torch.cat(feats), [torch.cat(v) for v in xbars]

    # -- training ------------------------------------------------------------------------------
    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        self.backbone.eval()  # frozen backbone; no dropout anywhere in the SEMA modules
        self._phase_seed = 0
        mask = torch.zeros(self.info.n_classes, dtype=torch.bool, device=self.device)
        mask[torch.as_tensor(list(exp.classes), device=self.device)] = True
        if self.experiences_seen == 0:
            stats = self._train_new(exp, fit, mask, self.expandable, first=True)
        else:
            stats, added = self._scan(exp, fit, mask)
            if added == 0:  # every adapter and router is frozen: only the head trains
                feats, _ = self._pass(exp.train.x, [])
                stats = fit(Phase("sema_head", list(self.head.parameters()),
                                  lambda f, y: self._masked_ce(self.head(f), y, mask),
                                  TensorDataset(feats, exp.train.y.to(self.device)), self.config.epochs,
                                  self.config.lr, self.config.batch_size, optimizer=self.config.optimizer,
                                  weight_decay=self.config.weight_decay,
                                  schedule_unit=self.config.schedule_unit, seed=self._seed()))
        for layer in self.layers.values():
            layer.freeze_all()
        self.shallow.requires_grad_(False)
        self._added_for_task.clear()
        if self.config.ca_epochs > 0:
            self._align(exp, fit)
        self.end_experience()
        return stats

    def _train_new(self, exp: Experience, fit: FitFn, mask: torch.Tensor, layers: list[int],
                   first: bool = False) -> dict[str, float]:
        """Functional phase (new adapters + router columns + head), then RD phase (new RDs)."""
        cfg = self.config
        params = list(self.head.parameters())
        for i in layers:
            params += self._layer(i).new_params("func")
        if first:
            params += list(self.shallow.parameters())
        record = cfg.buffer_record == "functional"  # official: the untrained new RDs record too
        for i in self.expandable:
            self._layer(i).record = record
        try:
            stats = fit(Phase("sema_func", params,
                              lambda x, y: self._masked_ce(self.head(self.backbone(x)), y, mask),
                              exp.train, cfg.epochs, cfg.lr, cfg.batch_size, optimizer=cfg.optimizer,
                              weight_decay=cfg.weight_decay, schedule_unit=cfg.schedule_unit, seed=self._seed()))
        finally:
            for i in self.expandable:
                self._layer(i).record = False
        _, xbars = self._pass(exp.train.x, layers)
        rds = [self._layer(i).rds[-1] for i in layers]
        data = TensorDataset(torch.stack(xbars, 1), exp.train.y.to(self.device))  # (N, L, D)

        def rd_loss(xb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = xb.new_zeros(())
            for j, rd in enumerate(rds):
                err = rd.errors(xb[:, j])  # (B,)
                rd.buffer.add(err)
                loss = loss + err.mean()
            return loss

        rd_params = [p for rd in rds for p in rd.parameters()]
        rd_stats = fit(Phase("sema_rd", rd_params, rd_loss, data, cfg.rd_epochs, cfg.rd_lr, cfg.batch_size,
                             optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, schedule_unit=cfg.schedule_unit, seed=self._seed()))
        return {**stats, "rd_loss": rd_stats["loss"]}

    def detect(self, x: torch.Tensor) -> tuple[int | None, dict[int, float]]:
        """Expansion decision for one batch of images.

        Args:
            x: (B, C, H, W) images.

        Returns:
            The shallowest expandable block that should expand (or None) and the statistic
            ``min_k`` over its RDs at every expandable block not yet expanded in this task.
        """
        self.backbone.eval()
        self._pass(x, self.expandable)  # fills last_errors (n, B) of every layer
        stats: dict[int, float] = {}
        choice = None
        for i in self.expandable:
            if i in self._added_for_task:
                continue
            layer = self._layer(i)
            stats[i] = expansion_statistic(layer, layer.last_errors, self.config.detect_stat)
            if choice is None and stats[i] > self.config.exp_threshold:
                choice = i
        return choice, stats

    def _scan(self, exp: Experience, fit: FitFn, mask: torch.Tensor) -> tuple[dict[str, float], int]:
        """Expansion scan with restarts; returns the last training stats and #expansions."""
        stats: dict[str, float] = {}
        added = 0
        while True:
            gen = torch.Generator().manual_seed(self._seed())
            grew = False
            for x, _ in DataLoader(exp.train, batch_size=self.config.detect_batch_size, shuffle=True, generator=gen):
                i, zs = self.detect(x)
                logger.debug("sema scan task %d: z %s", self.experiences_seen, zs)
                if i is None:
                    continue
                layer = self._layer(i)
                layer.add_adapter()
                self._added_for_task.add(i)
                self.expansions.append((self.experiences_seen, i))
                logger.info("sema: task %d expands block %d (z=%.3f) -> %d adapters",
                            self.experiences_seen, i, zs[i], len(layer))
                stats = self._train_new(exp, fit, mask, [i])
                layer.freeze_all()
                grew, added = True, added + 1
            if not grew:
                return stats, added

    def _align(self, exp: Experience, fit: FitFn) -> None:
        """Classifier alignment: store class Gaussians, re-train the head on samples of all."""
        feats, _ = self._pass(exp.train.x, [])
        y = exp.train.y.to(self.device)
        for c in y.unique():
            f = feats[y == c]
            self.stats.mean[c] = f.mean(0)
            self.stats.var[c] = f.var(0, unbiased=False) if len(f) > 1 else torch.zeros_like(f[0])
            self.stats.has[c] = True
        classes = self.stats.has.nonzero().flatten()
        gen = torch.Generator(device="cpu").manual_seed(self._seed())
        n = self.config.ca_samples * self.config.ca_epochs
        noise = torch.randn(len(classes), n, feats.shape[1], generator=gen).to(self.device)
        xs = self.stats.mean[classes, None] + noise * self.stats.var[classes, None].sqrt()  # (C, n, D)
        ys = classes[:, None].expand(-1, n)
        data = TensorDataset(xs.reshape(-1, feats.shape[1]), ys.reshape(-1))
        seen = self.seen_mask()
        fit(Phase("sema_ca", list(self.head.parameters()), lambda f, t: self._masked_ce(self.head(f), t, seen),
                  data, 1, self.config.ca_lr, 64, optimizer="sgd",
                  schedule_unit=self.config.schedule_unit, seed=self._seed()))

    # -- inference and state -------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.backbone.eval()
        return self.mask_unseen(self.head(self.backbone(x.to(self.device))))

    def modules(self) -> dict[str, nn.Module]:
        return {"head": self.head, "layers": self.layers, "shallow": self.shallow, "stats": self.stats}

    def adapters_per_layer(self) -> dict[int, int]:
        """Number of adapters of every expandable block."""
        return {i: len(self._layer(i)) for i in self.expandable}

    def run_metrics(self) -> dict[str, Any]:
        return {"sema_adapters_per_layer": {str(k): v for k, v in self.adapters_per_layer().items()},
                "sema_expansions": [list(e) for e in self.expansions],
                "sema_n_expansions": len(self.expansions)}

    def extra_state(self) -> dict[str, Any]:
        return {"adapters_per_layer": {str(k): v for k, v in self.adapters_per_layer().items()},
                "expansions": [list(e) for e in self.expansions]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for k, n in state["adapters_per_layer"].items():
            layer = self._layer(int(k))
            while len(layer) < int(n):
                layer.add_adapter()
            layer.freeze_all()
        self.shallow.requires_grad_(self.experiences_seen == 0)
        self.expansions = [(int(t), int(i)) for t, i in state["expansions"]]
