"""Pooled-feature extraction and an in-memory cache for frozen backbones.

Methods that keep the backbone frozen with nothing trainable inside it (SimpleCIL prototypes,
head-only fine-tuning) need each image's pooled feature once. :class:`FeatureCache` computes
them in batches under ``torch.no_grad()`` and keeps them in memory, keyed by
``(backbone.config_id, dataset_key)``.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import Tensor

from adaptsim.cl.backbones import Backbone

__all__ = ["FeatureCache", "extract_features"]

logger = logging.getLogger(__name__)


def _progress_enabled(progress: bool | None) -> bool:
    """``None`` means: show a bar only when stderr is a terminal."""
    if progress is None:
        return sys.stderr.isatty()
    return progress


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    x: Tensor,
    batch_size: int = 256,
    *,
    progress: bool | None = None,
    desc: str = "features",
) -> Tensor:
    """Pooled features of a tensor of images, in batches, without gradients.

    The backbone is put in eval mode for the extraction and its previous mode is restored.

    Args:
        backbone: The feature extractor.
        x: Images ``(N, C, H, W)``, uint8 in 0..255 or float in [0, 1] (see
            :meth:`Backbone.preprocess`); it may stay on the CPU, batches are moved.
        batch_size: Images per forward pass.
        progress: Show a tqdm bar; ``None`` shows it only on a terminal.
        desc: Label of the progress bar.

    Returns:
        ``(N, embed_dim)`` float32 features on the CPU.

    Raises:
        ValueError: ``batch_size`` is not positive or ``x`` is not 4-D.
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    was_training = backbone.training
    backbone.eval()
    try:
        chunks = []
        starts = range(0, x.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not _progress_enabled(progress)):
            chunks.append(backbone(x[start : start + batch_size]).float().cpu())  # (b, D)
    finally:
        backbone.train(was_training)
    if not chunks:
        return torch.empty(0, backbone.embed_dim)
    return torch.cat(chunks)  # (N, D)


class FeatureCache:
    """In-memory cache of pooled features of frozen backbones.

    Args:
        batch_size: Images per forward pass when computing.
        progress: Show a tqdm bar while computing; ``None`` shows it only on a terminal.

    Example:
        >>> cache = FeatureCache()
        >>> feats = cache.get(backbone, exp.train.x, key="digits/exp0/train")  # doctest: +SKIP
    """

    def __init__(self, batch_size: int = 256, progress: bool | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.progress = progress
        self._store: dict[tuple[str, str], Tensor] = {}

    def get(self, backbone: Backbone, x: Tensor, key: str) -> Tensor:
        """Features of ``x``, computed on the first call for ``(backbone.config_id, key)``.

        Args:
            backbone: A frozen backbone (no parameter requires grad).
            x: Images ``(N, C, H, W)``; only read on a cache miss.
            key: Names the dataset (e.g. ``"mnist5k/exp2/train"``); the caller keeps it unique.

        Returns:
            ``(N, embed_dim)`` float32 CPU features. The cached tensor itself: do not modify it.

        Raises:
            ValueError: The backbone has trainable parameters (its features would go stale), or a
                cached entry for this key has a different number of rows than ``x``.
        """
        if any(p.requires_grad for p in backbone.parameters()):
            raise ValueError(
                f"cannot cache features of backbone {backbone.config_id!r}: it has trainable parameters "
                "(build it with freeze=True, or run the backbone in the training loop instead)"
            )
        cache_key = (backbone.config_id, key)
        feats = self._store.get(cache_key)
        if feats is None:
            logger.info("Computing features for %s (%d images)", cache_key, x.shape[0])
            feats = extract_features(backbone, x, self.batch_size, progress=self.progress, desc=key)
            self._store[cache_key] = feats
        elif feats.shape[0] != x.shape[0]:
            raise ValueError(
                f"feature cache key {cache_key} holds {feats.shape[0]} rows but {x.shape[0]} images were "
                "given: use a distinct key per dataset"
            )
        return feats

    def __contains__(self, cache_key: object) -> bool:
        return cache_key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Drop every cached tensor."""
        self._store.clear()
