"""Building blocks of SEMA: error buffer, representation descriptor, expandable mixture layer.

Paper: Wang et al., "Self-Expansion of Pre-trained Models with Mixture of Adapters for Continual
Learning", CVPR 2025, https://arxiv.org/abs/2403.18886 (official code: huiyiwang01/SEMA-CL).
The strategy that drives these modules is :mod:`adaptsim.strategies.sema`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adaptsim.strategies.adapters import AdapterBank
from adaptsim.strategies.adapters.params import BiasParams, RowParams

__all__ = ["CosineHead", "ErrorBuffer", "RepresentationDescriptor", "SEMALayer"]


class ErrorBuffer(nn.Module):
    """Rolling buffer of the last ``max_len`` reconstruction errors of one RD.

    ``z(r) = |r - mean| / std`` with the unbiased std of the stored values; zeros while the
    buffer holds 2 values or fewer (as the official ``Records``). Once full it rolls: each batch
    pushes out the oldest values. The batch that first fills it is either cut (``truncate=True``,
    official ``Records.add_record``: the rest of that batch is dropped) or kept whole (newest
    ``max_len`` values). The state lives in buffers, so it is saved in checkpoints.

    Args:
        max_len: capacity (``buffer_size``).
        truncate: drop the overflow of the batch that first fills the buffer (official).
    """

    def __init__(self, max_len: int, truncate: bool = False) -> None:
        super().__init__()
        self.max_len, self.truncate = int(max_len), bool(truncate)
        self.register_buffer("values", torch.zeros(self.max_len))
        self.register_buffer("length", torch.zeros((), dtype=torch.long))
        self.register_buffer("updating", torch.ones((), dtype=torch.bool))

    @torch.no_grad()
    def add(self, errors: torch.Tensor) -> None:
        """Appends (B,) errors (no-op once frozen with ``updating=False``)."""
        if not bool(self.updating):
            return
        n = int(self.length)
        new = errors.detach().reshape(-1).to(self.values)
        if self.truncate and n < self.max_len:
            new = new[: self.max_len - n]  # official: the first fill keeps only what fits
        cat = torch.cat([self.values[:n], new])[-self.max_len:]
        self.values.zero_()
        self.values[: cat.numel()] = cat
        self.length.fill_(cat.numel())

    @property
    def mean(self) -> torch.Tensor:
        return self.values[: int(self.length)].mean()

    @property
    def std(self) -> torch.Tensor:
        return self.values[: int(self.length)].std()  # unbiased, as torch.var in the official code

    def z(self, errors: torch.Tensor) -> torch.Tensor:
        """Absolute z-scores (B,) of ``errors`` (B,) against the buffer."""
        if int(self.length) <= 2:
            return torch.zeros_like(errors)
        return ((errors - self.mean) / self.std.clamp_min(1e-12)).abs()


class RepresentationDescriptor(nn.Module):
    """Linear autoencoder ``D -> rd_dim -> D`` on the token-mean of a block's input.

    Args:
        dim: token width D.
        rd_dim: code width.
        buffer_size: capacity of its :class:`ErrorBuffer`.
        truncate: the buffer's first-fill rule (:class:`ErrorBuffer`).
    """

    def __init__(self, dim: int, rd_dim: int, buffer_size: int, truncate: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Linear(dim, rd_dim)
        self.decoder = nn.Linear(rd_dim, dim)
        for lin in (self.encoder, self.decoder):
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            nn.init.zeros_(lin.bias)
        self.buffer = ErrorBuffer(buffer_size, truncate)

    def errors(self, xbar: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE (B,) of reconstructing ``xbar`` (B, D)."""
        return (self.decoder(self.encoder(xbar)) - xbar).pow(2).mean(-1)


