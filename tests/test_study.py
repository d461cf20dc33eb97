"""Study engine: grid expansion and names, strict study files, in-process runs, kill/resume, failures.

The runs use ``scenarios/studies/tiny_digits_study.yaml`` (2 methods x 2 seeds on tiny_digits)
with overrides that shrink the data, so a whole study takes a few seconds in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adaptsim.cl.config import ConfigError
from adaptsim.cl.rundir import RunDir, is_run_dir, loads_json
from adaptsim.cl.study import load_study, run_study
from adaptsim.cl.study.grid import MAX_NAME, baseline_group, build_cells, expand_grid, group_name

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "scenarios" / "studies" / "tiny_digits_study.yaml"
BASE = ROOT / "scenarios" / "tiny_digits.yaml"
# Small data, no plots, one thread per cell: the four cells take about a second each.
FAST = {"scenario.dataset.train_per_class": 20, "scenario.dataset.test_per_class": 10, "run.plots": False,
        "study.threads_per_worker": 1}
LORA0 = "strategy.name-finetune_strategy.mode-lora_strategy.epochs-3__seed0"
LORA1 = "strategy.name-finetune_strategy.mode-lora_strategy.epochs-3__seed1"
RESULT_KEYS = ("A_last", "avg_incremental_accuracy", "forgetting", "bwt")


def results(study_dir: Path) -> dict[str, dict[str, float]]:
    """Each cell's scalar results (what the table aggregates, without the timings)."""
    index = loads_json((study_dir / "cells.json").read_text())
    out = {}
    for c in index["cells"]:
        summary = RunDir(study_dir / c["run_dir"]).status().get("summary") or {}
        out[c["name"]] = {k: summary[k] for k in RESULT_KEYS if k in summary}
    return out


