"""Scenario streams built with Avalanche's generators.

Three generators, each a keyword-only function registered in :data:`GENERATORS` with its own
argument dataclass, so every YAML in ``scenarios/`` names a generator and its arguments:

* ``class_incremental``: the PILOT protocol. The class order is
  ``np.random.RandomState(class_order_seed).permutation(n_classes)`` (PILOT's data manager,
  seed 1993), passed to Avalanche's ``nc_benchmark`` as ``fixed_class_order`` with
  ``per_exp_classes={0: initial_increment}`` and class ids re-mapped by order of appearance.
  Each experience's train set holds the current classes; its test set holds the same classes,
  so "all seen classes" is the union of test experiences 0..t (see :mod:`adaptsim.cl.metrics`).
* ``domain_incremental``: the same classes under per-domain transforms (``dataset_benchmark``).
* ``multi_domain``: a sequence of datasets, each with its own label space, placed side by side
  in one global label space; task identity is hidden at evaluation (MTIL/X-TAIL-like).

Experiences carry their data as :class:`ImageTensorDataset` slices of the original tensors, using
the index assignment Avalanche computed, so images are never copied through Python loops.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from adaptsim.cl import compat as _compat  # noqa: F401
from adaptsim.cl.data import DatasetConfig, ImageTensorDataset, load_dataset
from adaptsim.cl.registry import Registry

__all__ = [
    "Experience",
    "Stream",
    "GENERATORS",
    "ClassIncrementalArgs",
    "DomainIncrementalArgs",
    "MultiDomainArgs",
    "build_stream",
    "apply_domain_transform",
]


@dataclass(frozen=True)
class Experience:
    """One step of a stream.

    Attributes:
        id: position in the stream.
        train: training images of this experience (global labels).
        test: test images of this experience (global labels).
        classes: global class ids introduced (or used) by this experience.
        task_id: the task label; ``None`` in the evaluation view.
        name: human-readable name (e.g. the domain).
    """

    id: int
    train: ImageTensorDataset
    test: ImageTensorDataset
    classes: tuple[int, ...]
    task_id: int | None
    name: str = ""

    def eval_view(self) -> "Experience":
        """The experience with its task identity masked (what evaluation code sees)."""
        return dataclasses.replace(self, task_id=None)


@dataclass(frozen=True)
class Stream:
    """An ordered sequence of experiences plus the global label space."""

    kind: str
    experiences: tuple[Experience, ...]
    class_names: tuple[str, ...]
    class_order: tuple[int, ...] = ()

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.experiences)

    def __iter__(self):
        return iter(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    def test_sizes(self) -> list[int]:
        return [len(e.test) for e in self.experiences]


@dataclass(frozen=True)
class ClassIncrementalArgs:
    """Arguments of ``class_incremental`` (PILOT: B<initial> Inc<increment>)."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    initial_increment: int = 2
    increment: int = 2
    class_order_seed: int = 1993
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.initial_increment < 1 or self.increment < 1:
            raise ValueError("initial_increment and increment must be >= 1")


@dataclass(frozen=True)
class DomainIncrementalArgs:
    """Arguments of ``domain_incremental``: one experience per transform in ``domains``.

    Transforms: ``identity``, ``invert``, ``rotate:<deg>``, ``noise:<std 0..1>``,
    ``permute`` (fixed pixel permutation), ``flip``, ``blur``.
    """

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    domains: list[str] = field(default_factory=lambda: ["identity", "rotate:90", "invert"])
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("domains must name at least one transform")
        for d in self.domains:
            _parse_transform(d)


