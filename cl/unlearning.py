"""Continual unlearning: a stream of forget requests on a trained classifier, and its runner.

Unlearning is not a learning stream, so it has its own small runner. The classifier (frozen
backbone + linear head) is first trained on all classes; then each request names classes whose
training data must be forgotten. After the original training and after every request the runner
measures accuracy on the forgotten training data, the forgotten test data (both over every class
forgotten so far; lower is better), each request's test data, and the retained test data
(higher is better). The method comes from :mod:`adaptsim.strategies.o3` (``method.name``: ``o3``
or the baselines ``random_labels``, ``gradient_ascent``, ``retrain``).

YAML layout (``python run_scenario.py scenarios/unlearn_mnist_o3.yaml``)::

    unlearning:
      dataset: {name: mnist5k, train_per_class: 150, test_per_class: 100}
      requests: [[0], [1], [2]]        # classes forgotten by each request, in order
    method: {name: o3, epochs: 10}     # O3Config (strategies/o3.py)
    backbone: {name: imgfocus_vit_s14, img_size: 56}
    train: {device: auto, num_threads: 2}
    run: {seed: 0, out_dir: runs}

Run folder: ``config.yaml``, ``metrics.json``, ``unlearning_curve.png``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch

from adaptsim.cl.backbones import BackboneConfig, create_backbone
from adaptsim.cl.config import ConfigError, apply_overrides, from_dict, read_yaml
from adaptsim.cl.data import DatasetConfig, ImageTensorDataset, load_dataset
from adaptsim.cl.experiment import ExperimentBase, RunConfig
from adaptsim.cl.rundir import RunDir
from adaptsim.cl.train import TrainConfig, fit, seed_everything

log = logging.getLogger(__name__)

__all__ = ["UnlearningStream", "UnlearningExperiment", "unlearning_from_raw", "load_unlearning",
           "run_unlearning", "run_requests", "prepare_unlearning", "split_request"]

SECTIONS = ("unlearning", "method", "backbone", "train", "run")


@dataclass(frozen=True)
class UnlearningStream:
    """The data and the forget requests.

    Attributes:
        dataset: which dataset (train and test splits).
        requests: per request, the class ids it forgets (disjoint; at least one class retained).
    """

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    requests: tuple[tuple[int, ...], ...] = ((0,), (1,), (2,))

    def __post_init__(self) -> None:
        if not self.requests or any(not r for r in self.requests):
            raise ValueError("unlearning.requests must be a non-empty list of non-empty class lists")
        flat = [c for r in self.requests for c in r]
        if len(flat) != len(set(flat)):
            raise ValueError(f"unlearning.requests must be disjoint, got {self.requests}")
        if any(c < 0 for c in flat):
            raise ValueError(f"unlearning.requests holds a negative class id: {self.requests}")


def _parse_method(raw: Any) -> Any:
    from adaptsim.strategies.o3 import O3Config

    return from_dict(O3Config, raw, "method")


@dataclass(frozen=True)
class UnlearningExperiment(ExperimentBase):
    """A continual-unlearning run: a trained classifier, then a stream of forget requests."""

    SECTIONS: ClassVar[tuple[str, ...]] = SECTIONS
    REQUIRED: ClassVar[tuple[str, ...]] = ("unlearning",)
    PARSERS: ClassVar[dict[str, Callable[[Any], Any]]] = {"method": _parse_method}

    unlearning: UnlearningStream
    method: Any  # adaptsim.strategies.o3.O3Config
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str = ""


def unlearning_from_raw(raw: Mapping[str, Any], source: str = "") -> UnlearningExperiment:
    """Builds the typed config from a raw mapping (strict: unknown keys raise ConfigError)."""
    exp = UnlearningExperiment.from_raw(raw, source)
    if exp.method.name == "o3" and len(exp.unlearning.requests) > exp.method.max_requests:
        raise ConfigError(f"unlearning.requests has {len(exp.unlearning.requests)} requests but "
                          f"method.max_requests is {exp.method.max_requests}")
    return exp


def load_unlearning(path: str, overrides: Mapping[str, Any] | None = None) -> UnlearningExperiment:
    """Reads the YAML at ``path``, applies dotted ``overrides`` and builds the config."""
    raw = dict(read_yaml(path))
    raw.pop("kind", None)
    return unlearning_from_raw(apply_overrides(raw, overrides or {}), source=str(path))


def split_request(ds: ImageTensorDataset,
                  classes: list[int] | set[int]) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """(samples whose class is in ``classes``, the rest)."""
    inside = torch.isin(ds.y, torch.tensor(sorted(classes), dtype=torch.long))
    return ds.subset(torch.nonzero(inside).flatten()), ds.subset(torch.nonzero(~inside).flatten())


def _evaluate(model, train: ImageTensorDataset, test: ImageTensorDataset,
              requests: tuple[tuple[int, ...], ...], done: int) -> dict[str, Any]:
    """Accuracies after ``done`` requests (0 = the original classifier).

    The test set and the forgotten training data are each predicted once; every accuracy is a
    mean over a class mask of those predictions.
    """
    forgotten = sorted({c for r in requests[:done] for c in r})
    pred, w = model.predict_dataset(test)
    correct = (pred == test.y).float()

    def mean(values: torch.Tensor, classes: list[int], inside: bool = True) -> float:
        mask = torch.isin(test.y, torch.tensor(classes, dtype=torch.long))
        mask = mask if inside else ~mask
        return values[mask].mean().item() if mask.any() else float("nan")

    row: dict[str, Any] = {"requests_done": done}
    if forgotten:
        f_train = split_request(train, set(forgotten))[0]
        row["forget_train_acc"] = model.accuracy(f_train)[0]
        row["forget_test_acc"], row["forget_test_weight"] = mean(correct, forgotten), mean(w, forgotten)
    else:
        row["forget_train_acc"] = row["forget_test_acc"] = row["forget_test_weight"] = float("nan")
    row["retained_test_acc"] = mean(correct, forgotten, inside=False)
    row["retained_test_weight"] = mean(w, forgotten, inside=False)
    row["request_test_acc"] = [mean(correct, list(r)) for r in requests]
    return row


def prepare_unlearning(cfg: UnlearningExperiment) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Loads the data and checks the requests against it (before a run folder exists).

    Raises:
        ConfigError: when a request names a class the dataset does not have, or forgets all.
    """
    train, test = load_dataset(cfg.unlearning.dataset)
    n_classes = len(train.class_names)
    bad = [c for r in cfg.unlearning.requests for c in r if c >= n_classes]
    if bad:
        raise ConfigError(f"unlearning.requests names classes {bad}, but the dataset has {n_classes}")
    if len({c for r in cfg.unlearning.requests for c in r}) >= n_classes:
        raise ConfigError("unlearning.requests must leave at least one class retained")
    return train, test


