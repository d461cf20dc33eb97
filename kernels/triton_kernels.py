"""Triton kernels for the rank-sparse LoRA delta (forward and backward).

All gates arrive in the gathered form ``(idx, wt)`` (see :func:`~.gates.lower_gate`). Three
kernels cover forward and backward, each with a ``DENSE`` variant (``idx is None``: all ranks,
``tl.dot`` on tensor cores) and a gathered variant (per-token rank lists: cost ∝ J):

* ``shrink``:  ``acc[m, j] = sum_k X[m, k] * W[idx[m, j], k]`` plus an epilogue.
  Forward: ``X = x, W = A`` -> stores ``pre`` and ``hw = s * phi(pre) * wt``.
  Backward: ``X = dy, W = B^T`` -> ``dpre = s * acc * wt * phi'(pre)``, ``dwt = s * acc * phi(pre)``.
* ``expand``:  ``Y[m, n] = sum_j H[m, j] * W[n, idx[m, j]]``.
  Forward: ``y = expand(hw, B)``; backward: ``dx = expand(dpre, A^T)``.
* ``outer``:   ``OUT[idx[m, j], c] += sum_m D[m, j] * X[m, c]`` (fp32 output).
  ``dA = outer(dpre, x)``; ``dB^T = outer(hw, dy)``. The dense variant is a deterministic tiled
  ``D^T X``; the gathered variant scatters with ``tl.atomic_add``. Ranks that no token selects
  receive no contribution, so their gradient is exactly zero.

The ``@triton.jit`` functions are built lazily on first launch (``_kernels()``): Triton decides
at decoration time whether to interpret (``TRITON_INTERPRET=1``), and building lazily lets a
test module set that variable after ``adaptsim.kernels`` was first imported (as long as nothing
else imported ``triton`` before). Importing this module never touches CUDA and never imports
Triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import Counter
from typing import Any

import torch

# Triton is imported lazily (first launch), never at package import: Triton's own standard
# library (tl.sum, ...) is jitted when ``triton`` is first imported, and only honours
# TRITON_INTERPRET=1 if the variable is set by then. Import-time discovery uses find_spec.
HAS_TRITON = importlib.util.find_spec("triton") is not None
triton: Any = None
tl: Any = None

__all__ = ["HAS_TRITON", "LAUNCHES", "interpreting", "launch_expand", "launch_outer", "launch_shrink"]

#: Number of launches per kernel name; tests use it to prove the Triton path really ran.
LAUNCHES: Counter[str] = Counter()

_ACT = {"identity": 0, "relu": 1}


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernels() -> dict[str, Any]:
    """Builds (once) and returns the jitted kernels."""
    global triton, tl
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use backend='reference'")
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(X, W, IDX, WT, PRE, OUT, DWT, M, K, J,
               sxm, sxk, swr, swk, sim, sij, stm, stj, scaling,
               DENSE: tl.constexpr, HAS_WT: tl.constexpr, ACT: tl.constexpr, BWD: tl.constexpr,
               IEEE: tl.constexpr, BM: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rj = tl.program_id(1) * BJ + tl.arange(0, BJ)
        rk = tl.arange(0, BK)
        mmj = (rm < M)[:, None] & (rj < J)[None, :]  # (BM, BJ)
        acc = tl.zeros((BM, BJ), dtype=tl.float32)
        if DENSE:
            for k0 in range(0, K, BK):
                kk = k0 + rk
                x = tl.load(X + rm[:, None] * sxm + kk[None, :] * sxk,
                            mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
                w = tl.load(W + rj[None, :] * swr + kk[:, None] * swk,
                            mask=(rj < J)[None, :] & (kk < K)[:, None], other=0.0)  # (BK, BJ)
                if IEEE:
                    acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(x, w)
        else:
            idx = tl.load(IDX + rm[:, None] * sim + rj[None, :] * sij, mask=mmj, other=0)
            for k0 in range(0, K, BK):
                kk = k0 + rk
                x = tl.load(X + rm[:, None] * sxm + kk[None, :] * sxk,
                            mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
                w = tl.load(W + idx[:, :, None] * swr + kk[None, None, :] * swk,
                            mask=mmj[:, :, None] & (kk < K)[None, None, :], other=0.0)
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32), axis=2)
        offs = rm[:, None] * J + rj[None, :]  # PRE/OUT/DWT are contiguous (M, J) fp32
        if HAS_WT:
            wt = tl.load(WT + rm[:, None] * stm + rj[None, :] * stj, mask=mmj, other=0.0).to(tl.float32)
        if BWD:
            pre = tl.load(PRE + offs, mask=mmj, other=0.0)
            dh = acc * scaling
            h = pre
            if ACT == 1:
                h = tl.maximum(pre, 0.0)
            if HAS_WT:
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
            if HAS_WT:
                h = h * wt
            tl.store(OUT + offs, h * scaling, mask=mmj)

    @triton.jit
    def expand(H, W, IDX, Y, M, N, J, swn, swr, sim, sij, sym, syn,
               DENSE: tl.constexpr, IEEE: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for j0 in range(0, J, BJ):
            rj = j0 + tl.arange(0, BJ)
            mmj = (rm < M)[:, None] & (rj < J)[None, :]
            h = tl.load(H + rm[:, None] * J + rj[None, :], mask=mmj, other=0.0)  # (BM, BJ) fp32
            if DENSE:
                w = tl.load(W + rn[None, :] * swn + rj[:, None] * swr,
                            mask=(rn < N)[None, :] & (rj < J)[:, None], other=0.0)  # (BJ, BN)
                if IEEE:
                    acc += tl.dot(h, w.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(h.to(w.dtype), w)
            else:
                idx = tl.load(IDX + rm[:, None] * sim + rj[None, :] * sij, mask=mmj, other=0)
                w = tl.load(W + rn[None, None, :] * swn + idx[:, :, None] * swr,
                            mask=mmj[:, :, None] & (rn < N)[None, None, :], other=0.0)
                acc += tl.sum(h[:, :, None] * w.to(tl.float32), axis=1)
        tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def outer(D, X, IDX, OUT, M, C, J, sxm, sxc, sim, sij, sor, soc,
              DENSE: tl.constexpr, IEEE: tl.constexpr,
              BM: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr):
        rc = tl.program_id(1) * BC + tl.arange(0, BC)
        if DENSE:  # OUT[j, c] = sum_m D[m, j] X[m, c], one tile per program, no atomics
            rj = tl.program_id(0) * BJ + tl.arange(0, BJ)
            acc = tl.zeros((BJ, BC), dtype=tl.float32)
            for m0 in range(0, M, BM):
                rm = m0 + tl.arange(0, BM)
                d = tl.load(D + rm[:, None] * J + rj[None, :],
                            mask=(rm < M)[:, None] & (rj < J)[None, :], other=0.0)
                x = tl.load(X + rm[:, None] * sxm + rc[None, :] * sxc,
                            mask=(rm < M)[:, None] & (rc < C)[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(tl.trans(d), x.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(tl.trans(d.to(x.dtype)), x)
            tl.store(OUT + rj[:, None] * sor + rc[None, :] * soc, acc,
                     mask=(rj < J)[:, None] & (rc < C)[None, :])
        else:  # scatter: OUT[idx[m, j], c] += D[m, j] X[m, c]
            rm = tl.program_id(0) * BM + tl.arange(0, BM)
            x = tl.load(X + rm[:, None] * sxm + rc[None, :] * sxc,
                        mask=(rm < M)[:, None] & (rc < C)[None, :], other=0.0).to(tl.float32)
            for j0 in range(0, J, BJ):
                rj = j0 + tl.arange(0, BJ)
                mmj = (rm < M)[:, None] & (rj < J)[None, :]
                d = tl.load(D + rm[:, None] * J + rj[None, :], mask=mmj, other=0.0)
                idx = tl.load(IDX + rm[:, None] * sim + rj[None, :] * sij, mask=mmj, other=0)
                tl.atomic_add(OUT + idx[:, :, None] * sor + rc[None, None, :] * soc,
                              d[:, :, None] * x[:, None, :],
                              mask=mmj[:, :, None] & (rc < C)[None, None, :])

    return {"shrink": shrink, "expand": expand, "outer": outer}


def _p2(n: int, lo: int, hi: int) -> int:
    """Next power of two of ``n`` clamped to ``[lo, hi]``."""
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(dense: bool) -> tuple[int, int, int]:
    """(BM, BJ, BC) tile sizes. Small in the interpreter (it is slow), larger on GPU.

    The gathered variants materialise (BM, BJ, BC) fp32 tiles in registers, so they use
    smaller tiles than the tl.dot variants. (A short autotune list would go here.)
    """
    if interpreting():
        return (16, 16, 16)
    return (64, 64, 64) if dense else (16, 16, 64)


def _ieee(dtype: torch.dtype) -> bool:
    """Whether tl.dot runs on fp32 operands in IEEE precision.

    True for fp32 inputs (no TF32, so fp32 results match the reference closely) and for
    bf16 under the interpreter, whose numpy-backed tl.dot does not handle bf16 operands.
    bf16/fp16 on GPU use tensor cores with fp32 accumulation.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _idx_args(idx: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    return (dummy, 0, 0) if idx is None else (idx, idx.stride(0), idx.stride(1))


def launch_shrink(X: torch.Tensor, W: torch.Tensor, idx: torch.Tensor | None, wt: torch.Tensor | None,
                  pre: torch.Tensor | None, *, scaling: float, act: str, bwd: bool,
                  J: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launches ``shrink``. ``W`` is indexed as ``W[r, k]`` through its strides.

    Returns:
        ``(pre, out, dwt)``: forward returns (pre, hw, None); backward (pre, dpre, dwt).
    """
    M, K = X.shape
    dense = idx is None
    BM, BJ, BK = _blocks(dense)
    BJ = _p2(J, 16, BJ)
    f32 = dict(device=X.device, dtype=torch.float32)
    if pre is None:
        pre = torch.empty(M, J, **f32)
    out = torch.empty(M, J, **f32)
    dwt = torch.empty(M, J, **f32) if (bwd and wt is not None) else None
    IDX, sim, sij = _idx_args(idx, out)
    WT, stm, stj = (out, 0, 0) if wt is None else (wt, wt.stride(0), wt.stride(1))
    grid = (_cdiv(M, BM), _cdiv(J, BJ))
    _kernels()["shrink"][grid](
        X, W, IDX, WT, pre, out, out if dwt is None else dwt, M, K, J,
        X.stride(0), X.stride(1), W.stride(0), W.stride(1), sim, sij, stm, stj, float(scaling),
        DENSE=dense, HAS_WT=wt is not None, ACT=_ACT[act], BWD=bwd,
        IEEE=_ieee(X.dtype), BM=BM, BJ=BJ, BK=BK)
    LAUNCHES["shrink"] += 1
    return pre, out, dwt


def launch_expand(H: torch.Tensor, W: torch.Tensor, idx: torch.Tensor | None, N: int,
                  swn: int, swr: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Launches ``expand``: ``Y[m, n] = sum_j H[m, j] W[n, idx[m, j]]`` with W strides (swn, swr)."""
    M, J = H.shape
    dense = idx is None
    BM, BJ, BN = _blocks(dense)
    BJ = _p2(J, 16, BJ)
    Y = torch.empty(M, N, device=H.device, dtype=out_dtype)
    IDX, sim, sij = _idx_args(idx, H)
    grid = (_cdiv(M, BM), _cdiv(N, BN))
    _kernels()["expand"][grid](
        H, W, IDX, Y, M, N, J, swn, swr, sim, sij, Y.stride(0), Y.stride(1),
        DENSE=dense, IEEE=_ieee(W.dtype), BM=BM, BN=BN, BJ=BJ)
    LAUNCHES["expand"] += 1
    return Y


def launch_outer(D: torch.Tensor, X: torch.Tensor, idx: torch.Tensor | None, out: torch.Tensor,
                 sor: int, soc: int) -> torch.Tensor:
    """Launches ``outer`` into the zero-initialised fp32 ``out`` (strides ``sor``, ``soc``)."""
    M, J = D.shape
    C = X.shape[1]
    dense = idx is None
    BM, BJ, BC = _blocks(dense)
    BJ = _p2(J, 16, BJ)
    IDX, sim, sij = _idx_args(idx, D)
    grid = (_cdiv(J, BJ) if dense else _cdiv(M, BM), _cdiv(C, BC))
    _kernels()["outer"][grid](
        D, X, IDX, out, M, C, J, X.stride(0), X.stride(1), sim, sij, sor, soc,
        DENSE=dense, IEEE=_ieee(X.dtype), BM=BM, BJ=BJ, BC=BC)
    LAUNCHES["outer"] += 1
    return out
