"""Parameter containers that are also the modules doing the work (so Opacus can hook them).

An :class:`AdapterBank` or :class:`RankExpertLoRA` keeps one entry per adapter / expert group in
two dicts, ``<prefix>A`` (down projections) and ``<prefix>B`` (up projections), so that growing
means adding a key and freezing is per entry. Opacus computes per-sample gradients from the
module that *directly* owns a parameter, from that module's own inputs and output gradient. So
each dict is called as a module:

* :class:`DownParams` ``(x, gate) -> pre``: the shrink ``x A^T`` (or each token's adapter block
  for an ``AdapterGate``, SGMV kernel);
* :class:`UpParams` ``(x, pre) -> y``: the rest of the op, ``rank_sparse_lora(..., pre=pre)``
  (gate, activation, expand, optionally accumulated into the frozen base layer's output).

Their grad samplers are in :mod:`.grad_samplers`. Keys, parameter names and state dicts are
those of a plain ``nn.ParameterDict``.

Methods that keep small per-adapter pieces next to a bank use the same idea:

* :class:`RowParams` (an ``nn.ParameterList`` of row blocks, e.g. SEMA's router columns)
  ``x -> x W^T``;
* :class:`BiasParams` (an ``nn.ParameterList`` of bias blocks, SEMA's router biases)
  ``y -> y + b``;
* :class:`KeyedBiasParams` (an ``nn.ParameterDict`` of per-adapter output biases, MOS's
  ``b_up``) ``ids -> scale * b[ids]``, each sample's own adapter's bias.

Their state dicts are those of the plain list / dict.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adaptsim.kernels import Gate, lora_shrink, rank_sparse_lora

__all__ = ["BiasParams", "DownParams", "KeyedBiasParams", "RowParams", "UpParams"]


class DownParams(nn.ParameterDict):
    """Down projections ``{key: (r_i, in)}``; calling it returns ``pre`` (..., R) or (..., r)."""

    last_gate: Gate | None = None
    __call__ = nn.Module.__call__  # nn.ParameterDict forbids calls; these containers are layers

    def stacked(self) -> torch.Tensor:
        """(R, in): the entries stacked in key order."""
        return torch.cat(list(self.values()), 0)

    def forward(self, x: torch.Tensor, *, gate: Gate | None = None, backend: str = "auto") -> torch.Tensor:
        """``x A^T``; x (..., in). ``gate`` matters only if it is an ``AdapterGate``."""
        self.last_gate = gate
        return lora_shrink(x, self.stacked(), gate=gate, backend=backend)


class UpParams(nn.ParameterDict):
    """Up projections ``{key: (out, r_i)}``; calling it runs the gated expand on ``pre``."""

    last_call: dict | None = None
    __call__ = nn.Module.__call__

    def stacked(self) -> torch.Tensor:
        """(out, R): the entries stacked in key order."""
        return torch.cat(list(self.values()), 1)

    def forward(self, x: torch.Tensor, pre: torch.Tensor, *, A: torch.Tensor, scaling: float,
                activation: str = "identity", gate: Gate | None = None, backend: str = "auto",
                base: nn.Linear | None = None, op: Callable = rank_sparse_lora) -> torch.Tensor:
        """``[base(x) +] s * (phi(pre) * G) B^T``.

        Args:
            x: (..., in) input (only its shape is used unless ``base`` is given).
            pre: (..., R) or (..., r) from :class:`DownParams`.
            A: the stacked down projections (shape checks only; detached).
            scaling, activation, gate, backend: as in ``rank_sparse_lora``.
            base: optional frozen base layer whose output the delta is accumulated into.
            op: the kernel op (injectable for tests).
        """
        self.last_call = dict(gate=gate, scaling=float(scaling), activation=activation)
        B = self.stacked()
        kw = dict(scaling=scaling, activation=activation, gate=gate, backend=backend, pre=pre)
        A = A.detach()
        if base is None:
            return op(x.to(B.dtype), A, B, **kw)
        if x.dtype != B.dtype or base.weight.dtype != B.dtype:
            y = base(x)
            return y + op(x.to(B.dtype), A, B, **kw).to(y.dtype)
        return op(x, A, B, base_weight=base.weight, base_bias=base.bias, **kw)


class RowParams(nn.ParameterList):
    """Row blocks ``[(n_i, in)]`` of one weight; calling it returns ``x W^T`` (..., n)."""

    __call__ = nn.Module.__call__  # nn.ParameterList forbids calls; this container is a layer

    def stacked(self) -> torch.Tensor:
        """(n, in): the blocks stacked in order."""
        return torch.cat(list(self), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., n)."""
        W = self.stacked()
        return F.linear(x.to(W.dtype), W)


class BiasParams(nn.ParameterList):
    """Bias blocks ``[(n_i,)]``; calling it adds them to the last dim: ``y + b`` (..., n)."""

    __call__ = nn.Module.__call__

    def stacked(self) -> torch.Tensor:
        """(n,): the blocks concatenated in order."""
        return torch.cat(list(self), 0)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y (..., n) -> y + b."""
        return y + self.stacked().to(y.dtype)


class KeyedBiasParams(nn.ParameterDict):
    """Per-adapter output biases ``{key: (out,)}``; calling it picks each sample's bias."""

    last_scale: float = 1.0
    __call__ = nn.Module.__call__

    def forward(self, ids: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        """``scale * b[ids]`` (B, out) for (B,) entry ids (positions in key order)."""
        self.last_scale = float(scale)
        return scale * torch.stack(list(self.values()))[ids]