@dataclass(frozen=True)
class MultiDomainArgs:
    """Arguments of ``multi_domain``: one experience per (dataset, transform) pair.

    Each domain keeps its own label space; the global space concatenates them, with class names
    prefixed by the domain name.
    """

    datasets: list[DatasetConfig] = field(
        default_factory=lambda: [DatasetConfig(name="digits"), DatasetConfig(name="synthetic")]
    )
    transforms: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("datasets must list at least one dataset")
        for lst, what in ((self.transforms, "transforms"), (self.names, "names")):
            if lst and len(lst) != len(self.datasets):
                raise ValueError(f"{what} must be empty or have one entry per dataset")
        for t in self.transforms:
            _parse_transform(t)


def _parse_transform(spec: str) -> tuple[str, float | None]:
    name, _, arg = spec.partition(":")
    known = ("identity", "invert", "rotate", "noise", "permute", "flip", "blur")
    if name not in known:
        raise ValueError(f"unknown domain transform {spec!r}; known: {', '.join(known)}")
    if name in ("rotate", "noise") and not arg:
        raise ValueError(f"transform {name!r} needs an argument, e.g. '{name}:0.3'")
    return name, float(arg) if arg else None


def apply_domain_transform(x: torch.Tensor, spec: str, seed: int = 0) -> torch.Tensor:
    """Apply a deterministic domain transform to uint8 images (N, C, H, W)."""
    import torchvision.transforms.v2.functional as TF

    name, arg = _parse_transform(spec)
    if name == "identity":
        return x
    if name == "invert":
        return 255 - x
    if name == "flip":
        return torch.flip(x, dims=[-1])
    if name == "rotate":
        return TF.rotate(x, angle=float(arg))
    if name == "blur":
        return TF.gaussian_blur(x, kernel_size=[3, 3], sigma=[1.0, 1.0])
    gen = torch.Generator().manual_seed(seed)
    if name == "permute":
        n, c, h, w = x.shape
        perm = torch.randperm(h * w, generator=gen)
        return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)
    noise = torch.randn(x.shape, generator=gen) * (255.0 * float(arg))
    return (x.float() + noise).clamp(0, 255).to(torch.uint8)


def class_incremental(*, dataset: DatasetConfig, initial_increment: int, increment: int,
                      class_order_seed: int = 1993, shuffle: bool = True) -> Stream:
    """PILOT class-incremental stream built with Avalanche's ``nc_benchmark``."""
    from avalanche.benchmarks import nc_benchmark

    train, test = load_dataset(dataset)
    n_classes = len(train.class_names)
    rest = n_classes - initial_increment
    if rest < 0 or rest % increment:
        raise ValueError(
            f"{n_classes} classes cannot be split as B{initial_increment} Inc{increment}: "
            f"{n_classes} - {initial_increment} must be a non-negative multiple of {increment}"
        )
    n_exp = 1 + rest // increment
    order = (np.random.RandomState(class_order_seed).permutation(n_classes).tolist()
             if shuffle else list(range(n_classes)))
    bm = nc_benchmark(
        train, test, n_experiences=n_exp, task_labels=False, fixed_class_order=order,
        per_exp_classes={0: initial_increment}, class_ids_from_zero_from_first_exp=True,
    )
    mapping = torch.as_tensor(bm.class_mapping, dtype=torch.long)
    names = [""] * n_classes
    for orig, new in enumerate(bm.class_mapping):
        names[new] = train.class_names[orig]

    def part(ds: ImageTensorDataset, idx: list[int]) -> ImageTensorDataset:
        idx_t = torch.as_tensor(sorted(idx), dtype=torch.long)
        return ImageTensorDataset(ds.x[idx_t], mapping[ds.y[idx_t]], names)

    exps = tuple(
        Experience(
            id=t,
            train=part(train, bm.train_exps_patterns_assignment[t]),
            test=part(test, bm.test_exps_patterns_assignment[t]),
            classes=tuple(sorted(int(c) for c in bm.classes_in_experience["train"][t])),
            task_id=t,
            name=f"classes {sorted(int(c) for c in bm.classes_in_experience['train'][t])}",
        )
        for t in range(n_exp)
    )
    return Stream("class_incremental", exps, tuple(names), tuple(order))


