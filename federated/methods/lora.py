"""LoRA and FFA-LoRA as federated methods (frozen ViT + LoRA on q, v + linear head).

Paper: FFA-LoRA, "Improving LoRA in Privacy-preserving Federated Learning", Sun et al., ICLR 2024,
https://arxiv.org/abs/2403.12313. ``lora`` trains and sends A, B and the head; ``ffa_lora``
freezes A (built from the server's ``a_seed``) and sends B and the head only, so FedAvg of B is
the average of the clients' weight deltas. Their options are the LoRA fields of
``FederatedConfig`` (rank, alpha, targets, lora_blocks, lr, head_lr, dp). The pieces are the
framework-free functions of :mod:`adaptsim.federated.task`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import numpy as np

from adaptsim.federated.config import FederatedConfig
from adaptsim.federated.methods.base import ClientResult, FedMethod, register_fed_method

__all__ = ["LoRAMethod", "LoRA", "FFALoRA", "a_hash"]


def a_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex) of ``arrays`` in name order, each as contiguous float32 bytes."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return h.hexdigest()


class LoRAMethod(FedMethod):
    """Shared pieces of ``lora`` and ``ffa_lora``; ``sends_a`` is the only difference."""

    sends_a: ClassVar[bool] = True
    exports_peft: ClassVar[bool] = True
    run_kind = "federated"
    run_kind_description = ("federated LoRA / FFA-LoRA on Flower (in-process, simulation engine, SuperLink), "
                            "Opacus DP")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._parts: dict[int, Any] = {}

    @classmethod
    def prepare(cls, cfg: Any) -> None:
        """Load the data and draw the partitions before a run folder exists: a missing data file,
        a partition that cannot be drawn (too many clients, ``min_partition_size``) or a
        ``dp.delta >= 1/n_k`` for some client is a config error."""
        from adaptsim.cl.config import ConfigError
        from adaptsim.federated.partition import partition_indices
        from adaptsim.federated.privacy import check_delta
        from adaptsim.federated.task import load_data

        f = cfg.federated
        train, _ = load_data(cfg)
        try:
            parts = partition_indices(train.targets, f.num_clients, f.partition, alpha=f.dirichlet_alpha,
                                      seed=f.partition_seed, min_partition_size=f.min_partition_size)
        except ValueError as exc:
            raise ConfigError(f"federated: cannot partition {len(train.targets)} training samples over "
                              f"{f.num_clients} clients: {exc}") from None
        if f.dp.enabled:
            for k, idx in enumerate(parts):
                check_delta(f.dp.delta, len(idx), k)

    def model(self):
        from adaptsim.federated.task import get_model

        return get_model(self.cfg)

    def partition(self, partition_id: int):
        """The client's training partition (cached on this object)."""
        from adaptsim.federated.task import client_dataset

        if partition_id not in self._parts:
            self._parts[partition_id] = client_dataset(self.cfg, partition_id, self.cfg.federated.num_clients)[0]
        return self._parts[partition_id]

    def initial_arrays(self) -> dict[str, np.ndarray]:
        from adaptsim.federated.task import initial_arrays

        return initial_arrays(self.cfg)

    def evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        from adaptsim.federated.task import evaluate, load_data

        return evaluate(self.model(), dict(arrays), load_data(self.cfg)[1], self.cfg.federated.eval_batch_size)

    def frozen_a_hash(self) -> str | None:
        """sha256 of the initial A arrays (``lora_A`` parameters as built from ``a_seed``, in name
        order, float32 bytes): FFA-LoRA's frozen A and LoRA's initial A."""
        from adaptsim.federated.task import initial_arrays

        if self.sends_a:  # LoRA: A as built from a_seed is part of the initial global arrays
            return a_hash({k: v for k, v in initial_arrays(self.cfg).items() if "lora_A" in k})
        # FFA-LoRA: A is frozen, so the cached model's A is still the A built from a_seed
        return a_hash({n: p.detach().cpu().numpy() for n, p in self.model().named_parameters() if "lora_A" in n})

    def partition_sizes(self) -> list[int]:
        """Training examples per partition (the partitioner the clients use, on the loaded data)."""
        from adaptsim.federated.partition import partition_indices
        from adaptsim.federated.task import load_data

        f = self.cfg.federated
        parts = partition_indices(load_data(self.cfg)[0].targets, f.num_clients, f.partition,
                                  alpha=f.dirichlet_alpha, seed=f.partition_seed,
                                  min_partition_size=f.min_partition_size)
        return [len(idx) for idx in parts]

    def client_fit(self, arrays: Mapping[str, np.ndarray], partition_id: int, client_state: dict | None, *,
                   round_idx: int, node_store: Any = None) -> ClientResult:
        from adaptsim.federated.task import client_fit

        return client_fit(self.model(), dict(arrays), self.partition(partition_id), self.cfg, client_state,
                          client_id=partition_id, round_idx=round_idx, node_store=node_store)


@register_fed_method("lora", FederatedConfig)
class LoRA(LoRAMethod):
    """Vanilla federated LoRA: A, B and the head are trained and averaged."""

    sends_a = True


@register_fed_method("ffa_lora", FederatedConfig)
class FFALoRA(LoRAMethod):
    """FFA-LoRA: A frozen from the shared ``a_seed``; B and the head are trained and averaged."""

    sends_a = False
