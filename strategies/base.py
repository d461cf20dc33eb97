"""The Strategy interface and the strategy registry.

A strategy adapts a frozen pretrained backbone over a stream of experiences. The runner calls
:meth:`Strategy.train_experience` once per experience, passing :func:`adaptsim.cl.train.fit` (the
only code that steps optimisers), then :meth:`Strategy.predict` on test batches. ``predict``
receives images only: task identity cannot leak into evaluation.

State: :meth:`state_dict` returns tensors and plain containers only (``torch.load(...,
weights_only=True)`` can read it). Strategies whose structure grows (new adapters, experts)
record that structure in :meth:`extra_state` and rebuild it in :meth:`load_extra_state` before
the module weights are loaded.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from adaptsim.cl.registry import Registry
from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn

__all__ = [
    "Strategy",
    "StreamInfo",
    "BaseStrategyConfig",
    "STRATEGIES",
    "register_strategy",
    "list_strategies",
    "get_strategy",
    "SCENARIO_KINDS",
]

SCENARIO_KINDS = frozenset({"class_incremental", "domain_incremental", "multi_domain"})


@dataclass(frozen=True)
class StreamInfo:
    """What a strategy may know about the stream up front (no future data or classes)."""

    kind: str
    n_classes: int
    class_names: tuple[str, ...]
    n_experiences: int


@dataclass(frozen=True)
class BaseStrategyConfig:
    """Settings shared by most strategies.

    Attributes:
        epochs: training epochs per experience.
        lr: learning rate.
        batch_size: training batch size.
        weight_decay: optimiser weight decay.
        optimizer: ``sgd``, ``adam`` or ``adamw``.
    """

    epochs: int = 3
    lr: float = 0.01
    batch_size: int = 32
    weight_decay: float = 0.0
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be sgd, adam or adamw, got {self.optimizer!r}")


class Strategy(ABC):
    """Base class of every continual-learning strategy.

    Args:
        config: the strategy's own frozen config dataclass.
        backbone: a frozen :class:`adaptsim.cl.backbones.Backbone`.
        info: :class:`StreamInfo` of the stream.
        device: where to train and predict.
        progress: show progress bars.
        feature_cache: an optional :class:`adaptsim.cl.features.FeatureCache` for strategies
            that never change the backbone's features.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = BaseStrategyConfig
    SUPPORTED_SCENARIOS: ClassVar[frozenset[str]] = SCENARIO_KINDS
    #: True when predictions depend only on the frozen backbone's pooled features; the
    #: evaluator then scores cached features with :meth:`predict_from_features`.
    frozen_features: ClassVar[bool] = False
    #: What the strategy shares inside federated clients (:mod:`adaptsim.strategies.sharing`):
    #: a short description such as ``"prototype statistics"``, or ``None`` (not supported).
    sharing: ClassVar[str | None] = None

    def __init__(self, config: Any, backbone: nn.Module, info: StreamInfo, *,
                 device: torch.device | str = "cpu", progress: bool = False, feature_cache: Any = None) -> None:
        if info.kind not in self.SUPPORTED_SCENARIOS:
            raise ValueError(
                f"strategy {self.name!r} does not support {info.kind!r} streams; "
                f"supported: {', '.join(sorted(self.SUPPORTED_SCENARIOS))}"
            )
        self.config = config
        self.backbone = backbone
        self.info = info
        self.device = torch.device(device)
        self.progress = progress
        self.feature_cache = feature_cache
        # The frozen backbone's own weights, before any adapter is injected: never "trainable".
        self._backbone_param_ids = frozenset(id(p) for p in backbone.parameters())
        self.seen_classes: list[int] = []
        self.experiences_seen = 0

    # -- the two methods every strategy implements ---------------------------------------------
    @abstractmethod
    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        """Learn from ``exp`` (call ``fit(Phase(...))`` to optimise); return training stats."""

    @abstractmethod
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, n_classes) for a batch of images; the arg-max is the prediction."""

    def predict_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Scores from pooled frozen features (only for ``frozen_features`` strategies)."""
        raise NotImplementedError(f"{self.name} does not predict from cached features")

    # -- shared helpers ------------------------------------------------------------------------
    def begin_experience(self, exp: Experience) -> None:
        """Record the classes of ``exp`` (call at the start of ``train_experience``)."""
        for c in exp.classes:
            if c not in self.seen_classes:
                self.seen_classes.append(c)

    def end_experience(self) -> None:
        self.experiences_seen += 1

    def seen_mask(self) -> torch.Tensor:
        """Boolean (n_classes,) mask of the classes seen so far."""
        mask = torch.zeros(self.info.n_classes, dtype=torch.bool, device=self.device)
        if self.seen_classes:
            mask[torch.tensor(self.seen_classes, device=self.device)] = True
        return mask

    def mask_unseen(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the scores of classes not seen yet to -inf (PILOT's masked head)."""
        return logits.masked_fill(~self.seen_mask(), float("-inf"))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of a batch (no grad through the frozen backbone)."""
        with torch.no_grad():
            return self.backbone(x.to(self.device))

    def modules(self) -> dict[str, nn.Module]:
        """Strategy-owned modules whose weights are saved (not the frozen backbone)."""
        return {}

    def trainable_parameter_count(self) -> int:
        """Parameters the strategy adds and trains (adapters, heads), counted once.

        Weights of the pretrained backbone reachable through a strategy module (e.g. the frozen
        ``base_layer`` inside a LoRA wrapper) are not counted.
        """
        seen: set[int] = set(self._backbone_param_ids)
        total = 0
        for m in self.modules().values():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return total

    def stored_parameter_count(self) -> int:
        """Numbers the strategy keeps beyond the frozen backbone: every tensor element of its
        modules' state (frozen old adapters, prototypes, statistics included) and of
        :meth:`extra_state`, backbone weights excluded."""
        backbone_ids = {p.data_ptr() for p in self.backbone.parameters()}
        total = 0
        for m in self.modules().values():
            for t in m.state_dict().values():
                if isinstance(t, torch.Tensor) and t.data_ptr() not in backbone_ids:
                    total += t.numel()

        def count(obj: Any) -> int:
            if isinstance(obj, torch.Tensor):
                return obj.numel()
            if isinstance(obj, dict):
                return sum(count(v) for v in obj.values())
            if isinstance(obj, (list, tuple)):
                return sum(count(v) for v in obj)
            return 0

        return total + count(self.extra_state())

    # -- federated continual learning (opt-in: set ``sharing``) -------------------------------
    def shareable_state(self) -> Any:
        """What this client shares after a round: a :class:`~adaptsim.strategies.sharing.SharedState`."""
        from adaptsim.strategies.sharing import check_sharing

        check_sharing(self.name)
        raise NotImplementedError(f"{self.name} declares sharing but does not implement shareable_state")

    def load_shared_state(self, state: Any) -> None:
        """Takes the server's aggregate :class:`~adaptsim.strategies.sharing.SharedState` back."""
        from adaptsim.strategies.sharing import check_sharing

        check_sharing(self.name)
        raise NotImplementedError(f"{self.name} declares sharing but does not implement load_shared_state")

    def aggregate_shared(self, states: list[Any]) -> Any:
        """Server side: combines the clients' :class:`~adaptsim.strategies.sharing.SharedState` s.

        Called on the server's own copy of the strategy. Default: the exact aggregation of
        :func:`~adaptsim.strategies.sharing.aggregate_shared` (arrays weighted by examples,
        statistics added up). Override to add a server-side step (e.g. PILoRA's prototype
        re-weighting) on top of it.
        """
        from adaptsim.strategies.sharing import aggregate_shared

        return aggregate_shared(states)

    def run_metrics(self) -> dict[str, Any]:
        """Extra numbers for metrics.json (e.g. active ranks, number of adapters)."""
        return {}

    def on_resume(self, past: list[Experience]) -> None:
        """Called after a checkpoint is loaded, with the experiences already trained on.

        Strategies that legitimately keep past data (``joint``) rebuild it here.
        """

    def extra_state(self) -> dict[str, Any]:
        """Structure and non-module state (tensors and plain containers only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Rebuild structure from :meth:`extra_state` before weights are loaded."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "seen_classes": list(self.seen_classes),
            "experiences_seen": self.experiences_seen,
            "extra": self.extra_state(),
            "modules": {k: m.state_dict() for k, m in self.modules().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen_classes = list(state["seen_classes"])
        self.experiences_seen = int(state["experiences_seen"])
        self.load_extra_state(state["extra"])
        mods = self.modules()
        missing = set(state["modules"]) ^ set(mods)
        if missing:
            raise KeyError(f"{self.name}: checkpoint modules {sorted(state['modules'])} != {sorted(mods)}")
        for k, m in mods.items():
            m.load_state_dict(state["modules"][k])


STRATEGIES: Registry[tuple[type, type]] = Registry("strategy")


def register_strategy(name: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: register ``(config_cls, cls)`` under ``name``."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config of strategy {name!r} must be a dataclass")

    def deco(cls: type) -> type:
        cls.name = name
        cls.config_cls = config_cls
        STRATEGIES.add(name, (config_cls, cls))
        return cls

    return deco


def list_strategies() -> list[str]:
    return STRATEGIES.names()


def get_strategy(name: str) -> tuple[type, type]:
    """``(ConfigCls, StrategyCls)`` of ``name``; ``KeyError`` listing the names when unknown."""
    return STRATEGIES.get(name)


def check_scenario(name: str, kind: str) -> None:
    """Raise ``ConfigError`` when strategy ``name`` does not support ``kind`` streams.

    Checked when a run is built, before its folder exists.
    """
    from adaptsim.cl.config import ConfigError

    supported = get_strategy(name)[1].SUPPORTED_SCENARIOS
    if kind not in supported:
        fits = [n for n in list_strategies() if kind in get_strategy(n)[1].SUPPORTED_SCENARIOS]
        raise ConfigError(f"strategy {name!r} does not support {kind!r} streams (it supports "
                          f"{', '.join(sorted(supported))}); strategies for {kind!r}: {', '.join(fits)}")
