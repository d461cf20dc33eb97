"""Adapter modules: no-op init, merge round-trip, freezing, banks, experts, state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptsim.kernels import DenseGate, TopKGate, rank_sparse_lora_ref
from adaptsim.kernels import triton_kernels as tk
from adaptsim.strategies.adapters import (
    AdapterBank,
    BottleneckAdapter,
    LoRALinear,
    RankExpertLoRA,
    adapter_state_dict,
    inject_lora,
    load_adapter_state_dict,
)

# The Triton-backend tests run CPU tensors, so they need the interpreter (tests/conftest.py turns
# it on when CUDA is absent); on a GPU machine the compiled kernels are covered by test_kernels*.
needs_interpreter = pytest.mark.skipif(not (tk.HAS_TRITON and tk.interpreting()),
                                       reason="needs triton in interpreter mode (CPU)")


def _randomize_B(module: nn.Module) -> None:
    """B is zero at init; tests that check merges switch that off (else they pass trivially)."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n or "more_B" in n or "bank_B" in n or "adapter_up" in n:
                p.normal_()


LORA_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"alpha": 16.0}, id="alpha"),
    pytest.param({"out_slices": [(0, 4), (8, 12)]}, id="qv_slices"),
    pytest.param({"init_A": "gaussian", "seed": 3}, id="gaussian_seed"),
]


@pytest.mark.parametrize("kw", LORA_CASES)
def test_lora_fresh_is_noop_and_merge_roundtrips(kw):
    torch.manual_seed(0)
    base = nn.Linear(10, 12)
    layer = LoRALinear(base, 4, **kw)
    x = torch.randn(3, 5, 10)
    ref = base(x)
    assert torch.equal(layer(x), ref)  # B = 0: exactly the base output
    _randomize_B(layer)
    y = layer(x)
    assert not torch.allclose(y, ref)
    w0 = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y)


def test_lora_slices_only_touch_their_columns():
    layer = LoRALinear(nn.Linear(6, 9), 2, out_slices=[(0, 3), (6, 9)])
    _randomize_B(layer)
    x = torch.randn(4, 6)
    d = layer(x) - layer.base_layer(x)
    assert torch.all(d[:, 3:6] == 0) and torch.all(d[:, :3] != 0)


def test_lora_matches_reference_and_gate():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 5), 4, alpha=8.0)
    _randomize_B(layer)
    x = torch.randn(6, 8)
    w = torch.rand(6, 4)
    layer.gate = DenseGate(w)
    want = layer.base_layer(x) + rank_sparse_lora_ref(x, layer.lora_A, layer.lora_B, scaling=2.0,
                                                      gate=DenseGate(w))
    torch.testing.assert_close(layer(x), want)
    layer.gate = lambda inp: TopKGate(torch.zeros(inp.shape[0], 1, dtype=torch.long))  # callable gate
    want = layer.base_layer(x) + 2.0 * (x @ layer.lora_A[:1].t()) @ layer.lora_B[:, :1].t()
    torch.testing.assert_close(layer(x), want)
    with pytest.raises(RuntimeError, match="gate"):
        layer.merge()


@needs_interpreter
def test_lora_triton_backend_matches_reference():
    layer = LoRALinear(nn.Linear(8, 5), 4)
    _randomize_B(layer)
    x = torch.randn(2, 3, 8)
    want = layer(x)
    layer.backend = "triton"
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_seeded_init_is_bit_identical_and_ffa_freezing():
    a = LoRALinear(nn.Linear(16, 8), 4, seed=7)
    b = LoRALinear(nn.Linear(16, 8), 4, seed=7)
    assert torch.equal(a.lora_A, b.lora_A)
    a.lora_A.requires_grad_(False)  # FFA-LoRA: only B trains
    opt = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    a(torch.randn(4, 16)).square().sum().backward()
    opt.step()
    assert torch.equal(a.lora_A, b.lora_A) and a.lora_B.abs().sum() > 0


def test_inject_lora_and_state_dict_roundtrip():
    model = nn.Sequential()
    model.add_module("blk", nn.ModuleDict({"qkv": nn.Linear(8, 24), "fc1": nn.Linear(8, 8)}))
    model.add_module("head", nn.Linear(8, 3))
    found = inject_lora(model, ["qkv", "fc1"], rank=2, alpha=4.0, seed=1)
    assert sorted(found) == ["blk.fc1", "blk.qkv"]
    assert isinstance(model.blk.qkv, LoRALinear)
    assert not torch.equal(found["blk.qkv"].lora_A[:, :8], found["blk.fc1"].lora_A)
    _randomize_B(model)
    sd = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert sorted(sd) == ["blk.fc1.lora_A", "blk.fc1.lora_B", "blk.qkv.lora_A", "blk.qkv.lora_B"]
    model2 = nn.Sequential()
    model2.add_module("blk", nn.ModuleDict({"qkv": nn.Linear(8, 24), "fc1": nn.Linear(8, 8)}))
    model2.add_module("head", nn.Linear(8, 3))
    inject_lora(model2, ["qkv", "fc1"], rank=2, alpha=4.0)
    missing = load_adapter_state_dict(model2, sd)
    assert missing == []
    for k, v in adapter_state_dict(model2).items():
        assert torch.equal(v, sd[k])
    with pytest.raises(KeyError, match="close matches"):
        load_adapter_state_dict(model2, {"blk.qkv.lora_AA": sd["blk.qkv.lora_A"]})
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state_dict(model2, {"blk.qkv.lora_A": torch.zeros(3, 8)})
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(model2, ["nope"], rank=2)


