"""Datasets: shapes and class names, the real CIFAR-100 reader on a fake folder, clear errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from adaptsim.cl.data import DatasetConfig, DatasetNotFoundError, load_dataset


def test_digits_and_mnist5k():
    tr, te = load_dataset(DatasetConfig(name="digits"))
    assert tr.x.dtype == torch.uint8 and tr.x.shape[1:] == (1, 8, 8)
    assert len(tr) + len(te) == 1797 and tr.class_names == [str(i) for i in range(10)]
    tr, te = load_dataset(DatasetConfig(name="mnist5k", train_per_class=30, test_per_class=10))
    assert tr.x.shape[1:] == (1, 28, 28)
    assert torch.bincount(tr.y).tolist() == [30] * 10 and torch.bincount(te.y).tolist() == [10] * 10
    assert int(tr.x.max()) > 200  # real pixel range, not normalised floats


def test_split_is_seeded_and_disjoint():
    a, _ = load_dataset(DatasetConfig(name="mnist5k", seed=1))
    b, _ = load_dataset(DatasetConfig(name="mnist5k", seed=1))
    c, _ = load_dataset(DatasetConfig(name="mnist5k", seed=2))
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    tr, te = load_dataset(DatasetConfig(name="mnist5k"))
    rows_tr = {bytes(r) for r in tr.x.reshape(len(tr), -1).numpy()}
    assert not any(bytes(r) in rows_tr for r in te.x.reshape(len(te), -1).numpy()[:200])


def _write_fake_cifar(root, n_train=20, n_test=10):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": list(rng.integers(0, 100, n)),
                         "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return data


def test_cifar100_real_reader_on_fake_folder(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tvc

    last_test = _write_fake_cifar(tmp_path)
    monkeypatch.setattr(tvc.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    tr, te = load_dataset(DatasetConfig(name="cifar100", root=str(tmp_path)))
    assert tr.x.shape == (20, 3, 32, 32) and te.x.shape == (10, 3, 32, 32)
    assert tr.class_names[:2] == ["c0", "c1"] and len(tr.class_names) == 100
    # CHW planes: the first 1024 bytes of a row are the red plane
    assert torch.equal(te.x[0, 0].flatten(), torch.from_numpy(last_test[0, :1024]))


def test_missing_cifar_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(DatasetConfig(name="cifar100", root=str(tmp_path / "nothing")))
    msg = str(err.value)
    assert str(tmp_path / "nothing") in msg and "download" in msg and "split_mnist.yaml" in msg


def test_unknown_dataset_suggests():
    with pytest.raises(ValueError, match="did you mean 'mnist5k'"):
        DatasetConfig(name="mnist5")
