"""FedNano's client side: the NanoEdge (frozen encoder output -> frozen connector, frozen text
embeddings, trainable NanoAdapters on both token streams).

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang et al., arXiv 2506.14824 (https://arxiv.org/abs/2506.14824). No public code.

Readings of the paper (it gives neither placement nor ranks):
- a NanoAdapter is a residual low-rank bottleneck ``x + s * up(down(x))`` (LoRA-style down d->r,
  up r->d, ``s = alpha / r``), ``up`` zero-initialised so round 0 equals the pretrained model;
- one NanoAdapter on the image tokens (connector output) and one on the text embeddings, i.e.
  on the token streams right before they enter the server model;
- the modality encoder (a backbone of :mod:`adaptsim.cl.backbones`) is frozen and its tokens are
  computed once per image (see :mod:`.task`), so this module starts at the encoder output.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["NanoAdapter", "NanoEdge"]

log = logging.getLogger(__name__)


class NanoAdapter(nn.Module):
    """Residual low-rank adapter ``x + scale * up(down(x))`` on a token stream.

    Args:
        dim: token width d.
        rank: bottleneck r.
        alpha: scale numerator (``scale = alpha / rank``).
        seed: seed of ``down``'s init (``up`` starts at zero).

    Raises:
        ValueError: for a non-positive rank.
    """

    def __init__(self, dim: int, rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"federated.fednano.adapter_rank must be >= 1, got {rank}")
        self.down = nn.Linear(dim, rank, bias=False)  # weight A: (r, d)
        self.up = nn.Linear(rank, dim, bias=False)    # weight B: (d, r)
        self.scale = float(alpha) / rank
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bound = 1.0 / dim ** 0.5
            self.down.weight.uniform_(-bound, bound, generator=gen)
            self.up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, d)."""
        return x + self.scale * self.up(self.down(x))

    def per_example_grads(self, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact per-example gradients of ``sum_t <forward(x)_t, g_t>`` w.r.t. the weights.

        Args:
            x: (B, T, d) adapter inputs.
            g: (B, T, d) gradient of each example's own loss w.r.t. the adapter output.

        Returns:
            ``{"down.weight": (B, r, d), "up.weight": (B, d, r)}``.
        """
        A, Bw = self.down.weight, self.up.weight          # (r, d), (d, r)
        h = x @ A.t()                                     # (B, T, r)
        gB = g @ Bw                                       # (B, T, r)
        return {"down.weight": self.scale * torch.einsum("btr,btd->brd", gB, x),
                "up.weight": self.scale * torch.einsum("btd,btr->bdr", g, h)}


class NanoEdge(nn.Module):
    """What a FedNano client holds besides its encoder: connector, text embeddings, NanoAdapters.

    Args:
        enc_dim: width of the encoder tokens.
        vocab: text vocabulary size.
        dim: width of the server model's tokens.
        rank: NanoAdapter rank (``None``: no adapters, for the federated-PEFT baseline).
        alpha: NanoAdapter alpha.
        seed: adapter init seed (the same on every client and the server).
    """

    def __init__(self, enc_dim: int, vocab: int, dim: int, rank: int | None, alpha: float, seed: int) -> None:
        super().__init__()
        self.connector = nn.Linear(enc_dim, dim).requires_grad_(False)   # frozen, from the server
        self.embed = nn.Embedding(vocab, dim).requires_grad_(False)      # frozen, from the server
        self.img_adapter = NanoAdapter(dim, rank, alpha, seed) if rank else None
        self.txt_adapter = NanoAdapter(dim, rank, alpha, seed + 1) if rank else None

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Connector and embedding weights (what the client downloads once)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("connector.", "embed."))}

    def streams(self, enc: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter inputs: image tokens (B, T, d) from the connector, text tokens (B, L, d)."""
        return self.connector(enc), self.embed(q)

    def forward(self, enc: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Adapted tokens (B, T + L, d) sent to the server model.

        Args:
            enc: (B, T, enc_dim) frozen encoder tokens.
            q: (B, L) question token ids.
        """
        xi, xt = self.streams(enc, q)
        if self.img_adapter is not None:
            xi, xt = self.img_adapter(xi), self.txt_adapter(xt)
        return torch.cat([xi, xt], dim=1)

    def adapter_names(self) -> list[str]:
        """Names of the trainable NanoAdapter parameters (what a client sends)."""
        return [n for n, _ in self.named_parameters() if "_adapter." in n]
