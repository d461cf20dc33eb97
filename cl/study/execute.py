"""Run a study's cells, in this process or on Ray, resuming what an earlier attempt left.

Each cell is a normal run folder ``<study_dir>/cells/<cell>/`` made by the run engine
(:func:`adaptsim.cl.engine.run_config`). The study folder's ``cells.json`` (the index) is
rewritten atomically whenever a cell ends. Rerunning the same study:

- a cell whose folder is ``finished`` is read, not run;
- a cell whose folder is still ``running`` (the study was killed) continues from its last
  checkpoint (:func:`adaptsim.cl.engine.resume_run`), or starts again when its kind cannot resume;
- a cell that failed is tried again while it has had fewer than :data:`MAX_ATTEMPTS` attempts
  (``attempts`` counts every start or continuation), then reported.

One cell failing never stops the others. Execution backends:

- ``workers=0``: every cell in this process, one after the other (debugging, tests);
- local Ray (default): ``ray.init(num_cpus=workers * threads)``, each cell a task asking for
  ``threads_per_worker`` CPUs, so at most ``workers`` cells run at once;
- an existing Ray cluster, ``address=``: ``auto``, ``HOST:PORT`` (the head's GCS port, from a
  machine that is part of the cluster) or ``ray://HOST:PORT`` (Ray Client, the head's
  ``--ray-client-server-port``). Each cell asks for ``threads_per_worker`` CPUs and the cluster
  decides how many run at once; the study folder must be on a file system the workers share.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from adaptsim.cl.config import ConfigError, read_yaml, write_yaml
from adaptsim.cl.rundir import FAILED, FINISHED, RUNNING, RunDir, is_run_dir, loads_json
from adaptsim.cl.study.config import CellPlan, Study, load_study

log = logging.getLogger(__name__)

__all__ = ["StudyResult", "run_study", "run_cell", "MAX_ATTEMPTS", "INDEX_FILE", "STUDY_FILE"]

MAX_ATTEMPTS = 2  # a failed cell is tried once more, then reported
INDEX_FILE, STUDY_FILE, LOCK_FILE = "cells.json", "study.yaml", ".lock"
PENDING = "pending"
RAY_OBJECT_STORE_BYTES = 200 * 1024**2  # cells return small dicts; don't reserve 30% of RAM


@dataclass
class StudyResult:
    """What :func:`run_study` returns.

    Attributes:
        study_dir: the study folder.
        table: the Markdown table (``study.md``), with a failed-cells section when any failed.
        failed: ``(cell, error)`` of every cell that ended failed.
        incomplete: cells neither finished nor failed (stopped early on purpose).
        cells: the index entries (``cells.json``'s ``cells``).
        ray_startup_s: seconds ``ray.init`` took (None in-process or on a Ray already running).
        wall_s: seconds of the whole call.
    """

    study_dir: Path
    table: str
    failed: list[tuple[str, str]] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    cells: list[dict[str, Any]] = field(default_factory=list)
    ray_startup_s: float | None = None
    wall_s: float = 0.0


# --- one cell (runs in a Ray worker or in this process) --------------------------------------
def _folder_error(run_dir: Path) -> str | None:
    if is_run_dir(run_dir):
        st = RunDir(run_dir).status()
        if st.get("status") == FAILED:
            return st.get("error")
    return None


def run_cell(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Run, retry or resume one cell; never raises for the cell's own errors.

    Args:
        payload: ``name``, ``action`` (``run``, ``restart`` or ``resume``), ``config`` (the
            resolved raw config with its ``kind``), ``source``, ``run_dir``, ``threads``.

    Returns:
        ``{"name", "status" (finished, failed or running), "error", "seconds", "summary"}``.
    """
    import torch

    from adaptsim.cl import engine

    t0 = time.perf_counter()
    run_dir = Path(payload["run_dir"])
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(payload["threads"]))
    status, error, summary = FAILED, None, {}
    try:
        if payload["action"] == "resume":
            result = engine.resume_run(run_dir)
        else:
            if payload["action"] == "restart" and run_dir.exists():
                shutil.rmtree(run_dir)  # a killed run of a kind that cannot resume starts over
            kind, cfg = engine.load_raw(payload["config"], {}, payload["source"])
            result = engine.run_config(cfg, kind)
        status = FINISHED if result.finished else RUNNING
        summary = RunDir(run_dir).status().get("summary") or {}
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001  (one failing cell never stops the others)
        user = isinstance(exc, engine.USER_ERRORS)
        error = _folder_error(run_dir) or (str(exc) if user else f"{type(exc).__name__}: {exc}")
        if not user and run_dir.is_dir():
            (run_dir / "traceback.txt").write_text(traceback.format_exc())
    finally:
        torch.set_num_threads(threads_before)
    return {"name": payload["name"], "status": status, "error": error,
            "seconds": time.perf_counter() - t0, "summary": summary}


