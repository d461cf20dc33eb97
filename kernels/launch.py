"""Host launchers for the ``tl.dot`` kernels: tile configs, autotuning, grids, strides.

Tiles come from, in order: :func:`forced_tiles` (tests pin small tiles to reach several row /
rank tiles on tiny shapes), the interpreter defaults (small: the interpreter is slow), or on a
GPU ``triton.autotune`` over a short config list keyed on ``(M, K|N, R, RB, gate kind, mode)``
(``ADAPTSIM_AUTOTUNE=0`` uses the first config of each list instead: no tuning runs). Rank tiles
``BR`` are not tuned: ``next_pow2(R)`` clamped to [16, 64] (dense; 16 in the interpreter) or
``next_pow2(r)`` (SGMV, one tile per adapter, ``r <= 256``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch

from . import triton_kernels as tk
from .segments import Segments

__all__ = ["MAX_SEG_RANK", "forced_tiles", "launch_expand", "launch_outer", "launch_shrink"]

#: largest rank per adapter of the SGMV path (one rank tile per adapter).
MAX_SEG_RANK = 256

_FORCED: dict[str, int] | None = None
_INTERP = dict(BM=32, BK=32, BN=32, BC=32, BR=16, GROUP_M=2, SPLIT=2)
# (BM, BK | BN | BC, GROUP_M, num_warps, num_stages); first entry = untuned default.
_SHRINK_CFGS = [(64, 64, 0, 4, 3), (128, 64, 0, 4, 3), (128, 32, 0, 4, 4), (64, 128, 0, 4, 3)]
_EXPAND_CFGS = [(128, 128, 8, 8, 3), (64, 128, 8, 4, 4), (128, 64, 8, 4, 4), (64, 64, 8, 4, 4)]
_OUTER_CFGS = [(64, 128, 0, 4, 3), (128, 64, 0, 4, 3), (32, 128, 0, 4, 4), (64, 64, 0, 4, 4)]
_ACT = {"identity": 0, "relu": 1}


@contextlib.contextmanager
def forced_tiles(**tiles: int) -> Iterator[None]:
    """Pins tile sizes (``BM, BK, BN, BC, BR, GROUP_M, SPLIT``) for launches inside the block.

    ``BR`` is the dense-mode rank tile (SGMV always uses one tile per adapter).
    """
    global _FORCED
    old, _FORCED = _FORCED, {**_INTERP, **tiles}
    try:
        yield
    finally:
        _FORCED = old


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _p2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 operands in IEEE precision (no TF32); also bf16 under the numpy interpreter."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and tk.interpreting())


def _rank_tile(rl: int, seg: bool) -> int:
    """Rank tile: one per adapter (SGMV), else ``next_pow2(R)`` in [16, 64] (or the pinned BR)."""
    if seg:
        return _p2(rl, 16, MAX_SEG_RANK)
    fixed = _fixed()
    return _p2(rl, 16, fixed["BR"] if fixed is not None else 64)


def _debug() -> bool:
    return os.environ.get("ADAPTSIM_KERNEL_DEBUG", "0") not in ("", "0")


def _fixed() -> dict[str, int] | None:
    """Explicit tiles (forced or interpreter), or ``None`` for the GPU (autotune / default)."""
    if _FORCED is not None:
        return _FORCED
    if tk.interpreting():
        return _INTERP
    return None


@functools.cache
def _tuned(name: str, key: tuple[str, ...], second: str, restore: tuple[str, ...]) -> Any:
    """The autotuned wrapper of kernel ``name`` (built once)."""
    triton = tk.kernels()["triton"]
    cfgs = {"shrink": _SHRINK_CFGS, "expand": _EXPAND_CFGS, "outer": _OUTER_CFGS}[name]
    configs = [triton.Config({"BM": bm, second: b2, **({"GROUP_M": g} if name == "expand" else {})},
                             num_warps=w, num_stages=st) for bm, b2, g, w, st in cfgs]
    return triton.autotune(configs=configs, key=list(key), restore_value=list(restore) or None)(
        tk.kernels()[name])


def _run(name: str, grid, args: tuple, const: dict[str, Any], second: str,
         key: tuple[str, ...], restore: tuple[str, ...] = ()) -> None:
    """Launches kernel ``name`` with fixed tiles, the default config, or autotuning."""
    fixed = _fixed()
    cfg0 = {"shrink": _SHRINK_CFGS, "expand": _EXPAND_CFGS, "outer": _OUTER_CFGS}[name][0]
    if fixed is None and os.environ.get("ADAPTSIM_AUTOTUNE", "1") == "0":
        fixed = dict(BM=cfg0[0], **{second: cfg0[1]}, GROUP_M=cfg0[2] or 1)
        const = {**const, "num_warps": cfg0[3], "num_stages": cfg0[4]}
    if fixed is not None:
        tiles = {"BM": fixed["BM"], second: fixed[second]}
        if name == "expand":
            tiles["GROUP_M"] = fixed["GROUP_M"]
        meta = {**const, **tiles}
        tk.kernels()[name][grid(meta) if callable(grid) else grid](*args, **meta)
    else:
        _tuned(name, key, second, restore)[grid](*args, **const)
    tk.LAUNCHES[name] += 1


def _seg_args(seg: Segments | None, dummy: torch.Tensor) -> tuple:
    if seg is None:
        return (dummy, dummy, dummy, dummy)
    return (dummy if seg.rows is None else seg.rows, seg.adapter, seg.start, seg.length)


def check_range(v: torch.Tensor, lo: int, hi: int) -> None:
    """Debug mode on a GPU: device-side ``lo <= v < hi`` (no host sync; asserts on failure)."""
    if _debug() and v.is_cuda and v.numel():
        v = v.reshape(-1).contiguous()
        tk.kernels()["check_range"][(_cdiv(v.numel(), 1024),)](v, v.numel(), lo, hi, BLOCK=1024)


def launch_shrink(X: torch.Tensor | None, W: torch.Tensor | None, *, R: int, M: int, kind: int,
                  gw: torch.Tensor | None, gi: torch.Tensor | None, seg: Segments | None, rb: int,
                  bias: torch.Tensor | None, pre: torch.Tensor | None, load_pre: bool, bwd: bool,
                  scaling: float, act: str, out_dtype: torch.dtype, out: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Shrink ``acc = X W^T`` (``W[r, k]`` through strides) plus the gate epilogue.

    Forward returns ``(pre, hw, None)``; backward (``pre`` given) ``(pre, dpre, dgate)``.
    With ``load_pre`` the forward reads ``pre`` (a precomputed ``x A^T``) instead of the GEMM.
    """
    ref = X if X is not None else pre
    dev = ref.device
    rl = rb if seg is not None else R
    f32 = dict(device=dev, dtype=torch.float32)
    if pre is None:
        pre = torch.empty(M, rl, **f32)
    h = torch.empty(M, rl, device=dev, dtype=out_dtype) if out is None else out
    BR = _rank_tile(rl, seg is not None)
    n_rt = 1 if seg is not None else _cdiv(rl, BR)
    dg = None
    if bwd and kind != tk.GATE_NONE:
        shape = {tk.GATE_DENSE: (M, R), tk.GATE_TOPK: gi.shape if gi is not None else (M, 1),
                 tk.GATE_ROWSCALE: (M, n_rt)}[kind]
        dg = torch.zeros(shape, **f32)
    dummy = h
    Xp, sxm, sxk, K = (dummy, 0, 0, 0) if (X is None or (load_pre and not bwd)) else (
        X, X.stride(0), X.stride(1), X.shape[1])
    Wp, swr, swk = (dummy, 0, 0) if W is None or (load_pre and not bwd) else (W, W.stride(0), W.stride(1))
    GW = dummy if gw is None else gw
    sgm, sgr = (0, 0) if gw is None else (gw.stride(0), gw.stride(1) if gw.dim() == 2 else 0)
    GI, sim, sij = (dummy, 0, 0) if gi is None else (gi, gi.stride(0), gi.stride(1))
    DG, sdm, sdr = (dummy, 0, 0) if dg is None else (dg, dg.stride(0), dg.stride(1))
    args = (Xp, Wp, pre, dummy if bias is None else bias, GW, GI, h, DG, *_seg_args(seg, dummy),
            M, K, R, rb, 0 if gi is None else gi.shape[1],
            sxm, sxk, swr, swk, pre.stride(0), pre.stride(1), sgm, sgr, sim, sij,
            h.stride(0), h.stride(1), sdm, sdr, float(scaling))
    const = dict(SEG=seg is not None, HAS_ROWS=seg is not None and seg.rows is not None, BWD=bwd,
                 LOAD_PRE=load_pre, HAS_BIAS=bias is not None, GATE=kind, HAS_GW=gw is not None,
                 ACT=_ACT[act], IEEE=_ieee(ref.dtype if X is None else X.dtype), DEBUG=_debug(), BR=BR)

    def grid(meta):
        if seg is not None:
            return (_cdiv(seg.max_len, meta["BM"]), seg.n)
        return (_cdiv(M, meta["BM"]), n_rt)

    _run("shrink", grid, args, const, "BK", ("M", "K", "R", "RB", "GATE", "SEG", "BWD", "LOAD_PRE"))
    return pre, h, dg


