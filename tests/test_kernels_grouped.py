"""The reference backend's adapter-grouped path equals the dense reference (outputs and grads)."""

from __future__ import annotations

import pytest
import torch

from adaptsim.kernels import AdapterGate
from adaptsim.kernels.grouped import adapter_grouped_lora
from adaptsim.kernels.reference import rank_sparse_lora_ref
from adaptsim.kernels.shrink import lora_shrink

CASES = [  # (ids per sample, tokens per id, scale, activation, biases, pre)
    pytest.param([2, 0, 2, 1], 3, False, "identity", False, None, id="mixed-ids"),
    pytest.param([1, 1, 1, 1], 3, False, "identity", False, None, id="one-adapter"),
    pytest.param([0, 3, 3, 1], 1, True, "relu", True, None, id="scale-relu-biases"),
    pytest.param([3, 0, 1, 1], 3, True, "identity", False, "full", id="pre-full"),
    pytest.param([2, 2, 0, 1], 3, False, "relu", True, "block", id="pre-block"),
]


@pytest.mark.parametrize("ids,tpi,use_scale,act,biases,pre_kind", CASES)
def test_grouped_equals_dense_reference(ids, tpi, use_scale, act, biases, pre_kind):
    torch.manual_seed(0)
    n, r, K, N = 4, 5, 11, 7
    m = len(ids) * tpi
    x = torch.randn(m, K, dtype=torch.float64, requires_grad=True)
    A = torch.randn(n * r, K, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, n * r, dtype=torch.float64, requires_grad=True)
    ids_t = torch.tensor(ids)
    scale = torch.rand(len(ids), dtype=torch.float64, requires_grad=True) if use_scale else None
    gate = AdapterGate(ids_t, r, scale, tpi)
    db = torch.randn(n * r, dtype=torch.float64, requires_grad=True) if biases else None
    ub = torch.randn(N, dtype=torch.float64, requires_grad=True) if biases else None
    leaves = [t for t in (x, A, B, scale, db, ub) if t is not None]

    def run(fn):
        pre = None
        if pre_kind == "full":
            pre = x @ A.t()
        elif pre_kind == "block":
            pre = lora_shrink(x, A, gate=gate, backend="reference")
        y = fn(x, A, B, gate=gate, scaling=0.7, activation=act, down_bias=db, up_bias=ub, pre=pre)
        gy = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
        return [y, *torch.autograd.grad(y, leaves, gy)]

    got = run(lambda *a, gate, **kw: adapter_grouped_lora(*a, gate, **kw))
    want = run(rank_sparse_lora_ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)  # float64, same maths, other order


def test_grouped_shrink_returns_each_tokens_own_block():
    torch.manual_seed(0)
    x, A = torch.randn(6, 9), torch.randn(3 * 4, 9)
    ids = torch.tensor([2, 0, 2, 1, 1, 0])
    pre = lora_shrink(x, A, gate=AdapterGate(ids, 4), backend="reference")
    want = torch.stack([x[i] @ A[4 * a:4 * a + 4].t() for i, a in enumerate(ids.tolist())])
    torch.testing.assert_close(pre, want)
