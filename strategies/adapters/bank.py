"""A growable bank of equal-rank adapters keyed by name (multi-adapter / mixture paths).

Used by retrieval-style methods (one adapter per sample, Punica SGMV style batching, see
Chen et al. 2023, https://arxiv.org/abs/2310.18547) and router mixtures (SEMA,
https://arxiv.org/abs/2403.18886).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adaptsim.kernels import AdapterGate, DenseGate

from .params import DownParams, UpParams

__all__ = ["AdapterBank"]


class AdapterBank(nn.Module):
    """Stack of adapters ``x -> scale * phi(x A_k^T) B_k^T`` keyed by name.

    Each adapter's ``A_k`` (rank, dim_in) and ``B_k`` (dim_out, rank) is its own entry of the
    ``{prefix}A`` / ``{prefix}B`` ``ParameterDict``s (parameter names ``bank_A.<name>``).
    Freezing sets ``requires_grad=False`` on those entries; the stacked A/B are rebuilt with
    ``torch.cat`` every forward. That costs one copy of ``n*rank*(dim_in+dim_out)`` weights per
    call -- small next to the activations -- and in exchange frozen adapters get no gradient
    at all, so they stay bit-identical under any optimizer (even with weight decay).

    Args:
        dim_in: input width.
        dim_out: output width.
        rank: rank of every adapter.
        activation: ``"identity"`` (LoRA) or ``"relu"`` (bottleneck).
        scale: output scale.
        prefix: parameter-name prefix (for :func:`adapter_state_dict`).
    """

    def __init__(self, dim_in: int, dim_out: int, rank: int, *, activation: str = "identity",
                 scale: float = 1.0, prefix: str = "bank_") -> None:
        super().__init__()
        if activation not in ("identity", "relu"):
            raise ValueError(f"activation must be 'identity' or 'relu', got {activation!r}")
        self.dim_in, self.dim_out, self.rank = dim_in, dim_out, int(rank)
        self.activation, self.scale, self.prefix = activation, float(scale), prefix
        self.add_module(f"{prefix}A", DownParams())  # called for the shrink (Opacus hooks it)
        self.add_module(f"{prefix}B", UpParams())  # called for the gated expand
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # tracks device/dtype
        self.backend = "auto"

    @property
    def _A(self) -> DownParams:
        return getattr(self, f"{self.prefix}A")

    @property
    def _B(self) -> UpParams:
        return getattr(self, f"{self.prefix}B")

    @property
    def names(self) -> list[str]:
        """Adapter names in id order."""
        return list(self._A.keys())

    def __len__(self) -> int:
        return len(self._A)

    def index(self, name: str) -> int:
        """Integer id of adapter ``name`` (KeyError listing the names if unknown)."""
        if name not in self._A:
            raise KeyError(f"unknown adapter {name!r}; have {self.names}")
        return self.names.index(name)

    def add(self, name: str, trainable: bool = True) -> int:
        """Adds adapter ``name`` (A kaiming, B zero: a no-op until trained); returns its id."""
        if not name or "." in name or name in self._A:
            raise ValueError(f"adapter name {name!r} is empty, contains '.', or exists")
        ref = self._anchor
        A = torch.empty(self.rank, self.dim_in, device=ref.device, dtype=ref.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(self.dim_out, self.rank, device=ref.device, dtype=ref.dtype)
        self._A[name] = nn.Parameter(A, requires_grad=trainable)
        self._B[name] = nn.Parameter(B, requires_grad=trainable)
        return len(self) - 1

    def freeze(self, name: str, frozen: bool = True) -> None:
        """Freezes (or with ``frozen=False`` unfreezes) adapter ``name``."""
        self.index(name)
        self._A[name].requires_grad_(not frozen)
        self._B[name].requires_grad_(not frozen)

    def freeze_all_but(self, name: str) -> None:
        """Freezes every adapter except ``name`` (which becomes trainable)."""
        self.index(name)
        for n in self.names:
            self.freeze(n, n != name)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the stacked A (n*rank, dim_in) and B (dim_out, n*rank)."""
        if not len(self):
            raise RuntimeError("AdapterBank is empty: call add(name) first")
        return (torch.cat(list(self._A.values()), 0), torch.cat(list(self._B.values()), 1))

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Adapter output for a batch.

        Args:
            x: (B, T, dim_in) or (B, dim_in).
            adapter_ids: (B,) int64 adapter id per sample (one batched pass, AdapterGate).
            weights: (B, n_adapters) mixture weights: ``sum_k w_k f_k(x)`` (DenseGate).
            scale: optional (B,) per-sample scale.

        Returns:
            (B, T, dim_out) or (B, dim_out). With neither ids nor weights, the sum of all adapters.
        """
        if adapter_ids is not None and weights is not None:
            raise ValueError("give adapter_ids or weights, not both")
        A, B = self.stacked()
        x = x.to(A.dtype)
        nb = x.shape[0]
        per = x[0].numel() // self.dim_in if nb else 1  # tokens per sample
        if adapter_ids is not None:
            if adapter_ids.shape != (nb,):
                raise ValueError(f"adapter_ids must be ({nb},), got {tuple(adapter_ids.shape)}")
            # a sample's tokens are contiguous: one SGMV segment per sample, no per-token ids
            gate = AdapterGate(adapter_ids, self.rank, scale, tokens_per_id=per)
        elif weights is not None:
            if weights.shape != (nb, len(self)):
                raise ValueError(f"weights must be ({nb}, {len(self)}), got {tuple(weights.shape)}")
            w = weights if scale is None else weights * scale[:, None]
            gate = DenseGate(w.repeat_interleave(self.rank, dim=1).repeat_interleave(per, dim=0))
        else:
            gate = None if scale is None else DenseGate(
                scale.repeat_interleave(per)[:, None].expand(nb * per, A.shape[0]))
        pre = self._A(x, gate=gate, backend=self.backend)  # (..., R), or (..., rank) with ids
        return self._B(x, pre, A=A, scaling=self.scale, activation=self.activation, gate=gate,
                       backend=self.backend)
