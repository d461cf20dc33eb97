"""SGMV segments for adapter-id gates, built on the device without a host sync.

A segment is a run of rows that all use one adapter: ``(adapter, start, length)`` plus an
optional row list ``rows`` (rows sorted by adapter id; ``None`` = rows in natural order). Two
layouts are used (vLLM's ``lora_ids / num_tokens / start_loc``):

* :func:`per_sample` -- a sample's ``T`` contiguous tokens are one segment, no sorting;
  used by the forward (shrink/expand) when ``T`` fills a row block.
* :func:`by_adapter` -- rows sorted by adapter id (a stable ``argsort`` of the per-sample ids,
  expanded to tokens), one segment per adapter (possibly empty). Used by the weight gradients,
  so that ``dA``/``dB`` of each adapter are one segment GEMM owned by one set of programs:
  deterministic, no atomics.

Segment boundaries come from ``torch.searchsorted`` on the sorted ids, so everything stays on
the device and the launch grids use static bounds (``max_len``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Segments", "by_adapter", "per_sample"]


@dataclass(frozen=True)
class Segments:
    """Device-side segment table.

    Attributes:
        rows: (M,) int32 row list (sorted by adapter) or ``None`` (natural order).
        adapter: (S,) int32 adapter id of each segment.
        start: (S,) int32 first position of each segment (into ``rows`` or the rows).
        length: (S,) int32 number of rows of each segment.
        max_len: host-side upper bound on ``length`` (sizes the launch grid).
    """

    rows: torch.Tensor | None
    adapter: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    max_len: int

    @property
    def n(self) -> int:
        """Number of segments S."""
        return int(self.adapter.shape[0])


def per_sample(ids: torch.Tensor, tokens_per_id: int) -> Segments:
    """One segment per id: rows ``[i*T, (i+1)*T)`` use adapter ``ids[i]``.

    Args:
        ids: (S,) adapter id per sample.
        tokens_per_id: T, the contiguous tokens of each sample.
    """
    s = ids.shape[0]
    t = int(tokens_per_id)
    ar = torch.arange(s, device=ids.device, dtype=torch.int32)
    return Segments(None, ids.to(torch.int32), ar * t, torch.full_like(ar, t), t)


def by_adapter(ids: torch.Tensor, n_adapters: int, tokens_per_id: int = 1) -> Segments:
    """Rows sorted by adapter id; segment ``a`` holds every row of adapter ``a``.

    Ids outside ``[0, n_adapters)`` fall in no segment (their rows get no delta and give no
    weight gradient); :func:`~.rank_sparse_lora.rank_sparse_lora` checks the range on CPU and,
    in debug mode, on the device.

    Args:
        ids: (S,) adapter id per sample (each covering ``tokens_per_id`` rows).
        n_adapters: number of adapters.
        tokens_per_id: T.
    """
    t = int(tokens_per_id)
    order = torch.argsort(ids, stable=True)  # (S,)
    sorted_ids = ids[order]
    probe = torch.arange(n_adapters, device=ids.device, dtype=sorted_ids.dtype)
    lo = torch.searchsorted(sorted_ids, probe)
    hi = torch.searchsorted(sorted_ids, probe, right=True)
    if t == 1:
        rows = order
    else:
        rows = (order[:, None] * t + torch.arange(t, device=ids.device)).reshape(-1)
    return Segments(rows.to(torch.int32), probe.to(torch.int32), (lo * t).to(torch.int32),
                    ((hi - lo) * t).to(torch.int32), ids.shape[0] * t)
