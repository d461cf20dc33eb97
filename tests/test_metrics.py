"""Metrics from one accuracy matrix, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from adaptsim.cl import metrics as M

R = np.array([[0.9, 0.1, 0.0],
              [0.6, 0.8, 0.2],
              [0.5, 0.7, 0.9]])


def test_seen_accuracy_weighted_by_test_size():
    A = M.seen_accuracy(R, [100, 300, 100])
    assert A[0] == pytest.approx(0.9)
    assert A[1] == pytest.approx((0.6 * 100 + 0.8 * 300) / 400)
    assert A[2] == pytest.approx((0.5 * 100 + 0.7 * 300 + 0.9 * 100) / 500)
    assert M.avg_incremental_accuracy(R, [100, 300, 100]) == pytest.approx(A.mean())


def test_forgetting_bwt_fwt_by_hand():
    # PILOT forgetting: groups 0,1: (0.9-0.5) and (0.8-0.7) -> mean 0.25
    assert M.pilot_forgetting(R) == pytest.approx(0.25)
    # BWT: (0.5-0.9 + 0.7-0.8)/2 = -0.25
    assert M.bwt(R) == pytest.approx(-0.25)
    # FWT with b = [0.1, 0.05, 0.1]: (R[0,1]-b1 + R[1,2]-b2)/2 = (0.05 + 0.1)/2
    assert M.fwt(R, [0.1, 0.05, 0.1]) == pytest.approx(0.075)


def test_forgetting_uses_best_not_first():
    R2 = np.array([[0.5, 0.0], [0.9, 0.8]])  # group 0 improved later: best 0.9, final 0.9
    assert M.pilot_forgetting(R2) == pytest.approx(0.0)
    assert M.bwt(R2) == pytest.approx(0.4)


def test_mtil_metrics_by_hand():
    out = M.mtil_metrics(R)
    assert out["transfer"] == pytest.approx((0.1 + (0.0 + 0.2) / 2) / 2)
    assert out["average"] == pytest.approx(np.mean([R[:, k].mean() for k in range(3)]))
    assert out["last"] == pytest.approx(np.mean([0.5, 0.7, 0.9]))


def test_rejects_bad_shape():
    with pytest.raises(ValueError):
        M.seen_accuracy(np.zeros((3, 2)))
