"""LoRA linear layer on the rank-sparse LoRA kernel, plus ``inject_lora``.

Paper: LoRA, Hu et al. 2021, https://arxiv.org/abs/2106.09685 (FFA-LoRA: Sun et al. 2024,
https://arxiv.org/abs/2403.12313 -- A frozen at a seeded random init, only B trained).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from adaptsim.kernels import AdapterGate, DenseGate, TopKGate, lora_linear, rank_sparse_lora

__all__ = ["LoRALinear", "init_down_", "inject_lora", "resolve_gate"]

_GATES = (DenseGate, TopKGate, AdapterGate)
INIT_A = ("kaiming", "gaussian")


def init_down_(shape: tuple[int, int], init: str, seed: int | None) -> torch.Tensor:
    """Returns a fresh fp32 CPU down-projection, bit-identical for a given ``seed``.

    Args:
        shape: (rank, in_features).
        init: ``"kaiming"`` (uniform, a=sqrt(5), as ``nn.Linear``) or ``"gaussian"`` (std 1/rank).
        seed: optional seed; the same seed gives the same tensor on every client.
    """
    if init not in INIT_A:
        raise ValueError(f"init_A must be one of {INIT_A}, got {init!r}")
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    w = torch.empty(shape)
    if init == "kaiming":
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
    else:
        nn.init.normal_(w, std=1.0 / shape[0], generator=gen)
    return w


def resolve_gate(gate, x: torch.Tensor):
    """Returns the gate object for input ``x``: ``gate`` itself, or ``gate(x)`` if callable."""
    if gate is None or isinstance(gate, _GATES):
        return gate
    if callable(gate):
        return gate(x)
    raise TypeError(f"gate must be None, a gate object or a callable, got {type(gate).__name__}")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a LoRA delta ``scaling * (x A^T G) B^T``.

    Parameters are ``lora_A`` (rank, in) and ``lora_B`` (out, rank). With ``out_slices``, each
    output slice ``i`` = ``[start, stop)`` gets its own pair ``lora_A_{i}`` (rank, in) and
    ``lora_B_{i}`` (stop - start, rank); other output columns get no adapter (LoRA on q and v
    of a fused qkv projection). A and B are separate parameters, so either can be frozen.

    Attributes:
        gate: ``None`` (all ranks), a gate object (``DenseGate``/``TopKGate``/``AdapterGate``) or
            a callable ``x -> gate`` used by the next forward(s). The gate of the last forward is
            kept in ``last_gate`` (the Opacus grad sampler reads it).
        backend: kernel backend, ``"auto"`` | ``"triton"`` | ``"reference"``.
        merged: whether the delta is currently folded into the base weight.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, *,
                 out_slices: list[tuple[int, int]] | None = None, init_A: str = "kaiming",
                 seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank}")
        self.base_layer = base.requires_grad_(False)
        self.rank, self.alpha = int(rank), alpha
        self.scaling = 1.0 if alpha is None else float(alpha) / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.sliced = out_slices is not None
        self.out_slices = [(0, base.out_features)] if out_slices is None else [tuple(s) for s in out_slices]
        for start, stop in self.out_slices:
            if not 0 <= start < stop <= base.out_features:
                raise ValueError(f"out slice ({start}, {stop}) outside [0, {base.out_features}]")
        w = base.weight
        for i, (start, stop) in enumerate(self.out_slices):
            seed_i = None if seed is None else seed + i
            A = init_down_((rank, self.in_features), init_A, seed_i).to(w.device, w.dtype)
            self.register_parameter(self._name("A", i), nn.Parameter(A))
            self.register_parameter(self._name("B", i), nn.Parameter(
                torch.zeros(stop - start, rank, device=w.device, dtype=w.dtype)))
        self.gate = None
        self.last_gate = None
        self.backend = "auto"
        self.merged = False

    def _name(self, which: str, i: int) -> str:
        return f"lora_{which}_{i}" if self.sliced else f"lora_{which}"

    def pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, tuple[int, int]]]:
        """Returns ``[(A_i, B_i, (start, stop)), ...]`` for every output slice."""
        return [(getattr(self, self._name("A", i)), getattr(self, self._name("B", i)), s)
                for i, s in enumerate(self.out_slices)]

    def adapter_delta(self, x: torch.Tensor, gate=None) -> torch.Tensor:
        """Adapter output only (..., out) for input ``x`` and an already resolved gate."""
        out = None
        for A, B, (start, stop) in self.pairs():
            d = rank_sparse_lora(x.to(A.dtype), A, B, scaling=self.scaling, gate=gate,
                                 backend=self.backend)
            if not self.sliced:
                return d
            if out is None:
                out = d.new_zeros(*x.shape[:-1], self.out_features)
            out = out.index_add(-1, torch.arange(start, stop, device=d.device), d)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``base(x) + delta``; x is (..., in).

        On the Triton path the delta is accumulated in place into the base GEMM's output (and
        its ``dx``), and the slices of a fused qkv share one shrink launch (``gate=None``).
        """
        gate = resolve_gate(self.gate, x)
        self.last_gate = gate
        base = self.base_layer
        if self.merged:
            if gate is not None:
                raise RuntimeError("LoRALinear is merged: unmerge() before setting a gate")
            return base(x)
        pairs = self.pairs()
        A0 = pairs[0][0]
        if x.dtype != A0.dtype or base.weight.dtype != A0.dtype or (self.sliced and gate is not None):
            y = base(x)
            return y + self.adapter_delta(x, gate).to(y.dtype)
        if not self.sliced:
            return rank_sparse_lora(x, A0, pairs[0][1], scaling=self.scaling, gate=gate,
                                    backend=self.backend, base_weight=base.weight, base_bias=base.bias)
        A = torch.cat([a for a, _, _ in pairs], 0)  # (S * rank, in): one shrink for all slices
        return lora_linear(x, base.weight, base.bias, A, [b for _, b, _ in pairs], scaling=self.scaling,
                           backend=self.backend, out_slices=[s for _, _, s in pairs])

    def delta_weight(self) -> torch.Tensor:
        """Static weight delta (out, in) = scaling * B A, zero outside the output slices."""
        dw = torch.zeros_like(self.base_layer.weight)
        for A, B, (start, stop) in self.pairs():
            dw[start:stop] += (self.scaling * (B.float() @ A.float())).to(dw.dtype)
        return dw

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the delta into the base weight (only with a static gate, i.e. ``gate=None``).

        Raises:
            RuntimeError: if already merged or a (per-token, non-static) gate is set.
        """
        if self.gate is not None:
            raise RuntimeError(f"cannot merge with a per-token gate ({type(self.gate).__name__}); "
                               "set layer.gate = None first")
        if self.merged:
            raise RuntimeError("LoRALinear is already merged")
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the merged delta from the base weight.

        Raises:
            RuntimeError: if not merged.
        """
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged")
        self.base_layer.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}, out_slices={self.out_slices if self.sliced else None}"


