"""``report.html``: one self-contained page for a run folder or a study folder.

``adaptsim report DIR`` (and the end of every run and study) writes ``DIR/report.html``: plain
HTML and CSS, figures embedded as base64 ``data:`` PNGs, no JavaScript, no other files, every
text escaped. A study's page holds the aggregated tables (:mod:`adaptsim.cl.study.aggregate`,
re-aggregated when ``study.json`` is missing or older than the cells), an overlay of the groups'
mean curves, then per group: the mean accuracy matrix and the A_t curve with a ±std band
(continual); accuracy per round, accuracy against ε and bytes per round (federated); forgotten
and retained accuracies per request (unlearning); and each cell's resolved ``config.yaml`` in a
collapsible block. A single run's page shows its scalars, the same figures and its config.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from adaptsim.cl.config import ConfigError
from adaptsim.cl.report_plots import accuracy_matrix_png, band_png, curve_mean_std, epsilon_png
from adaptsim.cl.rundir import FINISHED, RunDir, is_run_dir, loads_json, write_atomic
from adaptsim.cl.study.aggregate import (
    DASH,
    aggregate_study,
    format_value,
    groups_of,
    is_current,
    load_cells,
    metric_info,
)

__all__ = ["write_report", "write_run_report", "write_study_report", "REPORT_FILE"]

REPORT_FILE = "report.html"

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#fff;
 max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:20px;margin:32px 0 8px;border-bottom:2px solid #dde3ee;
 padding-bottom:4px} h3{font-size:16px;margin:18px 0 6px} .meta{color:#5a6478;font-size:13px}
table{border-collapse:collapse;margin:8px 0 4px;font-size:13px}
th,td{border:1px solid #d5dbe6;padding:4px 8px;text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow-x:auto} td.wrap{white-space:normal;min-width:70px} .nw{white-space:nowrap}
th{background:#eef2f8;white-space:normal;vertical-align:bottom}
td:first-child,th:first-child{text-align:left;white-space:normal;overflow-wrap:anywhere;min-width:110px;
 max-width:260px} tr:nth-child(even) td{background:#f8fafc}
td.err,th.err{text-align:left;color:#9b1c1c;white-space:normal;min-width:320px}
.note{font-size:13px;color:#5a6478;margin:2px 0 10px}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;border:1px solid #e3e8f0;padding:6px;background:#fff;max-width:560px}
figcaption{font-size:12px;color:#5a6478;text-align:center} img{display:block;max-width:100%}
details{margin:4px 0} summary{cursor:pointer;font-size:14px}
pre{background:#f5f7fa;border:1px solid #e3e8f0;padding:8px;font-size:12px;overflow-x:auto;max-height:420px}
code{background:#f0f3f8;padding:0 3px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _page(title: str, body: Iterable[str]) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body)
            + f'\n<p class="meta">written by adaptsim report, {_e(stamp)}</p>\n</body>\n</html>\n')


def _img(png: bytes, caption: str) -> str:
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<figure><img src="{src}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: Sequence[str] = (), ci: bool = False) -> str:
    head = "".join(f'<th class="{cls[i]}">{_e(h)}</th>' if i < len(cls) and cls[i] else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(header))
    def td(i: int, c: str) -> str:
        if ci and " [" in c:  # "diff [lo, hi]": may break before the interval, never inside it
            d, interval = c.split(" [", 1)
            return f'<td class="wrap"><span class="nw">{_e(d)}</span> <span class="nw">[{_e(interval)}</span></td>'
        return f'<td class="{cls[i]}">{_e(c)}</td>' if i < len(cls) and cls[i] else f"<td>{_e(c)}</td>"

    body = "".join("<tr>" + "".join(td(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _config_block(label: str, path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else "(no config.yaml)"
    return f"<details><summary>{_e(label)}</summary><pre>{_e(text)}</pre></details>"


# -- figures of a group of cells (one cell for a single run) ---------------------------------
def _eps_of_round(r: Mapping[str, Any]) -> float:
    vals = [float(v) for v in (r.get("epsilon") or {}).values() if isinstance(v, (int, float))]
    return max(vals) if vals else math.nan


def _over(n: int) -> str:
    return f"mean ± std over {n} seeds" if n > 1 else "one run"


def _sd(std: np.ndarray, n: int) -> np.ndarray | None:
    return std if n > 1 else None


def _continual_figs(label: str, ms: list[dict[str, Any]]) -> list[str]:
    out = []
    mats = [np.asarray([[math.nan if v is None else v for v in row] for row in m["R"]], dtype=float)
            for m in ms if m.get("R")]
    if mats and all(r.shape == mats[0].shape for r in mats):
        mean_R, _ = curve_mean_std([r.ravel() for r in mats])  # untested (all-NaN) cells stay NaN
        mean_R = mean_R.reshape(mats[0].shape)
        what = f"mean over {len(mats)} seeds" if len(mats) > 1 else "one run"
        out.append(_img(accuracy_matrix_png(mean_R, f"R[t, k] (%), n={len(mats)}"),
                        f"{label}: accuracy matrix R[t, k], {what} (rows: after training t; columns: test k)"))
    curves = [m["A_t"] for m in ms if m.get("A_t")]
    if curves:
        mean, std = curve_mean_std(curves)
        band = " ± std" if len(curves) > 1 else ""
        out.append(_img(band_png([("", range(1, len(mean) + 1), mean, _sd(std, len(curves)))],  # the title names it
                                 xlabel="experience t", ylabel="A_t, accuracy on seen (%)",
                                 title=f"{label}: A_t{band}"),
                        f"{label}: A_t ({_over(len(curves))})"))
    return out


def _federated_figs(label: str, ms: list[dict[str, Any]]) -> list[str]:
    rounds = [m["rounds"] for m in ms if m.get("rounds")]
    if not rounds:
        return []
    x = range(1, max(len(r) for r in rounds) + 1)
    n = len(rounds)
    band = " ± std" if n > 1 else ""
    mean, std = curve_mean_std([[r.get("accuracy") for r in rs] for rs in rounds])
    out = [_img(band_png([("", x, mean, _sd(std, n))], xlabel="round", ylabel="global test accuracy (%)",
                         title=f"{label}: accuracy per round{band}"), f"{label}: accuracy vs round ({_over(n)})")]
    eps = {f"seed {i}" if n > 1 else "": ([_eps_of_round(r) for r in rs], [r.get("accuracy") for r in rs])
           for i, rs in enumerate(rounds)}
    out.append(_img(epsilon_png(eps, f"{label}: accuracy vs ε"), f"{label}: accuracy vs ε spent, per round"))
    series = []
    for key in ("bytes_up", "bytes_down"):
        m, s = curve_mean_std([[r.get(key) for r in rs] for rs in rounds])
        series.append((key.replace("_", " "), x, m, _sd(s, n)))
    peak = max((np.nanmax(s[2]) for s in series if np.isfinite(s[2]).any()), default=0.0)
    unit, scale = ("MB", 1e-6) if peak >= 1e5 else ("kB", 1e-3)
    out.append(_img(band_png(series, xlabel="round", ylabel=f"{unit} per round", scale=scale, ylim=(0, None),
                             title=f"{label}: bytes per round{band}"),
                    f"{label}: bytes up/down per round, {unit} ({_over(n)})"))
    return out


def _unlearning_figs(label: str, ms: list[dict[str, Any]]) -> list[str]:
    rows = [m["rows"] for m in ms if m.get("rows")]
    if not rows:
        return []
    n, series = len(rows), []
    x = range(0, max(len(r) for r in rows))
    for key in ("forget_train_acc", "forget_test_acc", "retained_test_acc"):
        m, s = curve_mean_std([[r.get(key) for r in rs] for rs in rows])
        series.append((metric_info(key)["label"], x, m, _sd(s, n)))
    return [_img(band_png(series, xlabel="requests processed", ylabel="accuracy (%)", title=f"{label}: unlearning"),
                 f"{label}: forgotten and retained accuracy per request ({_over(n)})")]


def _figures(label: str, ms: list[dict[str, Any]]) -> list[str]:
    return _continual_figs(label, ms) + _federated_figs(label, ms) + _unlearning_figs(label, ms)


def _overlay(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The groups' mean A_t / accuracy-per-round curves on one figure each (studies with ≥ 2 groups)."""
    out = []
    for key, sub, xlabel, ylabel, x0 in (("A_t", None, "experience t", "A_t (%)", 1),
                                         ("rounds", "accuracy", "round", "global test accuracy (%)", 1)):
        series = []
        for g, ms in groups.items():
            curves = [[r.get(sub) for r in m[key]] if sub else m[key] for m in ms if m.get(key)]
            if curves:
                mean, std = curve_mean_std(curves)
                series.append((g, range(x0, x0 + len(mean)), mean, _sd(std, len(curves))))
        if len(series) > 1:
            out.append(_img(band_png(series, xlabel=xlabel, ylabel=ylabel, title=f"all groups: {ylabel} (mean ± std)"),
                            f"all groups: {ylabel}, mean ± std over seeds"))
    if len([g for g, ms in groups.items() if any(m.get("rounds") for m in ms)]) > 1:
        eps = {}
        for g, ms in groups.items():
            rounds = [m["rounds"] for m in ms if m.get("rounds")]
            if rounds:
                e, _ = curve_mean_std([[_eps_of_round(r) for r in rs] for rs in rounds])
                a, _ = curve_mean_std([[r.get("accuracy") for r in rs] for rs in rounds])
                eps[g] = (list(e), list(a))
        out.append(_img(epsilon_png(eps, "all groups: accuracy vs ε (mean over seeds)"),
                        "all groups: mean accuracy vs mean ε spent, per round"))
    return out


