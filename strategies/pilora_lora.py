"""PILoRA's incremental LoRA: one LoRA on the query and value projections per experience.

Part of PILoRA (Guo et al., ECCV 2024, https://arxiv.org/abs/2401.02094; official code
Ghy0501/PILoRA). A ViT block's fused ``qkv`` ``nn.Linear`` is wrapped by
:class:`IncrementalQVLoRA`, which keeps, per experience ``name``, four parameters in
``nn.ParameterDict`` s keyed by that name::

    lora_A_q[name] (r, D)   lora_B_q[name] (D, r)   lora_A_v[name] (r, D)   lora_B_v[name] (D, r)

and adds ``x A^T B^T`` to the query (columns ``[0, D)``) and value (``[2D, 3D)``) outputs, with
scaling 1 (the official LoRA is a pair of bias-free ``nn.Linear`` s). Which LoRAs are applied is
set by :meth:`IncrementalQVLoRA.use`: a list of ``(A_q, B_q, A_v, B_v)`` tuples computed by
:func:`lora_terms` from the mode:

* ``"current"``: only the newest LoRA (training, as the official client model's ``switch_lora``);
* ``"sum"``: every LoRA, ``W = W0 + sum_k B_k A_k`` (the paper's incremental LoRA at inference);
* ``"official"``: the official server model's merge: one LoRA ``(A_0 + A_t, B_0 + B_t)`` of the
  first and the newest experience (products of sums, the middle ones left out).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from adaptsim.strategies.adapters.lora import init_down_

__all__ = ["IncrementalQVLoRA", "inject_incremental_lora", "lora_terms", "layer_seed", "orthogonality_loss",
           "l1_loss", "MERGE_MODES"]

MERGE_MODES = ("sum", "official")
_KINDS = ("A_q", "B_q", "A_v", "B_v")


class IncrementalQVLoRA(nn.Module):
    """A frozen fused ``qkv`` projection plus one q/v LoRA per experience (see the module doc)."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear) or base.out_features != 3 * base.in_features:
            raise TypeError("IncrementalQVLoRA wraps a fused qkv nn.Linear (out = 3 * in)")
        self.base_layer = base.requires_grad_(False)
        self.dim, self.rank = base.in_features, int(rank)
        self.lora_A_q, self.lora_B_q = nn.ParameterDict(), nn.ParameterDict()
        self.lora_A_v, self.lora_B_v = nn.ParameterDict(), nn.ParameterDict()
        self._terms: list[tuple[torch.Tensor, ...]] = []

    @property
    def names(self) -> list[str]:
        return list(self.lora_A_q.keys())

    def pair(self, name: str) -> tuple[nn.Parameter, ...]:
        """``(A_q, B_q, A_v, B_v)`` of LoRA ``name``."""
        return tuple(getattr(self, f"lora_{k}")[name] for k in _KINDS)

    def add(self, name: str, seed: int) -> None:
        """A new LoRA: A Kaiming-uniform (``nn.Linear``'s init, seeded), B zero (a no-op)."""
        w = self.base_layer.weight
        for which, s in (("q", seed), ("v", seed + 1)):
            A = init_down_((self.rank, self.dim), "kaiming", s).to(w.device, w.dtype)
            getattr(self, f"lora_A_{which}")[name] = nn.Parameter(A)
            getattr(self, f"lora_B_{which}")[name] = nn.Parameter(torch.zeros(self.dim, self.rank,
                                                                              device=w.device, dtype=w.dtype))

    def use(self, terms: list[tuple[torch.Tensor, ...]]) -> None:
        """The ``(A_q, B_q, A_v, B_v)`` tuples the next forwards add (see :func:`lora_terms`)."""
        self._terms = list(terms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self._terms:
            return y
        D = self.dim
        dq = sum((x @ Aq.T) @ Bq.T for Aq, Bq, _, _ in self._terms)
        dv = sum((x @ Av.T) @ Bv.T for _, _, Av, Bv in self._terms)
        return torch.cat([y[..., :D] + dq, y[..., D:2 * D], y[..., 2 * D:] + dv], dim=-1)


def lora_terms(layer: IncrementalQVLoRA, mode: str) -> list[tuple[torch.Tensor, ...]]:
    """The LoRA tuples a forward in ``mode`` (``current``, ``sum``, ``official``) applies."""
    names = layer.names
    if not names:
        return []
    if mode == "current":
        return [layer.pair(names[-1])]
    if mode == "sum":
        return [layer.pair(n) for n in names]
    if mode == "official":
        first, last = layer.pair(names[0]), layer.pair(names[-1])
        return [first] if len(names) == 1 else [tuple(a + b for a, b in zip(first, last))]
    raise ValueError(f"unknown LoRA mode {mode!r}; expected current or one of {MERGE_MODES}")


def inject_incremental_lora(blocks: nn.Module, block_ids: tuple[int, ...] | None,
                            rank: int) -> dict[str, IncrementalQVLoRA]:
    """Wraps ``blocks[i].attn.qkv`` of the chosen blocks (``None``: all); returns ``{"b{i}": layer}``."""
    blocks = list(blocks)
    ids = range(len(blocks)) if block_ids is None else block_ids
    out = {}
    for i in ids:
        if not 0 <= i < len(blocks):
            raise ValueError(f"lora_blocks: block {i} outside [0, {len(blocks)})")
        attn = blocks[i].attn
        layer = attn.qkv if isinstance(attn.qkv, IncrementalQVLoRA) else IncrementalQVLoRA(attn.qkv, rank)
        attn.qkv = layer
        out[f"b{i}"] = layer
    return out


def layer_seed(seed: int, layer_key: str, exp_index: int) -> int:
    """Seed of experience ``exp_index``'s LoRA in layer ``layer_key`` (equal on every client)."""
    return (seed * 1_000_003 + zlib.crc32(layer_key.encode()) + 7919 * exp_index) % 2**31


def orthogonality_loss(layers: list[IncrementalQVLoRA]) -> torch.Tensor:
    """``sum_layers sum_{k < t} (|A_q,k A_q,t^T|.sum() + |A_v,k A_v,t^T|.sum())``: the official
    entry-wise L1 norm of the products of the old LoRAs' A with the newest one's A (0 at t = 0)."""
    total = None
    for layer in layers:
        names = layer.names
        if len(names) < 2:
            continue
        Aq, _, Av, _ = layer.pair(names[-1])
        for n in names[:-1]:
            oq, _, ov, _ = layer.pair(n)
            term = (oq.detach() @ Aq.T).abs().sum() + (ov.detach() @ Av.T).abs().sum()
            total = term if total is None else total + term
    if total is None:
        p = layers[0].base_layer.weight
        return p.new_zeros(())
    return total


def l1_loss(layers: list[IncrementalQVLoRA]) -> torch.Tensor:
    """Entry-wise L1 norm of the newest LoRA's A matrices (q and v), summed over the layers."""
    terms = [layer.pair(layer.names[-1]) for layer in layers if layer.names]
    if not terms:
        return layers[0].base_layer.weight.new_zeros(())
    return sum(Aq.abs().sum() + Av.abs().sum() for Aq, _, Av, _ in terms)
