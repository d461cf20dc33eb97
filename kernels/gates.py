"""Rank gates for the rank-sparse LoRA operation.

A gate ``G`` decides, per token, which of the ``R`` ranks of a LoRA pair are active and with
what weight: ``y = s * ((phi(x A^T) * G) B^T)``.  Three kinds exist:

* :class:`DenseGate` -- a dense (M, R) weight matrix (differentiable).
* :class:`TopKGate` -- per-token top-k rank indices plus weights (MoRA style rank experts).
* :class:`AdapterGate` -- per-token adapter id selecting a contiguous rank block of a stacked
  adapter bank (Punica SGMV style), with an optional per-token scale.

Every gate is lowered to one *gathered* form, ``(idx, wt)`` with ``idx`` (M, J) int32 rank
indices (``None`` = all ``R`` ranks, ``J = R``) and ``wt`` (M, J) weights (``None`` = 1).
The Triton kernels only understand that form, so their cost is proportional to ``J``
(``k`` for top-k, ``r`` for an adapter), never to the total rank ``R``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AdapterGate", "DenseGate", "Gate", "TopKGate", "gate_to_dense", "lower_gate"]


@dataclass(frozen=True)
class DenseGate:
    """Dense per-token rank weights.

    Attributes:
        weights: (..., R) weights; leading dims must match the input's leading dims.
    """

    weights: torch.Tensor


@dataclass(frozen=True)
class TopKGate:
    """Per-token top-k active ranks.

    Rank ``j`` of token ``m`` is active iff ``j in indices[m]``; a rank listed twice is counted
    twice (weights add up), in both the reference and the kernel.

    Attributes:
        indices: (..., k) int64 rank indices in ``[0, R)``.
        weights: (..., k) weights of the selected ranks (differentiable), or ``None`` for 1.
    """

    indices: torch.Tensor
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class AdapterGate:
    """Per-token adapter selection from a stack of equal-rank adapters.

    Token ``m`` uses ranks ``[adapter_ids[m] * r, (adapter_ids[m] + 1) * r)`` of a stacked
    ``A`` (n_adapters * r, K) and ``B`` (N, n_adapters * r).

    Attributes:
        adapter_ids: (...,) int64 adapter id per token.
        rank_per_adapter: rank ``r`` of every adapter.
        scale: optional (...,) per-token scale of the delta (may require grad).
    """

    adapter_ids: torch.Tensor
    rank_per_adapter: int
    scale: torch.Tensor | None = None


Gate = DenseGate | TopKGate | AdapterGate


def _flat(t: torch.Tensor, m: int, trailing: int | None, what: str) -> torch.Tensor:
    """Flattens ``t`` to (M,) or (M, trailing) and checks its size."""
    out = t.reshape(m, -1) if trailing is not None else t.reshape(-1)
    if out.shape[0] != m or (trailing is not None and out.shape[1] != trailing):
        raise ValueError(f"{what} has shape {tuple(t.shape)}, incompatible with {m} tokens")
    return out


def lower_gate(
    gate: Gate | None, m: int, r: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Lowers a gate to the gathered ``(idx, wt)`` form used by the kernels.

    Args:
        gate: the gate, or ``None`` (all ranks, weight 1).
        m: number of tokens M (flattened leading dims of the input).
        r: total rank R of ``A``/``B``.
        device: device of the input.

    Returns:
        ``(idx, wt)``: idx (M, J) int32 or ``None`` (dense, J = R); wt (M, J) or ``None``.
        ``wt`` stays connected to the autograd graph of the gate's weights.

    Raises:
        ValueError: on a shape mismatch or an index outside ``[0, R)`` (checked on CPU only,
            to avoid a device sync on CUDA).
        TypeError: on an unknown gate type.
    """
    if gate is None:
        return None, None
    if isinstance(gate, DenseGate):
        w = gate.weights
        if w.shape[-1] != r:
            raise ValueError(f"DenseGate.weights last dim {w.shape[-1]} != rank R={r}")
        return None, _flat(w, m, r, "DenseGate.weights")
    if isinstance(gate, TopKGate):
        k = gate.indices.shape[-1]
        if gate.indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"TopKGate.indices must be int64/int32, got {gate.indices.dtype}")
        idx = _flat(gate.indices, m, k, "TopKGate.indices")
        if idx.device.type == "cpu" and idx.numel() and (idx.min() < 0 or idx.max() >= r):
            raise ValueError(f"TopKGate.indices out of range [0, {r})")
        wt = None if gate.weights is None else _flat(gate.weights, m, k, "TopKGate.weights")
        return idx.to(device=device, dtype=torch.int32), wt
    if isinstance(gate, AdapterGate):
        rb = int(gate.rank_per_adapter)
        if rb <= 0 or r % rb:
            raise ValueError(f"rank_per_adapter={rb} must be > 0 and divide R={r}")
        ids = _flat(gate.adapter_ids, m, None, "AdapterGate.adapter_ids").to(device)
        if ids.device.type == "cpu" and ids.numel() and (ids.min() < 0 or ids.max() >= r // rb):
            raise ValueError(f"AdapterGate.adapter_ids out of range [0, {r // rb})")
        idx = ids[:, None] * rb + torch.arange(rb, device=device)  # (M, r)
        wt = None
        if gate.scale is not None:
            wt = _flat(gate.scale, m, None, "AdapterGate.scale")[:, None].expand(m, rb)
        return idx.to(torch.int32), wt
    raise TypeError(f"unknown gate type {type(gate).__name__}; expected DenseGate, TopKGate, AdapterGate")


def gate_to_dense(
    gate: Gate | None, m: int, r: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Materialises any gate as a dense (M, R) weight matrix (differentiable in the weights).

    Duplicate top-k indices add up, matching the kernel.  This is the "masked" form used by
    the reference and by the Opacus grad samplers; its cost is proportional to ``R``.
    """
    idx, wt = lower_gate(gate, m, r, device)
    if idx is None:
        return torch.ones(m, r, device=device, dtype=dtype) if wt is None else wt.to(dtype)
    src = torch.ones(idx.shape, device=device, dtype=dtype) if wt is None else wt.to(dtype)
    return torch.zeros(m, r, device=device, dtype=dtype).scatter_add(1, idx.long(), src)
