"""Run a federated scenario and write its run folder (like the CL runs).

``adaptsim run scenarios/fed_ffa_lora.yaml`` runs YAMLs with a ``federated`` section as the run
kind of their method (``federated`` or ``fednano``, see :mod:`adaptsim.federated.runkinds`);
:func:`run_rounds` is their run function. ``federated.mode`` picks the engine: ``inprocess``
(the one in-process round engine, :mod:`adaptsim.federated.local_sim`), ``simulation`` (Flower simulation engine,
``adaptsim.federated.sim_engine.run_simulation_mode``) or ``deployment`` (SuperLink +
SuperNodes, ``adaptsim.federated.deploy.run_deployment_mode``).

Run folder: ``config.yaml`` (resolved), ``metrics.json`` (``rounds``: one dict per round with
accuracy, loss, per-client epsilon, bytes up/down, seconds, replies, failures; ``summary``),
``accuracy_vs_round.png``, ``accuracy_vs_epsilon.png`` and ``checkpoints/round_NNN.{npz,json}``
(global arrays; client states and metrics so far). An in-process run continues from its last
checkpoint with ``adaptsim run --resume RUN_DIR`` (any method).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from adaptsim.cl.config import ConfigError
from adaptsim.cl.rundir import RunDir
from adaptsim.federated.config import FedExperimentConfig, load_fed_experiment

log = logging.getLogger(__name__)

__all__ = ["run_from_raw", "run_fed", "run_rounds", "write_fed_outputs", "summarize_rounds",
           "new_run_dir", "kind_of", "plot_accuracy_vs_epsilon"]


def new_run_dir(cfg: FedExperimentConfig) -> Path:
    """A new run folder for ``cfg`` (``config.yaml``, status ``running``), for Flower's own
    ``flwr run .`` launches that do not go through the run engine.

    Raises:
        RunDirError: if the folder already holds a finished run.
    """
    from adaptsim.cl.engine import run_folder_name
    from adaptsim.cl.runkinds import get_run_kind

    kind = get_run_kind(kind_of(cfg))
    return RunDir.create(cfg.run.out_dir, run_folder_name(kind, cfg), cfg.to_raw(), kind.name).path


def kind_of(cfg: FedExperimentConfig) -> str:
    """The run kind of a federated config (its method's ``run_kind``: ``federated`` or ``fednano``)."""
    from adaptsim.federated.methods import fed_method_class

    return fed_method_class(cfg.federated.method).run_kind


def _finite_max(values) -> float:
    vals = [float(v) for v in values]
    return max(vals) if vals else math.nan


def summarize_rounds(rounds: list[dict], dp: Any = None) -> dict[str, Any]:
    """Final/best accuracy, max client epsilon, total bytes and seconds over the rounds.

    ``max_epsilon`` is the largest epsilon any client reported in any round (the server's audit
    trail: a client that lost its accountant cannot lower it). ``privacy`` says how to read it
    (:func:`adaptsim.federated.privacy.privacy_label` of ``dp``, else the rounds' own ``privacy``
    key): ``"not private (reproducible noise)"`` for ``dp.reproducible`` runs.
    """
    if not rounds:
        return {}
    last = rounds[-1]
    out = {"final_accuracy": last["accuracy"], "best_accuracy": max(r["accuracy"] for r in rounds),
           "final_loss": last["loss"], "max_epsilon": _finite_max(e for r in rounds for e in r["epsilon"].values()),
           "bytes_up": sum(r["bytes_up"] for r in rounds), "bytes_down": sum(r["bytes_down"] for r in rounds),
           "seconds": sum(r["seconds"] for r in rounds), "rounds": len(rounds),
           "failures": sum(r.get("failures", 0) for r in rounds)}
    if dp is not None:
        from adaptsim.federated.privacy import privacy_label

        out["privacy"] = privacy_label(dp)
    elif any("privacy" in r for r in rounds):
        from adaptsim.federated.privacy import NOT_PRIVATE

        labels = {r["privacy"] for r in rounds if "privacy" in r}
        out["privacy"] = NOT_PRIVATE if NOT_PRIVATE in labels else sorted(labels)[0]
    return out


def plot_accuracy_vs_epsilon(series: Mapping[str, tuple[list[float], list[float]]], path: Path,
                             title: str = "") -> None:
    """Accuracy (y, 0..1) against epsilon (x) for named series, as a PNG at ``path``
    (:func:`adaptsim.cl.report_plots.epsilon_png`; non-finite epsilons are dropped)."""
    from adaptsim.cl.report_plots import epsilon_png
    from adaptsim.cl.rundir import write_atomic

    write_atomic(path, epsilon_png(series, title))


def write_fed_outputs(cfg: FedExperimentConfig, rounds: list[dict], run_dir: Path | RunDir) -> dict[str, Any]:
    """Writes ``metrics.json`` and the two plots (used by every mode, Flower's included).

    Args:
        cfg: the experiment.
        rounds: the round metrics.
        run_dir: the run folder.

    Returns:
        The metrics dict written (``rounds``, ``summary``, ``config_hash``, ``method``, ``mode``).
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run_dir = rd.path
    metrics = {"method": cfg.federated.method, "mode": cfg.federated.mode,
               "config_hash": cfg.config_hash(), "rounds": rounds, "summary": summarize_rounds(rounds, dp=cfg.federated.dp)}
    rd.write_metrics(metrics)
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
            stop_after: int | None = None):
    """Runs (or resumes) a federated experiment through the run engine.

    Args:
        cfg: the experiment (read from ``RUN_DIR/config.yaml`` when resuming).
        resume: an in-process run folder to continue from its last checkpoint.
        stop_after: stop after this many rounds (in-process only; simulates a killed run).

    Returns:
        :class:`adaptsim.cl.engine.RunResult` (run folder and metrics).
    """
    from adaptsim.cl import engine

    if resume is not None:
        return engine.resume_run(resume, stop_after=stop_after)
    if cfg is None:
        raise ValueError("run_fed needs a config or resume=RUN_DIR")
    return engine.run_config(cfg, kind_of(cfg), stop_after=stop_after)


def run_rounds(cfg: FedExperimentConfig, rd: RunDir, *, resume: bool = False, stop_after: int | None = None,
               prepared: Any = None) -> dict[str, Any] | None:
    """The ``federated`` and ``fednano`` run kinds: every round into ``rd`` (``federated.mode``
    picks in-process, Flower's simulation engine or SuperLink + SuperNodes).

    Returns:
        The metrics written, or None when ``stop_after`` stopped an in-process run early.

    Raises:
        ConfigError: when resume is asked of a mode or method that cannot resume.
    """
    fed = cfg.federated
    run_dir = rd.path
    if fed.num_threads:
        torch.set_num_threads(fed.num_threads)
    if resume and fed.mode != "inprocess":
        raise ConfigError(f"resume is supported for federated.mode=inprocess, not mode {fed.mode!r}; "
                          f"start the run again")
    on_round = lambda rs: write_fed_outputs(cfg, rs, rd) and None  # noqa: E731
    if fed.mode == "inprocess":  # the one in-process round engine, for every method
        from adaptsim.federated.local_sim import run_inprocess

        rounds = run_inprocess(cfg, run_dir, resume=resume, stop_after=stop_after, on_round=on_round)
        if stop_after is not None and len(rounds) < fed.rounds:
            return None
    elif fed.mode == "simulation":
        from adaptsim.federated.sim_engine import run_simulation_mode

        rounds = run_simulation_mode(cfg, run_dir)
    else:
        from adaptsim.federated.deploy import run_deployment_mode

        rounds = run_deployment_mode(cfg, run_dir)
    metrics = write_fed_outputs(cfg, rounds, rd)
    log.info("federated run %s: %s", run_dir, metrics["summary"])
    return metrics


def run_from_raw(raw: Mapping[str, Any], source: str = ""):
    """Strict config from the raw YAML mapping, then :func:`run_fed`."""
    return run_fed(load_fed_experiment(raw, source))
