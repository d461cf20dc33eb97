"""Adapter-id LoRA on the reference backend, grouped by adapter: each token's own block only.

:func:`~.reference.rank_sparse_lora_ref` materialises an :class:`~.gates.AdapterGate` as a dense
(M, n·r) mask and multiplies every token by every stacked adapter, so its cost grows with the
number of adapters n. Here the tokens are grouped by adapter id (one group when every token uses
the same adapter, as a MOS layer does while it trains) and each group runs its own (K × r) and
(r × N) products: the same result, autograd-differentiable, with the cost of one adapter per
token. It is what the ``reference`` backend (CPU) runs for adapter ids; the dense reference stays
the ground truth its tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gates import AdapterGate, _flat, adapter_ids_flat

__all__ = ["adapter_grouped_lora", "adapter_grouped_shrink"]


def _token_ids(gate: AdapterGate, m: int, R: int) -> torch.Tensor:
    return adapter_ids_flat(gate, m, R).repeat_interleave(int(gate.tokens_per_id))  # (M,)


def _groups(ids: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(adapter id, its token rows) per adapter present; rows None when it is every token."""
    uniq = torch.unique(ids).tolist()
    if not uniq:  # no tokens: one empty group, so the (0, ·) result stays on the autograd graph
        return [(0, None)]
    if len(uniq) == 1:
        return [(int(uniq[0]), None)]
    return [(int(a), torch.nonzero(ids == a).squeeze(1)) for a in uniq]


def adapter_grouped_shrink(x2: torch.Tensor, A: torch.Tensor, gate: AdapterGate) -> torch.Tensor:
    """Each token's own block ``x A_id^T``: (M, r) from x2 (M, K) and stacked A (n·r, K)."""
    m, r = x2.shape[0], int(gate.rank_per_adapter)
    groups = _groups(_token_ids(gate, m, A.shape[0]))
    if groups[0][1] is None:
        a = groups[0][0]
        return F.linear(x2, A[a * r:(a + 1) * r])
    out = x2.new_zeros(m, r)
    for a, rows in groups:
        out = out.index_copy(0, rows, F.linear(x2[rows], A[a * r:(a + 1) * r]))
    return out


def adapter_grouped_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gate: AdapterGate, *,
                         scaling: float = 1.0, activation: str = "identity",
                         down_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
                         pre: torch.Tensor | None = None) -> torch.Tensor:
    """``s * ((phi(x A_id^T + down_bias_id) * scale) B_id^T + up_bias)`` per token, grouped.

    Same arguments and result as :func:`~.reference.rank_sparse_lora_ref` with an
    ``AdapterGate`` (``pre`` may be (..., n·r) or each token's block (..., r)).
    """
    lead, dtype = x.shape[:-1], x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    m, r, n_out = x2.shape[0], int(gate.rank_per_adapter), B.shape[0]
    if r <= 0 or A.shape[0] % r:
        raise ValueError(f"rank_per_adapter={r} must be > 0 and divide R={A.shape[0]}")
    ids = _token_ids(gate, m, A.shape[0])
    t = int(gate.tokens_per_id)
    scale = None if gate.scale is None else _flat(gate.scale, m // t, None, "AdapterGate.scale").repeat_interleave(t)
    pre2 = None if pre is None else pre.reshape(m, pre.shape[-1]).to(x2.dtype)
    out = None
    for a, rows in _groups(ids):
        sl = slice(a * r, (a + 1) * r)
        xs = x2 if rows is None else x2[rows]
        if pre2 is None:
            h = F.linear(xs, A[sl])
        else:
            p = pre2 if rows is None else pre2[rows]
            h = p if p.shape[-1] == r else p[:, sl]
        if down_bias is not None:
            h = h + down_bias[sl].to(h.dtype)
        if activation == "relu":
            h = torch.relu(h)
        if scale is not None:
            h = h * (scale if rows is None else scale[rows])[:, None].to(h.dtype)
        y = F.linear(h, B[:, sl])
        if rows is None:
            out = y
        else:
            out = (x2.new_zeros(m, n_out) if out is None else out).index_add(0, rows, y)
    if up_bias is not None:
        out = out + up_bias.to(out.dtype)
    return (out * scaling).to(dtype).reshape(*lead, n_out)
