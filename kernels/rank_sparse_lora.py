"""Rank-sparse LoRA: public ops, input checks, autograd wrapper and backend dispatch.

* ``rank_sparse_lora(x, A, B, ...)`` returns the adapter delta
  ``s * ((phi(x A^T + a) * G) B^T + c)``.
* ``lora_linear(x, weight, bias, A, B, ...)`` returns ``x W^T + b + delta``: the base GEMM
  (cuBLAS) output is the buffer the expand kernel accumulates into (``y += ...``), and in the
  backward the base ``dx = dy W`` is the buffer ``dpre A`` accumulates into. With
  ``out_slices`` (LoRA on q and v of a fused qkv) one shrink launch covers every slice.

Both take ``pre = x A^T`` when the caller already has it (MoRA computes it for its scores), so
the shrink GEMM is skipped and its gradient flows back through the caller's ``pre``.

The plain-torch reference lives in :mod:`.reference`, the kernels in :mod:`.triton_kernels`
(tensor cores) and :mod:`.gathered` (top-k with very large R), their launchers in
:mod:`.launch`, gates in :mod:`.gates`, SGMV segment tables in :mod:`.segments`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import launch as kl
from . import triton_kernels as tk
from .gates import AdapterGate, DenseGate, Gate, TopKGate, adapter_ids_flat, gate_to_dense, lower_gate
from .gathered import GatheredTopKFunction, use_gathered
from .grouped import adapter_grouped_lora
from .reference import ACTIVATIONS, rank_sparse_lora_ref
from .segments import Segments, by_adapter, per_sample

__all__ = ["BACKENDS", "KernelConfig", "LoRAFunction", "RankSparseLoRAFunction", "lora_linear",
           "rank_sparse_lora", "resolve_backend"]

BACKENDS = ("auto", "triton", "reference")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: an adapter id covering at least this many tokens runs as its own (unsorted) segment.
SEGMENT_MIN_TOKENS = 32


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
        if t.numel() >= 2**31:  # activations use int64 row offsets; weights int32
            raise ValueError(f"{name} has >= 2**31 elements (unsupported)")


@dataclass(frozen=True)
class _Plan:
    """Static (non-differentiable) part of a lowered gate."""

    kind: int  # tk.GATE_*
    gi: torch.Tensor | None = None  # (M, k) int32 top-k indices
    seg: Segments | None = None  # SGMV rows of shrink/expand
    seg_w: Segments | None = None  # adapter-sorted rows of dA/dB
    rb: int = 0  # ranks per adapter (SGMV)


def _plan(gate: Gate | None, m: int, r: int, device: torch.device):
    """Lowers ``gate`` to ``(plan, gw)`` for the tensor-core kernels, or ``None`` = gathered."""
    if gate is None:
        return _Plan(tk.GATE_NONE), None
    if isinstance(gate, DenseGate):
        _, w = lower_gate(gate, m, r, device)
        return _Plan(tk.GATE_DENSE), w
    if isinstance(gate, TopKGate):
        idx, w = lower_gate(gate, m, r, device)
        kl.check_range(idx, 0, r)
        return _Plan(tk.GATE_TOPK, gi=idx.contiguous()), w
    if isinstance(gate, AdapterGate):
        rb, t = int(gate.rank_per_adapter), int(gate.tokens_per_id)
        if rb <= 0 or r % rb:
            raise ValueError(f"rank_per_adapter={rb} must be > 0 and divide R={r}")
        if rb > kl.MAX_SEG_RANK:  # one rank tile per adapter: fall back to the masked dense gate
            return _Plan(tk.GATE_DENSE), gate_to_dense(gate, m, r, device, torch.float32)
        ids = adapter_ids_flat(gate, m, r).to(device)
        kl.check_range(ids, 0, r // rb)
        seg_w = by_adapter(ids, r // rb, t)
        seg = per_sample(ids, t) if t >= SEGMENT_MIN_TOKENS else seg_w
        gw = None
        if gate.scale is not None:
            gw = gate.scale.reshape(-1).repeat_interleave(t)  # (M,)
        return _Plan(tk.GATE_ROWSCALE if gw is not None else tk.GATE_NONE, seg=seg, seg_w=seg_w,
                     rb=rb), gw
    raise TypeError(f"unknown gate type {type(gate).__name__}; expected DenseGate, TopKGate, AdapterGate")


@dataclass(frozen=True)
class _Meta:
    plan: _Plan
    scaling: float
    act: str
    cols: tuple[tuple[int, int], ...] | None  # output column slices (multi-slice), else None
    n_out: int


class LoRAFunction(torch.autograd.Function):
    """Autograd wrapper over the tensor-core kernels (2-D tensors, gate already planned).

    ``apply(x, A, gw, down_bias, up_bias, pre, base_w, base_b, meta, *Bs)``: ``x`` (M, K) or
    ``None`` (with ``pre`` and no base), ``A`` (R, K) or ``None`` (with ``pre``), ``gw`` the
    differentiable gate tensor, ``pre`` (M, R) a precomputed ``x A^T``, ``base_w``/``base_b`` a
    frozen base layer (``None`` = delta only), ``Bs`` one (N, R) up projection, or one
    (n_s, R/S) per output slice.
    """

    @staticmethod
    def forward(ctx, x, A, gw, down_bias, up_bias, pre_in, base_w, base_b, meta, *Bs):  # noqa: D102
        p = meta.plan
        src = x if x is not None else pre_in
        M = src.shape[0]
        R = pre_in.shape[1] if pre_in is not None else A.shape[0]
        dtype = Bs[0].dtype
        pre, hw, _ = kl.launch_shrink(
            x, A, R=R, M=M, kind=p.kind, gw=gw, gi=p.gi, seg=p.seg, rb=p.rb, bias=down_bias,
            pre=pre_in, load_pre=pre_in is not None, bwd=False, scaling=meta.scaling, act=meta.act,
            out_dtype=dtype)
        cols = meta.cols or ((0, meta.n_out),)
        if base_w is not None:
            y = F.linear(x, base_w, base_b)  # (M, N): cuBLAS, then the delta lands in place
        elif meta.cols is not None:
            y = torch.zeros(M, meta.n_out, device=src.device, dtype=dtype)
        else:
            y = torch.empty(M, meta.n_out, device=src.device, dtype=dtype)
        accum = base_w is not None or meta.cols is not None
        r_s = hw.shape[1] // len(Bs)
        ub = None if up_bias is None else up_bias.to(torch.float32) * meta.scaling
        for i, (B, (c0, c1)) in enumerate(zip(Bs, cols)):
            kl.launch_expand(hw[:, i * r_s:(i + 1) * r_s], B, y[:, c0:c1], R=B.shape[1], rb=p.rb,
                             swn=B.stride(0), swr=B.stride(1), seg=p.seg, bias=ub, accum=accum)
        ctx.save_for_backward(x, A, gw, pre, hw, base_w, *Bs)
        ctx.meta, ctx.has_pre, ctx.bias_dtype = meta, pre_in is not None, (
            None if down_bias is None else down_bias.dtype)
        ctx.up_dtype = None if up_bias is None else up_bias.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # noqa: D102
        x, A, gw, pre, hw, base_w, *Bs = ctx.saved_tensors
        meta, p = ctx.meta, ctx.meta.plan
        need = ctx.needs_input_grad
        M = gy.shape[0]
        dtype = Bs[0].dtype
        gy = gy.to(dtype)
        cols = meta.cols or ((0, meta.n_out),)
        r_s = hw.shape[1] // len(Bs)
        R = pre.shape[1] if p.seg is None else (A.shape[0] if A is not None else Bs[0].shape[1])
        dpre = torch.empty(M, hw.shape[1], device=gy.device, dtype=pre.dtype if ctx.has_pre else dtype)
        dg = None
        for i, (B, (c0, c1)) in enumerate(zip(Bs, cols)):
            sl = slice(i * r_s, (i + 1) * r_s)
            _, _, dg = kl.launch_shrink(
                gy[:, c0:c1], B.t(), R=B.shape[1] if p.seg is not None else r_s, M=M, kind=p.kind,
                gw=gw, gi=p.gi, seg=p.seg, rb=p.rb, bias=None, pre=pre[:, sl], load_pre=False,
                bwd=True, scaling=meta.scaling, act=meta.act, out_dtype=dpre.dtype, out=dpre[:, sl])
        dx = dA = dgw = dbias = dup = dpre_in = None
        if need[0]:
            if base_w is not None:
                dx = gy.mm(base_w)  # (M, K) base gradient; the adapter's part lands in place
            if not ctx.has_pre:
                if dx is None:
                    dx = torch.empty(M, A.shape[1], device=gy.device, dtype=dtype)
                kl.launch_expand(dpre, A, dx, R=R, rb=p.rb, swn=A.stride(1), swr=A.stride(0),
                                 seg=p.seg, bias=None, accum=base_w is not None)
        if need[1] and not ctx.has_pre:
            dA = kl.launch_outer(dpre, x, R=R, rb=p.rb, seg=p.seg_w).to(A.dtype)
        if need[2] and dg is not None:
            dgw = (dg.sum(1) if p.kind == tk.GATE_ROWSCALE else dg).to(gw.dtype)
        if need[3]:
            dbias = dpre.float().sum(0).to(ctx.bias_dtype)
        if need[4]:
            dup = (gy.float().sum(0) * meta.scaling).to(ctx.up_dtype)
        if need[5]:
            dpre_in = dpre
        dBs = []
        for i, (B, (c0, c1)) in enumerate(zip(Bs, cols)):
            if need[9 + i]:
                dBt = kl.launch_outer(hw[:, i * r_s:(i + 1) * r_s], gy[:, c0:c1], R=B.shape[1],
                                      rb=p.rb, seg=p.seg_w)
                dBs.append(dBt.t().to(B.dtype))
            else:
                dBs.append(None)
        return (dx, dA, dgw, dbias, dup, dpre_in, None, None, None, *dBs)


#: backwards-compatible name of the autograd wrapper.
RankSparseLoRAFunction = LoRAFunction


def _flat2(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _apply(x, A, Bs, *, scaling, activation, gate, down_bias, up_bias, pre, base_w, base_b,
           cols, n_out) -> torch.Tensor:
    """Triton path on 2-D tensors; returns (M, n_out)."""
    x2 = _flat2(x)
    m, r = x2.shape[0], A.shape[0]
    pre2 = None if pre is None else _flat2(pre)
    r_pre = gate.rank_per_adapter if isinstance(gate, AdapterGate) and pre is not None and pre.shape[-1] != r else r
    if pre2 is not None and pre2.shape != (m, r_pre):
        raise ValueError(f"pre must be (..., R={r}) (or (..., r) with an AdapterGate) with the "
                         f"leading dims of x, got {tuple(pre.shape)}")
    if (isinstance(gate, TopKGate) and pre is None and down_bias is None and up_bias is None
            and base_w is None and cols is None and use_gathered(r, gate.indices.shape[-1])):
        idx, wt = lower_gate(gate, m, r, x2.device)
        return GatheredTopKFunction.apply(x2, A, Bs[0], wt, idx.contiguous(), float(scaling), activation)
    plan, gw = _plan(gate, m, r, x2.device)
    if gw is not None and gw.device != x2.device:
        raise ValueError(f"gate weights on {gw.device}, input on {x2.device}")
    if plan.seg is not None and down_bias is not None:
        raise ValueError("down_bias is not supported with an AdapterGate")
    meta = _Meta(plan, float(scaling), activation, cols, n_out)
    xin = x2 if (pre2 is None or base_w is not None) else None
    return LoRAFunction.apply(xin, None if pre2 is not None else A, gw, down_bias, up_bias, pre2,
                              base_w, base_b, meta, *Bs)


def rank_sparse_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scaling: float = 1.0,
    activation: str = "identity",
    gate: Gate | None = None,
    backend: str = "auto",
    down_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rank-sparse LoRA delta ``s * ((phi(x A^T + down_bias) * G) B^T + up_bias)``.

    Args:
        x: (..., K) input; leading dims are flattened to M tokens and restored.
        A: (R, K) down projection.
        B: (N, R) up projection.
        scaling: scalar ``s``.
        activation: ``"identity"`` or ``"relu"``.
        gate: ``DenseGate``/``TopKGate``/``AdapterGate`` or ``None`` (all ranks, weight 1).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        down_bias: optional (R,) bias of the down projection (a kernel input).
        up_bias: optional (N,) bias of the up projection.
        pre: optional (..., R) ``x A^T`` already computed by the caller (with an
            :class:`AdapterGate` also (..., r): each token's own adapter block, as
            :func:`~.shrink.lora_shrink` returns); the shrink GEMM is then skipped and the
            gradient of ``A``/``x`` flows through ``pre``'s own graph.
        base_weight: optional (N, K) frozen base weight: the result is then
            ``x W^T + base_bias + delta``, the delta accumulated in place into the base GEMM's
            output (and ``dpre A`` into the base ``dx``). A base that requires grad is computed
            by PyTorch and added (correct, not fused).
        base_bias: optional (N,) bias of the base layer (only with ``base_weight``).

    Returns:
        (..., N) delta (or base output plus delta) in ``x.dtype``. Inactive ranks get exactly
        zero gradient on both paths.

    Raises:
        ValueError, TypeError, RuntimeError: on bad shapes/dtypes/devices or backend.
    """
    _check(x, A, B, activation)
    if base_weight is not None and tuple(base_weight.shape) != (B.shape[0], x.shape[-1]):
        raise ValueError(f"base_weight must be (N, K) = ({B.shape[0]}, {x.shape[-1]}), "
                         f"got {tuple(base_weight.shape)}")
    fused = base_weight is not None and not base_weight.requires_grad and (
        base_bias is None or not base_bias.requires_grad)
    use_ref = resolve_backend(backend, x) == "reference"
    if use_ref or (base_weight is not None and not fused):
        kw = dict(scaling=scaling, activation=activation, gate=gate, down_bias=down_bias,
                  up_bias=up_bias, pre=pre)
        if use_ref and isinstance(gate, AdapterGate):  # each token's own adapter only (CPU)
            d = adapter_grouped_lora(x, A, B, **kw)
        else:
            d = (rank_sparse_lora_ref(x, A, B, **kw) if use_ref
                 else rank_sparse_lora(x, A, B, backend=backend, **kw))
        if base_weight is None:
            return d
        return F.linear(x, base_weight.to(x.dtype), None if base_bias is None else base_bias.to(x.dtype)) + d
    y = _apply(x, A, (B,), scaling=scaling, activation=activation, gate=gate, down_bias=down_bias,
               up_bias=up_bias, pre=pre, base_w=None if base_weight is None else base_weight.to(x.dtype),
               base_b=None if base_bias is None else base_bias.to(x.dtype), cols=None, n_out=B.shape[0])
    return y.reshape(*x.shape[:-1], B.shape[0])


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    Bs: torch.Tensor | list[torch.Tensor],
    *,
    scaling: float = 1.0,
    activation: str = "identity",
    gate: Gate | None = None,
    backend: str = "auto",
    out_slices: list[tuple[int, int]] | None = None,
    pre: torch.Tensor | None = None,
) -> torch.Tensor:
    """Frozen linear plus LoRA delta, ``x W^T + b + delta``, accumulated in place.

    Args:
        x: (..., K) input.
        weight: (N, K) frozen base weight (``requires_grad`` must be False for the fused path).
        bias: (N,) frozen base bias or ``None``.
        A: (R, K) down projection; with ``out_slices`` the S slices' A stacked, (S*r, K).
        Bs: (N, R) up projection, or with ``out_slices`` one (stop-start, r) per slice.
        out_slices: output column ranges ``[(start, stop), ...]`` each with its own (A_s, B_s);
            other columns get no adapter. Only with ``gate=None``.
        scaling, activation, gate, backend, pre: as in :func:`rank_sparse_lora`.

    Returns:
        (..., N) output in ``x.dtype``.
    """
    Bs = [Bs] if isinstance(Bs, torch.Tensor) else list(Bs)
    if out_slices is None and len(Bs) == 1:
        return rank_sparse_lora(x, A, Bs[0], scaling=scaling, activation=activation, gate=gate,
                                backend=backend, pre=pre, base_weight=weight, base_bias=bias)
    n = weight.shape[0]
    cols = None if out_slices is None else tuple((int(a), int(b)) for a, b in out_slices)
    if cols is not None and (len(cols) != len(Bs) or gate is not None or A.shape[0] % len(Bs)):
        raise ValueError("out_slices needs one B per slice, A stacked (S*r, K), and gate=None")
    if cols is None:
        _check(x, A, Bs[0], activation)
    for B, (c0, c1) in zip(Bs, cols or ()):
        _check(x, A[: B.shape[1]], B, activation)
        if B.shape[0] != c1 - c0:
            raise ValueError(f"slice ({c0}, {c1}) has B of {B.shape[0]} rows")
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if resolve_backend(backend, x) == "reference" or not frozen:
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        r_s = A.shape[0] // len(Bs)
        for i, (B, (c0, c1)) in enumerate(zip(Bs, cols or ((0, n),))):
            d = rank_sparse_lora(x, A[i * r_s:(i + 1) * r_s], B, scaling=scaling, activation=activation,
                                 gate=gate, backend=backend, pre=pre)
            y = y + d if cols is None else y.index_add(-1, torch.arange(c0, c1, device=y.device), d)
        return y
    y = _apply(x, A, Bs, scaling=scaling, activation=activation, gate=gate, down_bias=None,
               up_bias=None, pre=pre, base_w=weight.to(x.dtype), base_b=None if bias is None else bias.to(x.dtype),
               cols=cols, n_out=n)
    return y.reshape(*x.shape[:-1], n)
