"""MOS's official-code defaults and their options: merge mode, per-epoch cosine (adapter phase and
classifier alignment with fresh samples per epoch), timm head init. Each test fails when its
option is ignored."""

from __future__ import annotations

import pytest
import torch
from test_mos import _make, _small

from adaptsim.cl.train import Phase, fit
from adaptsim.strategies import MOSConfig
from adaptsim.strategies.mos_stats import EpochSamples


def test_defaults_are_official():
    cfg = MOSConfig()
    assert (cfg.merge_mode, cfg.schedule_unit, cfg.head_init) == ("official", "epoch", "timm")


@pytest.mark.parametrize("field", ["schedule_unit", "head_init"])
def test_config_validation_names_field(field):
    with pytest.raises(ValueError, match=field):
        MOSConfig(**{field: "x"})


@pytest.mark.parametrize("init", ["timm", "torch"])
def test_head_init(init, digits_stream, tiny_backbone_cfg):
    s = _make(tiny_backbone_cfg, digits_stream, head_init=init)
    w, b = s.head.weight.detach(), s.head.bias.detach()
    dim = w.shape[1]
    if init == "timm":  # trunc-normal std 0.02, zero bias
        assert 0.015 < float(w.std()) < 0.025 and torch.equal(b, torch.zeros_like(b))
    else:  # nn.Linear: uniform(+-1/sqrt(D)) weight and bias
        bound = dim ** -0.5
        assert float(w.abs().max()) <= bound and float(w.std()) > 0.4 * bound and b.abs().sum() > 0


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_schedule_unit_reaches_adapter_and_alignment_phases(unit, digits_stream, tiny_backbone_cfg):
    phases: list[Phase] = []

    def rec(phase):
        phases.append(phase)
        return fit(phase)

    s = _make(tiny_backbone_cfg, digits_stream, schedule_unit=unit, crct_epochs=3, ca_samples_per_class=8)
    exps = [_small(e, 40) for e in digits_stream][:2]
    for e in exps:
        s.train_experience(e, rec)
    assert [p.name for p in phases] == ["mos_adapters", "mos_adapters", "mos_align"]
    assert all(p.schedule_unit == unit for p in phases)
    align = phases[-1]
    n_classes = len(s.class_means)
    if unit == "epoch":  # crct_epochs epochs, each over its own fresh samples
        assert align.epochs == 3 and isinstance(align.data, EpochSamples)
        assert len(align.data) == n_classes * 8
    else:  # one epoch over every epoch's samples, cosine per step
        assert align.epochs == 1 and len(align.data) == 3 * n_classes * 8


def test_epoch_samples_gives_each_epoch_its_own_samples():
    C, E, n = 3, 4, 5
    x = torch.arange(C * E * n, dtype=torch.float32)[:, None]  # class-major sample ids
    y = torch.arange(C).repeat_interleave(E * n)
    data = EpochSamples(x, y, C, E, steps_per_epoch=C)  # batch n: C steps per epoch
    seen: list[list[float]] = [[] for _ in range(E)]
    w = torch.nn.Parameter(torch.zeros(1))

    def loss(xb, yb):
        seen[data.epoch].extend(xb[:, 0].tolist())
        for v, c in zip(xb[:, 0].tolist(), yb.tolist()):
            assert int(v) // (E * n) == c  # labels travel with their samples
        return (w * xb).sum()

    fit(Phase("t", [w], loss, data, E, 0.1, n, after_step=data.step, schedule_unit="epoch"))
    for e in range(E):  # epoch e: samples [e*n, (e+1)*n) of every class, each once
        expect = sorted(c * E * n + e * n + i for c in range(C) for i in range(n))
        assert sorted(int(v) for v in seen[e]) == expect
