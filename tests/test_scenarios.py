"""Scenario streams: PILOT class order and splits, domain and multi-domain streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptsim.cl.data import DatasetConfig, load_dataset
from adaptsim.cl.scenarios import (ClassIncrementalArgs, DomainIncrementalArgs, MultiDomainArgs,
                                   build_stream)


def test_pilot_class_order_and_splits(digits_stream):
    s = digits_stream
    order = np.random.RandomState(1993).permutation(10).tolist()   # PILOT's data manager
    assert list(s.class_order) == order
    assert [len(e.classes) for e in s] == [4, 3, 3]
    assert [e.classes for e in s] == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    train, test = load_dataset(DatasetConfig(name="digits"))
    for e in s:
        # train and test hold exactly the current classes (re-mapped to order of appearance)
        assert sorted(e.train.y.unique().tolist()) == list(e.classes)
        assert sorted(e.test.y.unique().tolist()) == list(e.classes)
        for new in e.classes:  # the images of new class id c are those of original class order[c]
            assert (train.y == order[new]).sum() == (e.train.y == new).sum()
    assert s.class_names[0] == str(order[0])
    assert sum(len(e.test) for e in s) == len(test)


def test_class_order_seed_changes_order():
    a = build_stream("class_incremental", ClassIncrementalArgs(dataset=DatasetConfig(name="digits"),
                                                              initial_increment=5, increment=5, class_order_seed=1))
    assert list(a.class_order) == np.random.RandomState(1).permutation(10).tolist()


def test_eval_view_hides_task_id(digits_stream):
    e = digits_stream[1]
    assert e.task_id == 1 and e.eval_view().task_id is None


def test_domain_incremental_same_classes_new_pixels():
    s = build_stream("domain_incremental", DomainIncrementalArgs(
        dataset=DatasetConfig(name="digits"), domains=["identity", "invert", "rotate:90"]))
    assert len(s) == 3 and all(e.classes == tuple(range(10)) for e in s)
    assert torch.equal(s[1].train.x, 255 - s[0].train.x)
    assert torch.equal(s[0].train.y, s[2].train.y) and not torch.equal(s[0].train.x, s[2].train.x)


def test_multi_domain_disjoint_label_spaces():
    s = build_stream("multi_domain", MultiDomainArgs(
        datasets=[DatasetConfig(name="digits"), DatasetConfig(name="synthetic")], names=["d", "s"]))
    assert s.n_classes == 16 and s[0].classes == tuple(range(10)) and s[1].classes == tuple(range(10, 16))
    assert s.class_names[10].startswith("s:")
    assert s[1].task_id == 1 and s[1].eval_view().task_id is None


def test_bad_transform_rejected():
    with pytest.raises(ValueError, match="unknown domain transform"):
        DomainIncrementalArgs(domains=["sepia"])
