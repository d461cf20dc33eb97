"""MOS adapter sets: one growable bank of bottleneck adapters (with biases) per ViT block.

Part of MOS (Sun et al., "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental
Learning", AAAI 2025, https://arxiv.org/abs/2412.09441; official code sun-hailong/AAAI25-MOS).

Each block gets a :class:`MOSAdapterLayer` placed in parallel to its MLP (through
:func:`adaptsim.strategies.components.parallel_adapter.wrap_blocks_with_parallel_adapter`). The
layer holds every adapter set of that block in an :class:`~adaptsim.strategies.adapters.AdapterBank`
keyed ``t0, t1, ...`` (bank id = task id) and computes, for adapter ``k``::

    adapter_k(h) = scale * (W_up,k relu(W_down,k h + b_down,k) + b_up,k)      # h: (B, T, D)

The bank has no biases, so they are handled outside it:

* ``b_down`` is the last column of the bank's ``A`` (the bank runs with ``dim_in = D + 1`` on
  ``[h, 1]``), which is exact and keeps the multi-adapter kernel path;
* ``b_up`` is a separate dict, a :class:`~adaptsim.strategies.adapters.params.KeyedBiasParams`
  called with the samples' adapter ids.

Routing is a context set by the strategy before a forward (:meth:`MOSAdapterLayer.route`): an
adapter name (one adapter for the whole batch; dropout 0.1 applies in training mode, as in the
official adapter) or a ``(B,)`` tensor of adapter ids (one batched pass, each sample with its
own adapter). Both run as an ``AdapterGate`` (SGMV) through the bank's parameter containers, a
name being the id tensor with one value. Every trainable parameter thus belongs to a module that
is called (``bank.mos_A``, ``bank.mos_B``, ``up_bias``), so Opacus computes exact per-sample
gradients for MOS (grad samplers in :mod:`adaptsim.strategies.adapters.grad_samplers`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adaptsim.kernels import AdapterGate
from adaptsim.strategies.adapters import AdapterBank
from adaptsim.strategies.adapters.params import KeyedBiasParams

__all__ = ["MOSAdapterLayer", "ema_merge_"]


class MOSAdapterLayer(nn.Module):
    """All adapter sets of one ViT block (MOS bottleneck adapters with biases).

    Args:
        dim: token width D.
        rank: bottleneck width (MOS ``ffn_num``).
        scale: output scale (MOS ``ffn_adapter_scalar``, 0.1).
        dropout: dropout on the bottleneck activations in training mode (0.1 in MOS).
    """

    def __init__(self, dim: int, rank: int, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.dim, self.rank, self.scale, self.dropout = dim, rank, float(scale), float(dropout)
        # (rank, D + 1) down weights with the down bias as last column; (D, rank) up weights.
        self.bank = AdapterBank(dim + 1, dim, rank, activation="relu", scale=scale, prefix="mos_")
        self.up_bias = KeyedBiasParams()  # called with the samples' adapter ids (Opacus hooks it)
        # official merge mode only: snapshots of each set taken when it was stored (the official
        # code's prefix sums are built from these, while the stored sets themselves drift).
        self.snapshots = nn.ParameterDict()
        self._route: str | torch.Tensor | None = None

    # -- structure ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return self.bank.names

    def add(self, name: str, copy_from: str | None = None, trainable: bool = True) -> int:
        """Adds adapter ``name`` (fresh MOS init or a copy of ``copy_from``); returns its bank id.

        Fresh init follows the official ``lora`` option: Kaiming-uniform down weight, zero up
        weight and zero biases (so a new adapter is a no-op).
        """
        idx = self.bank.add(name, trainable)
        A, B = self.bank._A[name], self.bank._B[name]
        with torch.no_grad():
            if copy_from is None:
                nn.init.kaiming_uniform_(A[:, : self.dim], a=math.sqrt(5))  # fan_in = D, not D + 1
                A[:, self.dim].zero_()
                bias = torch.zeros(self.dim, device=A.device, dtype=A.dtype)
            else:
                A.copy_(self.bank._A[copy_from])
                B.copy_(self.bank._B[copy_from])
                bias = self.up_bias[copy_from].detach().clone()
        self.up_bias[name] = nn.Parameter(bias, requires_grad=trainable)
        return idx

    def remove(self, name: str) -> None:
        """Removes adapter ``name`` (used for the official mode's temporary ``carry`` set)."""
        self.bank.index(name)
        del self.bank._A[name], self.bank._B[name], self.up_bias[name]

    def freeze(self, name: str) -> None:
        self.bank.freeze(name)
        self.up_bias[name].requires_grad_(False)

    def params(self, name: str) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """``(A (rank, D+1), B (D, rank), b_up (D,))`` of adapter ``name``."""
        return self.bank._A[name], self.bank._B[name], self.up_bias[name]

    def snapshot(self, name: str) -> None:
        """Keeps a frozen copy of adapter ``name`` as it is now (official merge mode)."""
        for part, p in zip("ABb", self.params(name)):
            self.snapshots[f"{name}_{part}"] = nn.Parameter(p.detach().clone(), requires_grad=False)

    def snapshot_params(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.snapshots[f"{name}_{part}"] for part in "ABb")  # type: ignore[return-value]

    # -- forward ------------------------------------------------------------------------------
    def route(self, target: str | torch.Tensor | None) -> None:
        """Sets what the next forwards use: an adapter name, (B,) bank ids, or ``None`` (off)."""
        self._route = target

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Adapter update (B, T, D) of the post-attention stream ``h`` (B, T, D)."""
        r = self._route
        if r is None:
            return torch.zeros_like(h)
        x1 = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)  # (B, T, D+1): bias column
        if isinstance(r, str):  # one adapter for the batch: the id tensor with one value
            ids = torch.full((h.shape[0],), self.bank.index(r), dtype=torch.long, device=h.device)
        else:
            ids = r
        if isinstance(r, str) and self.training and self.dropout > 0:
            y = self._dropout_forward(x1, ids)
        else:  # no dropout (the batched retrieval is an inference path)
            y = self.bank(x1, adapter_ids=ids)  # (B, T, D)
        return y + self.up_bias(ids, scale=self.scale)[:, None, :]

    def _dropout_forward(self, x1: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``AdapterBank.forward(x1, adapter_ids=ids)`` with dropout on the bottleneck activations.

        The mask multiplies ``pre`` between the bank's shrink and expand containers:
        ``relu(pre * m) = relu(pre) * m`` for a mask ``m >= 0``, so this is dropout after the ReLU.
        """
        bank = self.bank
        down, up = bank.mos_A, bank.mos_B  # the bank's called containers (prefix "mos_")
        nb, nt = x1.shape[:2]
        gate = AdapterGate(ids, self.rank, tokens_per_id=nt)
        pre = down(x1, gate=gate, backend=bank.backend)  # (B, T, rank): each sample's adapter block
        keep = torch.rand(nb * nt, self.rank, device=x1.device) >= self.dropout  # (B*T, rank)
        pre = pre * (keep.to(pre.dtype) / (1.0 - self.dropout)).view(nb, nt, self.rank)
        return up(x1, pre, A=down.stacked(), scaling=self.scale, activation="relu", gate=gate,
                  backend=bank.backend)  # (B, T, D)


@torch.no_grad()
def ema_merge_(layer: MOSAdapterLayer, name: str, sources: list[str], beta: float,
               use_snapshots: bool = False) -> None:
    """MOS adapter merge: ``theta_name <- (1 - beta) theta_name + beta * mean(theta_sources)``.

    Applies to the down/up weights and both biases. The parameters are rebound (``p.data =``),
    not updated in place, like the official code; this keeps tensors saved for backward valid
    when the official mode merges in the middle of a forward pass.

    Args:
        layer: the block's adapter layer.
        name: the adapter to merge (in place).
        sources: the earlier adapters whose mean is the target; nothing happens when empty.
        beta: merge weight (MOS ``adapter_momentum``).
        use_snapshots: take the sources from the snapshots taken at storing time (official
            prefix sums) instead of the live adapters.
    """
    if not sources or beta == 0:
        return
    src = [layer.snapshot_params(s) if use_snapshots else layer.params(s) for s in sources]
    for i, p in enumerate(layer.params(name)):
        mean = torch.stack([s[i] for s in src]).mean(0)
        p.data = (1.0 - beta) * p.data + beta * mean
