"""Compiled kernels on a GPU (never the interpreter): bf16/fp16, R up to 256, M = 8192.

Run by ``bench/gpu_check.sh``; skipped without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from adaptsim.kernels import AdapterGate, DenseGate, TopKGate, rank_sparse_lora, rank_sparse_lora_ref
from adaptsim.kernels import triton_kernels as tk

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Relative to max |reference| (fp32 math on the same inputs). Larger than the CPU budget for
# fp16 (3e-3) because K = 512 and M = 8192 terms are summed, and the tensor-core dots round
# h / dpre to the input dtype first: ~2 ulp of fp16 (1e-3) per rounding plus accumulation.
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def _gate(kind: str, m: int, r: int):
    dev = "cuda"
    if kind == "dense":
        return DenseGate(torch.rand(m, r, device=dev))
    if kind == "topk":
        return TopKGate(torch.rand(m, r, device=dev).topk(max(1, r // 8), -1).indices,
                        torch.rand(m, max(1, r // 8), device=dev))
    if kind == "adapter":  # per-token ids, adapter-sorted SGMV
        return AdapterGate(torch.randint(0, 4, (m,), device=dev), r // 4)
    if kind == "adapter_sample":  # 32 samples of m/32 contiguous tokens, with a scale
        return AdapterGate(torch.randint(0, 4, (32,), device=dev), r // 4,
                           torch.rand(32, device=dev), tokens_per_id=m // 32)
    return None


def test_not_interpreted():
    assert not tk.interpreting(), "GPU tests must run the compiled kernels"


@pytest.mark.parametrize("r", [64, 256])
@pytest.mark.parametrize("kind", ["none", "dense", "topk", "adapter", "adapter_sample"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_compiled_matches_reference(dtype, kind, r):
    torch.manual_seed(0)
    m, k, n = 8192, 512, 384
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    A = (torch.randn(r, k, device="cuda") / k**0.5).to(dtype).requires_grad_()
    B = (torch.randn(n, r, device="cuda") / r**0.5).to(dtype).requires_grad_()
    gate = _gate(kind, m, r)
    before = tk.LAUNCHES["shrink"]
    y = rank_sparse_lora(x, A, B, gate=gate, backend="triton", activation="relu")
    assert tk.LAUNCHES["shrink"] > before
    y_ref = rank_sparse_lora_ref(x, A, B, gate=gate, activation="relu", upcast=True)
    gy = torch.randn(n, m, device="cuda", dtype=dtype).t()  # non-contiguous
    got = torch.autograd.grad(y, [x, A, B], gy)
    want = torch.autograd.grad(y_ref, [x, A, B], gy)
    for name, a, b in zip(["y", "dx", "dA", "dB"], [y, *got], [y_ref, *want]):
        assert _rel(a, b) <= TOL[dtype], f"{name}: {_rel(a, b):.2e}"


def test_more_than_2_31_output_elements():
    """int64 row offsets: M * N > 2**31 (rows past 2**31 / N are checked against the reference)."""
    m, k, n, r = (1 << 19) + 64, 16, 4096, 16
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = rank_sparse_lora(x, A, B, backend="triton")
        tail = slice(m - 128, m)
        want = rank_sparse_lora_ref(x[tail], A, B, upcast=True)
    assert _rel(y[tail], want) <= TOL[torch.bfloat16]
    del y


def test_debug_mode_checks_indices_on_device():
    code = ("import torch; from adaptsim.kernels import TopKGate, rank_sparse_lora as f;"
            "x=torch.randn(64,32,device='cuda'); A=torch.randn(16,32,device='cuda');"
            "B=torch.randn(8,16,device='cuda');"
            "f(x,A,B,gate=TopKGate(torch.full((64,2),99,device='cuda')),backend='triton');"
            "torch.cuda.synchronize()")
    env = dict(os.environ, ADAPTSIM_KERNEL_DEBUG="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert res.returncode != 0 and b"out of range" in res.stderr + res.stdout
