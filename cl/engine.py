"""The one run engine under every entry point (``adaptsim run``, ``adaptsim study``, Python).

``load(path, overrides)`` reads a scenario YAML, picks its run kind
(:mod:`adaptsim.cl.runkinds`) and builds the typed config; :func:`run_config` checks it can run
(``kind.prepare``), creates the run folder (:class:`adaptsim.cl.rundir.RunDir`), marks it
``running``, runs the kind, and marks it ``finished``, or ``failed`` with the error.
:func:`resume_run` continues a folder from its last checkpoint. A config that cannot run leaves
no folder; a run that fails leaves its folder marked ``failed``, never one that looks finished.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from adaptsim.cl.config import ConfigError, read_yaml
from adaptsim.cl.rundir import RunDir, RunDirError
from adaptsim.cl.runkinds import RunKind, get_run_kind, resolve_kind

log = logging.getLogger(__name__)

__all__ = ["RunResult", "load", "load_raw", "run_config", "resume_run", "run_folder_name", "USER_ERRORS"]


def _user_errors() -> tuple[type[BaseException], ...]:
    from adaptsim.cl.backbones import PretrainedWeightsUnavailableError
    from adaptsim.cl.data import DatasetNotFoundError

    return (ConfigError, DatasetNotFoundError, PretrainedWeightsUnavailableError)


USER_ERRORS = _user_errors()
"""Exceptions that are the user's to fix: the CLI prints them as one ``error:`` line, exit 2."""


@dataclass
class RunResult:
    """Attributes: run_dir (the run folder), metrics (what ``metrics.json`` holds; ``{}`` for a
    run stopped early), kind (the run kind's name), finished."""

    run_dir: Path
    metrics: dict[str, Any]
    kind: str = "continual"
    finished: bool = True


def load_raw(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
             source: str = "") -> tuple[RunKind, Any]:
    """Kind and typed config of a raw mapping with dotted ``overrides`` applied."""
    overrides = dict(overrides or {})
    kind_override = overrides.pop("kind", None)
    raw = dict(raw)
    if kind_override is not None:
        raw["kind"] = kind_override
    kind, body = resolve_kind(raw, source)
    return kind, kind.config_from_raw(kind.preprocess(body, overrides), str(source))


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> tuple[RunKind, Any]:
    """Read the YAML at ``path``; returns its run kind and typed config (strict)."""
    return load_raw(read_yaml(path), overrides, str(path))


def run_folder_name(kind: RunKind, cfg: Any) -> str:
    """``run.name``, else ``<yaml stem>-<method>-<time>``."""
    import time

    return cfg.run.name or f"{Path(cfg.source).stem or kind.name}-{kind.label(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"


def _execute(kind: RunKind, cfg: Any, rd: RunDir, *, resume: bool, stop_after: int | None,
             prepared: Any) -> RunResult:
    rd.mark_running()
    try:
        metrics = kind.run(cfg, rd, resume=resume, stop_after=stop_after, prepared=prepared)
    except BaseException as exc:  # noqa: BLE001  (KeyboardInterrupt too: the folder must say so)
        msg = str(exc) or type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):
            msg = "interrupted (KeyboardInterrupt); resume with `adaptsim run --resume`"
        elif not isinstance(exc, USER_ERRORS):
            msg = f"{type(exc).__name__}: {msg}"
        rd.mark_failed(msg)
        raise
    if metrics is None:  # stopped early on purpose: stays "running", resumable
        return RunResult(rd.path, {}, kind.name, finished=False)
    rd.mark_finished(kind.summary(metrics))
    if cfg.run.plots:
        _single_report(rd)
    return RunResult(rd.path, dict(metrics), kind.name)


def _single_report(rd: RunDir) -> None:
    from adaptsim.cl.report import write_run_report

    write_run_report(rd.path)


def run_config(cfg: Any, kind: str | RunKind, *, stop_after: int | None = None) -> RunResult:
    """Run ``cfg`` as run kind ``kind`` into a new run folder under ``cfg.run.out_dir``.

    Raises:
        ConfigError: when the config cannot run (no folder is left behind).
    """
    kind = get_run_kind(kind) if isinstance(kind, str) else kind
    prepared = kind.prepare(cfg)
    rd = RunDir.create(cfg.run.out_dir, run_folder_name(kind, cfg), cfg.to_raw(), kind.name)
    log.info("run folder %s", rd.path)
    return _execute(kind, cfg, rd, resume=False, stop_after=stop_after, prepared=prepared)


def resume_run(run_dir: str | Path, *, stop_after: int | None = None) -> RunResult:
    """Continue a run folder from its last checkpoint (a finished one is returned as it is).

    Raises:
        RunDirError: if ``run_dir`` is not a run folder, or its kind cannot resume.
    """
    rd = RunDir.open(run_dir)
    raw = rd.config()
    kind, cfg = load_raw(raw, {}, str(rd.path / "config.yaml"))
    if rd.finished:
        log.info("%s is already finished", rd.path)
        return RunResult(rd.path, rd.metrics(), kind.name)
    if not kind.resumable:
        raise RunDirError(f"{rd.path}: runs of kind {kind.name!r} cannot be resumed; start it again")
    prepared = kind.prepare(cfg)
    return _execute(kind, cfg, rd, resume=True, stop_after=stop_after, prepared=prepared)