# --- backends --------------------------------------------------------------------------------
def _in_process(payloads: list[dict[str, Any]], on_start) -> Iterator[dict[str, Any]]:
    for p in payloads:
        on_start(p["name"])
        yield run_cell(p)


class _Ray:
    """A Ray connection for one study: a local instance, or an existing cluster at ``address``."""

    def __init__(self, workers: int, threads: int, address: str | None) -> None:
        import ray

        self.ray = ray
        self.threads = threads
        self.started_here = False
        self.startup_s: float | None = None
        if ray.is_initialized():  # e.g. a notebook that called ray.init() itself: use it, leave it
            log.info("study: using the Ray instance already initialised in this process")
            return
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Ray's accelerator env-var notice
            try:
                if address:
                    self._connect(ray, address)
                else:
                    ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING, object_store_memory=RAY_OBJECT_STORE_BYTES)
            except (ConnectionError, TimeoutError) as exc:
                raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.started_here = True
        self.startup_s = time.perf_counter() - t0
        where = f"cluster at {address}" if address else f"local Ray with {workers} workers x {threads} threads"
        log.info("study: %s ready in %.1f s", where, self.startup_s)

    @staticmethod
    def _connect(ray: Any, address: str, attempts: int = 3, wait_s: float = 5.0) -> None:
        """``ray.init(address=...)``; a Ray Client (``ray://``) connection is retried a few times,
        since its server answers "Initialization failure" while it is still starting a worker
        for the previous driver on a busy machine."""
        for i in range(attempts):
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                return
            except ConnectionError:
                if not address.startswith("ray://") or i == attempts - 1:
                    raise
                log.warning("study: Ray Client at %s not ready (attempt %d of %d); retrying in %.0f s",
                            address, i + 1, attempts, wait_s)
                time.sleep(wait_s)

    def run(self, payloads: list[dict[str, Any]], on_start) -> Iterator[dict[str, Any]]:
        ray = self.ray
        task = ray.remote(num_cpus=self.threads, max_retries=0)(run_cell)
        refs = {}
        for p in payloads:
            refs[task.remote(p)] = p["name"]
            on_start(p["name"])
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                name = refs.pop(done[0])
                try:
                    yield ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the worker died, or the task could not run
                    msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    yield {"name": name, "status": FAILED, "error": f"{type(exc).__name__}: {msg}",
                           "seconds": None, "summary": {}}
        finally:
            for ref in refs:  # interrupted: stop what is still queued or running
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


# --- the study folder ------------------------------------------------------------------------
def _read_index(study_dir: Path) -> dict[str, dict[str, Any]]:
    f = study_dir / INDEX_FILE
    if not f.is_file():
        return {}
    return {c["name"]: c for c in loads_json(f.read_text()).get("cells", [])}


def _write_index(study: Study, entries: dict[str, dict[str, Any]]) -> None:
    RunDir(study.study_dir).write_json(INDEX_FILE, {"study": study.cfg.name, "baseline_group": study.baseline_group,
                                                    "cells": list(entries.values())})


