"""The runner: run folder contents, resume after a kill, CLI errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptsim.cl.config import parse_overrides
from adaptsim.cl.experiment import load_experiment
from adaptsim.cl.runner import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scenarios" / "tiny_digits.yaml"


def _cfg(tmp_path, *extra):
    return load_experiment(TINY, parse_overrides([f"--run.out_dir={tmp_path}", *extra]))


def test_run_folder_has_everything(tmp_path):
    res = run(_cfg(tmp_path, "--run.name=a"))
    d = res.run_dir
    for f in ("config.yaml", "metrics.json", "accuracy_matrix.csv", "accuracy_matrix.png",
              "accuracy_curve.png", "checkpoints/after_exp2.pt"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    R = np.array(m["R"])
    assert R.shape == (3, 3)
    assert m["A_last"] == pytest.approx(np.average(R[2], weights=m["test_sizes"]))
    assert np.loadtxt(d / "accuracy_matrix.csv", delimiter=",", skiprows=1).shape == (3, 3)
    assert json.loads((d / "status.json").read_text())["status"] == "finished"
    # the resolved config re-creates the same experiment
    assert load_experiment(d / "config.yaml").config_hash() == m["config_hash"]
    # a finished run folder is never overwritten
    from adaptsim.cl.rundir import RunDirError

    with pytest.raises(RunDirError, match="finished run"):
        run(_cfg(tmp_path, "--run.name=a"))


def test_resume_after_kill_gives_same_metrics(tmp_path):
    extra = ["--strategy.name=finetune", "--strategy.epochs=2"]
    full = run(_cfg(tmp_path, "--run.name=full", *extra)).metrics
    part = run(_cfg(tmp_path, "--run.name=killed", *extra), stop_after=2)
    assert part.finished is False and not (part.run_dir / "metrics.json").exists()
    assert json.loads((part.run_dir / "status.json").read_text())["status"] == "running"
    resumed = run(resume=part.run_dir).metrics
    assert resumed["R"] == full["R"]
    assert resumed["A_last"] == full["A_last"] and resumed["forgetting"] == full["forgetting"]


def test_checkpoint_loads_with_weights_only(tmp_path):
    res = run(_cfg(tmp_path, "--run.name=w", "--strategy.name=finetune", "--strategy.epochs=1"))
    ck = torch.load(res.run_dir / "checkpoints" / "after_exp0.pt", weights_only=True)
    assert "strategy" in ck and "R" in ck["run_state"]


def _cli(*args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1", ADAPTSIM_CACHE=os.environ.get("ADAPTSIM_CACHE", ""))
    if not env["ADAPTSIM_CACHE"]:
        env.pop("ADAPTSIM_CACHE")
    return subprocess.run([sys.executable, str(ROOT / "run_scenario.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
def test_cli_missing_cifar_is_clear_error_not_traceback(tmp_path):
    out = _cli(str(ROOT / "scenarios" / "split_cifar.yaml"), f"--scenario.dataset.root={tmp_path}",
               f"--run.out_dir={tmp_path}")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "CIFAR-100" in out.stderr and "split_mnist.yaml" in out.stderr


@pytest.mark.slow
def test_cli_unknown_key_is_clear_error(tmp_path):
    out = _cli(str(TINY), "--run.sed=1", f"--run.out_dir={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "did you mean 'seed'" in out.stderr and "valid keys" in out.stderr
