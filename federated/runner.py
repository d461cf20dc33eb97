"""Run a federated scenario and write its run folder (like the CL runs).

``python run_scenario.py scenarios/fed_ffa_lora.yaml`` calls :func:`run_from_raw` for YAMLs
with a ``federated`` section; ``federated.mode`` picks the engine: ``inprocess``
(:mod:`adaptsim.federated.local_sim`), ``simulation`` (Flower simulation engine,
``adaptsim.federated.sim_engine.run_simulation_mode``) or ``deployment`` (SuperLink +
SuperNodes, ``adaptsim.federated.deploy.run_deployment_mode``).

Run folder: ``config.yaml`` (resolved), ``metrics.json`` (``rounds``: one dict per round with
accuracy, loss, per-client epsilon, bytes up/down, seconds, replies, failures; ``summary``),
``accuracy_vs_round.png``, ``accuracy_vs_epsilon.png`` and ``checkpoints/round_NNN.{npz,json}``
(global arrays; client states and metrics so far). An in-process run continues from its last
checkpoint with ``python -m adaptsim.federated.runner --resume RUN_DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from adaptsim.cl.config import read_yaml, write_yaml
from adaptsim.federated.config import FedExperimentConfig, load_fed_experiment

log = logging.getLogger(__name__)

__all__ = ["FedRunResult", "run_from_raw", "run_fed", "write_fed_outputs", "summarize_rounds",
           "new_run_dir", "plot_accuracy_vs_epsilon"]


@dataclass
class FedRunResult:
    """Attributes: run_dir (the run folder), metrics (what metrics.json holds)."""

    run_dir: Path
    metrics: dict[str, Any]


def new_run_dir(cfg: FedExperimentConfig) -> Path:
    """Creates ``run.out_dir / (run.name or <yaml stem>-<method>-<time>)`` with ``config.yaml``.

    Raises:
        FileExistsError: if the folder already holds a finished run.
    """
    name = cfg.run.name or f"{Path(cfg.source).stem or 'fed'}-{cfg.federated.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run.out_dir) / name
    if (run_dir / "metrics.json").exists():
        raise FileExistsError(f"run folder {run_dir} already holds a finished run; choose another run.name")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_yaml(cfg.to_raw(), run_dir / "config.yaml")
    return run_dir


def _finite_max(values) -> float:
    vals = [float(v) for v in values]
    return max(vals) if vals else math.nan


def summarize_rounds(rounds: list[dict]) -> dict[str, Any]:
    """Final/best accuracy, max client epsilon, total bytes and seconds over the rounds."""
    if not rounds:
        return {}
    last = rounds[-1]
    return {"final_accuracy": last["accuracy"], "best_accuracy": max(r["accuracy"] for r in rounds),
            "final_loss": last["loss"], "max_epsilon": _finite_max(last["epsilon"].values()),
            "bytes_up": sum(r["bytes_up"] for r in rounds), "bytes_down": sum(r["bytes_down"] for r in rounds),
            "seconds": sum(r["seconds"] for r in rounds), "rounds": len(rounds),
            "failures": sum(r.get("failures", 0) for r in rounds)}


def _json_safe(obj):
    """inf/nan -> null (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def plot_accuracy_vs_epsilon(series: Mapping[str, tuple[list[float], list[float]]], path: Path,
                             title: str = "") -> None:
    """Accuracy (y, 0..1) against epsilon (x) for named series; non-finite epsilons are dropped.

    Args:
        series: label -> (epsilons, accuracies).
        path: PNG to write.
        title: figure title.
    """
    from adaptsim.cl.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    drawn = 0
    for label, (eps, acc) in series.items():
        pts = [(e, a) for e, a in zip(eps, acc) if e is not None and math.isfinite(e)]
        if pts:
            ax.plot([e for e, _ in pts], [100 * a for _, a in pts], marker="o", label=label)
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no DP in this run (epsilon = inf)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epsilon spent (max over clients)")
    ax.set_ylabel("global test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_fed_outputs(cfg: FedExperimentConfig, rounds: list[dict], run_dir: Path) -> dict[str, Any]:
    """Writes ``metrics.json`` and the two plots (used by every mode, Flower's included).

    Args:
        cfg: the experiment.
        rounds: the round metrics.
        run_dir: the run folder.

    Returns:
        The metrics dict written (``rounds``, ``summary``, ``config_hash``, ``method``, ``mode``).
    """
    run_dir = Path(run_dir)
    metrics = {"method": cfg.federated.method, "mode": cfg.federated.mode,
               "config_hash": cfg.config_hash(), "rounds": rounds, "summary": summarize_rounds(rounds)}
    (run_dir / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=1))
    if cfg.run.plots and rounds:
        from adaptsim.cl.plots import plot_curve

        plot_curve([r["accuracy"] for r in rounds], run_dir / "accuracy_vs_round.png", xlabel="round",
                   ylabel="global test accuracy (%)", x=[r["round"] for r in rounds],
                   title=f"{cfg.federated.method} ({cfg.federated.mode})")
        eps = [_finite_max(r["epsilon"].values()) for r in rounds]
        plot_accuracy_vs_epsilon({cfg.federated.method: (eps, [r["accuracy"] for r in rounds])},
                                 run_dir / "accuracy_vs_epsilon.png", title=f"target epsilon {cfg.federated.dp.epsilon}")
    return metrics


def run_fed(cfg: FedExperimentConfig | None = None, *, resume: str | Path | None = None,
            stop_after: int | None = None) -> FedRunResult:
    """Runs (or resumes) a federated experiment and writes its run folder.

    Args:
        cfg: the experiment (read from ``RUN_DIR/config.yaml`` when resuming).
        resume: an in-process run folder to continue from its last checkpoint.
        stop_after: stop after this many rounds (in-process only; simulates a killed run).

    Returns:
        The run folder and metrics.

    Raises:
        ValueError: if neither ``cfg`` nor ``resume`` is given, or resume is asked of a Flower mode.
    """
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_fed_experiment(read_yaml(run_dir / "config.yaml"), source=str(run_dir))
    elif cfg is None:
        raise ValueError("run_fed needs a config or resume=RUN_DIR")
    else:
        run_dir = new_run_dir(cfg)
    fed = cfg.federated
    if fed.num_threads:
        torch.set_num_threads(fed.num_threads)
    if fed.method == "fednano" and fed.mode == "inprocess":  # FedNano's own loop (split training)
        if resume is not None:
            raise ValueError("resume is not supported for federated.method=fednano")
        from adaptsim.federated.fednano.loop import run_inprocess_fednano

        rounds = run_inprocess_fednano(cfg, run_dir, on_round=lambda rs: write_fed_outputs(cfg, rs, run_dir) and None)
    elif fed.mode == "inprocess":
        from adaptsim.federated.local_sim import run_inprocess

        rounds = run_inprocess(cfg, run_dir, resume=resume is not None, stop_after=stop_after,
                               on_round=lambda rs: write_fed_outputs(cfg, rs, run_dir) and None)
    elif resume is not None:
        raise ValueError(f"resume is supported for federated.mode=inprocess, not {fed.mode!r}")
    elif fed.mode == "simulation":
        from adaptsim.federated.sim_engine import run_simulation_mode

        rounds = run_simulation_mode(cfg, run_dir)
    else:
        from adaptsim.federated.deploy import run_deployment_mode

        rounds = run_deployment_mode(cfg, run_dir)
    metrics = write_fed_outputs(cfg, rounds, run_dir)
    log.info("federated run %s: %s", run_dir, metrics["summary"])
    return FedRunResult(run_dir, metrics)


def run_from_raw(raw: Mapping[str, Any], source: str = "") -> FedRunResult:
    """Entry used by ``run_scenario.py``: strict config from the raw YAML, then :func:`run_fed`."""
    return run_fed(load_fed_experiment(raw, source))


def main(argv: list[str] | None = None) -> int:
    """``python -m adaptsim.federated.runner (CONFIG.yaml | --resume RUN_DIR)``."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("config", nargs="?")
    p.add_argument("--resume", metavar="RUN_DIR")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.resume:
        result = run_fed(resume=args.resume)
    else:
        result = run_from_raw(read_yaml(args.config), source=args.config)
    print(f"run folder: {result.run_dir}")
    print(json.dumps(_json_safe(result.metrics["summary"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
