"""Bottleneck adapter (down, ReLU, up, scale) on the rank-sparse LoRA kernel.

Paper: Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; parallel/scaled form as in
AdaptFormer, Chen et al. 2022, https://arxiv.org/abs/2205.13535.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adaptsim.kernels import rank_sparse_lora

__all__ = ["BottleneckAdapter"]

INITS = ("lora", "normal")


class BottleneckAdapter(nn.Module):
    """``scale * (up(relu(down(dropout(x)))))``; returns only the adapter output.

    Parameters: ``adapter_down_weight`` (bottleneck, dim), ``adapter_down_bias`` (bottleneck),
    ``adapter_up_weight`` (dim, bottleneck), ``adapter_up_bias`` (dim). They are direct
    parameters (not ``nn.Linear`` children) so Opacus can attach one grad sampler to the module.

    Both biases are kernel inputs (``down_bias`` is added to ``x A^T`` in the shrink epilogue,
    ``up_bias`` in the expand epilogue): no ones column, no copy of ``x``. Dropout (departure
    from AdaptFormer, which drops after the ReLU) is applied to the input, because the kernel
    fuses ReLU and the up projection.

    Args:
        dim: input and output width.
        bottleneck: hidden width (the rank of the kernel).
        scale: output scale ``s``.
        dropout: input dropout probability (must be 0 under Opacus).
        init: ``"lora"`` (down kaiming, up zeros: a fresh adapter is a no-op) or ``"normal"``
            (both N(0, 0.02), for tests).
    """

    def __init__(self, dim: int, bottleneck: int, *, scale: float = 1.0, dropout: float = 0.0,
                 init: str = "lora") -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if dim <= 0 or bottleneck <= 0:
            raise ValueError(f"dim and bottleneck must be > 0, got {dim}, {bottleneck}")
        self.dim, self.bottleneck, self.scale, self.dropout = dim, bottleneck, float(scale), dropout
        self.adapter_down_weight = nn.Parameter(torch.empty(bottleneck, dim))
        self.adapter_down_bias = nn.Parameter(torch.zeros(bottleneck))
        self.adapter_up_weight = nn.Parameter(torch.zeros(dim, bottleneck))
        self.adapter_up_bias = nn.Parameter(torch.zeros(dim))
        if init == "lora":
            nn.init.kaiming_uniform_(self.adapter_down_weight, a=math.sqrt(5))
        else:
            for p in (self.adapter_down_weight, self.adapter_up_weight):
                nn.init.normal_(p, std=0.02)
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the adapter output (..., dim); the caller adds it to the residual."""
        x = F.dropout(x, self.dropout, self.training).to(self.adapter_down_weight.dtype)
        return rank_sparse_lora(x, self.adapter_down_weight, self.adapter_up_weight, scaling=self.scale,
                                activation="relu", backend=self.backend,
                                down_bias=self.adapter_down_bias, up_bias=self.adapter_up_bias)
