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
