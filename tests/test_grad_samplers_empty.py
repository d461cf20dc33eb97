"""Opacus grad samplers on an empty batch: Poisson sampling draws one now and then.

DP-SGD with Poisson sampling (Opacus ``DPDataLoader``) can draw a batch with no sample; the
analysed mechanism still runs the step and releases noise. A forward and backward of such a batch
must then give every trainable parameter a per-sample gradient of shape ``(0, *p.shape)``, not a
reshape error (``reshape(0, -1, D)`` is ambiguous and raises).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptsim.strategies.adapters.lora import LoRALinear
from adaptsim.strategies.mos_adapters import MOSAdapterLayer

opacus = pytest.importorskip("opacus")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


class Tokens(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(6, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head((h + self.layer(h)).mean(1))


def _lora() -> nn.Module:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 6), rank=2)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.startswith("lora_"):
                p.normal_()
    return layer


def _mos() -> nn.Module:
    torch.manual_seed(0)
    layer = MOSAdapterLayer(6, 3, scale=0.5)
    layer.add("t0")
    layer.route("t0")
    return layer


@pytest.mark.parametrize("make", [_lora, _mos], ids=["lora", "mos"])
@pytest.mark.parametrize("n", [0, 3])
def test_grad_samples_of_empty_and_full_batches(make, n):
    from opacus import GradSampleModule

    model = Tokens(make())
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        x, y = torch.randn(n, 5, 6), torch.randint(0, 3, (n,))
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
        assert any(k.startswith("layer.") for k in trainable)
        for k, p in trainable.items():
            assert p.grad_sample is not None, k
            assert p.grad_sample.shape == (n, *p.shape), k
    finally:
        gsm._close()
