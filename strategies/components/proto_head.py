"""A frozen cosine head on class prototypes of the *frozen* pretrained features.

The offline stand-in for CLIP's frozen text head (MoRA, and its fair LoRA baseline): a class's
row is the mean pooled feature of its first experience's training images, computed on the
pretrained backbone with every adapter switched off, and never changes afterwards. Logits are
``scale * cos(feature, prototype)``; classes without a prototype score ``-inf``.

Pieces:

* :class:`FrozenPrototypeHead` -- the head (buffers only, nothing trainable).
* :func:`adapters_off` -- context in which every adapter wrapper of a model (anything with an
  ``nn.Linear`` ``base_layer``: ``LoRALinear``, ``RankExpertLoRA``, ``MoRALinear``) is swapped
  for its frozen base layer, so the model computes the pretrained features.
* :func:`add_frozen_prototypes` -- sets the prototypes of a dataset's new classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FrozenPrototypeHead", "adapters_off", "add_frozen_prototypes"]


class FrozenPrototypeHead(nn.Module):
    """``scale * cos(f, p_c)`` over classes ``c`` with a prototype; ``-inf`` for the others.

    Args:
        dim: feature size.
        n_classes: classes of the stream.
        scale: logit scale (the CLIP text head's temperature is ``exp(logit_scale) = 100``).
    """

    def __init__(self, dim: int, n_classes: int, scale: float = 100.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.register_buffer("prototypes", torch.zeros(n_classes, dim))
        self.register_buffer("has_proto", torch.zeros(n_classes, dtype=torch.bool))
        self.register_buffer("scale", torch.tensor(float(scale)))

    @torch.no_grad()
    def add_prototypes(self, feats: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Sets the row of every class in ``labels`` that has none yet (earlier rows stay fixed).

        Returns:
            the classes whose prototype was set now.
        """
        new = []
        for c in labels.unique().tolist():
            if not bool(self.has_proto[c]):
                self.prototypes[c] = feats[labels == c].float().mean(0).to(self.prototypes)
                self.has_proto[c] = True
                new.append(int(c))
        return new

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, dim) -> logits (B, n_classes)."""
        cos = F.normalize(feats.float(), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()
        return (self.scale * cos).masked_fill(~self.has_proto, float("-inf"))


def _base_of(m: nn.Module) -> nn.Linear | None:
    base = getattr(m, "base_layer", None)
    return base if isinstance(base, nn.Linear) and base is not m else None


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[int]:
    """Swaps every adapter wrapper in ``model`` for its ``base_layer`` until the block ends.

    Yields:
        the number of wrappers swapped out (outermost wrappers only).
    """
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    done: list[str] = []
    for name, m in list(model.named_modules()):
        if not name or any(name.startswith(d + ".") for d in done):
            continue
        base = _base_of(m)
        if base is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        swaps.append((parent, child, m))
        done.append(name)
    try:
        for parent, child, m in swaps:
            setattr(parent, child, _base_of(m))
        yield len(swaps)
    finally:
        for parent, child, m in swaps:
            setattr(parent, child, m)


@torch.no_grad()
def add_frozen_prototypes(head: FrozenPrototypeHead, backbone: nn.Module, x: torch.Tensor,
                          y: torch.Tensor, *, batch_size: int = 256) -> list[int]:
    """Prototypes of the classes of ``(x, y)`` that have none yet, on the frozen backbone.

    Args:
        head: updated in place.
        backbone: a :class:`~adaptsim.cl.backbones.Backbone` (its adapters are switched off for
            the extraction only).
        x, y: images and labels (CPU or device).

    Returns:
        the classes whose prototype was set.
    """
    from adaptsim.cl.features import extract_features

    new_mask = ~head.has_proto.cpu()[y.cpu()]
    if not bool(new_mask.any()):
        return []
    with adapters_off(backbone.model):
        feats = extract_features(backbone, x[new_mask], batch_size=batch_size, progress=False)
    return head.add_prototypes(feats.to(head.prototypes.device), y.cpu()[new_mask].to(head.prototypes.device))