# -- study page ------------------------------------------------------------------------------
def _study_tables(res: Mapping[str, Any]) -> list[str]:
    infos = [res["metrics"][k] for k in res["metric_keys"]]
    base = res["baseline_group"]
    out = ['<p class="note">Mean ± sample std (ddof=1) over the finished seeds of each group; n = finished cells. '
           "Accuracies in %, bytes in MB (10⁶ B), times in s."
           + (_e(f" No cell reports {', '.join(res['missing_metrics'])}.") if res.get("missing_metrics") else "")
           + "</p>",
           _table(["group", "n", *[i["header"] for i in infos]],
                  ([g["group"] + (" (baseline)" if g["group"] == base else ""), str(g["n"]),
                    *[g["metrics"][i["key"]]["display"] if i["key"] in g["metrics"] else DASH for i in infos]]
                   for g in res["groups"]))]
    others = [g for g in res["groups"] if g["vs_baseline"] is not None]
    if others:
        out += [f"<h3>Paired difference vs baseline <code>{_e(base)}</code></h3>",
                '<p class="note">group − baseline, cells paired by seed; paired t, 95 % CI, n pairs '
                "(— : fewer than 2 pairs). Accuracies in percentage points (pp).</p>",
                _table(["group", "n pairs", *[i["diff_header"] for i in infos]],
                       ([g["group"], str(g["vs_baseline"]["n_pairs"]),
                         *[g["vs_baseline"]["metrics"][i["key"]]["display"] if i["key"] in g["vs_baseline"]["metrics"]
                           else DASH for i in infos]] for g in others), ci=True)]
    if res["failed"]:
        out += ["<h3>Failed cells</h3>",
                _table(["cell", "group", "seed", "attempts", "error"],
                       ([c["name"], c["group"], str(c["seed"]), str(c["attempts"]), c["error"] or "no error recorded"]
                        for c in res["failed"]), cls=("", "", "", "", "err"))]
    if res["unfinished"]:
        out.append('<p class="note">Not finished: '
                   + _e(", ".join(f"{c['name']} ({c['status']})" for c in res["unfinished"])) + "</p>")
    return out


