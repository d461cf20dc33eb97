"""Builds (once per process) everything FedNano runs on: encoder tokens, the pretrained server
model, the client's NanoEdge, the VQA splits and the client partitions.

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang et al., arXiv 2506.14824 (https://arxiv.org/abs/2506.14824).

The frozen encoder's tokens are computed once per image (it is frozen; a CPU speed-up that
does not change the maths). The server pretraining is cached on disk under
``$ADAPTSIM_CACHE/fednano/<key>.pt`` (written atomically) so the many processes of the Flower
modes load bit-identical weights instead of repeating it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adaptsim.cl.backbones import create_backbone
from adaptsim.federated.config import FedExperimentConfig
from adaptsim.federated.fednano.data import ANSWERS, VOCAB, VQASet, make_vqa, question_tokens, split_public
from adaptsim.federated.fednano.model import NanoEdge
from adaptsim.federated.fednano.server_model import ServerLM, hf_body, pretrain
from adaptsim.federated.partition import partition_indices
from adaptsim.federated.task import load_data

__all__ = ["FedNanoSystem", "get_system", "cache_dir"]

log = logging.getLogger(__name__)
_SYSTEMS: dict[tuple, "FedNanoSystem"] = {}
_ENCODED: dict[tuple, tuple[torch.Tensor, torch.Tensor, str]] = {}


def cache_dir() -> Path:
    """``$ADAPTSIM_CACHE/fednano`` (default ``~/.cache/adaptsim/fednano``)."""
    return Path(os.environ.get("ADAPTSIM_CACHE", Path.home() / ".cache" / "adaptsim")) / "fednano"


@torch.no_grad()
def _encode(backbone: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    chunks = [backbone.forward_tokens(x[i:i + batch]).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(chunks) if chunks else torch.empty(0)   # (N, T, enc_dim)


@dataclass
class FedNanoSystem:
    """Everything of one FedNano experiment, per process.

    Attributes:
        cfg: the experiment.
        enc_train / enc_test: (N, T, enc_dim) frozen encoder tokens of the train / test images.
        qtok: (3, L) question token ids.
        server: the frozen server model (server side only; clients reach it through a channel).
        edge: the client-side NanoEdge (frozen connector + embeddings, NanoAdapters).
        peft: the federated-PEFT baseline's client model (a LoRA'd copy of ``server``) or None.
        public: image ids of the server's pretraining split.
        clients: per client, its :class:`VQASet` over ``enc_train``.
        test: the global test :class:`VQASet` over ``enc_test``.
        pretrain_losses: server pretraining losses (empty when loaded from the cache).
    """

    cfg: FedExperimentConfig
    enc_train: torch.Tensor
    enc_test: torch.Tensor
    qtok: torch.Tensor
    server: ServerLM
    edge: NanoEdge
    peft: ServerLM | None
    public: np.ndarray
    clients: list[VQASet]
    test: VQASet
    pretrain_losses: list[float] = field(default_factory=list)
    initial: dict[str, np.ndarray] = field(default_factory=dict)

    def client_model(self) -> nn.Module:
        """The module whose parameters a client trains and sends (edge or PEFT copy)."""
        return self.edge if self.peft is None else self.peft

    def sent_names(self) -> list[str]:
        """Parameter names a client sends (NanoAdapters, or the baseline's LoRA A/B)."""
        if self.peft is None:
            return self.edge.adapter_names()
        return [n for n, p in self.peft.named_parameters() if p.requires_grad]

    def download_bytes(self) -> int:
        """One-time bytes a new client downloads: connector + embeddings (+ whole server model
        for the PEFT baseline). The encoder is assumed on the device already in both cases."""
        state = dict(self.edge.frozen_state())
        if self.peft is not None:
            state.update({f"server.{k}": v for k, v in self.server.state_dict().items()})
        return int(sum(v.numel() * v.element_size() for v in state.values()))


def _key(cfg: FedExperimentConfig) -> tuple:
    f = cfg.federated
    return (cfg.scenario.dataset, cfg.backbone, f.fednano, f.seed, f.a_seed, f.rank, f.alpha, f.method,
            f.num_clients, f.partition, f.dirichlet_alpha, f.partition_seed, f.min_partition_size)


def _pretrained(cfg: FedExperimentConfig, enc: torch.Tensor, digits: torch.Tensor, public: np.ndarray,
                backbone_id: str) -> tuple[ServerLM, nn.Linear, nn.Embedding, list[float]]:
    """The server model, connector and embeddings after pretraining (disk-cached)."""
    nc, seed = cfg.federated.fednano, cfg.federated.seed
    body, dim = (None, nc.d_model) if nc.server_model == "tiny" else hf_body(nc.server_model)
    seq_len = enc.shape[1] + question_tokens().shape[1]
    torch.manual_seed(seed)
    server = ServerLM(dim, nc.layers, nc.heads, seq_len, len(ANSWERS), body)
    connector, embed = nn.Linear(enc.shape[-1], dim), nn.Embedding(len(VOCAB), dim)
    desc = json.dumps({"v": 1, "backbone": backbone_id, "n": len(enc), "public": public.tolist()[:50],
                       "npub": len(public), "seed": seed,
                       "nano": [nc.server_model, nc.d_model, nc.layers, nc.heads, nc.pretrain_per_class,
                                nc.pretrain_steps]}, sort_keys=True)
    path = cache_dir() / f"server-{hashlib.sha1(desc.encode()).hexdigest()[:16]}.pt"
    losses: list[float] = []
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        server.load_state_dict(state["server"])
        connector.load_state_dict(state["connector"])
        embed.load_state_dict(state["embed"])
    else:
        vqa = make_vqa(digits, public)
        losses = pretrain(server, connector, embed, enc[vqa.image], question_tokens()[vqa.question],
                          vqa.answer, nc.pretrain_steps, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"server": server.state_dict(), "connector": connector.state_dict(),
                    "embed": embed.state_dict()}, tmp)
        os.replace(tmp, path)
    for m in (server, connector, embed):
        m.requires_grad_(False).eval()
    return server, connector, embed, losses


