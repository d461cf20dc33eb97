"""Opacus: exact per-sample gradients for LoRALinear / BottleneckAdapter through the kernel path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptsim.kernels import DenseGate
from adaptsim.strategies.adapters import BottleneckAdapter, LoRALinear

opacus = pytest.importorskip("opacus")


class Tiny(nn.Module):
    """LoRALinear on a frozen Linear, a bottleneck adapter on the residual, and a head."""

    def __init__(self, gate_per_token: bool = False) -> None:
        super().__init__()
        self.lora = LoRALinear(nn.Linear(6, 5), 3, alpha=6.0, seed=0)
        self.adapter = BottleneckAdapter(5, 4, scale=0.5, init="normal")
        self.head = nn.Linear(5, 2)
        with torch.no_grad():
            self.lora.lora_B.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, 6)
        h = self.lora(x)
        h = h + self.adapter(h)
        return self.head(h.mean(1))


def _per_sample_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: one backward per sample (loss reduction 'sum' so no 1/B factor)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("freeze_A", [False, True], ids=["A_and_B", "ffa_lora"])
@pytest.mark.parametrize("gated", [False, True], ids=["no_gate", "dense_gate"])
def test_grad_sample_matches_per_sample_loop(freeze_A, gated):
    from opacus import GradSampleModule  # the hooks-based implementation

    torch.manual_seed(0)
    model = Tiny()
    if freeze_A:
        model.lora.lora_A.requires_grad_(False)
    x, y = torch.randn(4, 3, 6), torch.tensor([0, 1, 1, 0])
    gated_want = None
    if gated:  # per-token DenseGate on 4*3 tokens; the loop gets each sample's gate rows
        full = torch.linspace(0.1, 1.0, 36).view(4, 3, 3)
        want = {}
        for i in range(4):
            model.lora.gate = DenseGate(full[i : i + 1])
            for n, g in _per_sample_loop(model, x[i : i + 1], y[i : i + 1]).items():
                want.setdefault(n, []).append(g[0])
        gated_want = {n: torch.stack(v) for n, v in want.items()}
        model.lora.gate = DenseGate(full)
    want = gated_want or _per_sample_loop(model, x, y)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ("lora.lora_A" in names) == (not freeze_A)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad_sample, want[n], rtol=1e-4, atol=1e-5, msg=n)
    if freeze_A:  # a frozen A gets no per-sample gradient at all
        assert getattr(model.lora.lora_A, "grad_sample", None) is None
    gsm._close()


def test_privacy_engine_trains():
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = Tiny()
    x, y = torch.randn(16, 3, 6), torch.randint(0, 2, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    pe = PrivacyEngine()
    model, opt, loader = pe.make_private(module=model, optimizer=opt, data_loader=loader,
                                         noise_multiplier=0.0, max_grad_norm=1e3,
                                         grad_sample_mode="hooks")
    before = model._module.lora.lora_B.detach().clone()
    base_w = model._module.lora.base_layer.weight.detach().clone()
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    assert not torch.equal(model._module.lora.lora_B, before)
    assert torch.equal(model._module.lora.base_layer.weight, base_w)  # base stays frozen


class BankNet(nn.Module):
    """An AdapterBank (one frozen adapter, two trainable) on tokens, routed per sample or mixed."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        from adaptsim.strategies.adapters import AdapterBank

        self.mode = mode
        self.bank = AdapterBank(6, 6, 2, activation="relu", scale=0.5)
        for n in ("a", "b", "c"):
            self.bank.add(n)
        with torch.no_grad():
            for p in self.bank.parameters():
                p.normal_()
        self.bank.freeze("a")
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.mode == "ids":
            h = self.bank(x, adapter_ids=ids, scale=w[:, 0])
        else:
            h = self.bank(x, weights=w)
        return self.head((x + h).mean(1))


def _loop(model, x, y, *extra):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i:i + 1], *(e[i:i + 1] for e in extra)), y[i:i + 1],
                                           reduction="sum")
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


def _check_grad_samples(model, x, y, *extra):
    from opacus import GradSampleModule

    want = _loop(model, x, y, *extra)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x, *extra), y, reduction="sum").backward()
    n_checked = 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad_sample, want[n], rtol=1e-4, atol=1e-5, msg=n)
            n_checked += 1
        else:
            assert getattr(p, "grad_sample", None) is None, n  # frozen entries: none at all
    gsm._close()
    return n_checked


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["ids", "mixture"])
def test_adapter_bank_grad_samples(mode, backend):
    """AdapterBank (MOS batched retrieval / SEMA mixture path): per-sample == one at a time."""
    from adaptsim.kernels import triton_kernels as tk

    if backend == "triton" and not (tk.HAS_TRITON and tk.interpreting()):
        pytest.skip("needs the Triton interpreter (CPU)")
    torch.manual_seed(0)
    model = BankNet(mode)
    model.bank.backend = backend
    x, y = torch.randn(4, 3, 6), torch.tensor([0, 1, 1, 0])
    ids, w = torch.tensor([2, 0, 1, 2]), torch.rand(4, 3)
    assert _check_grad_samples(model, x, y, ids, w) == 4 + 2  # bank b, c (A and B) + head


def test_mora_layer_grad_samples():
    """RankExpertLoRA under MoRA routing (top-k of x A^T, weights through the scores)."""
    from adaptsim.strategies.mora_gate import MoRALinear, SelfActivationGate

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mora = MoRALinear(nn.Linear(6, 5), SelfActivationGate(top_k=2, tau=0.5, delta=-1.0),
                                   scaling=2.0, seed=0)
            self.mora.add_experts(3)
            self.mora.add_experts(4)  # freezes group 0
            with torch.no_grad():
                for p in self.mora.experts.more_B.values():
                    p.normal_()
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.mora(x).mean(1))

    model = Net()
    x, y = torch.randn(4, 3, 6), torch.tensor([0, 1, 1, 0])
    assert _check_grad_samples(model, x, y) == 2 + 2  # group 1 (A and B) + head
