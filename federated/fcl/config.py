"""Config of a federated continual-learning run: a continual experiment plus an ``fcl`` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from adaptsim.cl.experiment import ExperimentConfig
from adaptsim.federated.config import DPConfig

__all__ = ["FCLSettings", "FCLExperimentConfig", "ENGINES"]

ENGINES = ("inprocess", "simulation", "deployment")


@dataclass(frozen=True)
class FCLSettings:
    """The federated setting of a continual stream.

    Attributes:
        num_clients: clients, all present from the first experience.
        rounds: federated rounds per experience.
        partition: ``dirichlet`` (label skew within each experience) or ``iid``.
        dirichlet_alpha: Dirichlet concentration (smaller: more skew).
        partition_seed: seed of the per-experience splits (experience ``t`` uses
            ``partition_seed * 1000 + t``).
        centralised: also run the same strategy centralised on the same stream, as the reference
            (its accuracy matrix goes into ``metrics.json`` under ``centralised``).
        engine: how the rounds run, as for the other federated methods: ``inprocess`` (the loop
            of :mod:`adaptsim.federated.fcl.loop`, default), ``simulation`` (Flower's simulation
            engine) or ``deployment`` (a real ``flower-superlink`` and ``num_clients``
            ``flower-supernode`` processes on loopback). The Flower engines run the registered
            federated method ``fcl`` (:mod:`adaptsim.federated.methods.fcl`) through the generic
            Flower apps and give the same accuracy matrix, prototypes and bytes as ``inprocess``.
        dp: sample-level DP of every client (:class:`~adaptsim.federated.config.DPConfig`:
            ``epsilon`` over all experiences and rounds, ``delta``, ``max_grad_norm``,
            ``accountant``, ``reproducible``; :mod:`adaptsim.federated.fcl.dp`): DP-SGD of the
            client training and the Gaussian mechanism on the shared class statistics, one
            accountant per client. ``inprocess`` engine only (for now).
        dp_feature_clip: DP: L2 norm every feature is clipped to before it enters the class
            sums and outer products a client shares (the statistics' sensitivity: count 1, sum
            ``C``, outer product ``C**2``). Pick about the backbone's typical feature norm: larger
            means more noise relative to the signal, smaller shrinks (biases) the features.
        dp_stats_fraction: DP, for strategies that both train on client data and share
            statistics (``mos``, ``pilora``): the statistics' noise multiplier is set so that
            all their releases alone would spend this fraction of ``dp.epsilon``; DP-SGD gets
            the rest (the two compose, so the split is of the budget, not an exact epsilon
            sum). Strategies with only one of the two spend the whole budget on it.
    """

    num_clients: int = 10
    rounds: int = 1
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    partition_seed: int = 0
    centralised: bool = False
    engine: str = "inprocess"
    dp: DPConfig = field(default_factory=DPConfig)
    dp_feature_clip: float = 1.0
    dp_stats_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.partition not in ("dirichlet", "iid"):
            raise ValueError(f"partition must be 'dirichlet' or 'iid', got {self.partition!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if not self.dp_feature_clip > 0:
            raise ValueError(f"dp_feature_clip must be > 0, got {self.dp_feature_clip}")
        if not 0 < self.dp_stats_fraction < 1:
            raise ValueError(f"dp_stats_fraction must be in (0, 1), got {self.dp_stats_fraction}")
        if self.dp.enabled and self.engine != "inprocess":
            raise ValueError(f"dp: DP is supported with engine 'inprocess' only (not yet {self.engine!r})")


@dataclass(frozen=True)
class FCLExperimentConfig(ExperimentConfig):
    """A continual experiment (scenario, strategy, backbone, train, run) run federated (``fcl``)."""

    SECTIONS: ClassVar[tuple[str, ...]] = ("scenario", "strategy", "backbone", "train", "fcl", "run")
    REQUIRED: ClassVar[tuple[str, ...]] = ("scenario", "strategy")

    fcl: FCLSettings = field(default_factory=FCLSettings)
