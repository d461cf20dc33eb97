"""Shared helpers of the real-process Flower tests (SuperLink/SuperNodes on loopback)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psutil
import pytest

from adaptsim.federated.config import load_fed_experiment
from adaptsim.federated.flower_glue import launch_run_config

# Small and quick: tiny random ViT on 16 px digits, IID split, 2 clients (the learning rates of
# tests/test_fed_local_sim.py, where this model is known to learn in a few rounds).
TINY = {"scenario": {"dataset": {"name": "digits"}},
        "backbone": {"name": "tiny_vit", "img_size": 16, "tiny_patch": 4, "tiny_dim": 32, "tiny_depth": 2,
                     "tiny_heads": 2},
        "federated": {"mode": "deployment", "num_clients": 2, "clients_per_round": 2, "rounds": 2,
                      "local_epochs": 2, "lr": 0.5, "head_lr": 0.2, "partition": "iid", "num_threads": 1,
                      "eval_batch_size": 512},
        "run": {"out_dir": "/tmp/runs", "plots": False}}


def run_config(run_dir, round_timeout: float = 300.0, **federated) -> dict:
    """Flat run_config of TINY with ``federated`` overrides, writing to ``run_dir`` (and any other
    run folder next to it: ``run.out_dir`` is ``run_dir``'s parent, e.g. under ``tmp_path``)."""
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["federated"] = {**raw["federated"], **federated}
    raw["run"] = {**raw["run"], "out_dir": str(Path(run_dir).parent)}
    cfg = load_fed_experiment(raw, "test")
    return launch_run_config(cfg, run_dir, round_timeout)


def alive(pids) -> list[int]:
    """The pids that still run (zombies count as gone)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def tree(fed) -> list[int]:
    """Pids of every process the federation started, with their descendants."""
    pids = []
    for proc in [fed.superlink, *fed.supernodes]:
        if proc is None:
            continue
        pids.append(proc.pid)
        try:
            pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return pids


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """Per-test ``ADAPTSIM_CACHE`` (under ``tmp_path``) and Ray temp dir, restored afterwards.

    Set before a :class:`~adaptsim.federated.deploy.LocalFederation` is built (it copies the
    environment). Ray's temp dir is a short folder under ``/tmp``: Ray puts Unix sockets in it,
    whose paths must stay under 107 characters, which ``tmp_path`` can exceed.
    """
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("ADAPTSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    yield {"cache": tmp_path / "cache", "ray_tmp": Path(ray_tmp)}
    shutil.rmtree(ray_tmp, ignore_errors=True)
