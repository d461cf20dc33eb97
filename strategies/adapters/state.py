"""Adapter-only state dicts, selected by parameter-name prefix (as FlowerTune sends PEFT weights)."""

from __future__ import annotations

import difflib

import torch
from torch import nn

__all__ = ["ADAPTER_PREFIXES", "adapter_state_dict", "load_adapter_state_dict"]

ADAPTER_PREFIXES = ("lora_", "adapter_", "bank_", "more_")


def _is_adapter_key(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(part.startswith(prefixes) for part in key.split("."))


def adapter_state_dict(model: nn.Module, prefixes: tuple[str, ...] = ADAPTER_PREFIXES) -> dict[str, torch.Tensor]:
    """Entries of ``model.state_dict()`` with a dotted name component starting with a prefix.

    Args:
        model: any module (unwrap Opacus/DDP wrappers first, or keys carry their prefix).
        prefixes: parameter-name family prefixes.

    Returns:
        ``{name: tensor}`` (tensors share storage with the model; clone to keep a snapshot).
    """
    return {k: v for k, v in model.state_dict().items() if _is_adapter_key(k, tuple(prefixes))}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor],
                            prefixes: tuple[str, ...] = ADAPTER_PREFIXES) -> list[str]:
    """Copies adapter tensors into ``model`` in place (parameter identity is kept).

    Args:
        model: the target model.
        sd: ``{name: tensor}``, a subset of :func:`adapter_state_dict` keys.
        prefixes: parameter-name family prefixes.

    Returns:
        the adapter keys of ``model`` that ``sd`` did not contain (partial loads are allowed,
        e.g. only ``lora_B`` under FFA-LoRA).

    Raises:
        KeyError: for keys that are not adapter entries of ``model`` (with close matches).
        ValueError: on a shape mismatch.
    """
    own = adapter_state_dict(model, prefixes)
    unknown = [k for k in sd if k not in own]
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(own), n=1) for k in unknown[:5]}
        raise KeyError(f"unknown adapter keys {unknown[:5]}{'...' if len(unknown) > 5 else ''}; "
                       f"close matches: {hints}; model has {len(own)} adapter keys")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k}: model {tuple(own[k].shape)}, given {tuple(v.shape)}")
    for k, v in sd.items():
        own[k].copy_(v)
    return [k for k in own if k not in sd]
