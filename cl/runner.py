"""Run an experiment: build stream, backbone and strategy; train, evaluate, checkpoint, write.

The run folder holds ``config.yaml`` (resolved), ``metrics.json``, ``accuracy_matrix.csv``,
``accuracy_matrix.png``, ``accuracy_curve.png`` and ``checkpoints/after_exp<t>.pt`` (strategy
state, accuracy rows and timings after each experience). :func:`run` with ``resume=RUN_DIR``
continues a killed run from its last checkpoint; every experience re-seeds the RNGs from
``run.seed`` and its index, so a resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptsim.cl.backbones import create_backbone
from adaptsim.cl.evaluate import evaluate_stream
from adaptsim.cl.experiment import ExperimentConfig
from adaptsim.cl.features import FeatureCache
from adaptsim.cl.metrics import summarize
from adaptsim.cl.rundir import RunDir
from adaptsim.cl.scenarios import Stream, build_stream
from adaptsim.cl.engine import RunResult
from adaptsim.cl.train import fit, seed_everything

log = logging.getLogger(__name__)

__all__ = ["RunResult", "run", "run_stream", "prepare", "build_components"]


def build_components(cfg: ExperimentConfig, device: torch.device, stream: Stream | None = None):
    """Stream, backbone and strategy of ``cfg`` (the strategy seeded with ``run.seed``)."""
    from adaptsim.strategies import StreamInfo, get_strategy

    stream = stream if stream is not None else prepare(cfg)
    seed_everything(cfg.run.seed)
    backbone = create_backbone(cfg.backbone).to(device)
    backbone.eval()
    info = StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))
    _, strategy_cls = get_strategy(cfg.strategy.name)
    cache = FeatureCache(batch_size=cfg.train.eval_batch_size, progress=cfg.train.progress)
    strategy = strategy_cls(cfg.strategy.config, backbone, info, device=device,
                            progress=cfg.train.progress, feature_cache=cache)
    return stream, backbone, strategy


def prepare(cfg: ExperimentConfig) -> Stream:
    """Build the stream before a run folder exists (a stream that cannot be built is a config error)."""
    from adaptsim.cl.config import ConfigError

    try:
        return build_stream(cfg.scenario.generator, cfg.scenario.args)
    except ValueError as exc:
        raise ConfigError(f"scenario: {exc}") from None


def run(cfg: ExperimentConfig | None = None, *, resume: str | Path | None = None,
        stop_after: int | None = None) -> RunResult:
    """Run (or resume) an experiment through the run engine and write its run folder.

    Args:
        cfg: the experiment; read from ``RUN_DIR/config.yaml`` when resuming.
        resume: a run folder to continue from its last checkpoint.
        stop_after: stop after training this many experiences (simulates a killed run).
    """
    from adaptsim.cl import engine

    if resume is not None:
        return engine.resume_run(resume, stop_after=stop_after)
    if cfg is None:
        raise ValueError("give a config or a run folder to resume")
    return engine.run_config(cfg, kind="continual", stop_after=stop_after)


def run_stream(cfg: ExperimentConfig, rd: RunDir, *, resume: bool = False, stop_after: int | None = None,
               prepared: Stream | None = None) -> dict[str, Any] | None:
    """The ``continual`` run kind: train and evaluate every experience into ``rd``.

    Returns:
        The metrics (also written as ``metrics.json``), or None when ``stop_after`` stopped it.
    """
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = cfg.train.resolved_device()
    stream, backbone, strategy = build_components(cfg, device, stream=prepared)
    T = len(stream)
    state = {"R": [], "b": None, "train_seconds": [], "eval_seconds": [], "train_stats": []}
    start_t = 0
    if resume and (cp := rd.latest_checkpoint("after_exp")) is not None:
        done, path = cp
        ckpt = rd.load_checkpoint(path, map_location=device)
        strategy.load_state_dict(ckpt["strategy"])
        strategy.on_resume(list(stream.experiences[: done + 1]))
        state = ckpt["run_state"]
        start_t = done + 1
        log.info("resumed %s after experience %d", rd.path, done)
    wall0 = time.perf_counter()
    eval_exps = list(stream.experiences)
    if cfg.train.eval_future and state["b"] is None:
        state["b"] = evaluate_stream(strategy, eval_exps, cfg.train.eval_batch_size)
    from tqdm.auto import tqdm

    for t in tqdm(range(start_t, T), desc="experiences", disable=not cfg.train.progress,
                  initial=start_t, total=T):
        if stop_after is not None and t >= stop_after:
            return None
        exp = stream[t]
        seed_everything(cfg.run.seed * 1000 + t)
        t0 = time.perf_counter()
        stats = strategy.train_experience(
            exp, lambda phase: fit(phase, device=device, progress=cfg.train.progress))
        state["train_seconds"].append(time.perf_counter() - t0)
        state["train_stats"].append({k: float(v) for k, v in (stats or {}).items()
                                     if isinstance(v, (int, float))})
        t0 = time.perf_counter()
        cols = eval_exps if cfg.train.eval_future else eval_exps[: t + 1]
        row = evaluate_stream(strategy, cols, cfg.train.eval_batch_size, cfg.train.progress)
        state["R"].append(row + [float("nan")] * (T - len(row)))
        state["eval_seconds"].append(time.perf_counter() - t0)
        log.info("after experience %d: %s", t, " ".join(f"{a:.3f}" for a in row))
        if cfg.run.checkpoint:
            rd.save_checkpoint(f"after_exp{t}.pt", {"strategy": strategy.state_dict(), "run_state": state})
    return _write_outputs(cfg, stream, strategy, state, rd, time.perf_counter() - wall0)


def _write_outputs(cfg: ExperimentConfig, stream: Stream, strategy, state: dict, rd: RunDir,
                   wall: float) -> dict[str, Any]:
    R = np.array(state["R"], dtype=float)
    n = stream.test_sizes()
    summary = summarize(np.nan_to_num(R), n, state["b"], multi_domain=stream.kind != "class_incremental")
    metrics = {
        "config_hash": cfg.config_hash(),
        "scenario": stream.kind,
        "strategy": cfg.strategy.name,
        "experiences": [e.name for e in stream],
        "R": R.tolist(),
        "test_sizes": n,
        "initial_accuracy": state["b"],
        **summary,
        "trainable_params": strategy.trainable_parameter_count(),
        "stored_params": strategy.stored_parameter_count(),
        "train_seconds": state["train_seconds"],
        "eval_seconds": state["eval_seconds"],
        "train_stats": state["train_stats"],
        "wall_seconds_this_process": wall,
        "strategy_metrics": strategy.run_metrics(),
    }
    rd.write_metrics(metrics)
    rd.write_csv("accuracy_matrix.csv", R.tolist(), [f"exp{k}" for k in range(R.shape[1])])
    if cfg.run.plots:
        from adaptsim.cl.plots import plot_accuracy_matrix, plot_curve

        plot_accuracy_matrix(R, rd.file("accuracy_matrix.png"), f"{cfg.strategy.name}: R[t, k] (%)")
        plot_curve(summary["A_t"], rd.file("accuracy_curve.png"), title=f"{cfg.strategy.name} on {stream.kind}")
    return metrics
