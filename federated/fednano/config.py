"""FedNano settings: the ``federated.fednano`` section of a federated YAML.

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang, Gao, Chen, Li, Ma, Tresp, arXiv 2506.14824 (https://arxiv.org/abs/2506.14824).
No public code; see docs/methods/fednano.md for every reading of the paper made here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FedNanoConfig", "AGGREGATIONS", "BASELINES"]

AGGREGATIONS = ("fedavg", "fisher")
BASELINES = ("none", "ffa_lora", "lora")


@dataclass(frozen=True)
class FedNanoConfig:
    """FedNano's own knobs (used only when ``federated.method == "fednano"``).

    Attributes:
        aggregation: ``"fedavg"`` (example-weighted mean of the NanoAdapters) or ``"fisher"``
            (diagonal-Fisher merging; clients also upload their Fisher).
        baseline: ``"none"`` = FedNano (split training, NanoAdapters). ``"ffa_lora"`` / ``"lora"``
            = the federated-PEFT baseline on the same VQA task: every client downloads the whole
            model (connector, embeddings, the server transformer) and trains LoRA on the
            transformer's q and v locally (FFA: A frozen from ``federated.a_seed``, B only).
        adapter_rank: rank of each NanoAdapter (down d->r, up r->d).
        adapter_alpha: NanoAdapter scaling is ``adapter_alpha / adapter_rank``.
        server_model: ``"tiny"`` (a small transformer pretrained in-process, cached) or a
            Hugging Face model name (needs ``transformers`` and the weights; clear error offline).
        d_model: width of the tiny server transformer (and of the tokens entering it).
        layers: blocks of the tiny server transformer.
        heads: attention heads of the tiny server transformer.
        pretrain_per_class: images per digit held out of the clients' data as the server's
            public pretraining split (``0`` = no pretraining: a random frozen server model).
        pretrain_steps: Adam steps of the server pretraining.
        fisher_eps: floor of Fisher merging, added to every client's weight ``n_k F_k`` (numerator
            and denominator alike, Matena & Raffel), so near-zero-Fisher entries do not shrink.
        fisher_batch: batch size of the Fisher pass (one split round trip per batch).
    """

    aggregation: str = "fisher"
    baseline: str = "none"
    adapter_rank: int = 4
    adapter_alpha: float = 4.0
    server_model: str = "tiny"
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    pretrain_per_class: int = 20
    pretrain_steps: int = 300
    fisher_eps: float = 1e-8
    fisher_batch: int = 64

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"federated.fednano.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"federated.fednano.baseline must be one of {BASELINES}, got {self.baseline!r}")
        for name in ("adapter_rank", "d_model", "layers", "heads", "fisher_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"federated.fednano.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ValueError(f"federated.fednano.d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.pretrain_per_class < 0 or self.pretrain_steps < 0:
            raise ValueError("federated.fednano.pretrain_per_class and pretrain_steps must be >= 0")
        if not self.fisher_eps > 0:
            raise ValueError(f"federated.fednano.fisher_eps must be > 0, got {self.fisher_eps}")
        if not self.server_model:
            raise ValueError("federated.fednano.server_model must be 'tiny' or a Hugging Face model name")
