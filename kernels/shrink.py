"""The shrink alone, ``pre = x A^T``, as its own differentiable op (for split adapter modules).

Adapter modules whose parameters live in two containers (a bank's ``A`` and ``B`` dicts, the
rank experts' groups) run the shrink through their ``A`` container and the rest of the op
(:func:`~.rank_sparse_lora.rank_sparse_lora` with ``pre=``) through their ``B`` container, so
that each container is called as a module and Opacus can hook it. Dense gates use the full
``x A^T`` (cuBLAS: MoRA needs it for its scores anyway); an :class:`~.gates.AdapterGate` gets
each token's own adapter block only, ``(..., r)``, from the SGMV shrink kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import launch as kl
from . import triton_kernels as tk
from .gates import AdapterGate, Gate
from .grouped import adapter_grouped_shrink

__all__ = ["lora_shrink"]


class _SegShrink(torch.autograd.Function):
    """``pre[m] = x[m] A_{id(m)}^T`` over SGMV segments; backward: SGMV expand + segment GEMMs."""

    @staticmethod
    def forward(ctx, x, A, plan):  # noqa: D102
        _, h, _ = kl.launch_shrink(x, A, R=A.shape[0], M=x.shape[0], kind=tk.GATE_NONE, gw=None, gi=None,
                                   seg=plan.seg, rb=plan.rb, bias=None, pre=None, load_pre=False,
                                   bwd=False, scaling=1.0, act="identity", out_dtype=x.dtype)
        ctx.save_for_backward(x, A)
        ctx.plan = plan
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        x, A = ctx.saved_tensors
        p = ctx.plan
        g = g.to(x.dtype)
        dx = dA = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            kl.launch_expand(g, A, dx, R=A.shape[0], rb=p.rb, swn=A.stride(1), swr=A.stride(0),
                             seg=p.seg, bias=None, accum=False)
        if ctx.needs_input_grad[1]:
            dA = kl.launch_outer(g, x, R=A.shape[0], rb=p.rb, seg=p.seg_w).to(A.dtype)
        return dx, dA, None


def lora_shrink(x: torch.Tensor, A: torch.Tensor, *, gate: Gate | None = None,
                backend: str = "auto") -> torch.Tensor:
    """``x A^T`` (..., R), or each token's adapter block (..., r) for an :class:`AdapterGate`.

    Args:
        x: (..., K) input.
        A: (R, K) stacked down projections.
        gate: only an :class:`AdapterGate` changes the result (per-token blocks); other gates
            are applied later by :func:`~.rank_sparse_lora.rank_sparse_lora` (``pre=``).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        (..., R) or (..., r) in ``x.dtype``.
    """
    from .rank_sparse_lora import _plan, resolve_backend

    if not isinstance(gate, AdapterGate):
        return F.linear(x, A)
    lead, r = x.shape[:-1], int(gate.rank_per_adapter)
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if resolve_backend(backend, x) == "reference" or r > kl.MAX_SEG_RANK:
        pre = adapter_grouped_shrink(x2, A, gate)  # (M, r): each token's own block only
    else:
        plan, _ = _plan(AdapterGate(gate.adapter_ids, r, None, gate.tokens_per_id), m, A.shape[0], x2.device)
        pre = _SegShrink.apply(x2 if x2.stride(-1) == 1 else x2.contiguous(), A, plan)
    return pre.reshape(*lead, r)