def run_unlearning(cfg: UnlearningExperiment):
    """Runs ``cfg`` through the run engine (kind ``unlearning``); returns its RunResult."""
    from adaptsim.cl import engine

    return engine.run_config(cfg, kind="unlearning")


def run_requests(cfg: UnlearningExperiment, rd: RunDir, *, resume: bool = False,
                 stop_after: int | None = None, prepared=None) -> dict[str, Any]:
    """The ``unlearning`` run kind: trains the original classifier, processes every request,
    evaluates after each, and writes ``metrics.json`` and the plot into ``rd``."""
    from adaptsim.strategies.o3 import O3Unlearner

    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = cfg.train.resolved_device()
    train, test = prepared if prepared is not None else prepare_unlearning(cfg)
    n_classes = len(train.class_names)
    wall0 = time.perf_counter()
    seed_everything(cfg.run.seed)
    backbone = create_backbone(cfg.backbone).to(device).eval()
    model = O3Unlearner(cfg.method, backbone, n_classes, device=device, seed=cfg.run.seed)
    fit_fn = lambda phase: fit(phase, device=device, progress=cfg.train.progress)  # noqa: E731
    t0 = time.perf_counter()
    stats = [model.fit_original(train, fit_fn)]
    train_s = [time.perf_counter() - t0]
    t0 = time.perf_counter()
    rows = [_evaluate(model, train, test, cfg.unlearning.requests, 0)]
    eval_s = [time.perf_counter() - t0]
    log.info("original: retained_test_acc=%.3f", rows[0]["retained_test_acc"])
    forgotten: set[int] = set()
    for j, classes in enumerate(cfg.unlearning.requests):
        seed_everything(cfg.run.seed * 1000 + j + 1)
        forgotten |= set(classes)
        forget, retained = split_request(train, forgotten)
        forget_j, _ = split_request(train, set(classes))
        t0 = time.perf_counter()
        stats.append(model.unlearn(forget_j, retained, fit_fn))
        train_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows.append(_evaluate(model, train, test, cfg.unlearning.requests, j + 1))
        eval_s.append(time.perf_counter() - t0)
        log.info("after request %d (forget %s): forget_train=%.3f forget_test=%.3f retained_test=%.3f",
                 j + 1, list(classes), rows[-1]["forget_train_acc"], rows[-1]["forget_test_acc"],
                 rows[-1]["retained_test_acc"])
    metrics = {
        "method": cfg.method.name,
        "requests": [list(r) for r in cfg.unlearning.requests],
        "rows": rows,
        "final": rows[-1],
        "original_retained_test_acc": rows[0]["retained_test_acc"],
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "train_stats": [{k: float(v) for k, v in s.items() if isinstance(v, (int, float))} for s in stats],
        "wall_seconds": time.perf_counter() - wall0,
    }
    rd.write_metrics(metrics)
    if cfg.run.plots:
        _plot(rows, rd.file("unlearning_curve.png"), cfg.method.name)
    return metrics


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["requests_done"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, label in (("forget_train_acc", "forgotten (train)"), ("forget_test_acc", "forgotten (test)"),
                       ("retained_test_acc", "retained (test)")):
        ax.plot(x, [100 * r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("requests processed")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.set_title(f"continual unlearning: {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
