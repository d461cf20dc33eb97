"""CPU compatibility shim for torchvision builds whose compiled ops do not match torch.

PyPI has no CPU build of torchvision. Next to a CPU build of torch, the CUDA torchvision wheel
fails at import with ``RuntimeError: operator torchvision::nms does not exist`` because its
compiled extension cannot load, and timm, open_clip and Avalanche all import torchvision.
Defining the two op schemas that torchvision's Python code registers fake kernels for lets the
pure-Python parts (transforms, datasets, models) import and run; only compiled ops (nms,
roi_align, video decoding) stay unavailable.

Import this module before the first ``import torchvision`` (``adaptsim.cl`` does so in its
``__init__``). Where the real ops exist it does nothing.
"""

from __future__ import annotations

import torch

__all__ = ["TORCHVISION_OPS_PATCHED", "ensure_torchvision_ops"]

_TV_LIB: torch.library.Library | None = None  # module-level reference keeps the schemas alive
TORCHVISION_OPS_PATCHED = False


def _real_ops_present() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018  (attribute access is the check)
    except (AttributeError, RuntimeError):
        return False
    return True


def ensure_torchvision_ops() -> bool:
    """Define ``torchvision::nms``/``qnms`` schemas when the compiled ops are missing.

    Returns:
        True when the schemas were defined by this call or an earlier one, False when the real
        compiled ops were present and nothing was changed.
    """
    global _TV_LIB, TORCHVISION_OPS_PATCHED
    if TORCHVISION_OPS_PATCHED:
        return True
    if _real_ops_present():
        return False
    _TV_LIB = torch.library.Library("torchvision", "FRAGMENT")
    _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    TORCHVISION_OPS_PATCHED = True
    return True


ensure_torchvision_ops()
