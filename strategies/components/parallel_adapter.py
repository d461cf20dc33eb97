"""Adapters in parallel with the MLP of a timm ViT block (AdaptFormer placement).

AdaptFormer (Chen et al., NeurIPS 2022, https://arxiv.org/abs/2205.13535) adds a bottleneck
branch beside the MLP of every block; SEMA (https://arxiv.org/abs/2403.18886) and MOS
(https://arxiv.org/abs/2412.09441) use the same placement. :class:`ParallelAdapterBlock` wraps
a timm ``Block`` (timm 1.0: ``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``) and
computes::

    x = x + drop_path1(ls1(attn(norm1(x))))
    h = x                                         # post-attention residual stream (B, T, D)
    x = x + drop_path2(ls2(mlp(norm2(x)))) + adapter(h)

The adapter is any module ``(B, T, D) -> (B, T, D)``; ``block.adapter`` may be replaced (or set to
``None``, which makes the wrapper an exact copy of the block) at run time. The adapter output is
added unscaled: scaling, dropout and routing belong to the adapter module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["ParallelAdapterBlock", "wrap_blocks_with_parallel_adapter", "unwrap_blocks"]

_REQUIRED = ("norm1", "attn", "norm2", "mlp")


class ParallelAdapterBlock(nn.Module):
    """A pre-norm transformer block with an adapter beside its MLP.

    Args:
        block: a timm ``Block`` (or any module with ``norm1, attn, norm2, mlp`` and optional
            ``ls1, ls2, drop_path1, drop_path2``). Its weights are shared, not copied.
        adapter: module mapping the post-attention stream (B, T, D) to a (B, T, D) update, or
            ``None`` for no adapter.

    Raises:
        TypeError: ``block`` lacks one of ``norm1, attn, norm2, mlp``.
    """

    def __init__(self, block: nn.Module, adapter: nn.Module | None) -> None:
        super().__init__()
        missing = [a for a in _REQUIRED if not hasattr(block, a)]
        if missing:
            raise TypeError(f"block {type(block).__name__} has no {missing}: not a pre-norm ViT block")
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """Block output (B, T, D) with the adapter update added."""
        b = self.block
        ident = nn.Identity()
        kwargs = {}
        if attn_mask is not None:
            kwargs["attn_mask"] = attn_mask
        if is_causal:
            kwargs["is_causal"] = True
        attn = b.attn(b.norm1(x), **kwargs)  # (B, T, D)
        x = x + getattr(b, "drop_path1", ident)(getattr(b, "ls1", ident)(attn))
        h = x  # (B, T, D) post-attention residual: the adapter's input
        x = x + getattr(b, "drop_path2", ident)(getattr(b, "ls2", ident)(b.mlp(b.norm2(x))))
        if self.adapter is not None:
            x = x + self.adapter(h)
        return x


def wrap_blocks_with_parallel_adapter(
    backbone: nn.Module,
    indices: Sequence[int],
    make_adapter_fn: Callable[[int], nn.Module | None],
) -> list[ParallelAdapterBlock]:
    """Replaces ``backbone.blocks[i]`` by a :class:`ParallelAdapterBlock` for each ``i``.

    Args:
        backbone: an :class:`adaptsim.cl.backbones.Backbone` (or anything with ``.blocks``, an
            indexable ``nn.Sequential``/``nn.ModuleList`` of pre-norm blocks).
        indices: block indices to wrap (negative indices count from the end).
        make_adapter_fn: called as ``make_adapter_fn(i)`` with the (non-negative) block index;
            returns the adapter module (moved to the block's device/dtype) or ``None``.

    Returns:
        The wrappers, in the order of ``indices``. Blocks that are already wrapped are re-used
        (their adapter is replaced).

    Raises:
        ValueError: an index is out of range or repeated.
    """
    blocks = backbone.blocks
    depth = len(blocks)
    norm = [i + depth if i < 0 else i for i in indices]
    if any(not 0 <= i < depth for i in norm):
        raise ValueError(f"indices {list(indices)} out of range for {depth} blocks")
    if len(set(norm)) != len(norm):
        raise ValueError(f"indices {list(indices)} contain duplicates")
    out: list[ParallelAdapterBlock] = []
    for i in norm:
        blk = blocks[i]
        adapter = make_adapter_fn(i)
        ref = next(blk.parameters(), None)
        if adapter is not None and ref is not None:
            adapter = adapter.to(device=ref.device)
        if isinstance(blk, ParallelAdapterBlock):
            blk.adapter = adapter
            out.append(blk)
            continue
        wrapper = ParallelAdapterBlock(blk, adapter)
        blocks[i] = wrapper
        out.append(wrapper)
    return out


def unwrap_blocks(backbone: nn.Module) -> int:
    """Puts the original blocks back (undoes :func:`wrap_blocks_with_parallel_adapter`).

    Args:
        backbone: the wrapped backbone.

    Returns:
        The number of blocks unwrapped.
    """
    blocks = backbone.blocks
    n = 0
    for i in range(len(blocks)):
        if isinstance(blocks[i], ParallelAdapterBlock):
            blocks[i] = blocks[i].block
            n += 1
    return n
