"""LoRA whose ranks are rank-1 experts that grow per task, routed by top-k (MoRA-style).

Paper: Mixture of rank-1 experts for continual learning, e.g. MoRA / "MoE as LoRA experts"
(https://arxiv.org/abs/2405.12130 for rank-as-expert routing). The strategy computes the
routing scores from :meth:`RankExpertLoRA.scores_input`; this layer only runs the gated delta.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptsim.kernels import TopKGate, rank_sparse_lora

from .lora import init_down_, resolve_gate
from .params import DownParams, UpParams

__all__ = ["RankExpertLoRA"]


class RankExpertLoRA(nn.Module):
    """Frozen ``nn.Linear`` plus rank-1 experts ``y = base(x) + s * sum_j g_j (a_j . x) b_j``.

    Experts are added in groups by :meth:`add_experts`; group ``g`` is stored as
    ``more_A[str(g)]`` (n_g, in) and ``more_B[str(g)]`` (out, n_g). Adding a group freezes all
    earlier ones (``requires_grad=False``), so they stay bit-identical under training.

    Args:
        base: the frozen linear layer.
        scaling: scale ``s`` of the delta.
        n_experts: experts created at construction (may be 0).
        seed: optional seed; group ``g`` is initialised from ``seed + g``.
    """

    def __init__(self, base: nn.Linear, *, scaling: float = 1.0, n_experts: int = 0,
                 seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"RankExpertLoRA wraps an nn.Linear, got {type(base).__name__}")
        self.base_layer = base.requires_grad_(False)
        self.scaling, self.seed = float(scaling), seed
        self.more_A = DownParams()  # called for x A^T (scores and shrink; Opacus hooks it)
        self.more_B = UpParams()  # called for the gated expand into the base output
        self.gate = None
        self.backend = "auto"
        self.merged = False
        if n_experts:
            self.add_experts(n_experts)

    @property
    def n_experts(self) -> int:
        """Total number of rank-1 experts R."""
        return sum(a.shape[0] for a in self.more_A.values())

    def add_experts(self, n: int) -> range:
        """Freezes existing experts and adds ``n`` new ones (a random, b zero).

        Returns:
            the expert indices of the new group.
        """
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        if self.merged:
            raise RuntimeError("unmerge() before adding experts")
        for p in [*self.more_A.values(), *self.more_B.values()]:
            p.requires_grad_(False)
        w, g, start = self.base_layer.weight, len(self.more_A), self.n_experts
        seed = None if self.seed is None else self.seed + g
        A = init_down_((n, w.shape[1]), "kaiming", seed).to(w.device, w.dtype)
        self.more_A[str(g)] = nn.Parameter(A)
        self.more_B[str(g)] = nn.Parameter(torch.zeros(w.shape[0], n, device=w.device, dtype=w.dtype))
        return range(start, start + n)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns A (R, in) and B (out, R) of all experts."""
        return torch.cat(list(self.more_A.values()), 0), torch.cat(list(self.more_B.values()), 1)

    def scores_input(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x A^T`` (..., R) for all experts (the self-activation routing scores' input)."""
        return self.more_A(x.to(self.more_A.stacked().dtype))

    def forward(self, x: torch.Tensor, topk_indices: torch.Tensor | None = None,
                topk_weights: torch.Tensor | None = None, pre: torch.Tensor | None = None) -> torch.Tensor:
        """``base(x)`` plus the gated delta.

        Args:
            x: (..., in).
            topk_indices: (..., k) active experts per token; if ``None``, ``self.gate`` is used
                (gate object or callable), else all experts with weight 1.
            topk_weights: (..., k) weights of the selected experts (``None`` = 1).
            pre: optional (..., R) ``x A^T`` the caller already computed with
                :meth:`scores_input` (MoRA's scores input); the shrink is not run again. Under
                Opacus it must come from :meth:`scores_input` (which calls ``more_A``).
        """
        base = self.base_layer
        if self.merged or not len(self.more_A):
            return base(x)
        if topk_indices is not None:
            gate = TopKGate(topk_indices, topk_weights)
        else:
            gate = resolve_gate(self.gate, x)
        A = self.more_A.stacked()
        if pre is None:
            pre = self.more_A(x.to(A.dtype))  # (..., R) shrink by cuBLAS, hooked by Opacus
        return self.more_B(x, pre, A=A, scaling=self.scaling, gate=gate, backend=self.backend,
                           base=base, op=rank_sparse_lora)

    def delta_weight(self) -> torch.Tensor:
        """Static delta (out, in) with all experts active."""
        A, B = self.stacked()
        return (self.scaling * (B.float() @ A.float())).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Folds all experts into the base weight (only with ``gate=None``)."""
        if self.gate is not None or self.merged:
            raise RuntimeError("cannot merge: already merged or a per-token gate is set")
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Reverses :meth:`merge`."""
        if not self.merged:
            raise RuntimeError("RankExpertLoRA is not merged")
        self.base_layer.weight -= self.delta_weight()
        self.merged = False
