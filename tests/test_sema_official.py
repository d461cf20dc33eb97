"""SEMA's official-code behaviours and their options: buffer recording and first fill, adapter
biases, per-epoch cosine schedule. Each test fails when its option is ignored."""

from __future__ import annotations

import pytest
import torch

from adaptsim.cl.train import fit
from adaptsim.strategies.sema import SEMA, SEMAConfig
from adaptsim.strategies.sema_modules import ErrorBuffer, SEMALayer
from test_sema import CFG, INFO, _backbone, _exp


def _trained(**kw) -> tuple[SEMA, list]:
    """SEMA after task 1 (64 images, 1 epoch) and the phases it ran."""
    phases = []

    def rec(phase):
        phases.append(phase)
        return fit(phase)

    torch.manual_seed(0)
    s = SEMA(SEMAConfig(**{**CFG, **kw}), _backbone(), INFO)
    s.train_experience(_exp(0, (0, 1), "smooth"), rec)
    return s, phases


@pytest.mark.parametrize("truncate,expect", [(True, [1.0, 2.0, 3.0, 4.0]), (False, [2.0, 3.0, 4.0, 5.0])],
                         ids=["official_truncate", "newest"])
def test_error_buffer_first_fill_by_hand(truncate, expect):
    buf = ErrorBuffer(4, truncate=truncate)
    buf.add(torch.tensor([1.0, 2.0]))
    buf.add(torch.tensor([3.0]))
    buf.add(torch.tensor([4.0, 5.0]))  # fills the buffer: official keeps only the 4
    assert buf.values.tolist() == expect
    buf.add(torch.tensor([6.0]))  # full: both roll
    assert buf.values.tolist() == expect[1:] + [6.0]


@pytest.mark.parametrize("fill,truncate", [("truncate", True), ("newest", False)])
def test_buffer_fill_option_reaches_every_rd(fill, truncate):
    s = SEMA(SEMAConfig(**{**CFG, "buffer_fill": fill}), _backbone(), INFO)
    assert all(rd.buffer.truncate is truncate for layer in s.layers.values() for rd in layer.rds)
    layer = s.layers[next(iter(s.layers))]
    layer.add_adapter()
    assert layer.rds[-1].buffer.truncate is truncate


@pytest.mark.parametrize("record,length", [("functional", 64), ("rd", 0)])
def test_buffer_record_functional_phase(record, length):
    """With no RD phase, only the official recording fills the buffers: the untrained RDs'
    errors seen in the functional phase (64 images, 1 epoch)."""
    s, _ = _trained(rd_epochs=0, buffer_record=record)
    lengths = {int(rd.buffer.length) for layer in s.layers.values() for rd in layer.rds}
    assert lengths == {length}
    assert not any(layer.record for layer in s.layers.values())  # switched off after the phase


def test_buffer_record_functional_values_are_the_untrained_rd_errors():
    """The recorded values are the RD errors of the functional phase's training forwards."""
    s, _ = _trained(rd_epochs=0, epochs=1, buffer_size=64)
    layer = s.layers[str(max(s.expandable))]
    vals = layer.rds[0].buffer.values
    assert vals.abs().sum() > 0 and torch.isfinite(vals).all()
    # the RD is untrained: its errors on the final network's token means are of the same scale
    _, (xbar,) = s._pass(_exp(0, (0, 1), "smooth").train.x, [max(s.expandable)])
    final = layer.rds[0].errors(xbar)
    assert 0.2 < float(vals.mean() / final.mean()) < 5.0


def test_adapter_bias_forward_by_hand():
    torch.manual_seed(0)
    layer = SEMALayer(6, 3, rd_dim=4, buffer_size=8, bias=True)
    layer.add_adapter()
    with torch.no_grad():
        for name in layer.bank.names:
            layer.bank._A[name].normal_()
            layer.bank._B[name].normal_()
        for b in layer.sema_up_bias:
            b.normal_()
    h = torch.randn(2, 5, 6)
    w = layer.router_weights(h.mean(1))  # (B, 2)
    expect = torch.zeros(2, 5, 6)
    for k, name in enumerate(layer.bank.names):
        A, B = layer.bank._A[name], layer.bank._B[name]  # A (3, 7): last column = down bias
        f = torch.relu(h @ A[:, :6].T + A[:, 6]) @ B.T + layer.sema_up_bias[k]
        expect += w[:, k, None, None] * f
    torch.testing.assert_close(layer(h), expect)


def test_adapter_bias_fresh_adapter_is_noop_and_biases_zero():
    layer = SEMALayer(6, 3, rd_dim=4, buffer_size=8, bias=True)
    assert torch.equal(layer.bank._A["a0"][:, 6], torch.zeros(3))
    assert torch.equal(layer(torch.randn(2, 5, 6)), torch.zeros(2, 5, 6))


@pytest.mark.parametrize("bias", [True, False])
def test_adapter_bias_option_trains_biases(bias):
    s, phases = _trained(adapter_bias=bias, rd_epochs=1)
    func = phases[0]
    for layer in s.layers.values():
        assert len(layer.sema_up_bias) == (1 if bias else 0)
        assert layer.bank._A["a0"].shape[1] == s.backbone.embed_dim + bias
        if bias:
            assert any(p is layer.sema_up_bias[0] for p in func.params)
            assert layer.sema_up_bias[0].abs().sum() > 0  # trained away from zero
            assert layer.bank._A["a0"][:, -1].abs().sum() > 0  # the down bias too


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_schedule_unit_reaches_every_phase(unit):
    _, phases = _trained(schedule_unit=unit, rd_epochs=1, ca_epochs=1)
    assert [p.name for p in phases] == ["sema_func", "sema_rd", "sema_ca"]
    assert all(p.schedule_unit == unit for p in phases)


def test_defaults_are_official():
    cfg = SEMAConfig()
    assert (cfg.schedule_unit, cfg.adapter_bias, cfg.buffer_record, cfg.buffer_fill) == (
        "epoch", True, "functional", "truncate")


@pytest.mark.parametrize("field", ["schedule_unit", "buffer_record", "buffer_fill"])
def test_config_validation_names_field(field):
    with pytest.raises(ValueError, match=field):
        SEMAConfig(**{field: "x"})