def launch_expand(H: torch.Tensor, W: torch.Tensor, Y: torch.Tensor, *, R: int, rb: int,
                  swn: int, swr: int, seg: Segments | None, bias: torch.Tensor | None,
                  accum: bool) -> torch.Tensor:
    """``Y[m, n] (+)= sum_r H[m, r] W[n, roff + r] (+ bias[n])`` in place (W through strides)."""
    M, N = Y.shape
    rl = rb if seg is not None else R
    BR = _rank_tile(rl, False)  # the expand loops over rank tiles of BR
    dummy = H
    args = (H, W, Y, dummy if bias is None else bias, *_seg_args(seg, dummy), M, N, R, rb,
            H.stride(0), H.stride(1), swn, swr, Y.stride(0), Y.stride(1))
    const = dict(SEG=seg is not None, HAS_ROWS=seg is not None and seg.rows is not None,
                 ACCUM=accum, HAS_BIAS=bias is not None, IEEE=_ieee(W.dtype), BR=BR)

    def grid(meta):
        if seg is not None:
            return (_cdiv(seg.max_len, meta["BM"]) * _cdiv(N, meta["BN"]), seg.n)
        return (_cdiv(M, meta["BM"]) * _cdiv(N, meta["BN"]),)

    _run("expand", grid, args, const, "BN", ("M", "N", "R", "RB", "SEG", "ACCUM"),
         restore=("Y",) if accum else ())
    return Y


