"""Rank gates for the rank-sparse LoRA operation.

A gate ``G`` decides, per token, which of the ``R`` ranks of a LoRA pair are active and with
what weight: ``y = s * ((phi(x A^T) * G) B^T)``.  Three kinds exist:

* :class:`DenseGate` -- a dense (M, R) weight matrix (differentiable).
* :class:`TopKGate` -- per-token top-k rank indices plus weights (MoRA style rank experts).
* :class:`AdapterGate` -- per-token adapter id selecting a contiguous rank block of a stacked
  adapter bank (Punica SGMV style), with an optional per-token scale.

The tensor-core kernels take each gate in its own form (no lowering): a dense weight tile, a
top-k list turned into a weight tile in registers, or SGMV segments for adapter ids. The
*gathered* form ``(idx, wt)`` of :func:`lower_gate` (``idx`` (M, J) int32 rank indices, ``None``
= all ranks; ``wt`` (M, J) weights, ``None`` = 1) feeds :func:`gate_to_dense` (the reference and
the Opacus grad samplers) and the gathered top-k kernels used for very large ``R``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AdapterGate", "DenseGate", "Gate", "TopKGate", "adapter_ids_flat", "gate_to_dense", "lower_gate"]


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

    Id ``i`` covers the ``tokens_per_id`` consecutive tokens ``[i*T, (i+1)*T)`` (a sample's
    tokens; ``T = 1``: one id per token), which use ranks ``[id * r, (id + 1) * r)`` of a stacked
    ``A`` (n_adapters * r, K) and ``B`` (N, n_adapters * r). The kernels run such a gate as SGMV
    segments (one per sample, or rows sorted by adapter), never as per-token rank lists.

    Attributes:
        adapter_ids: (...,) int64 adapter id per token (or per group of ``tokens_per_id`` tokens).
        rank_per_adapter: rank ``r`` of every adapter.
        scale: optional scale of the delta, same shape as ``adapter_ids`` (may require grad).
        tokens_per_id: T, consecutive tokens sharing one id.
    """

    adapter_ids: torch.Tensor
    rank_per_adapter: int
    scale: torch.Tensor | None = None
    tokens_per_id: int = 1


Gate = DenseGate | TopKGate | AdapterGate


def _flat(t: torch.Tensor, m: int, trailing: int | None, what: str) -> torch.Tensor:
    """Flattens ``t`` to (M,) or (M, trailing) and checks its size."""
    if trailing is not None:
        out = t.reshape(m, trailing if m == 0 else -1)  # -1 is ambiguous for zero tokens
    else:
        out = t.reshape(-1)
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
        ids = adapter_ids_flat(gate, m, r).to(device)
        t = int(gate.tokens_per_id)
        idx = ids.repeat_interleave(t)[:, None] * rb + torch.arange(rb, device=device)  # (M, r)
        wt = None
        if gate.scale is not None:
            sc = _flat(gate.scale, m // t, None, "AdapterGate.scale").repeat_interleave(t)
            wt = sc[:, None].expand(m, rb)
        return idx.to(torch.int32), wt
    raise TypeError(f"unknown gate type {type(gate).__name__}; expected DenseGate, TopKGate, AdapterGate")


def adapter_ids_flat(gate: AdapterGate, m: int, r: int | None = None) -> torch.Tensor:
    """Flat (M / T,) ids of an :class:`AdapterGate`, range-checked on CPU (no device sync).

    Raises:
        ValueError: bad ``tokens_per_id``, a shape mismatch, or (CPU) an id outside the bank.
    """
    t = int(gate.tokens_per_id)
    if t <= 0 or m % t:
        raise ValueError(f"AdapterGate.tokens_per_id={t} must be > 0 and divide M={m}")
    ids = _flat(gate.adapter_ids, m // t, None, "AdapterGate.adapter_ids")
    if gate.adapter_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"AdapterGate.adapter_ids must be int64/int32, got {gate.adapter_ids.dtype}")
    if r is not None:
        n = r // int(gate.rank_per_adapter)
        if ids.device.type == "cpu" and ids.numel() and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"AdapterGate.adapter_ids out of range [0, {n})")
    return ids


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