class SEMALayer(nn.Module):
    """Mixture of functional adapters with RDs and an expandable router (one expandable block).

    Forward: ``xbar = mean_tokens(h)``; ``w = softmax(xbar W_r^T + b_r [- rd_route_weight * z])``;
    output ``sum_k w_k f_k(h)`` through :class:`AdapterBank` (``weights=`` mixture path). Each
    router column is its own parameter so old columns freeze individually (the official code
    concatenates them into one ``Linear`` at the end of a task: same function). The columns
    and biases live in containers that are called (``router_w(xbar)``, then ``router_b``), as
    the bank's are, so Opacus computes exact per-sample gradients for the whole layer.

    Biases (``bias=True``, as the official ``Adapter``: trainable, zero-initialised down and up
    biases): the down bias is the last column of the bank's ``A`` (the bank runs on ``[h, 1]``
    with ``dim_in = D + 1``, exact, same kernel path); the up biases ``sema_up_bias.k`` (D,) mix
    with the router weights, ``sum_k w_k b_k``. With ``bias=False`` the bank has no biases. The
    up biases have no Opacus grad sampler: a DP run needs ``bias=False``.

    Recording (``record=True``, set by the strategy during its functional phase): each forward
    appends every RD's errors to its buffer (frozen buffers ignore them), as the official
    ``AdapterModule`` does in training mode, so the untrained new RD's errors are recorded too.

    Args:
        dim: token width D.
        bottleneck: adapter width (``ffn_num``).
        rd_dim: RD code width.
        buffer_size: RD error-buffer capacity.
        bias: give every mixture adapter zero-initialised down and up biases.
        truncate: the RD buffers' first-fill rule (:class:`ErrorBuffer`).
    """

    def __init__(self, dim: int, bottleneck: int, rd_dim: int, buffer_size: int, bias: bool = False,
                 truncate: bool = False) -> None:
        super().__init__()
        self.dim, self.rd_dim, self.buffer_size, self.bias = dim, rd_dim, buffer_size, bool(bias)
        self.truncate = bool(truncate)
        self.bank = AdapterBank(dim + self.bias, dim, rank=bottleneck, activation="relu", prefix="sema_")
        self.sema_up_bias = nn.ParameterList()  # one (D,) up bias per adapter when ``bias``
        self.rds = nn.ModuleList()
        self.router_w = RowParams()  # one (1, D) column per adapter; called: xbar W^T
        self.router_b = BiasParams()  # one (1,) bias per adapter; called: logits + b
        #: >0 (``router_fix``): subtract this times each trained RD's z-score from the logits.
        self.rd_route_weight = 0.0
        #: when True the forward stores ``last_errors`` (n, B) and ``last_xbar`` (B, D).
        self.capture = False
        #: when True (functional phase) the forward appends the RD errors to the buffers.
        self.record = False
        self.last_errors: torch.Tensor | None = None
        self.last_xbar: torch.Tensor | None = None
        self.add_adapter()

    def __len__(self) -> int:
        return len(self.rds)

    def add_adapter(self) -> int:
        """Adds adapter, RD and router column (all trainable); returns the new index."""
        ref = self.bank._anchor
        name = f"a{len(self.rds)}"
        self.bank.add(name)
        if self.bias:
            with torch.no_grad():
                A = self.bank._A[name]
                nn.init.kaiming_uniform_(A[:, : self.dim], a=math.sqrt(5))  # fan_in = D, not D + 1
                A[:, self.dim].zero_()  # the down bias
            self.sema_up_bias.append(nn.Parameter(torch.zeros(self.dim, device=ref.device, dtype=ref.dtype)))
        self.rds.append(RepresentationDescriptor(self.dim, self.rd_dim, self.buffer_size, self.truncate).to(ref.device))
        col = nn.Linear(self.dim, 1)  # PyTorch default init, as the official nn.Linear(d, 1)
        self.router_w.append(nn.Parameter(col.weight.detach().clone().to(ref.device)))
        self.router_b.append(nn.Parameter(col.bias.detach().clone().to(ref.device)))
        return len(self.rds) - 1

    def new_params(self, kind: str) -> list[nn.Parameter]:
        """Parameters of the newest adapter: ``func`` (adapter + router column) or ``rd``."""
        k = len(self.rds) - 1
        if kind == "func":
            name = self.bank.names[k]
            bias = [self.sema_up_bias[k]] if self.bias else []
            return [self.bank._A[name], self.bank._B[name], *bias, self.router_w[k], self.router_b[k]]
        return list(self.rds[k].parameters())

    def freeze_all(self) -> None:
        """Freezes every adapter, router column and RD, and stops the RD buffers."""
        for p in self.parameters():
            p.requires_grad_(False)
        for rd in self.rds:
            rd.buffer.updating.fill_(False)

    def z_scores(self, errors: torch.Tensor) -> torch.Tensor:
        """(n, B) absolute z-scores of per-RD errors (n, B)."""
        return torch.stack([rd.buffer.z(e) for rd, e in zip(self.rds, errors)])

    def router_weights(self, xbar: torch.Tensor, errors: torch.Tensor | None = None) -> torch.Tensor:
        """Mixture weights (B, n) from the token-mean ``xbar`` (B, D)."""
        logits = self.router_b(self.router_w(xbar))  # (B, n) = xbar W^T + b
        if self.rd_route_weight > 0 and errors is not None:
            z = self.z_scores(errors).T  # (B, n); RDs still untrained (empty buffer) give 0
            logits = logits - self.rd_route_weight * z
        return logits.softmax(-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Adapter update (B, T, D) for the post-attention stream ``h`` (B, T, D)."""
        xbar = h.mean(1)  # (B, D)
        errors = None
        if self.capture or self.record or self.rd_route_weight > 0:
            with torch.no_grad():
                errors = torch.stack([rd.errors(xbar) for rd in self.rds])  # (n, B)
        if self.capture:
            self.last_errors, self.last_xbar = errors, xbar.detach()
        w = self.router_weights(xbar, errors)  # (B, n); z-scores before this batch is recorded
        if self.record:
            for rd, e in zip(self.rds, errors):
                rd.buffer.add(e)
        if not self.bias:
            return self.bank(h, weights=w)
        h1 = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)  # (B, T, D+1): down-bias column
        up = w.to(h.dtype) @ torch.stack(list(self.sema_up_bias)).to(h.dtype)  # (B, D) = sum_k w_k b_k
        return self.bank(h1, weights=w) + up[:, None, :]


class CosineHead(nn.Module):
    """Logit-normalised linear head: ``scale * cos(f, w_c)`` (option ``head="cosine"``).

    Args:
        dim: feature width.
        n_classes: number of classes.
        scale: logit scale (temperature inverse).
    """

    def __init__(self, dim: int, n_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.scale = float(scale)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(feats, dim=-1) @ F.normalize(self.weight, dim=-1).T
