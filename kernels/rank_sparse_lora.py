"""Rank-sparse LoRA: public op, input checks, autograd wrapper and backend dispatch.

``rank_sparse_lora(x, A, B, scaling=s, activation=phi, gate=G)`` returns only the adapter
delta ``s * ((phi(x A^T) * G) B^T)``; callers add the base layer output. The plain-torch
reference lives in :mod:`.reference`, the Triton kernels in :mod:`.triton_kernels`, gates in
:mod:`.gates`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import triton_kernels as tk
from .gates import Gate, lower_gate
from .reference import ACTIVATIONS, rank_sparse_lora_ref

__all__ = ["BACKENDS", "KernelConfig", "RankSparseLoRAFunction", "rank_sparse_lora", "resolve_backend"]

BACKENDS = ("auto", "triton", "reference")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelConfig:
    """Kernel settings.

    Attributes:
        backend: ``"auto"`` (Triton on CUDA when it imports, else the reference),
            ``"triton"`` or ``"reference"``.
    """

    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"KernelConfig.backend must be one of {BACKENDS}, got {self.backend!r}")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Resolves ``"auto"`` to ``"triton"`` or ``"reference"`` for input ``x``.

    Raises:
        ValueError: on an unknown backend name.
        RuntimeError: if ``"triton"`` is requested but cannot run on ``x``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (tk.HAS_TRITON and x.is_cuda) else "reference"
    if backend == "triton":
        if not tk.HAS_TRITON:
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if not x.is_cuda and not tk.interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend


def _check(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, activation: str) -> None:
    """Validates shapes, dtypes, devices and strides; raises ``ValueError``/``TypeError``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"A and B must be 2-D, got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if x.shape[-1] != A.shape[1]:
        raise ValueError(f"x last dim {x.shape[-1]} != A.shape[1] = {A.shape[1]} (A is (R, K))")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"B.shape[1] = {B.shape[1]} != A.shape[0] = {A.shape[0]} (B is (N, R))")
    if not (x.dtype == A.dtype == B.dtype):
        raise TypeError(f"x, A, B must share a dtype, got {x.dtype}, {A.dtype}, {B.dtype}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"dtype {x.dtype} unsupported; use one of {_DTYPES}")
    if not (x.device == A.device == B.device):
        raise ValueError(f"x, A, B on different devices: {x.device}, {A.device}, {B.device}")
    for name, t in (("A", A), ("B", B)):
        if t.stride(0) != 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have a unit stride in one dim, got strides {t.stride()}")
    if max(x.numel(), A.numel(), B.numel()) >= 2**31:
        raise ValueError("tensors with >= 2**31 elements are unsupported (int32 offsets)")


class RankSparseLoRAFunction(torch.autograd.Function):
    """Autograd wrapper over the Triton kernels (all tensors already 2-D, gate lowered)."""

    @staticmethod
    def forward(ctx, x, A, B, wt, idx, scaling, activation):  # noqa: D102
        J = A.shape[0] if idx is None else idx.shape[1]
        pre, hw, _ = tk.launch_shrink(x, A, idx, wt, None, scaling=scaling, act=activation,
                                      bwd=False, J=J)
        y = tk.launch_expand(hw, B, idx, B.shape[0], B.stride(0), B.stride(1), x.dtype)
        ctx.save_for_backward(x, A, B, wt, idx, pre, hw)
        ctx.scaling, ctx.activation, ctx.J = scaling, activation, J
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        x, A, B, wt, idx, pre, hw = ctx.saved_tensors
        need_x, need_A, need_B, need_w = ctx.needs_input_grad[:4]
        gy = gy.to(x.dtype)
        dx = dA = dB = dwt = None
        # dpre[m, j] = s * wt * phi'(pre) * sum_n gy[m, n] B[n, idx[m, j]]  (B^T through strides)
        _, dpre, dwt32 = tk.launch_shrink(gy, B.t(), idx, wt, pre, scaling=ctx.scaling,
                                          act=ctx.activation, bwd=True, J=ctx.J)
        if need_x:
            dx = tk.launch_expand(dpre, A, idx, A.shape[1], A.stride(1), A.stride(0), x.dtype)
        if need_A:
            dA32 = torch.zeros(A.shape, device=A.device, dtype=torch.float32)
            dA = tk.launch_outer(dpre, x, idx, dA32, dA32.stride(0), dA32.stride(1)).to(A.dtype)
        if need_B:
            dB32 = torch.zeros(B.shape, device=B.device, dtype=torch.float32)
            dB = tk.launch_outer(hw, gy, idx, dB32, dB32.stride(1), dB32.stride(0)).to(B.dtype)
        if need_w and dwt32 is not None:
            dwt = dwt32.to(wt.dtype)
        return dx, dA, dB, dwt, None, None, None


def rank_sparse_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scaling: float = 1.0,
    activation: str = "identity",
    gate: Gate | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Rank-sparse LoRA delta ``s * ((phi(x A^T) * G) B^T)``.

    Args:
        x: (..., K) input; leading dims are flattened to M tokens and restored.
        A: (R, K) down projection.
        B: (N, R) up projection.
        scaling: scalar ``s``.
        activation: ``"identity"`` or ``"relu"``.
        gate: ``DenseGate``/``TopKGate``/``AdapterGate`` or ``None`` (all ranks, weight 1).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        (..., N) delta in ``x.dtype``. Inactive ranks cost nothing on the Triton path and get
        exactly zero gradient on both paths.

    Raises:
        ValueError, TypeError, RuntimeError: on bad shapes/dtypes/devices or backend.
    """
    _check(x, A, B, activation)
    if resolve_backend(backend, x) == "reference":
        return rank_sparse_lora_ref(x, A, B, scaling=scaling, activation=activation, gate=gate)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    idx, wt = lower_gate(gate, x2.shape[0], A.shape[0], x2.device)
    if idx is not None:
        idx = idx.contiguous()
    if wt is not None and wt.device != x2.device:
        raise ValueError(f"gate weights on {wt.device}, input on {x2.device}")
    y = RankSparseLoRAFunction.apply(x2, A, B, wt, idx, float(scaling), activation)
    return y.reshape(*lead, B.shape[0])