def write_study_report(study_dir: str | Path) -> Path:
    """Write ``STUDY_DIR/report.html`` (re-aggregating when ``study.json`` is missing or stale).

    Returns:
        The path of ``report.html``.
    """
    d = Path(study_dir)
    res = loads_json((d / "study.json").read_text()) if is_current(d) else aggregate_study(d)
    _, cells = load_cells(d)
    by_group = groups_of(cells)
    done = {g: [c.metrics for c in cs if c.status == FINISHED and c.metrics] for g, cs in by_group.items()}
    n_done = sum(len(v) for v in done.values())
    body = [f"<h1>Study {_e(res['study'])}</h1>",
            f'<p class="meta">{_e(d.resolve())} · {len(cells)} cells in {len(by_group)} groups · {n_done} finished · '
            f"{len(res['failed'])} failed</p>", "<h2>Results</h2>", *_study_tables(res)]
    if (d / "study.yaml").is_file():
        body.append(_config_block("study.yaml (the resolved study)", d / "study.yaml"))
    if overlay := _overlay({g: ms for g, ms in done.items() if ms}):
        body += ["<h2>All groups</h2>", '<div class="figs">', *overlay, "</div>"]
    info = {g["group"]: g for g in res["groups"]}
    for g, cs in by_group.items():
        gi = info.get(g, {})
        over = ", ".join(f"{k}={v}" for k, v in (gi.get("overrides") or {}).items()) or "none"
        body += [f"<h2>Group {_e(g)}{' (baseline)' if g == res['baseline_group'] else ''}</h2>",
                 f'<p class="note">{gi.get("n", 0)} of {len(cs)} cells finished · seeds {_e(gi.get("seeds", []))} · '
                 f"overrides: <code>{_e(over)}</code></p>"]
        figs = _figures(g, done.get(g, []))
        body += ['<div class="figs">', *figs, "</div>"] if figs else ['<p class="note">No finished cells to plot.</p>']
        body += ["<h3>Cell configs</h3>"] + [_config_block(f"{c.name} (seed {c.seed}, {c.status})",
                                                           c.run_dir / "config.yaml") for c in cs]
    return write_atomic(d / REPORT_FILE, _page(f"Study {res['study']}", body))


