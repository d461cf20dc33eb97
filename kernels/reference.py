"""Plain PyTorch reference of the rank-sparse LoRA delta: the source of truth for tests."""

from __future__ import annotations

import torch

from .gates import Gate, gate_to_dense

__all__ = ["ACTIVATIONS", "rank_sparse_lora_ref"]

ACTIVATIONS = ("identity", "relu")


def rank_sparse_lora_ref(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scaling: float = 1.0,
    activation: str = "identity",
    gate: Gate | None = None,
    upcast: bool = False,
    down_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
) -> torch.Tensor:
    """Computes ``s * ((phi(x A^T + down_bias) * G) B^T + up_bias)`` with a dense (masked) gate.

    Args:
        x: (..., K) input.
        A: (R, K) down projection.
        B: (N, R) up projection.
        scaling: scalar ``s``.
        activation: ``"identity"`` (LoRA) or ``"relu"`` (bottleneck adapter).
        gate: a :mod:`~adaptsim.kernels.gates` gate, or ``None`` for all ranks with weight 1.
        upcast: compute in fp32 and round the result once to ``x.dtype``.
        down_bias: optional (R,) bias added to ``x A^T``.
        up_bias: optional (N,) bias added before scaling.
        pre: optional (..., R) precomputed ``x A^T`` (then ``A`` is not used); with an
            ``AdapterGate`` also (..., r), each token's own adapter block.

    Returns:
        (..., N) adapter delta (the base layer output is not included).

    Raises:
        ValueError: on an unknown activation or mismatched shapes.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if A.shape[1] != x.shape[-1] or B.shape[1] != A.shape[0]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    lead, dtype = x.shape[:-1], x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    if upcast:
        x2, A, B = x2.float(), A.float(), B.float()
    m, r = x2.shape[0], A.shape[0]
    g = gate_to_dense(gate, m, r, x2.device, x2.dtype)  # (M, R), zero on inactive ranks
    if pre is None:
        h = x2 @ A.t()  # (M, R)
    elif pre.shape[-1] != r:  # per-token adapter block (M, r) of an AdapterGate: place it
        h = pre.reshape(m, 1, -1).to(x2.dtype) * (g.reshape(m, r // pre.shape[-1], -1) != 0)
        h = h.reshape(m, r)
    else:
        h = pre.reshape(m, r).to(x2.dtype)
    if down_bias is not None:
        h = h + down_bias.to(h.dtype)
    if activation == "relu":
        h = torch.relu(h)
    y = (h * g) @ B.t()  # (M, N)
    if up_bias is not None:
        y = y + up_bias.to(y.dtype)
    return (y * scaling).to(dtype).reshape(*lead, B.shape[0])
