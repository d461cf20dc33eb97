"""Typed, strict configuration of a federated run (the YAML ``federated:`` section and friends).

Paper: FFA-LoRA, "Improving LoRA in Privacy-preserving Federated Learning", Sun, Li, Li, Ding,
ICLR 2024, https://arxiv.org/abs/2403.12313.

YAML layout (``scenario`` holds only a dataset; ``run`` is the CL runner's ``RunConfig``)::

    scenario: {dataset: {name: mnist5k, train_per_class: 100}}
    backbone: {name: imgfocus_vit_s14, img_size: 56}
    federated:
      method: ffa_lora            # a registered method: lora | ffa_lora | fednano
      mode: inprocess             # inprocess | simulation | deployment
      num_clients: 10
      partition: dirichlet
      dirichlet_alpha: 0.5
      dp: {epsilon: 8, delta: 1.0e-5, max_grad_norm: 1.0}
    run: {seed: 0, out_dir: /tmp/runs}

Unknown keys raise :class:`adaptsim.cl.config.ConfigError` naming the section, the valid keys
and the closest match, like the CL configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from adaptsim.cl.backbones import BackboneConfig
from adaptsim.cl.data import DatasetConfig
from adaptsim.cl.experiment import ExperimentBase, RunConfig
from adaptsim.federated.fednano.config import FedNanoConfig

__all__ = ["DPConfig", "FedScenarioConfig", "FederatedConfig", "FedExperimentConfig",
           "load_fed_experiment", "MODES", "PARTITIONS", "TARGETS"]

MODES = ("inprocess", "simulation", "deployment")
PARTITIONS = ("iid", "dirichlet")
TARGETS = ("q", "k", "v")
ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP-SGD inside each client (Opacus), private against the server by default.

    Attributes:
        epsilon: target epsilon over all of a client's local steps of all rounds; ``None`` or
            ``.inf`` = no DP (plain SGD, no clipping, no noise).
        delta: target delta; must be below ``1 / n_k`` for every client (checked).
        max_grad_norm: per-example clipping norm C.
        accountant: Opacus accountant, ``"rdp"`` or ``"prv"``.
        reproducible: ``False`` (default): the Gaussian noise and the Poisson sampling come from
            generators seeded per client and round from OS entropy (``secrets``), never sent or
            logged, so the server cannot know them. ``True``: both are seeded from
            ``federated.seed``, the client id and the round (tests, debugging); such a run is
            **not private** and every summary says ``"not private (reproducible noise)"``.
    """

    epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    reproducible: bool = False

    def __post_init__(self) -> None:
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"dp.epsilon must be > 0 (or null/.inf for no DP), got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp.delta must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"dp.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"dp.accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if not isinstance(self.reproducible, bool):
            raise ValueError(f"dp.reproducible must be true or false, got {self.reproducible!r}")

    @property
    def enabled(self) -> bool:
        """True when a finite epsilon is set."""
        return self.epsilon is not None and math.isfinite(self.epsilon)


