"""Run an experiment: build stream, backbone and strategy; train, evaluate, checkpoint, write.

The run folder holds ``config.yaml`` (resolved), ``metrics.json``, ``accuracy_matrix.csv``,
``accuracy_matrix.png``, ``accuracy_curve.png`` and ``checkpoints/after_exp<t>.pt`` (strategy
state, accuracy rows and timings after each experience). :func:`run` with ``resume=RUN_DIR``
continues a killed run from its last checkpoint; every experience re-seeds the RNGs from
``run.seed`` and its index, so a resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptsim.cl.backbones import create_backbone
from adaptsim.cl.config import read_yaml, write_yaml
from adaptsim.cl.evaluate import evaluate_stream
from adaptsim.cl.experiment import ExperimentConfig, experiment_from_raw
from adaptsim.cl.features import FeatureCache
from adaptsim.cl.metrics import summarize
from adaptsim.cl.scenarios import Stream, build_stream
from adaptsim.cl.train import fit, seed_everything

log = logging.getLogger(__name__)

__all__ = ["RunResult", "run", "build_components"]


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


def build_components(cfg: ExperimentConfig, device: torch.device):
    """Stream, backbone and strategy of ``cfg`` (the strategy seeded with ``run.seed``)."""
    from adaptsim.strategies import StreamInfo, get_strategy

    stream = build_stream(cfg.scenario.generator, cfg.scenario.args)
    seed_everything(cfg.run.seed)
    backbone = create_backbone(cfg.backbone).to(device)
    backbone.eval()
    info = StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))
    _, strategy_cls = get_strategy(cfg.strategy.name)
    cache = FeatureCache(batch_size=cfg.train.eval_batch_size, progress=cfg.train.progress)
    strategy = strategy_cls(cfg.strategy.config, backbone, info, device=device,
                            progress=cfg.train.progress, feature_cache=cache)
    return stream, backbone, strategy


def _new_run_dir(cfg: ExperimentConfig) -> Path:
    name = cfg.run.name or f"{Path(cfg.source).stem or 'run'}-{cfg.strategy.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run.out_dir) / name
    if (run_dir / "metrics.json").exists():
        raise FileExistsError(f"run folder {run_dir} already holds a finished run; choose another run.name")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def _latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    cps = sorted((int(p.stem.removeprefix("after_exp")), p) for p in (run_dir / "checkpoints").glob("after_exp*.pt"))
    return cps[-1] if cps else None


def run(cfg: ExperimentConfig | None = None, *, resume: str | Path | None = None,
        stop_after: int | None = None) -> RunResult:
    """Run (or resume) an experiment and write its run folder.

    Args:
        cfg: the experiment; read from ``RUN_DIR/config.yaml`` when resuming.
        resume: a run folder to continue from its last checkpoint.
        stop_after: stop after training this many experiences (simulates a killed run).
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
        cfg = experiment_from_raw(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    elif cfg is None:
        raise ValueError("give a config or a run folder to resume")
    else:
        run_dir = _new_run_dir(cfg)
        write_yaml(cfg.to_raw(), run_dir / "config.yaml")
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = cfg.train.resolved_device()
    stream, backbone, strategy = build_components(cfg, device)
    T = len(stream)
    state = {"R": [], "b": None, "train_seconds": [], "eval_seconds": [], "train_stats": []}
    start_t = 0
    if resume is not None and (cp := _latest_checkpoint(run_dir)) is not None:
        done, path = cp
        ckpt = torch.load(path, map_location=device, weights_only=True)
        strategy.load_state_dict(ckpt["strategy"])
        strategy.on_resume(list(stream.experiences[: done + 1]))
        state = ckpt["run_state"]
        start_t = done + 1
        log.info("resumed %s after experience %d", run_dir, done)
    wall0 = time.perf_counter()
    eval_exps = list(stream.experiences)
    if cfg.train.eval_future and state["b"] is None:
        state["b"] = evaluate_stream(strategy, eval_exps, cfg.train.eval_batch_size)
    from tqdm.auto import tqdm

    for t in tqdm(range(start_t, T), desc="experiences", disable=not cfg.train.progress,
                  initial=start_t, total=T):
        if stop_after is not None and t >= stop_after:
            break
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
            torch.save({"strategy": strategy.state_dict(), "run_state": state},
                       run_dir / "checkpoints" / f"after_exp{t}.pt")
    if len(state["R"]) < T:
        return RunResult(run_dir, {"R": state["R"], "finished": False})
    metrics = _write_outputs(cfg, stream, strategy, state, run_dir, time.perf_counter() - wall0)
    return RunResult(run_dir, metrics)


def _write_outputs(cfg: ExperimentConfig, stream: Stream, strategy, state: dict, run_dir: Path,
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
        "train_seconds": state["train_seconds"],
        "eval_seconds": state["eval_seconds"],
        "train_stats": state["train_stats"],
        "wall_seconds_this_process": wall,
        "strategy_metrics": strategy.run_metrics(),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    np.savetxt(run_dir / "accuracy_matrix.csv", R, delimiter=",", fmt="%.6f",
               header=",".join(f"exp{k}" for k in range(R.shape[1])))
    if cfg.run.plots:
        from adaptsim.cl.plots import plot_accuracy_matrix, plot_curve

        plot_accuracy_matrix(R, run_dir / "accuracy_matrix.png", f"{cfg.strategy.name}: R[t, k] (%)")
        plot_curve(summary["A_t"], run_dir / "accuracy_curve.png", title=f"{cfg.strategy.name} on {stream.kind}")
    return metrics
