"""Aggregate a study folder: per group of seeds, mean ± std of each metric, and the paired
difference to the baseline group with a 95 % confidence interval.

Reads ``STUDY_DIR/cells.json`` and each finished cell's ``metrics.json`` through its run kind's
``summary`` (:func:`adaptsim.cl.runkinds.get_run_kind`), and writes ``study.json``, ``study.csv``
and ``study.md`` into the study folder (atomically).

Statistics:
    * mean and **sample** standard deviation (``ddof=1``) over the finished cells of a group;
      with one cell the std is not defined (shown as ``—``, ``null`` in JSON);
    * against the baseline group, cells are paired by seed (only seeds finished in both groups);
      the difference is ``group − baseline``, its 95 % CI is Student's t with ``n − 1`` degrees
      of freedom: ``mean(d) ± t.ppf(0.975, n − 1) · std(d, ddof=1) / √n``; fewer than two pairs:
      no CI (``—``).

Display rule (the Markdown table, and the HTML report, show exactly these strings; ``study.json``
holds the raw numbers and these strings under ``display``): :data:`UNITS` gives each unit's scale
and decimals; accuracies are ×100 with 2 decimals (differences in percentage points, ``pp``),
bytes are MB (10⁶ bytes) with 3 decimals, seconds with 2 decimals, parameter counts with 0,
other numbers with 3; see :func:`format_value`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from adaptsim.cl.config import ConfigError, read_yaml
from adaptsim.cl.rundir import FINISHED, RunDir, RunDirError, dumps_json, loads_json, write_atomic

__all__ = ["aggregate_study", "load_cells", "groups_of", "is_current", "metric_info", "mean_std", "paired_diff_ci",
           "format_value", "Cell",
           "METRICS", "UNITS"]

DASH = "—"

#: unit -> (scale applied before display, decimals, suffix for a difference column)
UNITS: dict[str, tuple[float, int, str]] = {
    "%": (100.0, 2, "pp"), "MB": (1e-6, 3, "MB"), "s": (1.0, 2, "s"), "count": (1.0, 0, ""), "": (1.0, 3, ""),
}

#: summary key -> (column label, unit), in table order; keys no kind reports are left out.
METRICS: dict[str, tuple[str, str]] = {
    "A_last": ("A_last", "%"), "avg_incremental_accuracy": ("Ā", "%"), "forgetting": ("forgetting", "%"),
    "bwt": ("BWT", "%"), "fwt": ("FWT", "%"), "mtil_transfer": ("MTIL transfer", "%"),
    "mtil_average": ("MTIL average", "%"), "mtil_last": ("MTIL last", "%"),
    "forget_train_acc": ("forgotten train acc", "%"), "forget_test_acc": ("forgotten test acc", "%"),
    "retained_test_acc": ("retained test acc", "%"), "final_accuracy": ("final acc", "%"),
    "best_accuracy": ("best acc", "%"), "final_loss": ("final loss", ""), "epsilon": ("ε", ""),
    "bytes_up": ("bytes up", "MB"), "bytes_down": ("bytes down", "MB"), "failures": ("client failures", "count"),
    "train_seconds": ("train", "s"), "eval_seconds": ("eval", "s"),
    "trainable_params": ("trainable params", "count"), "stored_params": ("stored params", "count"),
}


# -- pure statistics -----------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1) and count of the finite ``values``.

    Returns:
        ``(mean, std, n)``; ``mean`` is NaN for no values, ``std`` is NaN for fewer than two.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n >= 2 else math.nan
    return mean, std, n


def paired_diff_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float, int]:
    """Paired difference ``a − b`` with a Student-t confidence interval.

    Args:
        a: values of the compared group, one per seed.
        b: the baseline's values for the same seeds, in the same order.
        level: confidence level.

    Returns:
        ``(mean_diff, ci_low, ci_high, n_pairs)``; the CI bounds are NaN for fewer than two pairs.

    Raises:
        ValueError: if ``a`` and ``b`` differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(d.mean())
    if n < 2:
        return m, math.nan, math.nan, n
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return m, m - half, m + half, n