def _check_same_study(study: Study) -> None:
    f = study.study_dir / STUDY_FILE
    if not f.is_file():
        return
    old = (read_yaml(f).get("resolved") or {}).get("fingerprint")
    if old != study.fingerprint:
        raise ConfigError(f"the study folder {study.study_dir} holds a different study (its base scenario, seeds, "
                          "grid or overrides changed); give this study another study.name or --out-dir, "
                          "or rerun the study as it was")


def _take_lock(study_dir: Path) -> Path:
    lock = study_dir / LOCK_FILE
    host = socket.gethostname()
    if lock.is_file():
        try:
            held = loads_json(lock.read_text())
        except ValueError:
            held = {}
        pid = held.get("pid")
        if held.get("host") == host and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            raise ConfigError(f"the study in {study_dir} is being run by process {pid}; wait for it or stop it")
    RunDir(study_dir).write_json(LOCK_FILE, {"pid": os.getpid(), "host": host})
    return lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _plan(study: Study, index: dict[str, dict[str, Any]], retry_failed: bool) -> tuple[dict, list]:
    """Index entries for every cell, and ``(plan, action)`` for the cells to run now."""
    entries, todo = {}, []
    for plan in study.cells:
        c = plan.cell
        old = index.get(c.name, {})
        e = {"name": c.name, "group": c.group, "seed": c.seed, "overrides": c.overrides,
             "status": PENDING, "error": None, "attempts": int(old.get("attempts") or 0),
             "run_dir": f"cells/{c.name}", "seconds": old.get("seconds")}
        entries[c.name] = e
        folder = study.study_dir / "cells" / c.name
        state = RunDir(folder).status().get("status") if is_run_dir(folder) else None
        if state == FINISHED:
            e["status"] = FINISHED
            continue
        if old.get("status") == FAILED and not retry_failed and e["attempts"] >= MAX_ATTEMPTS:
            e.update(status=FAILED, error=old.get("error") or _folder_error(folder))
            continue
        if retry_failed and old.get("status") == FAILED:
            e["attempts"] = 0
        if state == RUNNING:
            todo.append((plan, "resume" if plan.resumable else "restart"))
        else:  # no folder yet, or one that failed (the engine clears and reuses it)
            todo.append((plan, "run"))
    return entries, todo


def _payload(study: Study, plan: CellPlan, action: str) -> dict[str, Any]:
    return {"name": plan.cell.name, "action": action, "config": plan.config, "source": str(study.base_path),
            "run_dir": str(study.study_dir / "cells" / plan.cell.name), "threads": study.threads_per_worker}


def _headline(summary: Mapping[str, Any], metrics: tuple[str, ...]) -> str:
    key = next((m for m in metrics if m in summary), next(iter(summary), None))
    if key is None or not isinstance(summary[key], (int, float)):
        return ""
    return f" ({key}={summary[key]:.4g})"


# --- the table -------------------------------------------------------------------------------
def _failure_section(failed: list[tuple[str, str]]) -> str:
    lines = ["", "## Failed cells", "", "| cell | error |", "|---|---|"]
    lines += [f"| {name} | {(err or 'unknown error').splitlines()[0].replace('|', '/')} |" for name, err in failed]
    return "\n".join(lines) + "\n"


def _finish_table(study: Study, entries: dict[str, dict[str, Any]], failed: list[tuple[str, str]]) -> str:
    from adaptsim.cl.report import write_report
    from adaptsim.cl.study.aggregate import aggregate_study

    table = aggregate_study(study.study_dir)["table"]
    if failed and not all(name in table for name, _ in failed):
        table = table.rstrip("\n") + "\n" + _failure_section(failed)
    write_report(study.study_dir)
    return table


