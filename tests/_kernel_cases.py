"""Shared inputs for the kernel tests: multi-tile odd shapes, every gate kind, tolerances.

Runs the compiled kernels on a GPU, else the Triton interpreter on CPU (``tests/conftest.py``
sets ``TRITON_INTERPRET=1`` only when CUDA is absent). Interpreter tiles are 32 rows, 32 K/N
columns and rank tiles of 16 (see ``kernels/launch.py``), so the shapes below reach several
tiles in every dimension: M = 70 (3 row blocks), K = 43 (2 K tiles, odd), N = 37 (2 N tiles),
R = 40 (3 rank tiles, the last one padded).
"""

from __future__ import annotations

import torch

from adaptsim.kernels import AdapterGate, DenseGate, TopKGate

DEV = "cuda" if torch.cuda.is_available() else "cpu"
M, K, N, R = 70, 43, 37, 40
N_ADAPTERS, R_ADAPTER = 5, 8  # AdapterGate: R = 5 * 8 = 40
TOPK = 5

# Tolerances, relative to the max |reference| of each tensor. The reference runs with
# upcast=True (fp32 math on the same low-precision inputs, one final rounding).
# - fp32: only the summation order differs (K=43 / M=70 terms), IEEE dots (no TF32) -> ~1e-6.
# - fp16: 10-bit mantissa, ulp 2^-11 ~ 4.9e-4. The kernel accumulates in fp32 but rounds
#   h = s*phi(xA^T)*G (and dpre) to fp16 before the tensor-core dot with B (A), as a fp16
#   PyTorch LoRA does: two roundings ~ 1e-3; 3e-3 leaves margin.
# - bf16: 7-bit mantissa, ulp 2^-8 ~ 3.9e-3 relative; output rounding plus the intermediate
#   rounding of h -> 2e-2 (~5 ulp) still fails on a wrong index or a missing rank (O(1) errors).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GATES = ["none", "dense", "topk", "adapter", "adapter_scale", "adapter_sample"]


def make(gate_kind: str, dtype: torch.dtype, *, r: int = R, seed: int = 0):
    """Inputs (all requiring grad) and the gate: ``(x, A, B, gate, gate_leaf)``.

    ``adapter`` gates leave adapter 1 unused (its ranks must get exactly zero gradient).
    ``adapter_sample`` gives one id per sample of 35 contiguous tokens (SGMV segments, no sort).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, M // 2, K, generator=g).to(dtype)  # leading dims (2, 35)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dtype)
    B = torch.randn(N, r, generator=g).to(dtype)
    leaf, gate = None, None
    if gate_kind == "dense":
        leaf = torch.randn(2, M // 2, r, generator=g).to(DEV).requires_grad_()
        gate = DenseGate(leaf)
    elif gate_kind == "topk":
        idx = torch.stack([torch.randperm(r, generator=g)[:TOPK] for _ in range(M)]).view(2, M // 2, TOPK)
        leaf = torch.randn(2, M // 2, TOPK, generator=g).to(DEV).requires_grad_()
        gate = TopKGate(idx.to(DEV), leaf)
    elif gate_kind.startswith("adapter"):
        rb = r // N_ADAPTERS
        if gate_kind == "adapter_sample":
            ids = torch.tensor([4, 0])
            leaf = torch.rand(2, generator=g).to(DEV).requires_grad_()
            gate = AdapterGate(ids.to(DEV), rb, leaf, tokens_per_id=M // 2)
        else:
            ids = torch.tensor([0, 2, 4, 3] * (M // 4) + [2, 0])[:M]  # adapter 1 unused
            if gate_kind == "adapter_scale":
                leaf = torch.rand(M, generator=g).to(DEV).requires_grad_()
            gate = AdapterGate(ids.view(2, M // 2).to(DEV), rb,
                               None if leaf is None else leaf.view(2, M // 2))
    x, A, B = (t.to(DEV).requires_grad_() for t in (x, A, B))
    return x, A, B, gate, leaf


def grad_out(shape, dtype: torch.dtype) -> torch.Tensor:
    """A non-contiguous (transposed) upstream gradient of ``shape`` (..., N)."""
    g = torch.randn(shape[-1], *shape[:-1], generator=torch.Generator().manual_seed(1))
    return g.movedim(0, -1).to(dtype).to(DEV)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
