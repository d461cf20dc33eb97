"""Opacus grad samplers: exact per-sample gradients for the kernel-backed adapter modules.

Opacus (``grad_sample_mode="hooks"``) records each module's input ``x`` (B, ..., in) and the
gradient of its output ``g`` (B, ..., out), then calls the sampler registered for the module
type. For ``y = base(x) + s * ((phi(x A^T + b) * G) B^T)`` the per-sample gradients are

    grad_B[b] = s * sum_t g[b,t]^T (phi(pre) * G)[b,t]
    grad_A[b] = sum_t dpre[b,t]^T x[b,t],   dpre = s * (g B^T-adjoint) * G * phi'(pre)

computed with batched einsums on the dense (masked) gate. The forward still runs through the
kernel; the gate used is the one of the module's last forward (``layer.last_gate``), so the gate
must not change between forward and backward. :func:`register` is called on import of
``adaptsim.strategies.adapters`` and does nothing if Opacus is missing.

``AdapterBank`` and ``RankExpertLoRA`` (hence MoRA's layers, and the banks inside the SEMA and MOS
layers) keep their parameters in two containers, :class:`~.params.DownParams` (called for
``pre = x A^T``) and :class:`~.params.UpParams` (called for the gated expand). Their samplers:

    grad_A_e[b] = sum_t g_pre[b,t, e-slice]^T x[b,t]          (g_pre: gradient of pre, all paths)
    grad_B_e[b] = s * sum_t g[b,t]^T (phi(pre) * G)[b,t, e-slice]

where ``e`` is one entry (one adapter of the bank, one expert group); with an ``AdapterGate``
the rows of samples using another adapter are masked out.

The small per-adapter containers next to a bank (SEMA's router, MOS's up biases) are linear in
their parameters, with ``g`` the gradient of their output:

    RowParams       y = x W^T:        grad_W_e[b] = sum_t g[b,t, e-slice]^T x[b,t]
    BiasParams      y = y_in + b:     grad_b_e[b] = sum_t g[b,t, e-slice]
    KeyedBiasParams y = s * b[ids]:   grad_b_e[b] = s * g[b] * [ids[b] == e]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adaptsim.kernels import AdapterGate, gate_to_dense
from adaptsim.kernels.gates import adapter_ids_flat

from .bottleneck import BottleneckAdapter
from .lora import LoRALinear
from .params import BiasParams, DownParams, KeyedBiasParams, RowParams, UpParams

__all__ = ["bias_params_grad_sample", "bottleneck_grad_sample", "down_params_grad_sample",
           "keyed_bias_params_grad_sample", "lora_linear_grad_sample", "register", "row_params_grad_sample",
           "up_params_grad_sample"]


def _btd(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., D) -> (B, T, D); T is the product of the middle dims (so an empty batch works)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


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
        G = gate_to_dense(layer.last_gate, nb * nt, A.shape[0], x.device, x.dtype).view(nb, nt, A.shape[0])
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


def _token_ids(gate: AdapterGate, nb: int, nt: int) -> torch.Tensor:
    """(B, T) adapter id of every token of an ``AdapterGate``."""
    ids = adapter_ids_flat(gate, nb * nt)
    return ids.repeat_interleave(int(gate.tokens_per_id)).view(nb, nt)


def _entries(layer: nn.ParameterDict, dim: int) -> list[tuple[nn.Parameter, int, int]]:
    """``[(param, start, stop)]``: each entry's slice of the stacked rank axis."""
    out, off = [], 0
    for p in layer.values():
        n = p.shape[dim]
        out.append((p, off, off + n))
        off += n
    return out