def table_without_times(table: str) -> str:
    """The Markdown table with its seconds columns dropped (timings differ between runs)."""
    out, drop = [], set()
    for line in table.splitlines():
        if not line.startswith("|"):
            out.append(line)
            drop = set()
            continue
        cols = line.strip("|").split("|")
        if not drop and any("(s)" in c for c in cols):
            drop = {i for i, c in enumerate(cols) if "(s)" in c}
        out.append("|".join(c for i, c in enumerate(cols) if i not in drop))
    return "\n".join(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny study run once, uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("ref")
    return run_study(STUDY, FAST, workers=0, out_dir=out)


def write_study(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent(body).replace("BASE", str(BASE)))
    return p


# --- grid and names (pure) -------------------------------------------------------------------
@pytest.mark.parametrize("overrides, name", [
    ({}, "base"),
    ({"strategy.name": "simplecil"}, "strategy.name-simplecil"),
    ({"strategy.name": "mos", "strategy.epochs": 5}, "strategy.name-mos_strategy.epochs-5"),
    ({"strategy.lr": 0.001, "train.eval_future": False}, "strategy.lr-0.001_train.eval_future-false"),
    ({"federated.dp.epsilon": None}, "federated.dp.epsilon-null"),
    ({"federated.targets": ["q", "v"]}, "federated.targets-q+v"),
    ({"scenario.dataset.root": "/data/my set"}, "scenario.dataset.root--data-my-set"),
], ids=["empty", "one", "two-keys", "float-bool", "null", "list", "unsafe-chars"])
def test_group_names(overrides, name):
    assert group_name(overrides) == name


def test_long_group_name_is_cut_with_a_stable_hash():
    ov = {f"strategy.key_number_{i}": "a_fairly_long_value" for i in range(8)}
    name = group_name(ov)
    assert len(name) <= MAX_NAME and name == group_name(dict(ov))
    assert name != group_name({**ov, "strategy.key_number_7": "another_value_entirely"})


def test_expand_grid_is_a_cartesian_product_in_file_order():
    grid = {"method": [{"strategy.name": "a"}, {"strategy.name": "b", "strategy.lr": 0.1}],
            "epochs": [{"strategy.epochs": 1}, {"strategy.epochs": 2}, {"strategy.epochs": 3}]}
    sets = expand_grid(grid)
    assert len(sets) == 6
    assert sets[0] == {"strategy.name": "a", "strategy.epochs": 1}
    assert sets[3] == {"strategy.name": "b", "strategy.lr": 0.1, "strategy.epochs": 1}
    cells = build_cells(grid, [0, 1])
    assert [c.name for c in cells[:2]] == ["strategy.name-a_strategy.epochs-1__seed0",
                                           "strategy.name-a_strategy.epochs-1__seed1"]
    assert cells[0].group == cells[1].group and cells[0].overrides == sets[0]
    assert expand_grid({}) == [{}] and build_cells({}, [3])[0].name == "base__seed3"


@pytest.mark.parametrize("grid, match", [
    ({"a": [{"strategy.lr": 1}], "b": [{"strategy.lr": 2}]}, "both set 'strategy.lr'"),
    ({"a": [{"strategy.lr": 1}, {"strategy.lr": 1}]}, "same overrides appear twice"),
], ids=["axes-clash", "duplicate"])
def test_grid_errors(grid, match):
    with pytest.raises(ConfigError, match=match):
        build_cells(grid, [0])


def test_names_that_collide_after_sanitising_stay_distinct():
    cells = build_cells({"a": [{"x.y": "p/q"}, {"x.y": "p-q"}]}, [0])
    assert len({c.group for c in cells}) == 2


def test_baseline_group():
    cells = build_cells({"m": [{"strategy.name": "simplecil"}, {"strategy.name": "mos", "strategy.epochs": 5}],
                         "lr": [{"strategy.lr": 0.1}]}, [0])
    assert baseline_group(cells, {"strategy.name": "mos"}) == "strategy.name-mos_strategy.epochs-5_strategy.lr-0.1"
    assert baseline_group(cells, None) is None
    with pytest.raises(ConfigError, match="matches no grid entry"):
        baseline_group(cells, {"strategy.name": "ewc"})
    with pytest.raises(ConfigError, match="matches several groups"):
        baseline_group(cells, {"strategy.lr": 0.1})


# --- study files (strict) --------------------------------------------------------------------
@pytest.mark.parametrize("body, match", [
    ("study: {name: s, base: BASE, seed: [0]}",
     r"unknown key 'seed' in section 'study'.*valid keys:.*did you mean 'seeds'"),
    ("study: {name: s, base: BASE}\nextra: 1", "unknown key 'extra' in section 'top level of a study file'"),
    ("study: {name: s, base: BASE, seeds: []}", "study.seeds must list at least one seed"),
    ("study: {name: s, base: BASE, seeds: [0, x]}", r"study.seeds\[1\]: expected an integer"),
    ("study: {name: s, base: BASE, grid: {m: {strategy.name: mos}}}", "study.grid.m must be a non-empty list"),
    ("study: {name: s, base: BASE, grid: {m: [mos]}}", r"study.grid.m\[0\] must be a mapping"),
    ("study: {name: s, base: BASE, grid: {m: []}}", "study.grid.m must be a non-empty list"),
    ("study: {name: s, base: nowhere.yaml}", "study.base 'nowhere.yaml' not found"),
    ("study: {base: BASE}", "study.name is required"),
    ("study: {name: 'a/b', base: BASE}", "must be a folder name"),
    ("study: {name: s, base: BASE, workers: -1}", "study.workers must be >= 0"),
    ("study: {name: s, base: BASE, grid: {m: [{strategy.nmae: mos}]}}",
     r"cell strategy.nmae-mos__seed0: unknown key 'nmae' in section 'strategy'"),
    ("study: {name: s, base: BASE, grid: {m: [{strategy.name: simplecil},"
     " {strategy.name: finetune, strategy.epochs: x}]}}",
     r"cell strategy.name-finetune_strategy.epochs-x__seed0: .*strategy.epochs: expected an integer"),
], ids=["typo", "top-level", "no-seeds", "bad-seed", "axis-not-list", "entry-not-mapping", "empty-axis",
        "missing-base", "no-name", "bad-name", "workers", "bad-key-in-cell", "bad-value-in-cell"])
def test_study_file_errors(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        load_study(write_study(tmp_path, body), out_dir=tmp_path)


def test_base_is_found_next_to_the_study_file_then_in_the_cwd(tmp_path, monkeypatch):
    study = load_study(STUDY, FAST, out_dir=tmp_path)  # base: ../tiny_digits.yaml, relative to the file
    assert study.base_path == BASE
    monkeypatch.chdir(ROOT)
    p = write_study(tmp_path, "study: {name: s, base: scenarios/tiny_digits.yaml}")
    assert load_study(p, out_dir=tmp_path).base_path == BASE


def test_resolved_cells_threads_overrides_and_fingerprint(tmp_path):
    study = load_study(STUDY, {"train.eval_batch_size": 64}, workers=2, out_dir=tmp_path)
    assert study.threads_per_worker == max(1, (os.cpu_count() or 1) // 2)
    assert study.baseline_group == "strategy.name-simplecil" and len(study.cells) == 4
    cfg = study.cells[1].config
    assert cfg["kind"] == "continual" and cfg["run"]["seed"] == 1
    assert cfg["run"]["name"] == study.cells[1].cell.name
    assert cfg["run"]["out_dir"] == str(tmp_path.resolve() / "tiny_digits_study" / "cells")
    assert cfg["train"]["num_threads"] == study.threads_per_worker and cfg["train"]["progress"] is False
    assert study.cells[2].config["strategy"]["epochs"] == 3 and study.cells[2].config["train"]["eval_batch_size"] == 64
    assert study.resolved()["study"]["overrides"] == {"train.eval_batch_size": 64}
    # An explicit thread count wins over the study's; neither it nor the worker count changes the study.
    one = load_study(STUDY, {"train.eval_batch_size": 64, "train.num_threads": 1}, workers=0, out_dir=tmp_path)
    assert one.cells[0].config["train"]["num_threads"] == 1
    assert one.fingerprint == study.fingerprint
    assert load_study(STUDY, {"study.seeds": [0]}, out_dir=tmp_path).fingerprint != study.fingerprint
    assert len(load_study(STUDY, {"study.seeds": [0]}, out_dir=tmp_path).cells) == 2


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_study_files_resolve(path, tmp_path):
    study = load_study(path, out_dir=tmp_path)
    assert study.cells and study.baseline_group is not None
    assert study.source.stem == study.cfg.name  # the folder is named like the file
    if study.cells[0].kind in ("federated", "fednano"):  # the seed reaches the federated kinds
        assert all(c.config["federated"]["seed"] == c.cell.seed for c in study.cells)


# --- running (in this process) ---------------------------------------------------------------
def test_in_process_study(reference):
    sdir = reference.study_dir
    assert reference.failed == [] and reference.incomplete == []
    for f in ("study.yaml", "cells.json", "study.md", "study.csv", "study.json", "report.html"):
        assert (sdir / f).is_file(), f
    index = loads_json((sdir / "cells.json").read_text())
    assert index["study"] == "tiny_digits_study" and index["baseline_group"] == "strategy.name-simplecil"
    assert [c["name"] for c in index["cells"]] == ["strategy.name-simplecil__seed0", "strategy.name-simplecil__seed1",
                                                   LORA0, LORA1]
    for c in index["cells"]:
        assert c["status"] == "finished" and c["attempts"] == 1 and c["error"] is None and c["seconds"] > 0
        assert c["run_dir"] == f"cells/{c['name']}"
        rd = RunDir(sdir / c["run_dir"])
        assert is_run_dir(rd.path) and rd.finished and (rd.path / "metrics.json").is_file()
        assert rd.config()["run"]["seed"] == c["seed"]
    assert index["cells"][2]["overrides"] == {"strategy.name": "finetune", "strategy.mode": "lora",
                                              "strategy.epochs": 3}
    res = results(sdir)
    assert res[LORA0] != res[LORA1]  # the seed reaches the run
    assert "strategy.name-simplecil" in reference.table


def test_rerun_reads_finished_cells(reference, monkeypatch):
    import adaptsim.cl.study.execute as ex

    monkeypatch.setattr(ex, "run_cell", lambda p: pytest.fail(f"cell {p['name']} ran again"))
    again = run_study(STUDY, FAST, workers=0, out_dir=reference.study_dir.parent)
    assert again.failed == [] and table_without_times(again.table) == table_without_times(reference.table)


def test_changed_study_in_the_same_folder_is_refused(reference):
    with pytest.raises(ConfigError, match="holds a different study"):
        run_study(STUDY, {**FAST, "study.seeds": [0, 1, 2]}, workers=0, out_dir=reference.study_dir.parent)


def _half_done(study_dir: Path) -> bool:
    """A cell folder still marked running with a checkpoint after its first experience."""
    for ckpt in study_dir.glob("cells/*/checkpoints/after_exp0.pt"):
        try:
            if RunDir(ckpt.parents[1]).status().get("status") == "running":
                return True
        except ValueError:  # status.json being replaced right now
            pass
    return False


def test_killed_study_resumes_with_the_same_table(reference, tmp_path):
    """SIGKILL a study process while a cell is half done; the same command finishes with the same numbers."""
    code = (f"from adaptsim.cl.study import run_study\n"
            f"run_study({str(STUDY)!r}, {FAST!r}, workers=0, out_dir={str(tmp_path)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index = tmp_path / "tiny_digits_study" / "cells.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if index.is_file() and '"finished"' in index.read_text() and _half_done(index.parent):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the study ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    at_kill = loads_json(index.read_text())["cells"]
    done = [c for c in at_kill if c["status"] == "finished"]
    assert 1 <= len(done) < 4 and _half_done(index.parent)
    resumed = run_study(STUDY, FAST, workers=0, out_dir=tmp_path)
    assert resumed.failed == [] and resumed.incomplete == []
    assert results(resumed.study_dir) == results(reference.study_dir)
    assert table_without_times(resumed.table) == table_without_times(reference.table)
    attempts = {c["name"]: c["attempts"] for c in loads_json(index.read_text())["cells"]}
    assert all(attempts[c["name"]] == 1 for c in done)  # finished cells were read, not rerun


def test_half_finished_cell_resumes_from_its_checkpoint(reference, tmp_path, monkeypatch, caplog):
    from adaptsim.cl import engine

    real = engine.run_config

    def stop_lora0(cfg, kind, **kw):  # the cell's process "dies" after its first experience
        return real(cfg, kind, stop_after=1 if cfg.run.name == LORA0 else None)

    monkeypatch.setattr(engine, "run_config", stop_lora0)
    first = run_study(STUDY, FAST, workers=0, out_dir=tmp_path)
    assert first.incomplete == [LORA0] and first.failed == []
    cell = RunDir(first.study_dir / "cells" / LORA0)
    assert cell.status()["status"] == "running"
    ckpt = cell.path / "checkpoints" / "after_exp0.pt"
    assert ckpt.is_file() and not (cell.path / "checkpoints" / "after_exp1.pt").exists()
    stamp = ckpt.stat().st_mtime_ns
    monkeypatch.setattr(engine, "run_config", real)
    with caplog.at_level("INFO"):
        second = run_study(STUDY, FAST, workers=0, out_dir=tmp_path)
    assert second.incomplete == [] and cell.finished
    assert ckpt.stat().st_mtime_ns == stamp  # continued after experience 0, not started again
    assert any("resumed" in r.getMessage() and LORA0 in r.getMessage() for r in caplog.records)
    assert results(second.study_dir) == results(reference.study_dir)


def test_failing_cell_is_reported_retried_once_and_the_rest_complete(tmp_path, monkeypatch, capsys):
    import adaptsim.cl.runner as runner
    from adaptsim.cl.cli import main

    real, calls = runner.run_stream, []

    def boom_for_lora1(cfg, rd, **kw):
        if cfg.run.name == LORA1:
            calls.append(cfg.run.name)
            raise RuntimeError("boom in lora seed 1")
        return real(cfg, rd, **kw)

    monkeypatch.setattr(runner, "run_stream", boom_for_lora1)
    first = run_study(STUDY, FAST, workers=0, out_dir=tmp_path)
    assert first.failed == [(LORA1, "RuntimeError: boom in lora seed 1")]
    assert LORA1 in first.table and "boom in lora seed 1" in first.table
    index = {c["name"]: c for c in loads_json((first.study_dir / "cells.json").read_text())["cells"]}
    assert index[LORA1]["status"] == "failed" and index[LORA1]["attempts"] == 1
    assert sum(c["status"] == "finished" for c in index.values()) == 3
    assert "boom in lora seed 1" in (first.study_dir / "cells" / LORA1 / "traceback.txt").read_text()

    second = run_study(STUDY, FAST, workers=0, out_dir=tmp_path)  # retried once more
    assert len(calls) == 2 and second.failed == first.failed
    # Attempts used up: the same command reports it without running it, and exits 1.
    args = [f"--{k}={v}" for k, v in FAST.items()]
    assert main(["-q", "study", str(STUDY), "--workers", "0", "--out-dir", str(tmp_path), *args]) == 1
    assert len(calls) == 2 and "1 cell(s) failed" in capsys.readouterr().out

    monkeypatch.setattr(runner, "run_stream", real)
    fixed = run_study(STUDY, FAST, workers=0, out_dir=tmp_path, retry_failed=True)
    assert fixed.failed == [] and RunDir(fixed.study_dir / "cells" / LORA1).finished


def test_cli_reports_a_bad_study_file_in_one_line(tmp_path, capsys):
    from adaptsim.cl.cli import main

    p = write_study(tmp_path, "study: {name: s, base: BASE, grid: {m: [{strategy.nmae: mos}]}}")
    assert main(["-q", "study", str(p), "--workers", "0", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "strategy.nmae-mos__seed0" in err[0]
    assert not (tmp_path / "s").exists()  # nothing ran, no folder
