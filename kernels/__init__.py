"""Rank-sparse LoRA kernels: the ground floor of adaptsim (imports nothing from adaptsim).

Importing this package never touches CUDA and does not require Triton.
"""

from __future__ import annotations

from .gates import AdapterGate, DenseGate, Gate, TopKGate, gate_to_dense, lower_gate
from .launch import forced_tiles
from .rank_sparse_lora import (
    BACKENDS,
    KernelConfig,
    LoRAFunction,
    RankSparseLoRAFunction,
    lora_linear,
    rank_sparse_lora,
    resolve_backend,
)
from .reference import ACTIVATIONS, rank_sparse_lora_ref
from .shrink import lora_shrink

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "AdapterGate",
    "DenseGate",
    "Gate",
    "KernelConfig",
    "LoRAFunction",
    "RankSparseLoRAFunction",
    "TopKGate",
    "forced_tiles",
    "gate_to_dense",
    "lora_linear",
    "lora_shrink",
    "lower_gate",
    "rank_sparse_lora",
    "rank_sparse_lora_ref",
    "resolve_backend",
]
