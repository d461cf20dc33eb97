"""Triton kernels of the rank-sparse LoRA op: tensor-core (``tl.dot``) shrink, expand and outer.

Three kernels cover forward and backward of ``y (+)= s * ((phi(x A^T + a) * G) B^T) + c``.
Each runs in one of two row modes:

* dense rows (``SEG=False``): row block ``pid_m`` covers rows ``[pid_m*BM, pid_m*BM+BM)`` and the
  rank axis is tiled over the grid (tiles of ``BR`` >= 16, padded and masked);
* SGMV segments (``SEG=True``, Punica/vLLM style): program ``(i, s)`` covers rows
  ``start[s] + i*BM + [0, BM)`` of segment ``s`` (through the row list ``ROWS`` when rows are
  sorted by adapter, else contiguous), all with adapter ``adp[s]`` whose ranks are
  ``[adp*RB, adp*RB + RB)``; blocks past the segment's length exit at once. Segment tables
  live on the device, so no host sync is needed.

Kernels:

* ``shrink``  ``acc[m, r] = sum_k X[m, k] W[roff + r, k]`` (or ``acc = PRE[m, r]`` when the
  caller already computed ``x A^T``, ``LOAD_PRE``), then a gate epilogue on the (BM, BR) tile.
  Forward (``X = x, W = A``): stores ``pre`` (fp32) and ``hw = s * phi(pre) * g``.
  Backward (``X = dy, W = B^T``): ``dpre = s * acc * g * phi'(pre)`` and the gate gradient
  (dense: ``s * acc * phi(pre)``; top-k: its gather at each selected rank; row scale: the row sum).
  The gate ``g`` is a mask/weight on the tile: 1, a dense (M, R) weight, a top-k list turned into
  a (BM, BR) weight tile in registers (``sum_j w_j [idx_j == r]``), or a per-row scale.
* ``expand``  ``Y[m, n] = (ACCUM ? Y[m, n] : 0) + sum_r H[m, r] W[n, roff + r] (+ c[n])`` with
  grouped (L2-friendly) program order: the forward writes into the base output in place, the
  backward into the base ``dx``.
* ``outer``   ``OUT[split, roff + r, c] = sum_{m in chunk} D[m, r] X[m, c]`` (fp32, deterministic:
  each output tile is owned by one program; ``split`` cuts M so that small R x C problems
  still fill the GPU; the caller sums the splits). ``dA = outer(dpre, x)``, ``dB^T = outer(hw, dy)``.

Row offsets are computed in int64, so ``M * N`` may exceed 2**31. The ``@triton.jit`` functions
live in :mod:`._tl_kernels`, imported on first launch (:func:`kernels`): importing this module never imports Triton
or touches CUDA, and Triton honours ``TRITON_INTERPRET=1`` set by then.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import Counter
from typing import Any

__all__ = ["GATE_DENSE", "GATE_NONE", "GATE_ROWSCALE", "GATE_TOPK", "HAS_TRITON", "LAUNCHES",
           "interpreting", "kernels"]

HAS_TRITON = importlib.util.find_spec("triton") is not None

#: Number of launches per kernel name; tests use it to prove the Triton path really ran.
LAUNCHES: Counter[str] = Counter()

GATE_NONE, GATE_DENSE, GATE_TOPK, GATE_ROWSCALE = 0, 1, 2, 3


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def kernels() -> dict[str, Any]:
    """Imports (once) and returns the jitted ``tl.dot`` kernels plus ``check_range``."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use backend='reference'")
    import triton

    from . import _tl_kernels as k

    return {"shrink": k.shrink, "expand": k.expand, "outer": k.outer, "check_range": k.check_range,
            "triton": triton}
