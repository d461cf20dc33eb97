"""Rank-sparse LoRA: Triton (interpreter on CPU) vs the PyTorch reference, forward and gradients."""

from __future__ import annotations

import os

# Must be set before the first Triton kernel is built (kernels are jitted lazily on first launch).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from adaptsim.kernels import (
    AdapterGate,
    DenseGate,
    KernelConfig,
    TopKGate,
    rank_sparse_lora,
    rank_sparse_lora_ref,
)
from adaptsim.kernels import triton_kernels as tk

pytestmark = pytest.mark.skipif(not tk.HAS_TRITON, reason="triton not installed")

# Odd shapes (Liger style): nothing is a multiple of the 16-wide interpreter tiles.
M, K, N, R = 6, 42, 123, 7
N_ADAPTERS = 3

# Tolerances, relative to the max |reference| of each tensor. The reference runs with
# upcast=True (fp32 math on the same low-precision inputs, one final rounding).
# - fp32: only the summation order differs (K=42 / M=6 terms) -> ~1e-6; 1e-5 leaves margin.
# - fp16: 10-bit mantissa, ulp 2^-11 ≈ 4.9e-4. The kernel accumulates in fp32 but on the dense
#   path rounds h = s*phi(xA^T)*G to fp16 before the tensor-core dot with B (as a fp16 PyTorch
#   LoRA would): two roundings ≈ 1e-3; 3e-3 leaves margin.
# - bf16: 7-bit mantissa, ulp 2^-8 ≈ 3.9e-3 relative; the output rounding alone gives up to
#   one ulp, plus the intermediate rounding of h -> 2e-2 (≈ 5 ulp) still fails on a wrong
#   index or a missing rank (errors O(1) relative).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GATES = ["none", "dense", "topk", "adapter", "adapter_scale"]


