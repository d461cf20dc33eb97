"""Config of a federated continual-learning run: a continual experiment plus an ``fcl`` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from adaptsim.cl.experiment import ExperimentConfig

__all__ = ["FCLSettings", "FCLExperimentConfig"]


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
    """

    num_clients: int = 10
    rounds: int = 1
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    partition_seed: int = 0
    centralised: bool = False

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.partition not in ("dirichlet", "iid"):
            raise ValueError(f"partition must be 'dirichlet' or 'iid', got {self.partition!r}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")


@dataclass(frozen=True)
class FCLExperimentConfig(ExperimentConfig):
    """A continual experiment (scenario, strategy, backbone, train, run) run federated (``fcl``)."""

    SECTIONS: ClassVar[tuple[str, ...]] = ("scenario", "strategy", "backbone", "train", "fcl", "run")
    REQUIRED: ClassVar[tuple[str, ...]] = ("scenario", "strategy")

    fcl: FCLSettings = field(default_factory=FCLSettings)
