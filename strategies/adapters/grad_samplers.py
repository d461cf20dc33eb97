"""Opacus grad samplers: exact per-sample gradients for the kernel-backed adapter modules.

Opacus (``grad_sample_mode="hooks"``) records each module's input ``x`` (B, ..., in) and the
gradient of its output ``g`` (B, ..., out), then calls the sampler registered for the module
type. For ``y = base(x) + s * ((phi(x A^T + b) * G) B^T)`` the per-sample gradients are

    grad_B[b] = s * sum_t g[b,t]^T (phi(pre) * G)[b,t]
    grad_A[b] = sum_t dpre[b,t]^T x[b,t],   dpre = s * (g B^T-adjoint) * G * phi'(pre)

computed with batched einsums on the dense (masked) gate. The forward still runs through the
kernel; the gate used is the one of the module's last forward (``layer.last_gate``), so the gate
must not change between forward and backward. :func:`register` is called on import of
``adaptsim.strategies.adapters`` and does nothing if Opacus is missing. ``AdapterBank`` and
``RankExpertLoRA`` keep their parameters in ``ParameterDict`` children and are not supported.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptsim.kernels import gate_to_dense

from .bottleneck import BottleneckAdapter
from .lora import LoRALinear

__all__ = ["bottleneck_grad_sample", "lora_linear_grad_sample", "register"]


def _btd(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., D) -> (B, T, D)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def lora_linear_grad_sample(layer: LoRALinear, activations: list[torch.Tensor],
                            backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the trainable ``lora_A*``/``lora_B*`` of a :class:`LoRALinear`."""
    if layer.merged:
        raise RuntimeError("per-sample gradients of a merged LoRALinear are undefined")
    out: dict[nn.Parameter, torch.Tensor] = {}
    for A, B, (start, stop) in layer.pairs():
        x = _btd(activations[0]).to(A.dtype)  # (B, T, in)
        g = _btd(backprops)[..., start:stop].to(A.dtype)  # (B, T, n)
        nb, nt = x.shape[:2]
        G = gate_to_dense(layer.last_gate, nb * nt, A.shape[0], x.device, x.dtype).view(nb, nt, -1)
        h = torch.einsum("btk,rk->btr", x, A)  # (B, T, r)
        if B.requires_grad:
            out[B] = torch.einsum("btn,btr->bnr", g, layer.scaling * h * G)
        if A.requires_grad:
            dpre = layer.scaling * torch.einsum("btn,nr->btr", g, B) * G
            out[A] = torch.einsum("btr,btk->brk", dpre, x)
    return out


def bottleneck_grad_sample(layer: BottleneckAdapter, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the four ``adapter_*`` parameters of a :class:`BottleneckAdapter`."""
    if layer.training and layer.dropout > 0:
        raise RuntimeError("BottleneckAdapter with dropout > 0 is not supported under Opacus")
    x = _btd(activations[0]).to(layer.adapter_down_weight.dtype)  # (B, T, d)
    g = _btd(backprops).to(x.dtype)  # (B, T, d)
    s = layer.scale
    pre = torch.einsum("btd,hd->bth", x, layer.adapter_down_weight) + layer.adapter_down_bias
    h = torch.relu(pre)
    dpre = s * torch.einsum("btd,dh->bth", g, layer.adapter_up_weight) * (pre > 0)
    grads = {
        layer.adapter_up_weight: s * torch.einsum("btd,bth->bdh", g, h),
        layer.adapter_up_bias: s * g.sum(1),
        layer.adapter_down_weight: torch.einsum("bth,btd->bhd", dpre, x),
        layer.adapter_down_bias: dpre.sum(1),
    }
    return {p: v for p, v in grads.items() if p.requires_grad}


def register() -> bool:
    """Registers the grad samplers with Opacus; returns False if Opacus is not installed."""
    try:
        from opacus.grad_sample import register_grad_sampler
    except ImportError:
        return False
    register_grad_sampler(LoRALinear)(lora_linear_grad_sample)
    register_grad_sampler(BottleneckAdapter)(bottleneck_grad_sample)
    return True