def _from_dataset_benchmark(kind: str, trains: list[ImageTensorDataset], tests: list[ImageTensorDataset],
                            names: list[str], class_names: list[str]) -> Stream:
    """Run Avalanche's ``dataset_benchmark`` and wrap its experiences (one per dataset)."""
    from avalanche.benchmarks import dataset_benchmark

    bm = dataset_benchmark(trains, tests)
    exps = []
    for t, (tr_exp, te_exp) in enumerate(zip(bm.train_stream, bm.test_stream)):
        tr, te = trains[t], tests[t]
        if len(tr_exp.dataset) != len(tr) or len(te_exp.dataset) != len(te):
            raise RuntimeError("Avalanche dataset_benchmark changed an experience's size")
        classes = tuple(sorted(int(c) for c in tr_exp.classes_in_this_experience))
        exps.append(Experience(t, tr, te, classes, task_id=t, name=names[t]))
    return Stream(kind, tuple(exps), tuple(class_names))


def domain_incremental(*, dataset: DatasetConfig, domains: list[str], seed: int = 0) -> Stream:
    """Same classes, one experience per domain transform."""
    train, test = load_dataset(dataset)
    trains, tests = [], []
    for i, spec in enumerate(domains):
        trains.append(ImageTensorDataset(apply_domain_transform(train.x, spec, seed + i), train.y, train.class_names))
        tests.append(ImageTensorDataset(apply_domain_transform(test.x, spec, seed + i), test.y, test.class_names))
    return _from_dataset_benchmark("domain_incremental", trains, tests, list(domains), train.class_names)


def multi_domain(*, datasets: list[DatasetConfig], transforms: list[str] | None = None,
                 names: list[str] | None = None) -> Stream:
    """A sequence of datasets with disjoint label spaces, concatenated into one global space."""
    transforms = list(transforms or ["identity"] * len(datasets))
    names = list(names or [f"{d.name}" + (f"-{t}" if t != "identity" else "") for d, t in zip(datasets, transforms)])
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique, got {names}; set multi_domain.names")
    trains, tests, class_names = [], [], []
    for i, (dcfg, spec) in enumerate(zip(datasets, transforms)):
        tr, te = load_dataset(dcfg)
        off = len(class_names)
        class_names += [f"{names[i]}:{c}" for c in tr.class_names]
        trains.append((apply_domain_transform(tr.x, spec, i), tr.y + off))
        tests.append((apply_domain_transform(te.x, spec, i), te.y + off))
    trains = [_to_common(x, y, class_names, trains) for x, y in trains]
    tests = [_to_common(x, y, class_names, tests) for x, y in tests]
    return _from_dataset_benchmark("multi_domain", trains, tests, names, class_names)


def _to_common(x: torch.Tensor, y: torch.Tensor, class_names: list[str], group: list) -> ImageTensorDataset:
    """Bring domains of different sizes/channels to the largest size and channel count."""
    import torch.nn.functional as F

    size = max(g[0].shape[-1] for g in group)
    chans = max(g[0].shape[1] for g in group)
    if x.shape[-1] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] != chans:
        x = x.expand(-1, chans, -1, -1).contiguous()
    return ImageTensorDataset(x, y, class_names)


GENERATORS: Registry[tuple[type, Callable[..., Stream]]] = Registry("scenario generator")
GENERATORS.add("class_incremental", (ClassIncrementalArgs, class_incremental))
GENERATORS.add("domain_incremental", (DomainIncrementalArgs, domain_incremental))
GENERATORS.add("multi_domain", (MultiDomainArgs, multi_domain))


def build_stream(generator: str, args: Any) -> Stream:
    """Build the stream of ``generator`` from its argument dataclass instance."""
    args_cls, fn = GENERATORS.get(generator)
    if not isinstance(args, args_cls):
        raise TypeError(f"{generator} expects {args_cls.__name__}, got {type(args).__name__}")
    return fn(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)})
