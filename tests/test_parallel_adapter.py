"""ParallelAdapterBlock: exact no-op without adapter, AdaptFormer placement, run-time swap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptsim.cl.backbones import BackboneConfig, create_backbone
from adaptsim.strategies.adapters import BottleneckAdapter
from adaptsim.strategies.components.parallel_adapter import (
    ParallelAdapterBlock,
    unwrap_blocks,
    wrap_blocks_with_parallel_adapter,
)


class _Recorder(nn.Module):
    """Adapter that records its input and adds a fixed offset."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.randn(dim))
        self.seen: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.seen = h.detach().clone()
        return self.offset.expand_as(h)


@pytest.fixture()
def backbone():
    torch.manual_seed(0)
    bb = create_backbone(BackboneConfig(name="tiny_vit", img_size=28, tiny_patch=7, tiny_dim=32,
                                        tiny_depth=3, tiny_heads=4))
    return bb.eval()


@pytest.mark.parametrize("init_values", [None, 0.5], ids=["no_layerscale", "layerscale"])
def test_wrapper_matches_hand_computation(init_values):
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    blk = Block(16, 4, init_values=init_values).eval()
    x = torch.randn(2, 5, 16)
    rec = _Recorder(16)
    out = ParallelAdapterBlock(blk, rec)(x)
    h = x + blk.ls1(blk.attn(blk.norm1(x)))
    ref = h + blk.ls2(blk.mlp(blk.norm2(h))) + rec.offset
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rec.seen, h)  # adapter input = post-attention stream, not x
    assert torch.equal(ParallelAdapterBlock(blk, None)(x), blk(x))


def test_wrap_noop_adapter_keeps_features_and_trains_only_adapter(backbone):
    x = torch.randint(0, 255, (3, 1, 28, 28), dtype=torch.uint8)
    ref = backbone(x)
    wrappers = wrap_blocks_with_parallel_adapter(backbone, [1, -1], lambda i: BottleneckAdapter(32, 4))
    assert [type(backbone.blocks[i]) for i in (1, 2)] == [ParallelAdapterBlock] * 2
    assert not isinstance(backbone.blocks[0], ParallelAdapterBlock)
    torch.testing.assert_close(backbone(x), ref)  # zero up-projection: a no-op
    backbone(x).sum().backward()
    grads = [n for n, p in backbone.named_parameters() if p.grad is not None]
    assert grads and all(".adapter." in n for n in grads)
    assert len(wrappers) == 2


def test_adapter_can_be_replaced_and_unwrapped(backbone):
    x = torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8)
    ref = backbone(x)
    (w,) = wrap_blocks_with_parallel_adapter(backbone, [0], lambda i: None)
    torch.testing.assert_close(backbone(x), ref)
    w.adapter = _Recorder(32)
    assert not torch.allclose(backbone(x), ref)
    again = wrap_blocks_with_parallel_adapter(backbone, [0], lambda i: None)
    assert again[0] is w and w.adapter is None
    assert unwrap_blocks(backbone) == 1
    assert torch.equal(backbone(x), ref)


def test_bad_indices_raise(backbone):
    with pytest.raises(ValueError, match="out of range"):
        wrap_blocks_with_parallel_adapter(backbone, [3], lambda i: None)
    with pytest.raises(ValueError, match="duplicates"):
        wrap_blocks_with_parallel_adapter(backbone, [0, -3], lambda i: None)
