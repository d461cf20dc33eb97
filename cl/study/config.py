"""Study files: the strict ``study:`` section, and a study resolved into its cells.

A study file holds one ``study:`` mapping::

    study:
      name: split_mnist_methods            # the folder <out_dir>/<name>/
      base: ../split_mnist.yaml            # a scenario YAML (relative to this file, else the CWD)
      seeds: [0, 1, 2]
      grid:                                # axis -> entries; each entry is a set of dotted overrides
        strategy: [{strategy.name: simplecil}, {strategy.name: mos, strategy.epochs: 5}]
      baseline: {strategy.name: simplecil} # the group the table compares against (optional)
      overrides: {train.device: cpu}       # applied to every cell (optional)
      metrics: [A_last, forgetting]        # the table's columns (optional; the aggregator's default)
      workers: 2                           # local Ray workers (0 = in this process)
      threads_per_worker: null             # default max(1, cpu_count // workers)
      out_dir: runs/studies

:func:`load_study` resolves it: every cell's config is built through the run engine before any
cell runs, so a bad override fails the whole study with one error naming the cell. Overrides
given with the study (the ``adaptsim study`` command line) apply to every cell, after the grid;
those starting with ``study.`` set the study's own keys (``--study.seeds=[0]``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from adaptsim.cl.config import ConfigError, apply_overrides, from_dict, read_yaml, unknown_key_error
from adaptsim.cl.rundir import json_safe
from adaptsim.cl.study.grid import Cell, baseline_group, build_cells

__all__ = ["StudyConfig", "Study", "CellPlan", "load_study", "study_from_raw"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
def _check_overrides(where: str, entry: Any) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a mapping of dotted overrides (key: value), got {entry!r}")
    for key in entry:
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise ValueError(f"{where}: {key!r} is not a dotted key such as strategy.name")
        if key.split(".")[0] == "study":
            raise ValueError(f"{where}: {key!r} sets the study itself; only scenario keys can vary")


@dataclass(frozen=True)
class StudyConfig:
    """The ``study:`` section (see the module docstring for every key)."""

    name: str = ""
    base: str = ""
    seeds: tuple[int, ...] = (0,)
    grid: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    workers: int = 2
    threads_per_worker: int | None = None
    out_dir: str = "runs/studies"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("study.name is required (it names the study folder)")
        if not _NAME.match(self.name):
            raise ValueError(f"study.name {self.name!r} must be a folder name (letters, digits, '.', '_', '-')")
        if not self.base:
            raise ValueError("study.base is required: the scenario YAML every cell starts from")
        if not self.seeds:
            raise ValueError("study.seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds has repeated seeds: {list(self.seeds)}")
        for axis, entries in self.grid.items():
            if not isinstance(axis, str) or not axis:
                raise ValueError(f"study.grid: axis names must be strings, got {axis!r}")
            if not isinstance(entries, list) or not entries:
                raise ValueError(f"study.grid.{axis} must be a non-empty list of override mappings, got {entries!r}")
            for i, entry in enumerate(entries):
                _check_overrides(f"study.grid.{axis}[{i}]", entry)
        if self.baseline is not None:
            _check_overrides("study.baseline", self.baseline)
        _check_overrides("study.overrides", self.overrides)
        if self.workers < 0:
            raise ValueError("study.workers must be >= 0 (0 runs the cells in this process)")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError("study.threads_per_worker must be >= 1 (or null for cpu_count // workers)")

    def __hash__(self) -> int:  # dict fields: hash by name (never used as a key)
        return hash(self.name)


@dataclass(frozen=True)
class CellPlan:
    """A cell with its resolved run config.

    Attributes:
        cell: name, group, seed and grid overrides.
        kind: the run kind's name.
        config: the resolved raw config (``kind`` first), what the cell's ``config.yaml`` holds.
        resumable: whether the kind resumes from checkpoints.
    """

    cell: Cell
    kind: str
    config: dict[str, Any]
    resumable: bool


@dataclass(frozen=True)
class Study:
    """A resolved study.

    Attributes:
        cfg: the ``study:`` section (with ``study.`` overrides, ``workers``/``out_dir`` arguments).
        source: the study file.
        base_path: the resolved base scenario.
        overrides: the command-line overrides applied to every cell (without ``study.`` ones).
        cells: every cell, in grid order.
        baseline_group: the baseline's group (None without ``study.baseline``).
        threads_per_worker: CPU threads of each cell.
        study_dir: ``<out_dir>/<name>`` (absolute).
        fingerprint: hash of what decides the results (base config, grid, seeds, overrides).
    """

    cfg: StudyConfig
    source: Path
    base_path: Path
    overrides: dict[str, Any]
    cells: list[CellPlan]
    baseline_group: str | None
    threads_per_worker: int
    study_dir: Path
    fingerprint: str

    def resolved(self) -> dict[str, Any]:
        """What ``study.yaml`` holds: the ``study:`` section as resolved, and how it was resolved."""
        cfg = self.cfg
        study = {"name": cfg.name, "base": cfg.base, "seeds": list(cfg.seeds), "grid": cfg.grid,
                 "baseline": cfg.baseline, "overrides": {**cfg.overrides, **self.overrides},
                 "metrics": list(cfg.metrics), "workers": cfg.workers,
                 "threads_per_worker": self.threads_per_worker, "out_dir": cfg.out_dir}
        return json_safe({"study": study,
                          "resolved": {"source": str(self.source), "base_path": str(self.base_path),
                                       "command_line_overrides": self.overrides,
                                       "kinds": sorted({c.kind for c in self.cells}),
                                       "cells": len(self.cells), "baseline_group": self.baseline_group,
                                       "fingerprint": self.fingerprint}})


def _resolve_base(base: str, source: Path) -> Path:
    p = Path(base).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [source.parent / p, Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"{source}: study.base {base!r} not found (looked for {', '.join(map(str, candidates))})")


def _split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    study, cells = {}, {}
    for k, v in overrides.items():
        (study if k.split(".")[0] == "study" else cells)[k] = v
    return study, cells


def default_threads(workers: int) -> int:
    """``max(1, cpu_count // workers)`` (all cores for ``workers=0``, one process)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _cell_config(base_raw: dict[str, Any], overrides: Mapping[str, Any], source: str) -> tuple[Any, Any]:
    from adaptsim.cl import engine

    return engine.load_raw(base_raw, overrides, source)


def study_from_raw(raw: Mapping[str, Any], source: str | Path, overrides: Mapping[str, Any] | None = None, *,
                   workers: int | None = None, out_dir: str | Path | None = None) -> Study:
    """Resolve a study file's mapping (see :func:`load_study`)."""
    source = Path(source)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a study file is a mapping with one 'study:' section")
    for key in raw:
        if key != "study":
            raise unknown_key_error("top level of a study file", str(key), ["study"])
    study_ov, cell_ov = _split_overrides(dict(overrides or {}))
    body = apply_overrides({"study": dict(raw.get("study") or {})}, study_ov)["study"]
    if workers is not None:
        body["workers"] = workers
    if out_dir is not None:
        body["out_dir"] = str(out_dir)
    if not raw.get("study"):
        raise ConfigError(f"{source}: the 'study:' section is missing or empty")
    try:
        cfg = from_dict(StudyConfig, body, "study")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    base_path = _resolve_base(cfg.base, source)
    base_raw = read_yaml(base_path)
    cells = build_cells(cfg.grid, cfg.seeds)
    baseline = baseline_group(cells, cfg.baseline)
    threads = cfg.threads_per_worker or default_threads(cfg.workers)
    study_dir = (Path(cfg.out_dir).expanduser() / cfg.name).resolve()

    plans, thread_keys = [], set()
    for cell in cells:
        common = {**cfg.overrides, **cell.overrides, **cell_ov}
        run = {"run.out_dir": str(study_dir / "cells"), "run.name": cell.name, "run.seed": cell.seed}
        try:
            kind, probe = _cell_config(base_raw, {**common, **run}, str(base_path))
            defaults = {kind.threads_key: threads}
            run.update({k: cell.seed for k in kind.seed_keys})
            train = getattr(probe, "train", None)
            if train is not None and hasattr(train, "progress"):
                defaults["train.progress"] = False
            # The study's thread count goes under the overrides, so an explicit one still wins.
            kind, cellcfg = _cell_config(base_raw, {**defaults, **common, **run}, str(base_path))
        except ConfigError as exc:
            raise ConfigError(f"{source}: cell {cell.name}: {exc}") from None
        thread_keys.add(kind.threads_key)
        plans.append(CellPlan(cell, kind.name, {"kind": kind.name, **cellcfg.to_raw()},
                              kind.resumable))

    # What decides the results: a folder holding another fingerprint is another study.
    ident = {"base": cfg.base, "base_config": base_raw, "seeds": list(cfg.seeds), "grid": cfg.grid,
             "overrides": {k: v for k, v in {**cfg.overrides, **cell_ov}.items() if k not in thread_keys}}
    fingerprint = hashlib.sha1(json.dumps(json_safe(ident), sort_keys=True).encode()).hexdigest()[:16]
    return Study(cfg, source, base_path, cell_ov, plans, baseline, threads, study_dir, fingerprint)


def load_study(path: str | Path, overrides: Mapping[str, Any] | None = None, *, workers: int | None = None,
               out_dir: str | Path | None = None) -> Study:
    """Read and resolve a study file: every cell's config is built (strictly) before any runs.

    Args:
        path: the study YAML.
        overrides: dotted overrides for every cell; ``study.*`` keys set the study's own keys.
        workers: replaces ``study.workers`` when given.
        out_dir: replaces ``study.out_dir`` when given.

    Raises:
        ConfigError: for any mistake in the study file, its base scenario or a cell's overrides
            (the message names the cell).
    """
    return study_from_raw(read_yaml(path), path, overrides, workers=workers, out_dir=out_dir)
