"""Continual unlearning: a stream of forget requests on a trained classifier, and its runner.

Unlearning is not a learning stream, so it has its own small runner. The classifier (frozen
backbone + linear head) is first trained on all classes; then each request names classes whose
training data must be forgotten. After the original training and after every request the runner
measures accuracy on the forgotten training data, the forgotten test data (both over every class
forgotten so far; lower is better), each request's test data, and the retained test data
(higher is better); the forget quality (KS test against a retrained model), each detector's
false-positive rate and weight histogram on the retained test data, and the utility on an
unrelated dataset (:mod:`adaptsim.cl.unlearning_metrics`). The method comes from
:mod:`adaptsim.strategies.o3` (``method.name``: ``o3`` or the baselines ``random_labels``,
``gradient_ascent``, ``retrain``).

YAML layout (``python run_scenario.py scenarios/unlearn_mnist_o3.yaml``)::

    unlearning:
      dataset: {name: mnist5k}
      requests: [[0], [1], [2], [3], [4]]   # classes forgotten by each request, in order
      utility: digits                  # unrelated dataset of the utility probe (none = off)
    method: {name: o3, epochs: 10}     # O3Config (strategies/o3.py)
    backbone: {name: imgfocus_vit_s14, img_size: 56}
    train: {device: auto, num_threads: 2}
    run: {seed: 0, out_dir: runs}

Run folder: ``config.yaml``, ``metrics.json``, ``unlearning_curve.png`` and
``checkpoints/after_request<j>.pt`` (model state and rows after ``j`` requests; ``adaptsim run
--resume RUN_DIR`` continues from the last one and ends with the same metrics as an
uninterrupted run, since every request re-seeds from ``run.seed`` and its index).
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
from adaptsim.cl.unlearning_metrics import (HIST_EDGES, detector_fpr, forget_quality, linear_probe,
                                            weight_histogram)

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
        utility: the unrelated dataset of the utility probe (``digits``, scikit-learn's 8x8
            digits, or ``none`` to skip it): a logistic regression on the unlearned model's
            features of its train split, accuracy on its test split.
        utility_per_class: images per class of each utility split (keeps the probe cheap).
    """

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    requests: tuple[tuple[int, ...], ...] = ((0,), (1,), (2,), (3,), (4,))
    utility: str = "digits"
    utility_per_class: int = 30

    def __post_init__(self) -> None:
        if not self.requests or any(not r for r in self.requests):
            raise ValueError("unlearning.requests must be a non-empty list of non-empty class lists")
        flat = [c for r in self.requests for c in r]
        if len(flat) != len(set(flat)):
            raise ValueError(f"unlearning.requests must be disjoint, got {self.requests}")
        if any(c < 0 for c in flat):
            raise ValueError(f"unlearning.requests holds a negative class id: {self.requests}")
        if self.utility not in ("digits", "none"):
            raise ValueError(f"unlearning.utility must be digits or none, got {self.utility!r}")
        if self.utility_per_class < 1:
            raise ValueError(f"unlearning.utility_per_class must be >= 1, got {self.utility_per_class}")


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
              requests: tuple[tuple[int, ...], ...], done: int, *, base_train: torch.Tensor,
              fit_fn, seed: int, utility: tuple[ImageTensorDataset, ImageTensorDataset] | None) -> dict[str, Any]:
    """Measurements after ``done`` requests (0 = the original classifier).

    The test set and the forgotten training data are each predicted once; every accuracy is a
    mean over a class mask of those predictions. ``base_train`` (N, D) holds the frozen base
    features of ``train``, on which the forget-quality reference head is retrained with the seed
    the ``retrain`` method uses for the same request (so ``retrain`` is the reference: p = 1).
    """
    forgotten = sorted({c for r in requests[:done] for c in r})
    out = model.predict_full(test.x)
    correct = (out["pred"] == test.y).float()

    def mean(values: torch.Tensor, classes: list[int], inside: bool = True) -> float:
        mask = torch.isin(test.y, torch.tensor(classes, dtype=torch.long))
        mask = mask if inside else ~mask
        return values[mask].mean().item() if mask.any() else float("nan")

    row: dict[str, Any] = {"requests_done": done}
    nan = float("nan")
    if forgotten:
        in_f = torch.isin(train.y, torch.tensor(forgotten, dtype=torch.long))
        f_train = train.subset(torch.nonzero(in_f).flatten())
        fo = model.predict_full(f_train.x)
        row["forget_train_acc"] = (fo["pred"] == f_train.y).float().mean().item()
        row["forget_test_acc"], row["forget_test_weight"] = mean(correct, forgotten), mean(out["w"], forgotten)
        ref = model.retrained_head(base_train[~in_f], train.y[~in_f], fit_fn, seed)
        with torch.no_grad():
            p_ref = ref(base_train[in_f].to(model.device)).softmax(-1).cpu()
        idx = torch.arange(len(f_train))
        row.update(forget_quality(fo["prob"][idx, f_train.y], p_ref[idx, f_train.y]))
    else:
        row.update(forget_train_acc=nan, forget_test_acc=nan, forget_test_weight=nan, forget_quality=nan,
                   forget_ks=nan)
    row["retained_test_acc"] = mean(correct, forgotten, inside=False)
    row["retained_test_weight"] = mean(out["w"], forgotten, inside=False)
    row["request_test_acc"] = [mean(correct, list(r)) for r in requests]
    kept = ~torch.isin(test.y, torch.tensor(forgotten, dtype=torch.long))
    row["detector_fpr"] = detector_fpr(out["wk"], kept)
    row["detector_weight_hist"] = [weight_histogram(w[kept]) for w in out["wk"]]
    row["retained_weight_hist"] = weight_histogram(out["w"][kept])
    if utility is not None:
        u_train, u_test = (model.predict_full(d.x) for d in utility)
        row["utility_acc"] = linear_probe(u_train["pooled"], utility[0].y, u_test["pooled"], utility[1].y)
        row["utility_weight"] = torch.cat([u_train["w"], u_test["w"]]).mean().item()
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


