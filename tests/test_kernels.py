"""Rank-sparse LoRA kernels vs the PyTorch reference: forward and every gradient.

Compiled kernels on a GPU, the Triton interpreter on CPU (see ``tests/_kernel_cases.py`` for
the multi-tile shapes and the per-dtype tolerances).
"""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import DEV, GATES, M, R, TOL, grad_out, make, rel_err

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


def _run(backend: str, gate_kind: str, dtype: torch.dtype, activation: str, r: int = R):
    x, A, B, gate, leaf = make(gate_kind, dtype, r=r)
    if backend == "reference":
        y = rank_sparse_lora_ref(x, A, B, scaling=0.5, activation=activation, gate=gate, upcast=True)
    else:
        y = rank_sparse_lora(x, A, B, scaling=0.5, activation=activation, gate=gate, backend=backend)
    inputs = [x, A, B] + ([leaf] if leaf is not None else [])
    return [y, *torch.autograd.grad(y, inputs, grad_out(y.shape, dtype))]


def _compare(got, want, dtype):
    for name, a, b in zip(["y", "dx", "dA", "dB", "dgate"], got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) <= TOL[dtype], f"{name}: rel err {rel_err(a, b):.2e}"


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("gate_kind", GATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_matches_reference(dtype, gate_kind, activation):
    before = tk.LAUNCHES.copy()
    got = _run("triton", gate_kind, dtype, activation)
    ran = tk.LAUNCHES - before
    assert ran["shrink"] == 2 and ran["expand"] == 2 and ran["outer"] == 2, dict(ran)
    _compare(got, _run("reference", gate_kind, dtype, activation), dtype)


@pytest.mark.parametrize("gate_kind", ["dense", "topk", "adapter_scale"])
def test_rank_130_spans_three_rank_tiles(gate_kind):
    """R = 130: three 64-wide rank tiles in dense mode, one 26-wide tile per adapter in SGMV."""
    got = _run("triton", gate_kind, torch.float32, "relu", r=130)
    _compare(got, _run("reference", gate_kind, torch.float32, "relu", r=130), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("gate_kind", ["topk", "adapter"])
def test_inactive_ranks_get_zero_grad(backend, gate_kind):
    x, A, B, gate, _ = make(gate_kind, torch.float32)
    if gate_kind == "topk":  # rank R-1 is never selected
        gate = TopKGate(gate.indices.clamp(max=R - 2), gate.weights)
        inactive = torch.tensor([R - 1])
    else:
        inactive = torch.arange(8, 16)  # adapter 1 of 5 x rank 8 is never selected
    y = rank_sparse_lora(x, A, B, gate=gate, backend=backend)
    dA, dB = torch.autograd.grad(y.square().sum(), [A, B])
    assert torch.all(dA[inactive] == 0) and torch.all(dB[:, inactive] == 0)
    active = torch.ones(A.shape[0], dtype=torch.bool)
    active[inactive] = False
    assert dA[active].abs().sum(1).min() > 0


def test_topk_wrong_index_is_detected():
    """Guards the tests themselves: an off-by-one gate must be caught by the tolerance."""
    x, A, B, gate, _ = make("topk", torch.bfloat16)
    good = rank_sparse_lora_ref(x, A, B, gate=gate, upcast=True)
    bad = rank_sparse_lora(x, A, B, gate=TopKGate((gate.indices + 1) % R, gate.weights), backend="triton")
    assert rel_err(bad, good) > 10 * TOL[torch.bfloat16]


def test_duplicate_topk_indices_add_up():
    x, A, B, _, _ = make("none", torch.float32)
    idx = torch.zeros(2, M // 2, 2, dtype=torch.long, device=DEV)  # rank 0 twice
    got = rank_sparse_lora(x, A, B, gate=TopKGate(idx), backend="triton")
    want = 2 * rank_sparse_lora_ref(x, A[:1], B[:, :1])
    assert rel_err(got, want) < 1e-5


def test_topk_weight_grad_of_duplicates():
    """Both slots of a duplicated rank get the same gradient (the kernel gathers per slot)."""
    x, A, B, _, _ = make("none", torch.float32)
    idx = torch.tensor([[3, 3, 17]] * M, device=DEV).view(2, M // 2, 3)
    w = torch.rand(2, M // 2, 3, device=DEV, requires_grad=True)
    gy = torch.randn(2, M // 2, B.shape[0], device=DEV)
    got = torch.autograd.grad(rank_sparse_lora(x, A, B, gate=TopKGate(idx, w), backend="triton"), w, gy)[0]
    want = torch.autograd.grad(rank_sparse_lora_ref(x, A, B, gate=TopKGate(idx, w)), w, gy)[0]
    assert rel_err(got, want) < 1e-5 and torch.equal(got[..., 0], got[..., 1])


@pytest.mark.skipif(DEV == "cuda", reason="auto picks Triton on CUDA")
def test_auto_uses_reference_on_cpu():
    x, A, B, _, _ = make("none", torch.float32)
    before = sum(tk.LAUNCHES.values())
    rank_sparse_lora(x, A, B)
    assert sum(tk.LAUNCHES.values()) == before


@pytest.mark.parametrize(
    "case, exc",
    [("bad_k", ValueError), ("bad_r", ValueError), ("dtype", TypeError), ("activation", ValueError),
     ("backend", ValueError), ("gate_shape", ValueError), ("topk_range", ValueError),
     ("adapter_range", ValueError), ("tokens_per_id", ValueError), ("pre_shape", ValueError)],
)
def test_input_checks_raise(case, exc):
    x, A, B = torch.randn(4, 8), torch.randn(3, 8), torch.randn(5, 3)
    kw = {"backend": "triton"}
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
    elif case == "tokens_per_id":
        kw["gate"] = AdapterGate(torch.zeros(1, dtype=torch.long), 1, tokens_per_id=3)
    elif case == "pre_shape":
        kw["pre"] = torch.randn(4, 2)
    if DEV == "cuda":
        if case.endswith("range"):  # host check on CPU tensors; on CUDA: debug mode, GPU tests
            pytest.skip("range checks on CUDA run in debug mode (tests/test_kernels_gpu.py)")
        x, A, B = x.cuda(), A.cuda(), B.cuda()
    with pytest.raises(exc):
        rank_sparse_lora(x, A, B, **kw)


def test_kernel_config_validates():
    assert KernelConfig().backend == "auto"
    with pytest.raises(ValueError, match="backend"):
        KernelConfig(backend="cuda")


def test_backward_is_once_differentiable():
    x, A, B, _, _ = make("none", torch.float32)
    y = rank_sparse_lora(x, A, B, backend="triton")
    (dA,) = torch.autograd.grad(y.square().sum(), A, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        dA.sum().backward()
