"""Shared fixtures of the MoRA tests: a synthetic class-incremental stream and a tiny ViT."""

from __future__ import annotations

import torch

from adaptsim.cl.backbones import BackboneConfig, create_backbone
from adaptsim.cl.data import DatasetConfig
from adaptsim.cl.scenarios import ClassIncrementalArgs, build_stream

__all__ = ["synthetic_stream", "tiny_vit"]


def synthetic_stream():
    """synthetic 8x8 data, 3 class-incremental experiences of 2 classes, 15 train images/class."""
    return build_stream("class_incremental", ClassIncrementalArgs(
        dataset=DatasetConfig(name="synthetic", train_per_class=15, test_per_class=8),
        initial_increment=2, increment=2))


def tiny_vit():
    """A random 2-block ViT on 16 px inputs (patch 4, width 32), in eval mode."""
    torch.manual_seed(0)
    return create_backbone(BackboneConfig(name="tiny_vit", img_size=16, tiny_patch=4, tiny_dim=32,
                                          tiny_depth=2, tiny_heads=2)).eval()
