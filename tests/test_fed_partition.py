"""Partitioning: IID and Dirichlet label skew are seeded, disjoint, complete and skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest

from adaptsim.federated.partition import (dirichlet_partition, iid_partition, label_histogram,
                                          partition_indices)

LABELS = np.repeat(np.arange(10), 50)  # 500 samples, 10 balanced classes


def _check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and complete


def test_iid_sizes_cover_and_seed():
    parts = iid_partition(103, 10, seed=3)
    _check_cover(parts, 103)
    assert {len(p) for p in parts} <= {10, 11}
    again = iid_partition(103, 10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = iid_partition(103, 10, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 5.0], ids=["a0.1", "a0.5", "a5"])
def test_dirichlet_cover_min_size_and_seed(alpha):
    parts = dirichlet_partition(LABELS, 10, alpha, seed=0, min_partition_size=5)
    _check_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 5
    again = dirichlet_partition(LABELS, 10, alpha, seed=0, min_partition_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def _mean_label_entropy(parts):
    h = label_histogram(LABELS, parts, 10).astype(float)
    p = h / h.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return ent.mean()


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_near_iid():
    skewed = _mean_label_entropy(dirichlet_partition(LABELS, 10, 0.1, seed=1))
    flat = _mean_label_entropy(dirichlet_partition(LABELS, 10, 1000.0, seed=1))
    iid = _mean_label_entropy(iid_partition(len(LABELS), 10, seed=1))
    assert skewed < 1.2  # few classes per client (uniform over 10 classes is log 10 = 2.30)
    assert flat > 2.1 and iid > 2.1


def test_label_histogram_hand_computed():
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]
    np.testing.assert_array_equal(label_histogram(labels, parts, 3), [[1, 0, 1], [1, 1, 2]])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="min_partition_size"):
        dirichlet_partition(LABELS, 10, 0.5, seed=0, min_partition_size=60)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(LABELS, 10, 0.0, seed=0)
    with pytest.raises(ValueError, match="num_partitions"):
        iid_partition(5, 6, seed=0)
    with pytest.raises(ValueError, match="partition"):
        partition_indices(LABELS, 3, "pathological")


def test_client_dataset_partitions_the_train_set():
    from adaptsim.federated.config import load_fed_experiment
    from adaptsim.federated.task import client_dataset, load_data

    cfg = load_fed_experiment({"scenario": {"dataset": {"name": "digits"}},
                               "federated": {"num_clients": 4, "clients_per_round": 4}})
    train, test = load_data(cfg)
    sizes, xs = [], []
    for k in range(4):
        tr, te = client_dataset(cfg, k, 4)
        assert te is test
        sizes.append(len(tr))
        xs.append(tr.fingerprint)
    assert sum(sizes) == len(train) and len(set(xs)) == 4
    with pytest.raises(ValueError, match="partition_id"):
        client_dataset(cfg, 4, 4)