def down_params_grad_sample(layer: DownParams, activations: list[torch.Tensor],
                            backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the trainable down projections of a :class:`DownParams`."""
    x = _btd(activations[0])  # (B, T, in)
    gp = _btd(backprops).to(x.dtype)  # (B, T, R) or (B, T, r) with an AdapterGate
    gate = layer.last_gate
    out: dict[nn.Parameter, torch.Tensor] = {}
    ids = _token_ids(gate, *x.shape[:2]) if isinstance(gate, AdapterGate) else None
    for a, (p, start, stop) in enumerate(_entries(layer, 0)):
        if not p.requires_grad:
            continue
        if ids is None:
            g = gp[..., start:stop]
        else:
            g = gp * (ids == a).to(gp.dtype)[..., None]  # rows of adapter a only
        out[p] = torch.einsum("btr,btk->brk", g, x.to(p.dtype) if x.dtype != p.dtype else x)
    return out


def up_params_grad_sample(layer: UpParams, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the trainable up projections of a :class:`UpParams`."""
    call = layer.last_call
    pre = _btd(activations[1])
    g = _btd(backprops).to(pre.dtype)  # (B, T, out)
    nb, nt = pre.shape[:2]
    gate = call["gate"]
    h = torch.relu(pre) if call["activation"] == "relu" else pre
    out: dict[nn.Parameter, torch.Tensor] = {}
    if isinstance(gate, AdapterGate):
        ids = _token_ids(gate, nb, nt)
        if gate.scale is not None:
            sc = gate.scale.reshape(-1).repeat_interleave(int(gate.tokens_per_id)).view(nb, nt)
            h = h * sc[..., None].to(h.dtype)
        for a, (p, _, _) in enumerate(_entries(layer, 1)):
            if p.requires_grad:
                hw = h * (ids == a).to(h.dtype)[..., None]
                out[p] = call["scaling"] * torch.einsum("btn,btr->bnr", g, hw)
        return out
    G = gate_to_dense(gate, nb * nt, pre.shape[-1], pre.device, pre.dtype).view(nb, nt, pre.shape[-1])
    hw = call["scaling"] * h * G  # (B, T, R)
    for p, start, stop in _entries(layer, 1):
        if p.requires_grad:
            out[p] = torch.einsum("btn,btr->bnr", g, hw[..., start:stop])
    return out


def _list_entries(layer: nn.ParameterList) -> list[tuple[nn.Parameter, int, int]]:
    """``[(param, start, stop)]``: each block's slice of the output axis."""
    out, off = [], 0
    for p in layer:
        out.append((p, off, off + p.shape[0]))
        off += p.shape[0]
    return out


def row_params_grad_sample(layer: RowParams, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the trainable row blocks of a :class:`RowParams`."""
    x = _btd(activations[0])  # (B, T, in)
    g = _btd(backprops)  # (B, T, n)
    return {p: torch.einsum("btr,btk->brk", g[..., a:b].to(p.dtype), x.to(p.dtype))
            for p, a, b in _list_entries(layer) if p.requires_grad}


def bias_params_grad_sample(layer: BiasParams, activations: list[torch.Tensor],
                            backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the trainable bias blocks of a :class:`BiasParams`."""
    g = _btd(backprops).sum(1)  # (B, n)
    return {p: g[:, a:b].to(p.dtype) for p, a, b in _list_entries(layer) if p.requires_grad}


def keyed_bias_params_grad_sample(layer: KeyedBiasParams, activations: list[torch.Tensor],
                                  backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the trainable biases of a :class:`KeyedBiasParams`.

    An entry no sample of the batch picked gets a zero per-sample gradient (as autograd gives it
    through the gather), so a DP optimiser finds a ``grad_sample`` on every trainable entry.
    """
    ids = activations[0].reshape(-1)  # (B,)
    g = backprops.reshape(ids.shape[0], backprops.shape[-1])  # (B, out)
    out = {}
    for e, p in enumerate(layer.values()):
        if p.requires_grad:
            out[p] = (layer.last_scale * g * (ids == e).to(g.dtype)[:, None]).to(p.dtype)
    return out


def register() -> bool:
    """Registers the grad samplers with Opacus; returns False if Opacus is not installed."""
    try:
        from opacus.grad_sample import register_grad_sampler
    except ImportError:
        return False
    register_grad_sampler(LoRALinear)(lora_linear_grad_sample)
    register_grad_sampler(BottleneckAdapter)(bottleneck_grad_sample)
    register_grad_sampler(DownParams)(down_params_grad_sample)
    register_grad_sampler(UpParams)(up_params_grad_sample)
    register_grad_sampler(RowParams)(row_params_grad_sample)
    register_grad_sampler(BiasParams)(bias_params_grad_sample)
    register_grad_sampler(KeyedBiasParams)(keyed_bias_params_grad_sample)
    return True
