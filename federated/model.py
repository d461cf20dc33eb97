"""The federated model: frozen timm ViT + LoRA on q/v of the fused ``qkv`` + a linear head.

Paper: FFA-LoRA, "Improving LoRA in Privacy-preserving Federated Learning", Sun et al., ICLR 2024,
https://arxiv.org/abs/2403.12313. LoRA uses the shared ``LoRALinear`` layer (two separate
parameters A and B per output slice, so A can be frozen and Opacus has an exact grad sampler;
the methods notes warn against PEFT wrappers under Opacus).

Departures / decisions:
- LoRA on the q and v slices of timm's fused ``attn.qkv`` (``out_slices``), as the paper's q, v.
- ``lora_blocks=N`` adapts only the last N blocks; the frozen blocks before them are computed
  once per dataset (:meth:`FedLoRAModel.encode_prefix`) and cached: a CPU speed-up, not in the
  paper (which adapts every layer). ``None`` adapts all blocks.
- LoRA goes in through :func:`~adaptsim.strategies.adapters.inject_lora` on the timm model's
  ``blocks.{i}.attn.qkv`` (the names a PEFT user sees on the same timm model), with its one
  seeding rule: the A of layer ``name``, slice ``j`` is drawn from ``(a_seed + crc32(name)) % 2**31
  + j`` (``init_A="kaiming"``, PEFT's default), so every client that got ``a_seed`` holds
  bit-identical A. :mod:`adaptsim.federated.peft_export` writes a trained model as a PEFT adapter.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from adaptsim.cl.backbones import Backbone
from adaptsim.strategies.adapters import LoRALinear, inject_lora

log = logging.getLogger(__name__)

__all__ = ["FedLoRAModel", "qkv_slices"]


def qkv_slices(targets: tuple[str, ...], dim: int) -> list[tuple[int, int]]:
    """Output slices of a fused qkv projection (out = 3*dim) for ``targets`` ⊆ {q, k, v}."""
    return [("qkv".index(t) * dim, ("qkv".index(t) + 1) * dim) for t in targets]


class FedLoRAModel(nn.Module):
    """Frozen backbone with LoRA in the attention of its last blocks, and a trainable head.

    Args:
        backbone: a timm-kind :class:`adaptsim.cl.backbones.Backbone` (frozen).
        n_classes: head outputs.
        rank: LoRA rank.
        alpha: LoRA alpha (scaling alpha / rank).
        targets: subset of ``("q", "k", "v")``.
        lora_blocks: adapt the last N blocks (``None`` = all).
        a_seed: seed of the A matrices.
        freeze_a: FFA-LoRA: A keeps ``requires_grad=False``.
        head_seed: seed of the head's init.

    Raises:
        ValueError: for a non-timm backbone.
    """

    def __init__(self, backbone: Backbone, n_classes: int, *, rank: int, alpha: float,
                 targets: tuple[str, ...], lora_blocks: int | None, a_seed: int, freeze_a: bool,
                 head_seed: int = 0) -> None:
        super().__init__()
        if backbone.kind != "timm":
            raise ValueError(f"backbone.name {backbone.name!r}: federated LoRA needs a timm ViT")
        self.backbone = backbone.requires_grad_(False).eval()
        depth = len(backbone.blocks)
        n = depth if lora_blocks is None else min(lora_blocks, depth)
        self.start = depth - n
        self.scaling = float(alpha) / rank
        slices = qkv_slices(tuple(targets), backbone.token_dim)
        self.targets = tuple(targets)
        self.qkv_names = [f"blocks.{i}.attn.qkv" for i in range(self.start, depth)]  # in backbone.model
        layers = inject_lora(backbone.model, self.qkv_names, rank, alpha, out_slices=slices, seed=a_seed)
        assert len(layers) == n, layers.keys()
        if freeze_a:
            for layer in layers.values():
                for A, _, _ in layer.pairs():
                    A.requires_grad_(False)
        gen = torch.Generator().manual_seed(head_seed)
        self.head = nn.Linear(backbone.embed_dim, n_classes)
        with torch.no_grad():  # seeded, so the server's initial head is reproducible
            bound = 1.0 / backbone.embed_dim ** 0.5
            self.head.weight.uniform_(-bound, bound, generator=gen)
            self.head.bias.zero_()
        self.prefix_id = f"{backbone.config_id}|prefix{self.start}"

    def train(self, mode: bool = True) -> "FedLoRAModel":
        """Keeps the frozen backbone in eval mode (no dropout / drop-path) while training.

        The ``LoRALinear`` layers follow ``mode``: Opacus only records activations of modules
        in training mode.
        """
        super().train(mode)
        self.backbone.eval()
        for layer in self.lora_layers().values():
            layer.train(mode)
        return self

    @torch.no_grad()
    def encode_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens entering the first adapted block.

        Args:
            x: (B, C, H, W) images (uint8 or float).

        Returns:
            (B, T, D) float tokens.
        """
        m = self.backbone.model
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(self.backbone.preprocess(x)))))
        for blk in list(self.backbone.blocks)[: self.start]:
            t = blk(t)
        return t  # (B, T, D)

    def forward_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) from prefix tokens (B, T, D)."""
        m = self.backbone.model
        for blk in list(self.backbone.blocks)[self.start:]:
            t = blk(t)
        feats = m.forward_head(m.norm(t), pre_logits=True)  # (B, D)
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes); ``x`` is images (B, C, H, W) or prefix tokens (B, T, D)."""
        if x.dim() == 4:
            x = self.encode_prefix(x)
        return self.forward_tokens(x)

    def lora_layers(self) -> dict[str, LoRALinear]:
        """``{qualified name: LoRALinear}`` of the adapted projections."""
        return {n: m for n, m in self.named_modules() if isinstance(m, LoRALinear)}