def get_system(cfg: FedExperimentConfig) -> FedNanoSystem:
    """The :class:`FedNanoSystem` of ``cfg``, built once per process (and model config).

    Raises:
        ServerModelUnavailableError: for a Hugging Face server model that cannot be loaded.
    """
    key = _key(cfg)
    if key in _SYSTEMS:
        return _SYSTEMS[key]
    f, nc = cfg.federated, cfg.federated.fednano
    train, test = load_data(cfg)
    enc_key = (cfg.scenario.dataset, cfg.backbone, f.seed)
    if enc_key not in _ENCODED:  # the frozen encoder's tokens, shared by every variant
        torch.manual_seed(f.seed)  # random backbones (tiny_vit) are identical in every process
        backbone = create_backbone(cfg.backbone).requires_grad_(False).eval()
        _ENCODED[enc_key] = (_encode(backbone, train.x), _encode(backbone, test.x), backbone.config_id)
    enc_train, enc_test, backbone_id = _ENCODED[enc_key]
    public, private = split_public(train.y, nc.pretrain_per_class, f.seed)
    server, connector, embed, losses = _pretrained(cfg, enc_train, train.y, public, backbone_id)
    edge = NanoEdge(enc_train.shape[-1], len(VOCAB), server.pos.shape[-1],
                    None if nc.baseline != "none" else nc.adapter_rank, nc.adapter_alpha, f.a_seed)
    edge.connector.load_state_dict(connector.state_dict())
    edge.embed.load_state_dict(embed.state_dict())
    peft = None
    if nc.baseline != "none":
        peft = copy.deepcopy(server)
        peft.add_lora(f.rank, f.alpha, f.a_seed, freeze_a=nc.baseline == "ffa_lora")
    parts = partition_indices(train.y[private].numpy(), f.num_clients, f.partition, alpha=f.dirichlet_alpha,
                              seed=f.partition_seed, min_partition_size=f.min_partition_size)
    clients = [make_vqa(train.y, private[p]) for p in parts]
    sys_ = FedNanoSystem(cfg, enc_train, enc_test, question_tokens(), server, edge, peft, public, clients,
                         make_vqa(test.y), losses)
    params = dict(sys_.client_model().named_parameters())
    sys_.initial = {n: params[n].detach().cpu().numpy().copy() for n in sys_.sent_names()}
    _SYSTEMS[key] = sys_
    return sys_