@dataclass(frozen=True)
class FederatedConfig:
    """The federated run: method, engine, clients, rounds, local training, LoRA, DP.

    Attributes:
        method: a method of the registry (:mod:`adaptsim.federated.methods`): ``"lora"`` (A and B
            trained and averaged), ``"ffa_lora"`` (A frozen from ``a_seed``, only B and the head
            trained and sent), ``"fednano"`` (options in ``fednano``) or ``"fcl"`` (federated
            continual learning; built by the ``fcl`` run kind, options in ``fcl``).
        mode: ``"inprocess"`` (sequential loop, :mod:`adaptsim.federated.local_sim`),
            ``"simulation"`` (Flower simulation engine) or ``"deployment"`` (SuperLink +
            SuperNodes on loopback).
        num_clients: number of data partitions / clients.
        clients_per_round: clients sampled each round (seeded by ``seed`` and the round).
        rounds: server rounds.
        local_epochs: local epochs per round.
        batch_size: local batch size (expected batch size under DP's Poisson sampling).
        lr: learning rate of the LoRA parameters (FFA-LoRA needs roughly 10x LoRA's).
        head_lr: learning rate of the linear head (``None`` = ``lr``).
        momentum: local SGD momentum (the optimizer is rebuilt each round).
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling alpha / r).
        targets: which of q, k, v of the fused ``qkv`` projection get LoRA.
        lora_blocks: adapt only the last N transformer blocks (``None`` = all). The frozen
            blocks before them are run once per client and cached (a CPU speed-up).
        partition: ``"iid"`` or ``"dirichlet"`` label skew.
        dirichlet_alpha: concentration of the Dirichlet label split.
        partition_seed: seed of the partition.
        min_partition_size: the Dirichlet split is redrawn until every client has this many.
        dp: sample-level DP settings.
        min_replies: a round completes with at least this many replies (fault tolerance).
        seed: run seed (global init, client sampling, local batch order).
        a_seed: seed the server sends in round 0; every client builds bit-identical A from it.
        fcl: method ``"fcl"`` only: the whole federated continual-learning experiment (the raw
            ``kind: fcl`` config: scenario, strategy, backbone, train, fcl, run), set by the
            ``fcl`` run kind when ``fcl.engine`` is ``simulation`` or ``deployment``
            (:mod:`adaptsim.federated.methods.fcl`). Empty for every other method; an empty
            mapping adds no key to Flower's ``run_config`` (so none to ``pyproject.toml``).
        eval_batch_size: batch size of the server-side evaluation.
        device: ``cpu``, ``cuda`` or ``auto``.
        num_threads: torch CPU threads (0 = leave torch's default). Default 1: on a shared
            2-core machine intra-op threads fight other processes (measured 10x slower with 2).
    """

    method: str = "ffa_lora"
    mode: str = "inprocess"
    num_clients: int = 10
    clients_per_round: int = 10
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    head_lr: float | None = None
    momentum: float = 0.0
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q", "v")
    lora_blocks: int | None = None
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    partition_seed: int = 0
    min_partition_size: int = 2
    dp: DPConfig = field(default_factory=DPConfig)
    min_replies: int = 1
    seed: int = 0
    a_seed: int = 1234
    fednano: FedNanoConfig = field(default_factory=FedNanoConfig)  # method "fednano" only
    fcl: dict[str, Any] = field(default_factory=dict, hash=False)  # method "fcl" only
    eval_batch_size: int = 256
    device: str = "auto"
    num_threads: int = 1

    def __post_init__(self) -> None:
        from adaptsim.federated.methods import list_fed_methods  # the registry (lazy: it imports this module)

        if self.method not in (names := list_fed_methods()):
            raise ValueError(f"federated.method must be a registered method, one of {names}; got {self.method!r}")
        if self.mode not in MODES:
            raise ValueError(f"federated.mode must be one of {MODES}, got {self.mode!r}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"federated.partition must be one of {PARTITIONS}, got {self.partition!r}")
        for name in ("num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size",
                     "rank", "min_replies", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"federated.{name} must be >= 1, got {getattr(self, name)}")
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"federated.clients_per_round ({self.clients_per_round}) exceeds "
                             f"num_clients ({self.num_clients})")
        if self.min_replies > self.clients_per_round:
            raise ValueError(f"federated.min_replies ({self.min_replies}) exceeds clients_per_round "
                             f"({self.clients_per_round})")
        if not self.lr > 0 or (self.head_lr is not None and not self.head_lr > 0):
            raise ValueError("federated.lr and federated.head_lr must be > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"federated.momentum must be in [0, 1), got {self.momentum}")
        if not self.targets or any(t not in TARGETS for t in self.targets) or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"federated.targets must be distinct names from {TARGETS}, got {self.targets}")
        if self.lora_blocks is not None and self.lora_blocks < 1:
            raise ValueError(f"federated.lora_blocks must be >= 1 or null, got {self.lora_blocks}")
        if not self.dirichlet_alpha > 0:
            raise ValueError(f"federated.dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if self.min_partition_size < 0:
            raise ValueError(f"federated.min_partition_size must be >= 0, got {self.min_partition_size}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"federated.device must be cpu, cuda or auto, got {self.device!r}")

    @property
    def sends_a(self) -> bool:
        """Whether the LoRA A matrices are trained and exchanged (the method's registry entry says)."""
        from adaptsim.federated.methods import fed_method_class

        return bool(getattr(fed_method_class(self.method), "sends_a", False))


@dataclass(frozen=True)
class FedScenarioConfig:
    """The data of a federated run: one dataset, partitioned over the clients."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)


@dataclass(frozen=True)
class FedExperimentConfig(ExperimentBase):
    """A whole federated experiment (hashable: used as the per-process model-cache key)."""

    SECTIONS: ClassVar[tuple[str, ...]] = ("scenario", "backbone", "federated", "run")
    REQUIRED: ClassVar[tuple[str, ...]] = ("federated",)

    scenario: FedScenarioConfig = field(default_factory=FedScenarioConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str = ""


SECTIONS = FedExperimentConfig.SECTIONS


def load_fed_experiment(raw: Mapping[str, Any], source: str = "") -> FedExperimentConfig:
    """Builds a :class:`FedExperimentConfig` from a raw YAML mapping (strict).

    Args:
        raw: the parsed YAML (overrides already applied).
        source: where it came from (names the run folder).

    Returns:
        The typed config.

    Raises:
        ConfigError: on unknown sections or keys, wrong types or invalid values.
    """
    return FedExperimentConfig.from_raw(raw, source)
