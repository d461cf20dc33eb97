"""Gathered top-k path for very large total rank R (kept only where it can win).

For a top-k gate with ``k`` of ``R`` ranks active, the tensor-core path of
:mod:`.triton_kernels` computes the shrink over all ``R`` ranks (rank tiles of 16+), which is
what MoRA needs for its scores anyway. When ``R`` is large and ``k << R`` (and the caller has not
computed ``x A^T`` already), gathering only the ``k`` selected rows of ``A`` / columns of ``B``
per token costs ``O(M k (K + N))`` instead of ``O(M R K)``. The gathered loads are per-token and
reduce with ``tl.sum`` (no tensor cores), and ``dA``/``dB`` scatter with ``tl.atomic_add``, so
this path is never used in deterministic mode. The rule that selects it is
:func:`use_gathered` (``R >= GATHER_MIN_R`` and ``k * GATHER_MAX_FRAC_INV <= R``); the
thresholds are first-principles guesses until a GPU measures them
(``bench/bench_rank_sparse_lora.py`` prints both paths).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .triton_kernels import LAUNCHES, interpreting

__all__ = ["GATHER_MAX_FRAC_INV", "GATHER_MIN_R", "GatheredTopKFunction", "use_gathered"]

#: smallest total rank for which the gathered path is used (tensor-core path below it).
GATHER_MIN_R = 512
#: the gathered path needs ``k <= R / GATHER_MAX_FRAC_INV``.
GATHER_MAX_FRAC_INV = 16

_ACT = {"identity": 0, "relu": 1}


def use_gathered(R: int, k: int) -> bool:
    """The measured-rule placeholder: gathered path for very large R and few active ranks."""
    return (R >= GATHER_MIN_R and k * GATHER_MAX_FRAC_INV <= R
            and not torch.are_deterministic_algorithms_enabled())


@functools.cache
def _kernels() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(X, W, IDX, WT, PRE, OUT, DWT, M, K, J, sxm, sxk, swr, swk, sim, sij, stm, stj,
               scaling, HAS_WT: tl.constexpr, ACT: tl.constexpr, BWD: tl.constexpr,
               BM: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rj = tl.program_id(1) * BJ + tl.arange(0, BJ)
        mmj = (rm < M)[:, None] & (rj < J)[None, :]
        rm64 = rm.to(tl.int64)
        idx = tl.load(IDX + rm64[:, None] * sim + rj[None, :] * sij, mask=mmj, other=0)
        acc = tl.zeros((BM, BJ), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            x = tl.load(X + rm64[:, None] * sxm + kk[None, :] * sxk,
                        mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
            w = tl.load(W + idx[:, :, None] * swr + kk[None, None, :] * swk,
                        mask=mmj[:, :, None] & (kk < K)[None, None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32), axis=2)
        offs = rm64[:, None] * J + rj[None, :]
        wt = tl.full((BM, BJ), 1.0, dtype=tl.float32)
        if HAS_WT:
            wt = tl.load(WT + rm64[:, None] * stm + rj[None, :] * stj, mask=mmj, other=0.0).to(tl.float32)
        if BWD:
            pre = tl.load(PRE + offs, mask=mmj, other=0.0)
            dh = acc * scaling
            h = pre
            if ACT == 1:
                h = tl.maximum(pre, 0.0)
            tl.store(DWT + offs, dh * h, mask=mmj)
            dh = dh * wt
            if ACT == 1:
                dh = tl.where(pre > 0.0, dh, 0.0)
            tl.store(OUT + offs, dh, mask=mmj)
        else:
            tl.store(PRE + offs, acc, mask=mmj)
            h = acc
            if ACT == 1:
                h = tl.maximum(acc, 0.0)
            tl.store(OUT + offs, h * wt * scaling, mask=mmj)

    @triton.jit
    def expand(H, W, IDX, Y, M, N, J, swn, swr, sim, sij, sym, syn,
               BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rm64 = rm.to(tl.int64)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for j0 in range(0, J, BJ):
            rj = j0 + tl.arange(0, BJ)
            mmj = (rm < M)[:, None] & (rj < J)[None, :]
            h = tl.load(H + rm64[:, None] * J + rj[None, :], mask=mmj, other=0.0)
            idx = tl.load(IDX + rm64[:, None] * sim + rj[None, :] * sij, mask=mmj, other=0)
            w = tl.load(W + rn[None, None, :] * swn + idx[:, :, None] * swr,
                        mask=mmj[:, :, None] & (rn < N)[None, None, :], other=0.0)
            acc += tl.sum(h[:, :, None] * w.to(tl.float32), axis=1)
        tl.store(Y + rm64[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def scatter(D, X, IDX, OUT, M, C, J, sxm, sxc, sim, sij, sor, soc,
                BM: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rc = tl.program_id(1) * BC + tl.arange(0, BC)
        rm64 = rm.to(tl.int64)
        x = tl.load(X + rm64[:, None] * sxm + rc[None, :] * sxc,
                    mask=(rm < M)[:, None] & (rc < C)[None, :], other=0.0).to(tl.float32)
        for j0 in range(0, J, BJ):
            rj = j0 + tl.arange(0, BJ)
            mmj = (rm < M)[:, None] & (rj < J)[None, :]
            d = tl.load(D + rm64[:, None] * J + rj[None, :], mask=mmj, other=0.0)
            idx = tl.load(IDX + rm64[:, None] * sim + rj[None, :] * sij, mask=mmj, other=0)
            tl.atomic_add(OUT + idx[:, :, None] * sor + rc[None, None, :] * soc,
                          d[:, :, None] * x[:, None, :], mask=mmj[:, :, None] & (rc < C)[None, None, :])

    return {"shrink": shrink, "expand": expand, "scatter": scatter}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks() -> tuple[int, int, int]:
    """(BM, BJ, BC): the gathered variants hold (BM, BJ, BC) fp32 tiles in registers."""
    return (16, 16, 16) if interpreting() else (16, 16, 64)


def _shrink(X, W, idx, wt, pre, *, scaling, act, bwd):
    M, K = X.shape
    J = idx.shape[1]
    BM, BJ, BK = _blocks()
    f32 = dict(device=X.device, dtype=torch.float32)
    pre = torch.empty(M, J, **f32) if pre is None else pre
    out = torch.empty(M, J, **f32)
    dwt = torch.empty(M, J, **f32) if bwd else out
    WT, stm, stj = (out, 0, 0) if wt is None else (wt, wt.stride(0), wt.stride(1))
    _kernels()["shrink"][(_cdiv(M, BM), _cdiv(J, BJ))](
        X, W, idx, WT, pre, out, dwt, M, K, J, X.stride(0), X.stride(1), W.stride(0), W.stride(1),
        idx.stride(0), idx.stride(1), stm, stj, float(scaling),
        HAS_WT=wt is not None, ACT=_ACT[act], BWD=bwd, BM=BM, BJ=BJ, BK=BK)
    LAUNCHES["gathered_shrink"] += 1
    return pre, out, dwt


def _expand(H, W, idx, N, swn, swr, dtype):
    M, J = H.shape
    BM, BJ, BN = _blocks()
    Y = torch.empty(M, N, device=H.device, dtype=dtype)
    _kernels()["expand"][(_cdiv(M, BM), _cdiv(N, BN))](
        H, W, idx, Y, M, N, J, swn, swr, idx.stride(0), idx.stride(1), Y.stride(0), Y.stride(1),
        BM=BM, BN=BN, BJ=BJ)
    LAUNCHES["gathered_expand"] += 1
    return Y


def _scatter(D, X, idx, shape, transpose: bool):
    M, J = D.shape
    C = X.shape[1]
    out = torch.zeros(shape, device=D.device, dtype=torch.float32)
    sor, soc = (out.stride(1), out.stride(0)) if transpose else (out.stride(0), out.stride(1))
    BM, BJ, BC = _blocks()
    _kernels()["scatter"][(_cdiv(M, BM), _cdiv(C, BC))](
        D, X, idx, out, M, C, J, X.stride(0), X.stride(1), idx.stride(0), idx.stride(1), sor, soc,
        BM=BM, BJ=BJ, BC=BC)
    LAUNCHES["gathered_scatter"] += 1
    return out


class GatheredTopKFunction(torch.autograd.Function):
    """Delta ``s * ((phi(x A^T) * G) B^T)`` for a top-k gate, gathering the selected ranks.

    Inputs are 2-D: x (M, K), A (R, K), B (N, R), wt (M, k) or None, idx (M, k) int32.
    """

    @staticmethod
    def forward(ctx, x, A, B, wt, idx, scaling, activation):  # noqa: D102
        pre, hw, _ = _shrink(x, A, idx, wt, None, scaling=scaling, act=activation, bwd=False)
        y = _expand(hw, B, idx, B.shape[0], B.stride(0), B.stride(1), x.dtype)
        ctx.save_for_backward(x, A, B, wt, idx, pre, hw)
        ctx.scaling, ctx.activation = scaling, activation
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):  # noqa: D102
        x, A, B, wt, idx, pre, hw = ctx.saved_tensors
        gy = gy.to(x.dtype)
        _, dpre, dwt = _shrink(gy, B.t(), idx, wt, pre, scaling=ctx.scaling, act=ctx.activation, bwd=True)
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = _expand(dpre, A, idx, A.shape[1], A.stride(1), A.stride(0), x.dtype)
        if ctx.needs_input_grad[1]:
            dA = _scatter(dpre, x, idx, A.shape, False).to(A.dtype)
        if ctx.needs_input_grad[2]:
            dB = _scatter(hw, gy, idx, B.shape, True).to(B.dtype)
        dwt = dwt.to(wt.dtype) if (wt is not None and ctx.needs_input_grad[3]) else None
        return dx, dA, dB, dwt, None, None, None
