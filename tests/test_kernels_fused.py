"""Kernel layer v2 features: in-place base accumulation, bias inputs, precomputed ``x A^T``,
multi-slice launches, SGMV segment tables, the gathered large-R path, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernel_cases import DEV, K, M, N, R, TOL, grad_out, make, rel_err

from adaptsim.kernels import AdapterGate, TopKGate, lora_linear, rank_sparse_lora, rank_sparse_lora_ref
from adaptsim.kernels import gathered
from adaptsim.kernels import triton_kernels as tk
from adaptsim.kernels.segments import by_adapter, per_sample

pytestmark = pytest.mark.skipif(not tk.HAS_TRITON, reason="triton not installed")


def _grads(y, inputs, dtype):
    return [y, *torch.autograd.grad(y, inputs, grad_out(y.shape, dtype))]


def _base(dtype, n=N, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, K, generator=g) / K**0.5).to(dtype).to(DEV), torch.randn(n, generator=g).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gate_kind", ["none", "topk", "adapter_sample"])
def test_lora_linear_accumulates_into_base(dtype, gate_kind):
    x, A, B, gate, leaf = make(gate_kind, dtype)
    W, b = _base(dtype)
    ins = [x, A, B] + ([leaf] if leaf is not None else [])
    got = _grads(lora_linear(x, W, b, A, B, scaling=0.5, gate=gate, backend="triton"), ins, dtype)
    ref = F.linear(x.float(), W.float(), b.float()) + rank_sparse_lora_ref(
        x, A, B, scaling=0.5, gate=gate, upcast=True).float()
    want = _grads(ref.to(dtype), ins, dtype)
    # bf16: the base output is rounded once before the delta is added in fp32 and rounded
    # again (PyTorch rounds base and delta separately, then their sum): one extra ulp -> the
    # same 2e-2 budget as the delta alone (relative to max |y|).
    for name, a, w in zip(["y", "dx", "dA", "dB", "dgate"], got, want):
        assert rel_err(a, w) <= TOL[dtype], name


@pytest.mark.parametrize("relu", [False, True], ids=["identity", "relu"])
def test_precomputed_pre_skips_the_shrink_gemm(relu):
    """MoRA's path: ``pre = x A^T`` from the caller; gradients reach A and x through ``pre``."""
    x, A, B, gate, leaf = make("topk", torch.float32)
    act = "relu" if relu else "identity"
    W, b = _base(torch.float32)
    pre = x @ A.t()
    y = lora_linear(x, W, b, A, B, scaling=0.5, gate=gate, activation=act, pre=pre, backend="triton")
    got = _grads(y, [x, A, B, leaf], torch.float32)
    y_ref = F.linear(x, W, b) + rank_sparse_lora_ref(x, A, B, scaling=0.5, gate=gate, activation=act)
    for name, a, w in zip("y dx dA dB dw".split(), got, _grads(y_ref, [x, A, B, leaf], torch.float32)):
        assert rel_err(a, w) <= TOL[torch.float32], name


def test_down_and_up_bias_are_kernel_inputs():
    x, A, B, _, _ = make("dense", torch.float32)
    g = torch.Generator().manual_seed(5)
    db = torch.randn(R, generator=g).to(DEV).requires_grad_()
    ub = torch.randn(N, generator=g).to(DEV).requires_grad_()
    kw = dict(scaling=0.3, activation="relu", down_bias=db, up_bias=ub)
    got = _grads(rank_sparse_lora(x, A, B, backend="triton", **kw), [x, A, B, db, ub], torch.float32)
    want = _grads(rank_sparse_lora_ref(x, A, B, **kw), [x, A, B, db, ub], torch.float32)
    for name, a, w in zip("y dx dA dB ddb dub".split(), got, want):
        assert rel_err(a, w) <= TOL[torch.float32], name