def format_value(v: float | None, unit: str, signed: bool = False) -> str:
    """The display string of ``v`` in ``unit`` (see the module docstring); ``—`` for None/NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    if isinstance(v, float) and math.isinf(v):
        return ("+" if signed and v > 0 else "") + ("∞" if v > 0 else "-∞")
    scale, dec, _ = UNITS[unit]
    return f"{v * scale:{'+' if signed else ''}.{dec}f}"


# -- reading the study folder --------------------------------------------------------------
@dataclass
class Cell:
    """One cell of ``cells.json`` with what its run folder holds (``metrics`` only when finished).

    Attributes:
        name, group, seed, status, error, attempts, overrides: as in ``cells.json``.
        run_dir: the cell's run folder (absolute).
        kind: the run kind (from the cell's ``status.json``), or None.
        metrics: the parsed ``metrics.json`` of a finished cell, else None.
        summary: the kind's scalar summary of ``metrics`` ({} when not finished).
    """

    name: str
    group: str
    seed: Any
    status: str
    run_dir: Path
    error: str | None = None
    attempts: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None
    metrics: dict[str, Any] | None = None
    summary: dict[str, float] = field(default_factory=dict)


def _summary(kind: str | None, metrics: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, float]:
    from adaptsim.cl.runkinds import get_run_kind

    try:
        return dict(get_run_kind(kind).summary(metrics)) if kind else {}
    except ConfigError:  # a kind this install does not have: the summary the run wrote
        return {k: float(v) for k, v in (status.get("summary") or {}).items() if isinstance(v, (int, float))}


def load_cells(study_dir: str | Path) -> tuple[dict[str, Any], list[Cell]]:
    """``cells.json`` and its cells, each finished one with its metrics and summary.

    A cell marked finished whose folder has no readable ``metrics.json`` is reported as failed.

    Raises:
        ConfigError: if ``study_dir`` has no ``cells.json``.
    """
    study_dir = Path(study_dir)
    f = study_dir / "cells.json"
    if not f.is_file():
        raise ConfigError(f"{study_dir} is not a study folder (no cells.json)")
    doc = loads_json(f.read_text())
    cells = []
    for c in doc.get("cells", []):
        cell = Cell(name=c["name"], group=c.get("group") or c["name"], seed=c.get("seed"),
                    status=c.get("status", "pending"), run_dir=study_dir / c.get("run_dir", f"cells/{c['name']}"),
                    error=c.get("error"), attempts=int(c.get("attempts") or 0),
                    overrides=dict(c.get("overrides") or {}))
        if cell.status == FINISHED:
            try:
                rd = RunDir.open(cell.run_dir)
                st = rd.status()
                cell.kind = st.get("kind") or rd.config().get("kind")
                cell.metrics = rd.metrics()
                cell.summary = _summary(cell.kind, cell.metrics, st)
            except (RunDirError, OSError, ValueError) as exc:
                cell.status, cell.error, cell.metrics = "failed", f"unreadable run folder: {exc}", None
        cells.append(cell)
    return doc, cells


def groups_of(cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    """Cells by group, groups in order of first appearance."""
    out: dict[str, list[Cell]] = {}
    for c in cells:
        out.setdefault(c.group, []).append(c)
    return out


def _common_overrides(cells: Sequence[Cell]) -> dict[str, Any]:
    """The overrides every cell of a group shares (what defines the group; the seed varies)."""
    if not cells:
        return {}
    first = cells[0].overrides
    return {k: v for k, v in first.items() if all(k in c.overrides and c.overrides[k] == v for c in cells[1:])}


def _metric_keys(cells: Sequence[Cell]) -> list[str]:
    present = {k for c in cells for k in c.summary}
    return [k for k in METRICS if k in present] + sorted(present - set(METRICS))


def _wanted_metrics(study_dir: Path) -> list[str]:
    """``study.metrics`` of ``study.yaml`` (the table's columns), [] when absent."""
    f = study_dir / "study.yaml"
    study = read_yaml(f, allow_empty=True).get("study") if f.is_file() else None
    wanted = study.get("metrics") if isinstance(study, Mapping) else None
    return [str(k) for k in wanted] if isinstance(wanted, list) else []


def metric_info(key: str) -> dict[str, Any]:
    """``{"key", "label", "unit", "header"}`` of a summary key (unknown keys: unit-less)."""
    label, unit = METRICS.get(key, (key, ""))
    suffix = {"%": " (%)", "MB": " (MB)", "s": " (s)"}.get(unit, "")
    return {"key": key, "label": label, "unit": unit, "header": label + suffix,
            "diff_header": label + (f" ({UNITS[unit][2]})" if UNITS[unit][2] else "")}


def _group_entry(name: str, cells: list[Cell], keys: list[str]) -> dict[str, Any]:
    done = [c for c in cells if c.status == FINISHED]
    entry: dict[str, Any] = {
        "group": name, "kind": next((c.kind for c in done if c.kind), None), "n": len(done),
        "n_cells": len(cells), "seeds": [c.seed for c in done], "cells": [c.name for c in cells],
        "overrides": _common_overrides(cells), "metrics": {}, "vs_baseline": None}
    for k in keys:
        vals = [c.summary[k] for c in done if k in c.summary]
        if not vals:
            continue
        m, s, n = mean_std(vals)
        unit = metric_info(k)["unit"]
        display = f"{format_value(m, unit)} ± {format_value(s, unit)}"
        if n == 0 and len(set(vals)) == 1 and math.isinf(vals[0]):  # e.g. ε = ∞ (no DP) in every seed
            m, display = vals[0], format_value(vals[0], unit)
        entry["metrics"][k] = {"mean": m, "std": s, "n": n, "values": vals, "display": display}
    return entry


def _vs_baseline(cells: list[Cell], base: list[Cell], keys: list[str]) -> dict[str, Any]:
    mine = {c.seed: c for c in cells if c.status == FINISHED}
    theirs = {c.seed: c for c in base if c.status == FINISHED}
    seeds = [s for s in mine if s in theirs]
    out: dict[str, Any] = {"seeds": seeds, "n_pairs": len(seeds), "metrics": {}}
    for k in keys:
        pairs = [(mine[s].summary[k], theirs[s].summary[k]) for s in seeds
                 if k in mine[s].summary and k in theirs[s].summary]
        if not pairs:
            continue
        d, lo, hi, n = paired_diff_ci([a for a, _ in pairs], [b for _, b in pairs])
        unit = metric_info(k)["unit"]
        ci = DASH if math.isnan(lo) else f"{format_value(lo, unit, True)}, {format_value(hi, unit, True)}"
        out["metrics"][k] = {"mean_diff": d, "ci_low": lo, "ci_high": hi, "n_pairs": n,
                             "display": f"{format_value(d, unit, True)} [{ci}]"}
    return out


def _md_cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _markdown(res: dict[str, Any]) -> str:
    infos = [metric_info(k) for k in res["metric_keys"]]
    base = res["baseline_group"]
    lines = [f"# Study {res['study']}", "",
             "Mean ± sample std (ddof=1) over the finished seeds of each group; n = finished cells. "
             "Accuracies in %, bytes in MB (10⁶ B), times in s."
             + (f" No cell reports {', '.join(res['missing_metrics'])}." if res["missing_metrics"] else ""), "",
             "| group | n | " + " | ".join(i["header"] for i in infos) + " |",
             "|---|---:|" + "---:|" * len(infos)]
    for g in res["groups"]:
        label = g["group"] + (" (baseline)" if g["group"] == base else "")
        cells = [g["metrics"][i["key"]]["display"] if i["key"] in g["metrics"] else DASH for i in infos]
        lines.append(f"| {_md_cell(label)} | {g['n']} | " + " | ".join(cells) + " |")
    others = [g for g in res["groups"] if g["vs_baseline"] is not None]
    if base is not None and others:
        lines += ["", f"## Paired difference vs baseline {base}", "",
                  "group − baseline, cells paired by seed; paired t, 95 % CI, n pairs "
                  "(— : fewer than 2 pairs). Accuracies in percentage points (pp).", "",
                  "| group | n pairs | " + " | ".join(i["diff_header"] for i in infos) + " |",
                  "|---|---:|" + "---:|" * len(infos)]
        for g in others:
            vb = g["vs_baseline"]
            cells = [vb["metrics"][i["key"]]["display"] if i["key"] in vb["metrics"] else DASH for i in infos]
            lines.append(f"| {_md_cell(g['group'])} | {vb['n_pairs']} | " + " | ".join(cells) + " |")
    elif base is not None:
        lines += ["", f"Baseline group {base!r} has no finished cells to compare against."
                  if base in {g["group"] for g in res["groups"]} else f"Baseline group {base!r} is not in the study."]
    if res["failed"]:
        lines += ["", "## Failed cells", "", "| cell | group | seed | attempts | error |", "|---|---|---|---:|---|"]
        lines += [f"| {_md_cell(c['name'])} | {_md_cell(c['group'])} | {c['seed']} | {c['attempts']} | "
                  f"{_md_cell(c['error'] or 'no error recorded')} |" for c in res["failed"]]
    if res["unfinished"]:
        lines += ["", "## Not finished", "", ", ".join(f"{c['name']} ({c['status']})" for c in res["unfinished"])]
    return "\n".join(lines) + "\n"


def _csv(res: dict[str, Any]) -> str:
    import csv
    import io

    keys, has_base = res["all_metric_keys"], res["baseline_group"] is not None
    header = ["group", "kind", "n", "seeds"]
    for k in keys:
        header += [f"{k}_mean", f"{k}_std"] + ([f"{k}_diff", f"{k}_ci_low", f"{k}_ci_high"] if has_base else [])

    def num(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for g in res["groups"]:
        row = [g["group"], g["kind"] or "", g["n"], " ".join(map(str, g["seeds"]))]
        for k in keys:
            m = g["metrics"].get(k, {})
            row += [num(m.get("mean")), num(m.get("std"))]
            if has_base:
                d = ((g["vs_baseline"] or {}).get("metrics") or {}).get(k, {})
                row += [num(d.get("mean_diff")), num(d.get("ci_low")), num(d.get("ci_high"))]
        w.writerow(row)
    return buf.getvalue()


def aggregate_study(study_dir: str | Path) -> dict[str, Any]:
    """Aggregate a study folder and write ``study.json``, ``study.csv`` and ``study.md`` into it.

    ``study.json`` (the project's JSON encoding, NaN → null) holds ``study``, ``baseline_group``,
    ``metric_keys`` (the table's columns: ``study.metrics`` of ``study.yaml`` where given, else
    every metric some cell reports), ``all_metric_keys``, ``missing_metrics`` (asked for, reported by no
    cell), ``metrics`` (label and unit per key), ``groups`` (per group: ``n``,
    ``seeds``, ``cells``, shared ``overrides``, ``metrics[key] = {mean, std, n, values,
    display}`` in raw units (fractions, bytes, seconds) and ``vs_baseline = {n_pairs, seeds,
    metrics[key] = {mean_diff, ci_low, ci_high, n_pairs, display}}``, None for the baseline),
    ``failed`` and ``unfinished`` cells. ``display`` is the string the table shows: the raw
    number through :func:`format_value` (×100 with 2 decimals for accuracies, MB with 3
    decimals, seconds with 2, counts with 0, else 3); groups hold every metric, the table shows
    ``metric_keys``. ``study.csv`` has one row per group with every metric's raw numbers
    (``<key>_mean``, ``_std``, ``_diff``, ``_ci_low``, ``_ci_high``).

    Args:
        study_dir: the study folder (with ``cells.json``).

    Returns:
        The ``study.json`` dict plus ``"table"``: the Markdown text of ``study.md``.

    Raises:
        ConfigError: if ``study_dir`` has no ``cells.json``.
    """
    study_dir = Path(study_dir)
    doc, cells = load_cells(study_dir)
    keys = _metric_keys(cells)
    wanted = _wanted_metrics(study_dir)
    by_group = groups_of(cells)
    base = doc.get("baseline_group")
    groups = []
    for name, gcells in by_group.items():
        entry = _group_entry(name, gcells, keys)
        if base is not None and name != base and base in by_group:
            entry["vs_baseline"] = _vs_baseline(gcells, by_group[base], keys)
        groups.append(entry)
    res: dict[str, Any] = {
        "study": doc.get("study") or study_dir.name, "baseline_group": base,
        "std": "sample standard deviation (ddof=1)", "ci": "paired t, 95 % CI, n pairs (group − baseline)",
        "metric_keys": [k for k in wanted if k in keys] if wanted else keys, "all_metric_keys": keys,
        "missing_metrics": [k for k in wanted if k not in keys],
        "metrics": {k: metric_info(k) for k in keys}, "groups": groups,
        "failed": [{"name": c.name, "group": c.group, "seed": c.seed, "attempts": c.attempts, "error": c.error}
                   for c in cells if c.status == "failed"],
        "unfinished": [{"name": c.name, "group": c.group, "seed": c.seed, "status": c.status}
                       for c in cells if c.status not in (FINISHED, "failed")],
    }
    table = _markdown(res)
    write_atomic(study_dir / "study.json", dumps_json(res))
    write_atomic(study_dir / "study.csv", _csv(res))
    write_atomic(study_dir / "study.md", table)
    return {**res, "table": table}


def is_current(study_dir: str | Path) -> bool:
    """Whether ``study.json`` is newer than ``study.yaml``, ``cells.json`` and every cell's status and metrics."""
    study_dir = Path(study_dir)
    out = study_dir / "study.json"
    if not out.is_file():
        return False
    t = out.stat().st_mtime
    inputs = [study_dir / "cells.json", study_dir / "study.yaml", *study_dir.glob("cells/*/status.json"),
              *study_dir.glob("cells/*/metrics.json")]
    return all(p.stat().st_mtime <= t for p in inputs if p.is_file())