# --- the entry point -------------------------------------------------------------------------
def run_study(path: str | Path, overrides: Mapping[str, Any] | None = None, *, workers: int | None = None,
              address: str | None = None, out_dir: str | Path | None = None,
              retry_failed: bool = False) -> StudyResult:
    """Run (or continue) the study in ``path`` and aggregate it.

    Args:
        path: the study YAML.
        overrides: dotted overrides for every cell (``study.*`` ones set the study's keys).
        workers: local Ray workers (replaces ``study.workers``); 0 runs every cell in this process.
        address: an existing Ray cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``).
        out_dir: the study folder's parent (replaces ``study.out_dir``).
        retry_failed: give cells that used up their attempts a fresh budget.

    Returns:
        The study folder, its table, and the cells that failed.

    Raises:
        ConfigError: for a mistake in the study (before any cell runs), a study folder holding
            another study or used by a live process, or a Ray cluster that cannot be reached.
    """
    t_start = time.perf_counter()
    if address and workers == 0:
        raise ConfigError("--workers 0 runs in this process; it cannot be combined with --address")
    study = load_study(path, overrides, workers=workers, out_dir=out_dir)
    sdir = study.study_dir
    sdir.mkdir(parents=True, exist_ok=True)
    _check_same_study(study)
    lock = _take_lock(sdir)
    try:
        write_yaml(study.resolved(), sdir / STUDY_FILE)
        entries, todo = _plan(study, _read_index(sdir), retry_failed)
        _write_index(study, entries)
        result = _execute(study, entries, todo, address)
        failed = [(e["name"], e["error"] or "unknown error") for e in entries.values() if e["status"] == FAILED]
        result.failed = failed
        result.incomplete = [e["name"] for e in entries.values() if e["status"] in (PENDING, RUNNING)]
        result.cells = list(entries.values())
        result.table = _finish_table(study, entries, failed)
    finally:
        lock.unlink(missing_ok=True)
    result.wall_s = time.perf_counter() - t_start
    return result


def _execute(study: Study, entries: dict[str, dict[str, Any]], todo: list, address: str | None) -> StudyResult:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    total = len(entries)
    done = sum(e["status"] in (FINISHED, FAILED) for e in entries.values())
    result = StudyResult(study.study_dir, "")
    if not todo:
        log.info("study %s: all %d cells already done", study.cfg.name, total)
        return result
    log.info("study %s: %d cells, %d to run (%s), folder %s", study.cfg.name, total, len(todo),
             "in this process" if study.cfg.workers == 0 and not address else "on Ray", study.study_dir)
    payloads = [_payload(study, plan, action) for plan, action in todo]
    actions = {p["name"]: p["action"] for p in payloads}

    def on_start(name: str) -> None:
        e = entries[name]
        e["attempts"] += 1
        e.update(status=RUNNING, error=None)
        _write_index(study, entries)

    backend = None
    if study.cfg.workers == 0 and not address:
        results = _in_process(payloads, on_start)
    else:
        backend = _Ray(study.cfg.workers, study.threads_per_worker, address)
        result.ray_startup_s = backend.startup_s
        results = backend.run(payloads, on_start)
    try:
        with logging_redirect_tqdm(), tqdm(total=total, initial=done, unit="cell", desc=study.cfg.name,
                                           disable=None, dynamic_ncols=True) as bar:
            for res in results:
                e = entries[res["name"]]
                e.update(status=res["status"], error=res["error"], seconds=res["seconds"])
                done += res["status"] in (FINISHED, FAILED)
                _write_index(study, entries)
                bar.update(res["status"] in (FINISHED, FAILED))
                secs = f"{res['seconds']:.1f} s" if res["seconds"] is not None else "?"
                verb = "resumed and finished" if actions[res["name"]] == "resume" else "finished"
                if res["status"] == FINISHED:
                    log.info("[%d/%d] %s %s in %s%s", done, total, res["name"], verb, secs,
                             _headline(res["summary"], study.cfg.metrics))
                elif res["status"] == FAILED:
                    log.warning("[%d/%d] %s failed after %s: %s", done, total, res["name"], secs, res["error"])
                else:
                    log.info("[%d/%d] %s stopped early; the next run continues it", done, total, res["name"])
    except KeyboardInterrupt:
        # In this process the engine marked the interrupted cell failed; that attempt does not count.
        for e in entries.values():
            if e["status"] == RUNNING and backend is None:
                e.update(status=PENDING, attempts=max(0, e["attempts"] - 1))
        _write_index(study, entries)
        raise
    finally:
        if backend is not None:
            backend.close()
    return result
