"""The training loop's learning-rate schedules (per optimiser step and per epoch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from adaptsim.cl.train import Phase, fit


def _lrs(unit: str, epochs: int = 3, n: int = 8, batch: int = 2, lr: float = 0.1, min_lr: float = 0.0):
    """Learning rate of every step, read back from plain SGD on loss = w (gradient 1)."""
    w = torch.nn.Parameter(torch.zeros(()))
    seen = []
    last = [0.0]

    def after_step():
        seen.append(last[0] - w.item())
        last[0] = w.item()

    fit(Phase("p", [w], lambda x, y: w * 1.0, TensorDataset(torch.zeros(n, 1), torch.zeros(n)), epochs, lr,
              batch_size=batch, momentum=0.0, schedule_unit=unit, min_lr=min_lr, after_step=after_step))
    return seen


def test_epoch_schedule_is_constant_within_an_epoch_and_follows_cosine_annealing():
    lrs = _lrs("epoch", min_lr=0.01)
    per_epoch = [lrs[i * 4:(i + 1) * 4] for i in range(3)]
    for e, steps in enumerate(per_epoch):
        want = 0.01 + (0.1 - 0.01) * (1 + math.cos(math.pi * e / 3)) / 2
        assert steps == pytest.approx([want] * 4, rel=1e-5)


def test_step_schedule_decreases_every_step():
    lrs = _lrs("step")
    assert lrs[0] == pytest.approx(0.1, rel=1e-5)
    assert all(b < a for a, b in zip(lrs, lrs[1:]))
    assert lrs[5] == pytest.approx(0.1 * (1 + math.cos(math.pi * 5 / 12)) / 2, rel=1e-5)


def test_bad_schedule_unit_is_refused():
    with pytest.raises(ValueError, match="schedule_unit"):
        Phase("p", [], lambda x, y: x, TensorDataset(torch.zeros(1)), 1, 0.1, schedule_unit="batch")