def _split(M: int, tiles: int, device: torch.device) -> int:
    """Split-M factor so that ``tiles * split`` programs fill the GPU (>= 2 waves)."""
    fixed = _fixed()
    if fixed is not None:
        return int(fixed["SPLIT"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(_cdiv(2 * sms, max(tiles, 1)), _cdiv(M, 256)))


def launch_outer(D: torch.Tensor, X: torch.Tensor, *, R: int, rb: int, seg: Segments | None
                 ) -> torch.Tensor:
    """``OUT[r, c] = sum_m D[m, r] X[m, c]`` per adapter segment; returns fp32 (R, C)."""
    M, C = X.shape
    rl = rb if seg is not None else R
    BR = _rank_tile(rl, seg is not None)
    n_r = seg.n if seg is not None else _cdiv(rl, BR)
    split = _split(M, n_r * _cdiv(C, 128), X.device)
    out = torch.empty(split, R, C, device=X.device, dtype=torch.float32)
    if seg is not None and seg.n * rb < R:  # ranks of adapters outside the table stay zero
        out.zero_()
    dummy = D
    args = (D, X, out, *_seg_args(seg, dummy), M, C, R, rb, D.stride(0), D.stride(1),
            X.stride(0), X.stride(1), out.stride(0), out.stride(1), out.stride(2), split)
    const = dict(SEG=seg is not None, HAS_ROWS=seg is not None and seg.rows is not None,
                 IEEE=_ieee(X.dtype), BR=BR)

    def grid(meta):
        return (n_r, _cdiv(C, meta["BC"]), split)

    _run("outer", grid, args, const, "BC", ("M", "C", "R", "RB", "SEG"))
    return out[0] if split == 1 else out.sum(0)