def test_out_slices_share_one_shrink_launch():
    """q/v LoRA on a fused qkv: one shrink over both slices' stacked A, writes in place."""
    x, _, _, _, _ = make("none", torch.float32)
    W, b = _base(torch.float32, n=3 * 12)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(2 * 4, K, generator=g).to(DEV).requires_grad_()  # (2 slices * r=4, K)
    Bq, Bv = (torch.randn(12, 4, generator=g).to(DEV).requires_grad_() for _ in range(2))
    before = tk.LAUNCHES.copy()
    y = lora_linear(x, W, b, A, [Bq, Bv], scaling=2.0, out_slices=[(0, 12), (24, 36)], backend="triton")
    assert (tk.LAUNCHES - before)["shrink"] == 1
    got = _grads(y, [x, A, Bq, Bv], torch.float32)
    ref = F.linear(x, W, b).clone()
    ref = torch.cat([ref[..., :12] + rank_sparse_lora_ref(x, A[:4], Bq, scaling=2.0), ref[..., 12:24],
                     ref[..., 24:] + rank_sparse_lora_ref(x, A[4:], Bv, scaling=2.0)], -1)
    for name, a, w in zip("y dx dA dBq dBv".split(), got, _grads(ref, [x, A, Bq, Bv], torch.float32)):
        assert rel_err(a, w) <= TOL[torch.float32], name
    assert torch.equal(y[..., 12:24], F.linear(x, W, b)[..., 12:24])  # k columns untouched


def test_segment_tables():
    ids = torch.tensor([2, 0, 2, 1, 0])
    s = by_adapter(ids, 4, tokens_per_id=3)
    assert s.rows.tolist() == [3, 4, 5, 12, 13, 14, 9, 10, 11, 0, 1, 2, 6, 7, 8]
    assert s.start.tolist() == [0, 6, 9, 15] and s.length.tolist() == [6, 3, 6, 0]
    p = per_sample(ids, 3)
    assert p.rows is None and p.start.tolist() == [0, 3, 6, 9, 12] and p.length.tolist() == [3] * 5


def test_per_sample_and_sorted_segments_agree():
    """Contiguous per-sample segments (no sort) equal the adapter-sorted per-token path."""
    x, A, B, gate, _ = make("adapter_sample", torch.float32)
    per_token = AdapterGate(gate.adapter_ids.repeat_interleave(M // 2), gate.rank_per_adapter,
                            gate.scale.detach().repeat_interleave(M // 2))
    a = rank_sparse_lora(x, A, B, gate=AdapterGate(gate.adapter_ids, gate.rank_per_adapter,
                                                   gate.scale.detach(), M // 2), backend="triton")
    b = rank_sparse_lora(x, A, B, gate=per_token, backend="triton")
    assert rel_err(a, b) < 1e-6


def test_gathered_path_for_very_large_rank(monkeypatch):
    """R >= GATHER_MIN_R with few active ranks takes the gathered kernels (not in deterministic mode)."""
    monkeypatch.setattr(gathered, "GATHER_MIN_R", 64)
    r = 96
    x, A, B, _, _ = make("none", torch.float32, r=r)
    idx = torch.randint(0, r, (2, M // 2, 3), generator=torch.Generator().manual_seed(2)).to(DEV)
    w = torch.rand(2, M // 2, 3, device=DEV, requires_grad=True)
    before = tk.LAUNCHES.copy()
    got = _grads(rank_sparse_lora(x, A, B, gate=TopKGate(idx, w), backend="triton"), [x, A, B, w], torch.float32)
    assert (tk.LAUNCHES - before)["gathered_shrink"] == 2
    want = _grads(rank_sparse_lora_ref(x, A, B, gate=TopKGate(idx, w)), [x, A, B, w], torch.float32)
    for name, a, b in zip("y dx dA dB dw".split(), got, want):
        assert rel_err(a, b) <= TOL[torch.float32], name
    torch.use_deterministic_algorithms(True)
    try:
        before = tk.LAUNCHES.copy()
        rank_sparse_lora(x, A, B, gate=TopKGate(idx, w), backend="triton")
        assert (tk.LAUNCHES - before)["gathered_shrink"] == 0  # atomics avoided
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("gate_kind", ["topk", "adapter"])
def test_weight_grads_are_deterministic(gate_kind):
    """No atomics: two backward passes give bit-identical dA/dB."""
    x, A, B, gate, _ = make(gate_kind, torch.float32)
    runs = [torch.autograd.grad(rank_sparse_lora(x, A, B, gate=gate, backend="triton").square().sum(), [A, B])
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