def _make(gate_kind: str, dtype: torch.dtype, seed: int = 0):
    """Builds inputs (all requiring grad) and the gate; returns (x, A, B, gate, gate_leaf)."""
    g = torch.Generator().manual_seed(seed)
    r_total = R * N_ADAPTERS if gate_kind.startswith("adapter") else R
    x = torch.randn(2, M // 2, K, generator=g).to(dtype).requires_grad_()  # leading dims (2, 3)
    A = (torch.randn(r_total, K, generator=g) / K**0.5).to(dtype).requires_grad_()
    B = torch.randn(N, r_total, generator=g).to(dtype).requires_grad_()
    leaf, gate = None, None
    if gate_kind == "dense":
        leaf = torch.randn(2, M // 2, R, generator=g).requires_grad_()
        gate = DenseGate(leaf)
    elif gate_kind == "topk":
        idx = torch.stack([torch.randperm(R, generator=g)[:3] for _ in range(M)]).view(2, M // 2, 3)
        leaf = torch.randn(2, M // 2, 3, generator=g).requires_grad_()
        gate = TopKGate(idx, leaf)
    elif gate_kind.startswith("adapter"):
        ids = torch.tensor([0, 2, 2, 0, 0, 2])  # adapter 1 unused: its ranks must get zero grad
        if gate_kind == "adapter_scale":
            leaf = torch.rand(M, generator=g).requires_grad_()
        gate = AdapterGate(ids.view(2, M // 2), R, None if leaf is None else leaf.view(2, M // 2))
    return x, A, B, gate, leaf


def _run(backend: str, gate_kind: str, dtype: torch.dtype, activation: str):
    x, A, B, gate, leaf = _make(gate_kind, dtype)
    if backend == "reference":
        y = rank_sparse_lora_ref(x, A, B, scaling=0.5, activation=activation, gate=gate, upcast=True)
    else:
        y = rank_sparse_lora(x, A, B, scaling=0.5, activation=activation, gate=gate, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    inputs = [x, A, B] + ([leaf] if leaf is not None else [])
    return [y, *torch.autograd.grad(y, inputs, gy)]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("gate_kind", GATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_matches_reference(dtype, gate_kind, activation):
    before = sum(tk.LAUNCHES.values())
    got = _run("triton", gate_kind, dtype, activation)
    assert sum(tk.LAUNCHES.values()) - before >= 5, "Triton kernels did not run"
    want = _run("reference", gate_kind, dtype, activation)
    names = ["y", "dx", "dA", "dB", "dgate"]
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel_err(a, b) <= TOL[dtype], f"{name}: rel err {_rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("gate_kind", ["topk", "adapter"])
def test_inactive_ranks_get_zero_grad(backend, gate_kind):
    x, A, B, gate, _ = _make(gate_kind, torch.float32)
    y = rank_sparse_lora(x, A, B, gate=gate, backend=backend)
    dA, dB = torch.autograd.grad(y.square().sum(), [A, B])
    if gate_kind == "adapter":
        inactive = torch.arange(R, 2 * R)  # adapter 1 is never selected
    else:
        used = torch.zeros(R, dtype=torch.bool)
        used[gate.indices.flatten()] = True
        inactive = (~used).nonzero().flatten()
        if inactive.numel() == 0:  # make one rank inactive for sure
            x, A, B = x.detach(), A.detach().requires_grad_(), B.detach().requires_grad_()
            idx = gate.indices.clamp(max=R - 2)
            y = rank_sparse_lora(x, A, B, gate=TopKGate(idx, gate.weights), backend=backend)
            dA, dB = torch.autograd.grad(y.square().sum(), [A, B])
            inactive = torch.tensor([R - 1])
    assert torch.all(dA[inactive] == 0) and torch.all(dB[:, inactive] == 0)
    active = torch.ones(A.shape[0], dtype=torch.bool)
    active[inactive] = False
    assert dA[active].abs().sum() > 0


def test_topk_wrong_index_is_detected():
    """Guards the tests themselves: an off-by-one gate must be caught by the tolerance."""
    x, A, B, gate, _ = _make("topk", torch.bfloat16)
    good = rank_sparse_lora_ref(x, A, B, gate=gate, upcast=True)
    shifted = TopKGate((gate.indices + 1) % R, gate.weights)
    bad = rank_sparse_lora(x, A, B, gate=shifted, backend="triton")
    assert _rel_err(bad, good) > 10 * TOL[torch.bfloat16]


def test_duplicate_topk_indices_add_up():
    x, A, B, _, _ = _make("none", torch.float32)
    idx = torch.zeros(2, M // 2, 2, dtype=torch.long)  # rank 0 twice
    got = rank_sparse_lora(x, A, B, gate=TopKGate(idx), backend="triton")
    want = 2 * rank_sparse_lora_ref(x, A[:1], B[:, :1])
    assert _rel_err(got, want) < 1e-5


def test_auto_uses_reference_on_cpu(monkeypatch):
    x, A, B, _, _ = _make("none", torch.float32)
    before = sum(tk.LAUNCHES.values())
    rank_sparse_lora(x, A, B)
    assert sum(tk.LAUNCHES.values()) == before


@pytest.mark.parametrize(
    "case, exc",
    [
        ("bad_k", ValueError),
        ("bad_r", ValueError),
        ("dtype", TypeError),
        ("activation", ValueError),
        ("backend", ValueError),
        ("gate_shape", ValueError),
        ("topk_range", ValueError),
        ("adapter_range", ValueError),
    ],
)
def test_input_checks_raise(case, exc):
    x, A, B = torch.randn(4, 8), torch.randn(3, 8), torch.randn(5, 3)
    kw = {}
    if case == "bad_k":
        A = torch.randn(3, 9)
    elif case == "bad_r":
        B = torch.randn(5, 4)
    elif case == "dtype":
        B = B.double()
    elif case == "activation":
        kw["activation"] = "gelu"
    elif case == "backend":
        kw["backend"] = "cuda"
    elif case == "gate_shape":
        kw["gate"] = DenseGate(torch.ones(4, 2))
    elif case == "topk_range":
        kw["gate"] = TopKGate(torch.full((4, 1), 3))
    elif case == "adapter_range":
        kw["gate"] = AdapterGate(torch.full((4,), 3), 1)
    with pytest.raises(exc):
        rank_sparse_lora(x, A, B, **kw)


def test_kernel_config_validates():
    assert KernelConfig().backend == "auto"
    with pytest.raises(ValueError, match="backend"):
        KernelConfig(backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("gate_kind", GATES)
def test_cuda_matches_reference(gate_kind):
    """On a GPU (compiled, not interpreted): bf16, a larger shape, all gradients."""
    torch.manual_seed(0)
    m, k, n, r = 257, 512, 384, 64
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, k, device="cuda") / k**0.5).bfloat16().requires_grad_()
    B = torch.randn(n, r, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gate = {"none": None, "dense": DenseGate(torch.rand(m, r, device="cuda")),
            "topk": TopKGate(torch.randint(0, r, (m, 8), device="cuda"), torch.rand(m, 8, device="cuda")),
            "adapter": AdapterGate(torch.randint(0, 4, (m,), device="cuda"), 16),
            "adapter_scale": AdapterGate(torch.randint(0, 4, (m,), device="cuda"), 16,
                                         torch.rand(m, device="cuda"))}[gate_kind]
    y = rank_sparse_lora(x, A, B, gate=gate, backend="triton")
    y_ref = rank_sparse_lora_ref(x, A, B, gate=gate, upcast=True)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, A, B], gy)
    want = torch.autograd.grad(y_ref, [x, A, B], gy)
    for a, b in zip([y, *got], [y_ref, *want]):
        assert _rel_err(a, b) <= TOL[torch.bfloat16]