def _numbers(stats: Mapping[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (stats or {}).items() if isinstance(v, (int, float))}


def _utility_data(cfg: UnlearningExperiment) -> tuple[ImageTensorDataset, ImageTensorDataset] | None:
    if cfg.unlearning.utility == "none":
        return None
    n = cfg.unlearning.utility_per_class
    return load_dataset(DatasetConfig(name="digits", train_per_class=n, test_per_class=n, seed=cfg.run.seed))


def run_requests(cfg: UnlearningExperiment, rd: RunDir, *, resume: bool = False,
                 stop_after: int | None = None, prepared=None) -> dict[str, Any] | None:
    """The ``unlearning`` run kind: trains the original classifier, processes every request,
    evaluates after each, checkpoints (``checkpoints/after_request<j>.pt``), and writes
    ``metrics.json`` and the plot into ``rd``.

    Args:
        resume: continue from the folder's last checkpoint.
        stop_after: stop (returning None, the run stays resumable) before request ``stop_after``
            (0 = after the original classifier).
    """
    from adaptsim.strategies.o3 import O3Unlearner

    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = cfg.train.resolved_device()
    train, test = prepared if prepared is not None else prepare_unlearning(cfg)
    utility = _utility_data(cfg)
    n_classes = len(train.class_names)
    requests = cfg.unlearning.requests
    wall0 = time.perf_counter()
    seed_everything(cfg.run.seed)
    backbone = create_backbone(cfg.backbone).to(device).eval()
    model = O3Unlearner(cfg.method, backbone, n_classes, device=device, seed=cfg.run.seed)
    fit_fn = lambda phase: fit(phase, device=device, progress=cfg.train.progress)  # noqa: E731
    base_train = model.base_features(train.x).cpu()  # (N, D): the forget-quality reference's input

    def evaluate(done: int) -> None:
        t0 = time.perf_counter()
        state["rows"].append(_evaluate(model, train, test, requests, done, base_train=base_train,
                                       fit_fn=fit_fn, seed=cfg.run.seed * 1000 + done, utility=utility))
        state["eval_seconds"].append(time.perf_counter() - t0)
        if cfg.run.checkpoint:
            rd.save_checkpoint(f"after_request{done}.pt", {"model": model.checkpoint_state(), "run_state": state})

    state: dict[str, Any] = {"rows": [], "stats": [], "train_seconds": [], "eval_seconds": []}
    start = 0
    if resume and (cp := rd.latest_checkpoint("after_request")) is not None:
        start, path = cp
        ckpt = rd.load_checkpoint(path, map_location=device)
        model.load_checkpoint_state(ckpt["model"])
        state = ckpt["run_state"]
        log.info("resumed %s after request %d", rd.path, start)
    else:
        t0 = time.perf_counter()
        state["stats"].append(_numbers(model.fit_original(train, fit_fn)))
        state["train_seconds"].append(time.perf_counter() - t0)
        evaluate(0)
        log.info("original: retained_test_acc=%.3f", state["rows"][0]["retained_test_acc"])
    for j in range(start, len(requests)):
        if stop_after is not None and j >= stop_after:
            return None
        classes = requests[j]
        seed_everything(cfg.run.seed * 1000 + j + 1)
        forgotten = {c for r in requests[: j + 1] for c in r}
        _, retained = split_request(train, forgotten)
        forget_j, _ = split_request(train, set(classes))
        t0 = time.perf_counter()
        state["stats"].append(_numbers(model.unlearn(forget_j, retained, fit_fn)))
        state["train_seconds"].append(time.perf_counter() - t0)
        evaluate(j + 1)
        row = state["rows"][-1]
        log.info("after request %d (forget %s): forget_train=%.3f forget_test=%.3f retained_test=%.3f "
                 "forget_quality=%.3g", j + 1, list(classes), row["forget_train_acc"], row["forget_test_acc"],
                 row["retained_test_acc"], row["forget_quality"])
    rows = state["rows"]
    metrics = {
        "method": cfg.method.name,
        "requests": [list(r) for r in requests],
        "rows": rows,
        "final": rows[-1],
        "original_retained_test_acc": rows[0]["retained_test_acc"],
        "weight_hist_edges": list(HIST_EDGES),
        "train_seconds": state["train_seconds"],
        "eval_seconds": state["eval_seconds"],
        "train_stats": state["stats"],
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
