"""The federated-method contract and its registry.

A federated method supplies pure pieces; the round engines (:func:`adaptsim.federated.local_sim.run_inprocess`
in process, :class:`adaptsim.federated.flower_strategy.FedMethodStrategy` over Flower) drive any of them:

- client side: :meth:`FedMethod.client_fit` (the client's model and data, one local round through the
  shared :func:`adaptsim.federated.local_train.local_train`; returns what the client sends);
- server side: :meth:`FedMethod.initial_arrays`, :meth:`FedMethod.aggregate`,
  :meth:`FedMethod.evaluate` and :meth:`FedMethod.round_metrics` (the method's extra keys of the
  round record);
- before a run folder exists: :meth:`FedMethod.prepare` (config checks and data loading).

What travels is general, so that methods with state across rounds (federated continual learning)
fit: a client sends arbitrary named arrays (``dict[str, np.ndarray]``) and its numeric metrics,
and keeps a plain JSON-able ``client_state`` dict of its own across rounds (``None`` before its
first round; in process the engine keeps it and checkpoints it, on Flower the ClientApp keeps it
in ``context.state``).

Registration is explicit (``@register_fed_method("ffa_lora", FederatedConfig)`` in the method's
module, imported by :mod:`adaptsim.federated.methods`), as for strategies: duplicate or
non-``lower_snake`` names raise, and an unknown name raises ``KeyError`` listing the registered ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from adaptsim.cl.registry import Registry

__all__ = ["FedMethod", "FedMethodEntry", "register_fed_method", "fed_method_class", "fed_method_entry",
           "fed_method", "list_fed_methods", "Arrays", "ClientResult"]

Arrays = dict[str, np.ndarray]
#: ``(arrays sent, num_examples, metrics, new client state)`` of one client round.
ClientResult = tuple[Arrays, int, dict[str, Any], dict[str, Any]]


@dataclass(frozen=True)
class FedMethodEntry:
    """A registered method: its config dataclass (where its options live) and its class."""

    name: str
    config_cls: type
    method_cls: type["FedMethod"]


_REGISTRY: Registry[FedMethodEntry] = Registry("federated method")


def register_fed_method(name: str, config_cls: type) -> Callable[[type["FedMethod"]], type["FedMethod"]]:
    """Class decorator: registers a :class:`FedMethod` subclass under ``name``.

    Args:
        name: the ``federated.method`` value (lower_snake, unique).
        config_cls: the dataclass holding the method's options (e.g. ``FedNanoConfig``, the
            ``federated.fednano`` section; LoRA and FFA-LoRA use the shared LoRA fields of
            ``FederatedConfig``).

    Raises:
        ValueError: on a duplicate or non-lower_snake name.
    """
    def deco(cls: type[FedMethod]) -> type[FedMethod]:
        _REGISTRY.add(name, FedMethodEntry(name, config_cls, cls))
        cls.name = name
        cls.config_cls = config_cls
        return cls

    return deco


def fed_method_entry(name: str) -> FedMethodEntry:
    """The registered entry of ``name``.

    Raises:
        KeyError: naming the registered methods (and the closest match).
    """
    return _REGISTRY.get(name)


def fed_method_class(name: str) -> type["FedMethod"]:
    """The :class:`FedMethod` subclass registered as ``name`` (``KeyError`` listing the names)."""
    return _REGISTRY.get(name).method_cls


def list_fed_methods() -> list[str]:
    """The registered method names, sorted."""
    return _REGISTRY.names()


def fed_method(cfg: Any) -> "FedMethod":
    """The method object of an experiment (``cfg.federated.method``)."""
    return fed_method_class(cfg.federated.method)(cfg)


class FedMethod(ABC):
    """One federated method; the engines call only these methods.

    Class attributes:
        name / config_cls: set by :func:`register_fed_method`.
        run_kind: the run kind (``adaptsim.cl.runkinds``) its experiments run as.
        run_kind_description: that kind's one-line description.

    Args:
        cfg: the :class:`~adaptsim.federated.config.FedExperimentConfig`.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    run_kind: ClassVar[str] = "federated"
    run_kind_description: ClassVar[str] = ""
    #: whether ``adaptsim export-peft`` can write this method's global model as a PEFT LoRA adapter
    exports_peft: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    # -- before a run ------------------------------------------------------------------------
    @classmethod
    def check(cls, cfg: Any) -> None:
        """Config checks that need no data (e.g. a refused option); raises ``ConfigError``."""

    @classmethod
    def prepare(cls, cfg: Any) -> None:
        """Checks and data loading before a run folder exists (default: :meth:`check`)."""
        cls.check(cfg)

    # -- server side -------------------------------------------------------------------------
    @abstractmethod
    def initial_arrays(self) -> Arrays:
        """The server's round-0 global arrays."""

    def aggregate(self, results: Sequence[tuple[Mapping[str, np.ndarray], int]],
                  global_arrays: Mapping[str, np.ndarray]) -> Arrays:
        """The new global arrays from ``[(client arrays, num_examples), ...]`` (default: FedAvg).

        Called only when some reply has ``num_examples > 0``.
        """
        from adaptsim.federated.aggregation import fedavg

        return fedavg(results)

    @abstractmethod
    def evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Server-side evaluation of global arrays: at least ``accuracy`` and ``loss``."""

    def round_metrics(self, replies: Any, evaluation: Mapping[str, float]) -> dict[str, Any]:
        """The method's extra keys of the round record (``replies``: the round's
        :class:`~adaptsim.federated.rounds.RoundReplies`; ``evaluation``: :meth:`evaluate`'s dict)."""
        return {}

    # -- client side -------------------------------------------------------------------------
    @abstractmethod
    def client_fit(self, arrays: Mapping[str, np.ndarray], partition_id: int, client_state: dict | None, *,
                   round_idx: int, node_store: Any = None) -> ClientResult:
        """One client round: load ``arrays``, train locally, return what the client sends.

        Args:
            arrays: the global arrays the server sent.
            partition_id: the client's data partition.
            client_state: what this returned last round for this client (``None`` first).
            round_idx: 0-based server round (seeds the batch order).
            node_store: the client's :class:`~adaptsim.federated.privacy.NodeDPStore` (or ``None``).

        Returns:
            ``(arrays_out, num_examples, metrics, new_state)``; ``metrics`` holds at least
            ``loss``, ``epsilon`` and ``budget_spent``; its numeric entries travel over Flower.
        """

    # -- node checks (Flower server) ---------------------------------------------------------
    def frozen_a_hash(self) -> str | None:
        """sha256 (hex) of the method's frozen/shared initial A arrays, or ``None`` (default: the
        method has none). The Flower handshake compares a node's hash with the server's own and
        refuses a node whose A differs."""
        return None

    def partition_sizes(self) -> list[int] | None:
        """The number of training examples of every partition (index = partition id), from the
        same partitioner the clients use, or ``None`` (default: unknown, no bound). The Flower
        server refuses a reply whose ``num-examples`` exceeds its partition's size."""
        return None