def inject_lora(model: nn.Module, target_names: list[str], rank: int, alpha: float | None = None,
                **kw) -> dict[str, LoRALinear]:
    """Replaces ``nn.Linear`` submodules whose name ends with a target by ``LoRALinear``.

    A name matches target ``t`` if it equals ``t`` or ends with ``"." + t``. With ``seed`` in
    ``kw``, layer ``name`` is seeded with ``seed + crc32(name)`` so every client that calls
    ``inject_lora`` with the same seed gets bit-identical A matrices (FFA-LoRA).

    Args:
        model: the model, modified in place.
        target_names: name suffixes, e.g. ``["qkv", "fc1"]``.
        rank: LoRA rank.
        alpha: LoRA alpha (``None`` = scaling 1).
        **kw: forwarded to :class:`LoRALinear` (``out_slices``, ``init_A``, ``seed``).

    Returns:
        ``{qualified_name: LoRALinear}`` of the injected layers.

    Raises:
        ValueError: if no module matched.
    """
    seed = kw.pop("seed", None)
    found: dict[str, LoRALinear] = {}
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in target_names)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        s = None if seed is None else (seed + zlib.crc32(name.encode())) % 2**31
        layer = LoRALinear(mod, rank, alpha, seed=s, **kw)
        setattr(parent, child, layer)
        found[name] = layer
    if not found:
        raise ValueError(f"inject_lora: no nn.Linear matched {target_names}")
    return found

