"""CLIP models from open_clip: the image tower as a :class:`Backbone` plus a text encoder.

``create_clip(BackboneConfig(name="open_clip:ViT-B-16", pretrained_tag="openai"))`` for users
with hub access; ``name="open_clip_tiny"`` builds a small random CLIP offline (tests, mechanics).
Strategies use ``encode_text`` to build text-embedding classifiers (zero-shot on unseen domains).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import adaptsim.cl.compat  # noqa: F401  (must run before open_clip imports torchvision)
from torch import Tensor, nn

from adaptsim.cl.backbones import (OPEN_CLIP_PREFIX, OPEN_CLIP_TINY_NAME, Backbone, BackboneConfig,
                                   _weights_error)

__all__ = ["ClipModel", "create_clip"]

logger = logging.getLogger(__name__)


class ClipModel(NamedTuple):
    """What :func:`create_clip` returns (unpacks as ``backbone, encode_text, tokenizer, clip``).

    Attributes:
        backbone: The image tower as a :class:`Backbone` (``kind="open_clip"``).
        encode_text: ``encode_text(list[str]) -> (n, d)`` L2-normalised text embeddings, in the
            space of ``backbone(x)``; runs on the device of ``clip`` under the caller's grad mode.
        tokenizer: The open_clip tokenizer (``tokenizer(list[str]) -> LongTensor (n, context)``).
        clip: The full open_clip model; move it (not only ``backbone``) to change the text device.
    """

    backbone: Backbone
    encode_text: Callable[[Sequence[str]], Tensor]
    tokenizer: Callable[..., Tensor]
    clip: nn.Module


def _tiny_clip(cfg: BackboneConfig) -> tuple[nn.Module, Callable[..., Tensor]]:
    """A small random open_clip CLIP (offline) with the default BPE tokenizer, context 16."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    head_width = cfg.tiny_dim // cfg.tiny_heads
    vision = CLIPVisionCfg(
        layers=cfg.tiny_depth,
        width=cfg.tiny_dim,
        head_width=head_width,
        patch_size=cfg.tiny_patch,
        image_size=cfg.img_size,
    )
    context = 16
    text = CLIPTextCfg(context_length=context, width=cfg.tiny_dim, heads=cfg.tiny_heads, layers=cfg.tiny_depth)
    model = open_clip.CLIP(embed_dim=cfg.tiny_dim, vision_cfg=vision, text_cfg=text)
    return model, open_clip.SimpleTokenizer(context_length=context)


def create_clip(cfg: BackboneConfig) -> ClipModel:
    """Build an open_clip model: image :class:`Backbone`, text encoder and tokenizer.

    ``cfg.name`` is ``"open_clip:<arch>"`` (hub weights from ``cfg.pretrained_tag`` when
    ``cfg.pretrained``) or ``"open_clip_tiny"`` (random init, offline, for tests). ``cfg.freeze``
    freezes both towers.

    Args:
        cfg: The backbone configuration.

    Returns:
        A :class:`ClipModel`.

    Raises:
        ValueError: ``cfg.name`` is not an open_clip name.
        PretrainedWeightsUnavailableError: The pretrained weights could not be downloaded.
    """
    import open_clip

    if cfg.name == OPEN_CLIP_TINY_NAME:
        model, tokenizer = _tiny_clip(cfg)
        weights_id = None
    elif cfg.name.startswith(OPEN_CLIP_PREFIX):
        arch = cfg.name[len(OPEN_CLIP_PREFIX) :]
        tag = cfg.pretrained_tag if cfg.pretrained else None
        try:
            model = open_clip.create_model(
                arch, pretrained=tag, force_image_size=cfg.img_size, require_pretrained=tag is not None
            )
        except Exception as exc:  # hub/network/cache errors come in many types
            if tag is None:
                raise
            raise _weights_error("open_clip", arch, tag, exc) from exc
        tokenizer = open_clip.get_tokenizer(arch)
        weights_id = f"open_clip:{arch}.{tag}" if tag else None
    else:
        raise ValueError(f"create_clip needs name 'open_clip:<arch>' or {OPEN_CLIP_TINY_NAME!r}, got {cfg.name!r}")
    if cfg.freeze:
        model.requires_grad_(False)
    visual = model.visual
    pre = getattr(visual, "preprocess_cfg", None) or {}
    backbone = Backbone(
        visual,
        kind="open_clip",
        embed_dim=visual.output_dim,
        token_dim=visual.transformer.width,
        img_size=cfg.img_size,
        mean=tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)),
        weights_id=weights_id,
        name=cfg.name,
    )

    def encode_text(texts: Sequence[str]) -> Tensor:
        device = next(model.parameters()).device
        tokens = tokenizer(list(texts)).to(device)  # (n, context)
        return model.encode_text(tokens, normalize=True)  # (n, d)

    return ClipModel(backbone, encode_text, tokenizer, model)
