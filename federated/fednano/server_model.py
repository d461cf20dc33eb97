"""FedNano's server side: the frozen transformer that never leaves the server.

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang et al., arXiv 2506.14824 (https://arxiv.org/abs/2506.14824). The paper's server
model is the LLM of MiniGPT-4 / LLaVA-1.5 (GPU-only). Offline stand-in (documented departure):
a small pre-LN transformer (``d_model``, ``layers``, ``heads``) *pretrained in-process* on a
public split of the VQA task (images held out of every client), jointly with the connector and
the text embeddings (like LLaVA's stage-1 alignment); then everything is frozen. The answer is
read from the last token through a frozen answer head (the LLM's output layer restricted to the
answer vocabulary). Pretraining is deterministic from the seed and cached on disk
(``$ADAPTSIM_CACHE/fednano``) so every process (Flower spawns one per message) gets the same
weights. A Hugging Face model name loads that model as the frozen body instead (offline: a clear
error). LoRA on q and v of the fused qkv (``LoRALinear``) serves the federated-PEFT baseline.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from torch.nn import functional as F

from adaptsim.strategies.adapters import LoRALinear

__all__ = ["ServerLM", "TinyBlock", "ServerModelUnavailableError", "hf_body"]

log = logging.getLogger(__name__)


class ServerModelUnavailableError(RuntimeError):
    """A named Hugging Face server model cannot be loaded (offline, or ``transformers`` missing)."""


class TinyBlock(nn.Module):
    """Pre-LN transformer block with a fused ``qkv`` projection (so LoRA can target q, v)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, d) -> (B, S, d)."""
        b, s, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])          # (B, H, S, d/H)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


def hf_body(name: str) -> tuple[nn.Module, int]:
    """A Hugging Face encoder as the frozen body (``inputs_embeds`` in, hidden states out).

    Returns:
        ``(module mapping (B, S, h) -> (B, S, h), hidden size h)``.

    Raises:
        ServerModelUnavailableError: if ``transformers`` or the weights are unavailable.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        from transformers import AutoModel
    except ImportError as exc:
        raise ServerModelUnavailableError(
            f"federated.fednano.server_model={name!r} needs the 'transformers' package; "
            "use server_model: tiny offline") from exc
    try:
        model = AutoModel.from_pretrained(name, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001 - every loader failure gets the same advice
        raise ServerModelUnavailableError(
            f"federated.fednano.server_model={name!r} could not be loaded "
            f"({'HF_HUB_OFFLINE is set and it is not cached' if offline else type(exc).__name__}: {exc}); "
            "use server_model: tiny offline") from exc

    class _Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.hf(inputs_embeds=x).last_hidden_state

    return _Body(), int(model.config.hidden_size)


class ServerLM(nn.Module):
    """The server model: positions + transformer body + final norm + answer head (last token).

    Args:
        dim: token width.
        layers: tiny-transformer blocks (ignored with ``body``).
        heads: attention heads.
        seq_len: tokens per example (image tokens + question tokens).
        n_answers: answer vocabulary size.
        body: an external body (a Hugging Face model from :func:`hf_body`) instead of the tiny one.
    """

    def __init__(self, dim: int, layers: int, heads: int, seq_len: int, n_answers: int,
                 body: nn.Module | None = None) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.body = body if body is not None else nn.Sequential(*[TinyBlock(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_answers)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Answer logits (B, n_answers) from tokens (B, S, d)."""
        h = self.body(tokens + self.pos)
        return self.head(self.norm(h[:, -1]))

    def add_lora(self, rank: int, alpha: float, a_seed: int, freeze_a: bool) -> None:
        """LoRA on q and v of every tiny block's fused ``qkv`` (the federated-PEFT baseline).

        Raises:
            ValueError: with a Hugging Face body (not supported here).
        """
        if not isinstance(self.body, nn.Sequential):
            raise ValueError("federated.fednano.baseline needs server_model: tiny")
        d = self.pos.shape[-1]
        for i, blk in enumerate(self.body):
            blk.qkv = LoRALinear(blk.qkv, rank, alpha, out_slices=[(0, d), (2 * d, 3 * d)], seed=a_seed + 100 * i)
            if freeze_a:
                for A, _, _ in blk.qkv.pairs():
                    A.requires_grad_(False)


def pretrain(server: ServerLM, connector: nn.Linear, embed: nn.Embedding, enc: torch.Tensor,
             q: torch.Tensor, answers: torch.Tensor, steps: int, seed: int, lr: float = 3e-3,
             batch_size: int = 64) -> list[float]:
    """Server-side pretraining on the public split (jointly with connector and embeddings).

    Everything is frozen again afterwards. A Hugging Face body is kept frozen throughout (only
    the positions, norm, head, connector and embeddings learn).

    Args:
        server: the server model.
        connector: encoder -> token projection (shipped frozen to clients afterwards).
        embed: text embeddings (shipped frozen to clients afterwards).
        enc: (M, T, enc_dim) encoder tokens, one row per example.
        q: (M, L) question ids.
        answers: (M,) answer ids.
        steps: Adam steps (0: nothing is trained).
        seed: batch-order seed.
        lr: Adam learning rate.
        batch_size: batch size.

    Returns:
        The loss of every step.
    """
    tiny = isinstance(server.body, nn.Sequential)
    params = [p for n, p in server.named_parameters() if tiny or not n.startswith("body.")]
    params += list(connector.parameters()) + list(embed.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    server.train()
    for _ in range(steps if len(answers) else 0):
        idx = torch.randint(len(answers), (min(batch_size, len(answers)),), generator=gen)
        tokens = torch.cat([connector(enc[idx]), embed(q[idx])], dim=1)   # (B, T + L, d)
        loss = F.cross_entropy(server(tokens), answers[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    server.eval()
    for p in params:
        p.grad = None  # no pretraining gradient is left on the frozen server model
    for m in (server, connector, embed):
        m.requires_grad_(False)
    if losses:
        log.info("server pretraining: %d steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    return losses
