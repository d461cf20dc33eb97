"""Study aggregation: mean ± sample std per group, paired t CI vs the baseline, study.{json,csv,md}."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from adaptsim.cl.config import ConfigError
from adaptsim.cl.rundir import RunDir, dumps_json, loads_json
from adaptsim.cl.study.aggregate import aggregate_study, format_value, mean_std, paired_diff_ci

NAN = float("nan")


# -- synthetic study folders (shared with test_report.py) -----------------------------------
def continual_metrics(a: float, T: int = 3) -> dict[str, Any]:
    """A plausible continual metrics.json whose A_last is ``a`` (R lower-triangular, NaN above)."""
    R = [[(a + 0.1 * (t - k)) if k <= t else NAN for k in range(T)] for t in range(T)]
    A_t = [float(np.nanmean(R[t][: t + 1])) for t in range(T)]
    return {"R": R, "A_t": A_t, "experiences": [f"exp{k}" for k in range(T)], "A_last": A_t[-1],
            "avg_incremental_accuracy": float(np.mean(A_t)), "forgetting": 0.1 + a / 10, "bwt": -0.1 - a / 10,
            "fwt": NAN, "trainable_params": 1000, "stored_params": 4000,
            "train_seconds": [1.0, 2.0, a], "eval_seconds": [0.1, 0.1, 0.1]}


def federated_metrics(acc: float, eps: float, rounds: int = 3) -> dict[str, Any]:
    rs = [{"round": r + 1, "accuracy": acc * (r + 1) / rounds, "loss": 2.0 - r * 0.1,
           "epsilon": {"0": eps * (r + 1) / rounds, "1": eps * (r + 1) / rounds / 2},
           "bytes_up": 16000 * (r + 1), "bytes_down": 32000, "seconds": 1.5, "replies": 2, "failures": 0}
          for r in range(rounds)]
    return {"method": "ffa_lora", "rounds": rs, "summary": {
        "final_accuracy": rs[-1]["accuracy"], "best_accuracy": rs[-1]["accuracy"], "final_loss": rs[-1]["loss"],
        "max_epsilon": eps, "bytes_up": sum(r["bytes_up"] for r in rs), "bytes_down": 32000 * rounds,
        "seconds": 1.5 * rounds, "rounds": rounds, "failures": 0}}


def make_study(root: Path, groups: dict[str, dict[int, Any]], kind: str = "continual",
               baseline: str | None = None, name: str = "demo") -> Path:
    """A study folder: ``groups = {group: {seed: metrics dict | "error text" (failed) | None (pending)}}``."""
    d = root / name
    cells = []
    for group, seeds in groups.items():
        for seed, m in seeds.items():
            cname = f"{group}-s{seed}"
            status = "pending" if m is None else "failed" if isinstance(m, str) else "finished"
            cells.append({"name": cname, "group": group, "seed": seed, "status": status, "attempts": 1,
                          "overrides": {"strategy.name": group, "run.seed": seed}, "run_dir": f"cells/{cname}",
                          "error": m if status == "failed" else None, "seconds": 1.0})
            if m is None:
                continue
            rd = RunDir.create(d / "cells", cname, {"strategy": {"name": group}, "run": {"seed": seed}}, kind)
            if status == "failed":
                rd.mark_failed(m)
                continue
            rd.write_metrics(m)
            rd.mark_finished({})
    d.mkdir(parents=True, exist_ok=True)
    (d / "study.yaml").write_text(f"study:\n  name: {name}\n  seeds: [0, 1, 2]\n")
    (d / "cells.json").write_text(dumps_json({"study": name, "baseline_group": baseline, "cells": cells}))
    return d


def md_rows(table: str) -> dict[str, list[str]]:
    """First column -> cells, for every Markdown table row (later tables overwrite by prefix)."""
    out = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out.setdefault(cells[0], []).append(cells[1:])
    return out


# -- pure functions, hand-computed ------------------------------------------------------------
@pytest.mark.parametrize("values, mean, std, n", [
    ([1.0, 2.0, 3.0, 4.0], 2.5, math.sqrt(5 / 3), 4),   # Σ(x−2.5)² = 5, /(n−1)
    ([0.5, 0.5], 0.5, 0.0, 2),
    ([7.0], 7.0, NAN, 1),                               # one seed: no sample std
    ([], NAN, NAN, 0),
    ([1.0, NAN, 3.0], 2.0, math.sqrt(2), 2),             # NaN ignored
], ids=["four", "equal", "one", "empty", "nan"])
def test_mean_std(values, mean, std, n):
    m, s, k = mean_std(values)
    assert k == n
    assert (math.isnan(m) and math.isnan(mean)) or m == pytest.approx(mean)
    assert (math.isnan(s) and math.isnan(std)) or s == pytest.approx(std)


def test_paired_diff_ci_hand_computed():
    # d = [2, 3, 2]: mean 7/3, sd = sqrt(1/3), se = 1/3, t_{0.975, 2} = 4.302653 -> half 1.434218
    d, lo, hi, n = paired_diff_ci([3.0, 5.0, 4.0], [1.0, 2.0, 2.0])
    assert n == 3 and d == pytest.approx(7 / 3)
    assert lo == pytest.approx(7 / 3 - 1.434218, abs=1e-6) and hi == pytest.approx(7 / 3 + 1.434218, abs=1e-6)
    # a constant shift: zero-width interval
    assert paired_diff_ci([1.5, 2.5], [1.0, 2.0])[1:3] == pytest.approx((0.5, 0.5))
    d, lo, hi, n = paired_diff_ci([1.0], [0.25])
    assert (d, n) == (0.75, 1) and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_diff_ci([1.0], [1.0, 2.0])


@pytest.mark.parametrize("v, unit, signed, text", [
    (0.52345, "%", False, "52.34"), (0.012, "%", True, "+1.20"), (-0.012, "%", True, "-1.20"),
    (48744.0, "MB", False, "0.049"), (2.345, "s", False, "2.35"), (4000.0, "count", False, "4000"),
    (4.99791, "", False, "4.998"), (NAN, "%", False, "—"), (None, "s", False, "—"), (math.inf, "", False, "∞"),
], ids=lambda x: str(x))
def test_format_value(v, unit, signed, text):
    assert format_value(v, unit, signed) == text


# -- study folders -----------------------------------------------------------------------------
def test_aggregate_continual_study(tmp_path):
    a0, a1 = [0.50, 0.55, 0.60], [0.62, 0.66, 0.70]
    d = make_study(tmp_path, {"finetune": {s: continual_metrics(a) for s, a in enumerate(a0)},
                              "ewc": {0: continual_metrics(a1[0]), 1: continual_metrics(a1[1]),
                                      2: "RuntimeError: out of memory | at step 3\nsecond line"},
                              "lwf": {0: continual_metrics(0.4), 1: None}},
                   baseline="finetune")
    res = aggregate_study(d)
    for f in ("study.json", "study.csv", "study.md"):
        assert (d / f).is_file()
    on_disk = loads_json((d / "study.json").read_text())
    assert (d / "study.md").read_text() == res["table"]
    assert on_disk["groups"] == loads_json(dumps_json(res["groups"]))
    g = {x["group"]: x for x in res["groups"]}
    assert [x["group"] for x in res["groups"]] == ["finetune", "ewc", "lwf"]
    assert (g["finetune"]["n"], g["ewc"]["n"], g["lwf"]["n"]) == (3, 2, 1)
    assert g["finetune"]["overrides"] == {"strategy.name": "finetune"}  # the seed varies: not shared
    a_last = g["finetune"]["metrics"]["A_last"]
    expect = [continual_metrics(a)["A_last"] for a in a0]
    assert a_last["mean"] == pytest.approx(np.mean(expect)) and a_last["std"] == pytest.approx(np.std(expect, ddof=1))
    assert g["finetune"]["metrics"]["train_seconds"]["mean"] == pytest.approx(3 + np.mean(a0))
    assert "fwt" not in res["metric_keys"]  # NaN in every cell: no column
    assert g["finetune"]["vs_baseline"] is None
    vb = g["ewc"]["vs_baseline"]
    assert vb["n_pairs"] == 2 and vb["seeds"] == [0, 1]  # seed 2 failed: paired on 0 and 1 only
    dd = [continual_metrics(a1[s])["A_last"] - continual_metrics(a0[s])["A_last"] for s in (0, 1)]
    assert vb["metrics"]["A_last"]["mean_diff"] == pytest.approx(np.mean(dd))
    assert g["lwf"]["vs_baseline"]["metrics"]["A_last"]["ci_low"] is None or \
        math.isnan(g["lwf"]["vs_baseline"]["metrics"]["A_last"]["ci_low"])  # one pair: no CI
    assert on_disk["groups"][2]["vs_baseline"]["metrics"]["A_last"]["ci_low"] is None  # NaN -> null
    assert math.isnan(g["lwf"]["metrics"]["A_last"]["std"])

    # the Markdown table holds exactly study.json's numbers, under the documented rounding rule
    table = res["table"]
    assert "sample std (ddof=1)" in table and "paired t, 95 % CI, n pairs" in table
    rows = md_rows(table)
    header = rows["group"][0]
    for x in on_disk["groups"]:
        label = x["group"] + (" (baseline)" if x["group"] == "finetune" else "")
        row = rows[label][0]
        assert row[0] == str(x["n"])
        for key, m in x["metrics"].items():
            unit = on_disk["metrics"][key]["unit"]
            cell = row[header.index(on_disk["metrics"][key]["header"])]
            assert cell == m["display"] == f"{format_value(m['mean'], unit)} ± {format_value(m['std'], unit)}"
    assert rows["finetune (baseline)"][0][header.index("A_last (%)")].startswith(f"{100 * np.mean(expect):.2f} ± ")
    diff_row = rows["ewc"][1]
    diff_header = rows["group"][1]
    assert diff_row[0] == "2"
    assert diff_row[diff_header.index("A_last (pp)")] == vb["metrics"]["A_last"]["display"]
    assert vb["metrics"]["A_last"]["display"].startswith(f"{100 * np.mean(dd):+.2f} [")
    assert rows["lwf"][1][diff_header.index("A_last (pp)")].endswith("[—]")
    # failed and unfinished cells are listed, with the error from cells.json on one line
    assert "## Failed cells" in table
    assert "| ewc-s2 | ewc | 2 | 1 | RuntimeError: out of memory \\| at step 3 second line |" in table
    assert "lwf-s1 (pending)" in table

    # study.csv: one row per group, raw numbers
    rows_csv = list(csv.DictReader(io.StringIO((d / "study.csv").read_text())))
    assert [r["group"] for r in rows_csv] == ["finetune", "ewc", "lwf"]
    assert float(rows_csv[0]["A_last_mean"]) == pytest.approx(a_last["mean"])
    assert float(rows_csv[1]["A_last_diff"]) == pytest.approx(np.mean(dd))
    assert rows_csv[0]["A_last_diff"] == "" and rows_csv[2]["A_last_ci_low"] == ""


def test_aggregate_federated_units(tmp_path):
    d = make_study(tmp_path, {"eps8": {0: federated_metrics(0.8, 8.0), 1: federated_metrics(0.7, 8.0)},
                              "eps1": {0: federated_metrics(0.5, 1.0), 1: federated_metrics(0.4, 1.0)}},
                   kind="federated", baseline="eps8")
    res = aggregate_study(d)
    assert res["metric_keys"][:3] == ["final_accuracy", "best_accuracy", "final_loss"]
    g = {x["group"]: x for x in res["groups"]}
    assert g["eps1"]["metrics"]["epsilon"]["mean"] == 1.0
    assert g["eps8"]["metrics"]["bytes_up"]["display"] == "0.096 ± 0.000"  # 96 000 B = 0.096 MB
    assert g["eps1"]["vs_baseline"]["metrics"]["final_accuracy"]["mean_diff"] == pytest.approx(-0.3)
    # d = [-0.3, -0.3]: zero spread, zero-width interval
    assert g["eps1"]["vs_baseline"]["metrics"]["final_accuracy"]["display"] == "-30.00 [-30.00, -30.00]"
    hdr = md_rows(res["table"])["group"][0]
    assert "ε" in hdr and "bytes up (MB)" in hdr and "train (s)" in hdr and "A_last (%)" not in hdr


def test_not_a_study_folder(tmp_path):
    with pytest.raises(ConfigError, match="not a study folder"):
        aggregate_study(tmp_path)


def test_study_metrics_pick_the_table_columns(tmp_path):
    d = make_study(tmp_path, {"a": {0: continual_metrics(0.5), 1: continual_metrics(0.6)},
                              "b": {0: continual_metrics(0.7), 1: continual_metrics(0.8)}}, baseline="a")
    (d / "study.yaml").write_text("study:\n  name: demo\n  metrics: [forgetting, A_last, mtil_last]\n")
    res = aggregate_study(d)
    assert res["metric_keys"] == ["forgetting", "A_last"] and res["missing_metrics"] == ["mtil_last"]
    assert "bwt" in res["all_metric_keys"] and "bwt" in res["groups"][0]["metrics"]  # kept in json/csv
    rows = md_rows(res["table"])
    assert rows["group"][0] == ["n", "forgetting (%)", "A_last (%)"]
    assert rows["group"][1] == ["n pairs", "forgetting (pp)", "A_last (pp)"]
    assert "No cell reports mtil_last." in res["table"]
    assert "bwt_mean" in (d / "study.csv").read_text().splitlines()[0]