# -- single run ------------------------------------------------------------------------------
def write_run_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html``: status, scalar results, figures and the resolved config.

    Returns:
        The path of ``report.html``.
    """
    from adaptsim.cl.runkinds import get_run_kind

    rd = RunDir.open(run_dir)
    st = rd.status()
    kind = st.get("kind") or rd.config().get("kind")
    metrics = rd.metrics() if (rd.path / "metrics.json").is_file() else None
    body = [f"<h1>Run {_e(rd.path.name)}</h1>",
            f'<p class="meta">{_e(rd.path.resolve())} · kind <code>{_e(kind)}</code> · status '
            f"<b>{_e(st.get('status', 'unknown'))}</b></p>"]
    if st.get("error"):
        body.append(_table(["error"], [[st["error"]]], cls=("err",)))
    if metrics is not None:
        try:
            summary = get_run_kind(kind).summary(metrics) if kind else {}
        except ConfigError:
            summary = st.get("summary") or {}
        rows = [[metric_info(k)["header"], format_value(float(v), metric_info(k)["unit"])]
                for k, v in summary.items() if isinstance(v, (int, float))]
        body += ["<h2>Results</h2>", _table(["metric", "value"], rows)]
        figs = _figures(rd.path.name, [metrics])
        if figs:
            body += ["<h2>Figures</h2>", '<div class="figs">', *figs, "</div>"]
    else:
        body.append('<p class="note">No metrics.json yet.</p>')
    body += ["<h2>Config</h2>", _config_block("config.yaml (resolved)", rd.path / "config.yaml")]
    return write_atomic(rd.path / REPORT_FILE, _page(f"Run {rd.path.name}", body))


def write_report(path: str | Path) -> Path:
    """``report.html`` of a study folder (has ``cells.json``) or a run folder.

    Raises:
        ConfigError: if ``path`` is neither.
    """
    p = Path(path)
    if (p / "cells.json").is_file():
        return write_study_report(p)
    if is_run_dir(p):
        return write_run_report(p)
    raise ConfigError(f"{p} is neither a study folder (cells.json) nor a run folder (config.yaml and status.json)")