def test_bottleneck_matches_plain_torch():
    torch.manual_seed(0)
    ad = BottleneckAdapter(10, 4, scale=0.5, init="normal")
    with torch.no_grad():
        ad.adapter_down_bias.normal_()
        ad.adapter_up_bias.normal_()
    x = torch.randn(2, 3, 10)
    h = torch.relu(x @ ad.adapter_down_weight.t() + ad.adapter_down_bias)
    want = 0.5 * (h @ ad.adapter_up_weight.t() + ad.adapter_up_bias)
    torch.testing.assert_close(ad(x), want)
    assert torch.equal(BottleneckAdapter(10, 4)(x), torch.zeros(2, 3, 10))  # fresh: no-op
    assert all(n.startswith("adapter_") for n, _ in ad.named_parameters())


def test_bank_ids_weights_and_freezing():
    torch.manual_seed(0)
    bank = AdapterBank(6, 5, 2, activation="relu", scale=0.5)
    assert [bank.add(n) for n in ("t0", "t1", "t2")] == [0, 1, 2]
    assert bank.names == ["t0", "t1", "t2"] and len(bank) == 3
    _randomize_B(bank)
    x = torch.randn(4, 3, 6)

    def one(k, xs):
        return rank_sparse_lora_ref(xs, bank.bank_A[bank.names[k]], bank.bank_B[bank.names[k]],
                                    scaling=0.5, activation="relu")

    ids = torch.tensor([2, 0, 2, 1])
    scale = torch.tensor([1.0, 2.0, 0.5, 0.0])
    want = torch.stack([scale[b] * one(int(ids[b]), x[b]) for b in range(4)])
    torch.testing.assert_close(bank(x, adapter_ids=ids, scale=scale), want)
    w = torch.rand(4, 3)
    want = torch.stack([sum(w[b, k] * one(k, x[b]) for k in range(3)) for b in range(4)])
    torch.testing.assert_close(bank(x, weights=w), want)
    torch.testing.assert_close(bank(x[:, 0], adapter_ids=ids), torch.stack(
        [one(int(ids[b]), x[b, 0]) for b in range(4)]))
    # freeze old adapters: bit-identical after an optimizer step on a mixture loss
    bank.freeze_all_but("t2")
    old = {k: v.clone() for k, v in adapter_state_dict(bank).items()}
    opt = torch.optim.AdamW([p for p in bank.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    bank(x, weights=torch.ones(4, 3)).square().sum().backward()
    opt.step()
    now = adapter_state_dict(bank)
    for k in old:
        assert torch.equal(now[k], old[k]) == ("t2" not in k), k
    with pytest.raises(KeyError):
        bank.freeze("nope")
    with pytest.raises(ValueError):
        bank.add("t0")


def test_rank_experts_grow_freeze_and_route():
    torch.manual_seed(0)
    layer = RankExpertLoRA(nn.Linear(8, 6), n_experts=3, seed=0)
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), layer.base_layer(x))
    _randomize_B(layer)
    old = {k: v.clone() for k, v in adapter_state_dict(layer).items()}
    assert list(layer.add_experts(2)) == [3, 4] and layer.n_experts == 5
    assert layer.scores_input(x).shape == (5, 5)
    idx = torch.tensor([[0, 4]] * 5)
    wts = torch.rand(5, 2, requires_grad=True)
    A, B = layer.stacked()
    want = layer.base_layer(x) + wts[:, :1] * (x @ A[0]).unsqueeze(1) * B[:, 0]  # b_4 = 0 (new)
    y = layer(x, topk_indices=idx, topk_weights=wts)
    torch.testing.assert_close(y, want)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    y.square().sum().backward()
    opt.step()
    now = adapter_state_dict(layer)
    for k in old:
        assert torch.equal(now[k], old[k]), k
    assert now["more_B.1"].abs().sum() > 0
    with torch.no_grad():
        y_all = layer(x)  # no gate: all experts active
    layer.merge()
    torch.testing.assert_close(layer(x), y_all, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), y_all, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("kind", ["lora_slices", "bank_ids", "bank_weights", "bottleneck", "experts_pre"])
def test_triton_backend_matches_reference_for_every_adapter(kind):
    """Each adapter's kernel path (interpreter on CPU) equals its reference path, with grads."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    if kind == "lora_slices":
        mod = LoRALinear(nn.Linear(8, 12), 2, out_slices=[(0, 4), (8, 12)])
        call = lambda: mod(x)  # noqa: E731
    elif kind.startswith("bank"):
        mod = AdapterBank(8, 6, 2, activation="relu", scale=0.5)
        for n in ("a", "b", "c"):
            mod.add(n)
        ids, w = torch.tensor([2, 0, 2]), torch.rand(3, 3)
        call = (lambda: mod(x, adapter_ids=ids, scale=torch.tensor([1.0, 2.0, 0.5]))) if kind == "bank_ids" \
            else (lambda: mod(x, weights=w))
    elif kind == "bottleneck":
        mod = BottleneckAdapter(8, 4, scale=0.5, init="normal")
        with torch.no_grad():
            mod.adapter_down_bias.normal_()
            mod.adapter_up_bias.normal_()
        call = lambda: mod(x)  # noqa: E731
    else:
        mod = RankExpertLoRA(nn.Linear(8, 6), n_experts=4, seed=0)
        idx = torch.tensor([[0, 3]]).expand(3, 5, 2)
        call = lambda: mod(x, topk_indices=idx, pre=mod.scores_input(x))  # noqa: E731
    _randomize_B(mod)
    params = [x] + [p for p in mod.parameters() if p.requires_grad]
    outs = {}
    for backend in ("reference", "triton"):
        for m in mod.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        y = call()
        outs[backend] = [y, *torch.autograd.grad(y, params, torch.ones_like(y))]
    for a, b in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
