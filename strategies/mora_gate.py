"""MoRA's self-activated rank gate, the gated layer, and where the layers go in a backbone.

Paper: Lu et al., "Little By Little: Continual Learning via Self-Activated Sparse
Mixture-of-Rank Adaptive Learning", arXiv 2506.21035 (submitted to ICLR 2026),
https://arxiv.org/abs/2506.21035. No official code exists; every choice the paper leaves open is
an explicit option of :class:`SelfActivationGate` (see ``docs/methods/mora.md``).

Pieces:

* :class:`SelfActivationGate` -- a small variant object: raw activations ``h = x A^T`` (M, R)
  in, ``Route(indices, weights, n_active)`` out. No router parameters.
* :class:`MoRALinear` -- an :class:`~adaptsim.strategies.adapters.RankExpertLoRA` plus a gate.
  It runs the kernel's gated (top-k) path, or the dense masked path for comparison.
* :class:`LinearSelfAttention` -- an exact stand-in for open_clip's ``nn.MultiheadAttention``
  whose q/k/v and output projections are ``nn.Linear`` modules (``qkv``, ``proj``), so LoRA can
  wrap them (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly and never calls it).
* :func:`inject_mora` -- wraps every matching ``nn.Linear`` of a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adaptsim.strategies.adapters import RankExpertLoRA

__all__ = [
    "COMPUTE_MODES",
    "SCORE_MODES",
    "LinearSelfAttention",
    "MoRALinear",
    "Route",
    "SelfActivationGate",
    "inject_mora",
    "replace_clip_attention",
]

logger = logging.getLogger(__name__)

SCORE_MODES = ("signed", "abs")
COMPUTE_MODES = ("gated", "dense")


class Route(NamedTuple):
    """Routing decision for M tokens.

    The width is static, ``k = min(top_k, R)``, whatever the delta mask keeps: cutting it to the
    widest token's active count would need that count on the host (one device sync per layer).
    Slots a token does not keep stay in the list with weight exactly 0, which the kernel's top-k
    gate treats as inactive (no output, no gradient).

    Attributes:
        indices: (M, k) int64 expert indices, best first (a token's kept experts are a prefix).
        weights: (M, k) mixture weights (differentiable), 0 on inactive slots.
        n_active: (M,) number of active experts per token (after top-k and the delta mask).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    n_active: torch.Tensor


@dataclass(frozen=True)
class SelfActivationGate:
    """MoRA self-activation: scores from the experts' own activations ``a_i . x``.

    ``s_i = f(a_i . x) / sqrt(sum_j (a_j . x)^2)`` with ``f`` = identity (``"signed"``, the
    paper's equation) or ``abs``; keep the ``top_k`` largest scores, then those with
    ``s_i >= delta``; weights ``softmax(s / tau)`` over all experts, masked to the kept ones
    (the paper, default) or renormalised over the kept ones.

    Attributes:
        top_k: activation budget per token (clipped to the number of experts).
        tau: softmax temperature.
        delta: threshold on the normalised score (in [-1, 1]); with signed scores, ``0``
            drops experts whose key is anti-aligned with the input.
        score: ``"signed"`` or ``"abs"``.
        renormalize: ``False`` (default, the paper's equation): the softmax runs over all
            experts and the dropped ones are zeroed (weights sum to < 1, and shrink as experts
            accumulate); ``True``: the softmax runs over the kept experts only (weights sum to 1).
        norm_grad: let gradients flow through the layer-wide quantities (the L2 norm over all
            experts, and the softmax partition over all experts when not renormalising).
            ``False`` (default) treats them as constants in backward, so an expert gets gradient
            only from tokens where it is active (sparse gradients, as in top-k MoE).
    """

    top_k: int = 8
    tau: float = 0.1
    delta: float = 0.0
    score: str = "signed"
    renormalize: bool = False
    norm_grad: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {self.score!r}")

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Normalised scores (M, R) from raw activations ``h`` (M, R)."""
        norm = h.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (M, 1)
        if not self.norm_grad:
            norm = norm.detach()
        return (h.abs() if self.score == "abs" else h) / norm

    def __call__(self, h: torch.Tensor) -> Route:
        """Routes M tokens given their raw activations ``h = x A^T`` (M, R).

        Runs entirely on ``h``'s device (no host sync): the route has the static width
        ``k = min(top_k, R)``; a token with no kept expert has all-zero weights.
        """
        s = self.scores(h.float())  # (M, R)
        k = min(self.top_k, s.shape[-1])
        top_s, idx = s.topk(k, dim=-1)  # (M, k), sorted: kept experts form a prefix
        keep = top_s >= self.delta  # (M, k)
        logits = top_s / self.tau
        if self.renormalize:
            w = torch.softmax(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), -1)
        else:
            log_z = torch.logsumexp(s / self.tau, -1, keepdim=True)  # (M, 1) over all R experts
            w = torch.exp(logits - (log_z if self.norm_grad else log_z.detach()))
        return Route(idx, w * keep, keep.sum(-1))  # masked slots: weight 0, gradient 0


class MoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with growing rank-1 experts routed by a :class:`SelfActivationGate`.

    ``y = base(x) + scaling * sum_{i in active(x)} w_i(x) (a_i . x) b_i``.

    Args:
        base: the linear layer to wrap (frozen).
        gate: the self-activation gate.
        scaling: scale of the delta.
        compute: ``"gated"`` (the kernel's top-k path, :class:`RankExpertLoRA` with
            ``topk_indices``) or ``"dense"`` (dense masked LoRA: reuse ``h`` and multiply by a
            dense (M, R) weight matrix; the benchmark baseline).
        seed: optional seed of the experts' A initialisation.

    Attributes:
        recorder: optional callable ``recorder(layer, route, h)`` called on every forward with
            the :class:`Route` (``n_active`` shaped like the input's leading dims) and the raw
            activations ``h`` (M, R) (:mod:`adaptsim.strategies.mora_stats`); ``None`` = off.
    """

    def __init__(self, base: nn.Linear, gate: SelfActivationGate, *, scaling: float = 1.0,
                 compute: str = "gated", seed: int | None = None) -> None:
        super().__init__()
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
        self.experts = RankExpertLoRA(base, scaling=scaling, seed=seed)
        self.gate_cfg = gate
        self.compute = compute
        self.recorder = None

    @property
    def n_experts(self) -> int:
        return self.experts.n_experts

    @property
    def base_layer(self) -> nn.Linear:
        """The wrapped frozen linear (what :func:`~adaptsim.strategies.components.proto_head.adapters_off` swaps in)."""
        return self.experts.base_layer

    def group_sizes(self) -> list[int]:
        """Number of experts in each task's group, in order."""
        return [int(a.shape[0]) for a in self.experts.more_A.values()]

    def add_experts(self, n: int) -> range:
        """Freezes the current experts and adds ``n`` new ones (A random, B zero)."""
        return self.experts.add_experts(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        ex = self.experts
        if ex.n_experts == 0:
            return ex.base_layer(x)
        lead, R = x.shape[:-1], ex.n_experts
        h = ex.scores_input(x).reshape(-1, R)  # (M, R) = x A^T, the self-activation input
        if h.shape[0] == 0:  # no tokens (a static shape, not a device value)
            return ex.base_layer(x)
        route = self.gate_cfg(h)  # static width k, no host sync
        if self.recorder is not None:
            self.recorder(self, route._replace(n_active=route.n_active.reshape(lead)), h)
        if self.compute == "gated":
            J = route.indices.shape[-1]
            return ex(x, topk_indices=route.indices.reshape(*lead, J),
                      topk_weights=route.weights.reshape(*lead, J), pre=h.reshape(*lead, R))
        _, B = ex.stacked()
        dense = torch.zeros_like(h, dtype=route.weights.dtype).scatter(1, route.indices, route.weights)
        d = (h * dense.to(h.dtype)) @ B.t() * ex.scaling  # (M, out)
        y = ex.base_layer(x)
        return y + d.reshape(*lead, -1).to(y.dtype)


class LinearSelfAttention(nn.Module):
    """Self-attention equal to a given ``nn.MultiheadAttention``, built from ``nn.Linear``s.

    Only self-attention (``key is query is value`` or ``None``) without key-padding masks is
    supported, which is what open_clip's vision tower uses.

    Args:
        mha: the module to replace; its weights are copied.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None:
            raise ValueError("LinearSelfAttention needs a packed in_proj and no bias_k/bias_v")
        d = mha.embed_dim
        w = mha.in_proj_weight
        self.qkv = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None, device=w.device, dtype=w.dtype)
        self.proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(w)
            self.proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.qkv.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.proj.bias.copy_(mha.out_proj.bias)
        self.requires_grad_(mha.in_proj_weight.requires_grad)
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, **_: object) -> tuple[torch.Tensor, None]:
        """Same call signature and return value as ``nn.MultiheadAttention`` (weights ``None``).

        Raises:
            ValueError: for cross-attention, ``need_weights`` or a key-padding mask.
        """
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("LinearSelfAttention supports self-attention only")
        if need_weights or key_padding_mask is not None:
            raise ValueError("LinearSelfAttention: need_weights and key_padding_mask are unsupported")
        x = query if self.batch_first else query.transpose(0, 1)  # (B, T, D)
        Bsz, T, D = x.shape
        q, k, v = self.qkv(x).reshape(Bsz, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        elif attn_mask is not None:
            attn_mask = ~attn_mask  # nn.MultiheadAttention: True = masked out; SDPA: True = attend
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, Dh)
        o = self.proj(o.transpose(1, 2).reshape(Bsz, T, D))
        return (o if self.batch_first else o.transpose(0, 1)), None


def replace_clip_attention(model: nn.Module) -> int:
    """Replaces every ``nn.MultiheadAttention`` in ``model`` by :class:`LinearSelfAttention`.

    Returns:
        the number of modules replaced.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LinearSelfAttention(getattr(parent, child)))
    return len(names)


def inject_mora(model: nn.Module, targets: tuple[str, ...] | list[str], gate: SelfActivationGate, *,
                scaling: float, compute: str = "gated", seed: int | None = None) -> dict[str, MoRALinear]:
    """Wraps every ``nn.Linear`` whose qualified name ends with a target in a :class:`MoRALinear`.

    A name matches target ``t`` if it equals ``t`` or ends with ``"." + t``.

    Args:
        model: modified in place.
        targets: module-name suffixes (``"qkv"``, ``"proj"``, ``"fc1"``, ...).
        gate: shared gate settings.
        scaling: delta scale.
        compute: ``"gated"`` or ``"dense"``.
        seed: optional base seed; layer ``i`` (in module order) uses ``seed + 1000 * i``.

    Returns:
        ``{qualified_name: MoRALinear}``.

    Raises:
        ValueError: if no ``nn.Linear`` matched.
    """
    found: dict[str, MoRALinear] = {}
    matches = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    for i, (name, mod) in enumerate(matches):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MoRALinear(mod, gate, scaling=scaling, compute=compute,
                           seed=None if seed is None else seed + 1000 * i)
        setattr(parent, child, layer)
        found[name] = layer
    if not found:
        raise ValueError(f"targets {tuple(targets)} matched no nn.Linear of the model")
    logger.info("MoRA wraps %d linear layers: %s", len(found), ", ".join(found))
    return found
