"""Deployment on loopback: a real flower-superlink, two flower-supernodes and `flwr run .`.

Slow (every Flower message starts a `flwr-clientapp` process that imports torch); still run in CI.
"""

from __future__ import annotations

import json

import pytest

from adaptsim.federated.deploy import LocalFederation
from adaptsim.federated.flower_glue import read_rounds

from _flower_proc import alive, run_config, tree

pytestmark = pytest.mark.slow


def test_superlink_two_supernodes_two_rounds_improve_and_clean_up(tmp_path):
    run_dir = tmp_path / "run"
    fed = LocalFederation(tmp_path / "fed", num_supernodes=2)
    pids = []
    try:
        fed.start()
        pids = tree(fed)
        status = fed.run(run_config(run_dir), timeout=1200)
        pids = sorted(set(pids + tree(fed)))
    finally:
        fed.stop()
    assert status == "finished:completed"
    rounds, initial = read_rounds(run_dir, with_initial=True)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["replies"] == 2 and r["failures"] == 0 for r in rounds)
    # the global model improved over the one the server started from
    assert rounds[-1]["accuracy"] > initial["accuracy"], (initial, rounds)
    assert rounds[-1]["loss"] < initial["loss"] - 0.02, (initial, rounds)
    assert rounds[0]["bytes_up"] > 0 and rounds[0]["bytes_down"] == rounds[0]["bytes_up"]  # ffa: B+head both ways
    metrics = json.loads((run_dir / "metrics.json").read_text())   # same run folder as in-process
    assert metrics["mode"] == "deployment" and len(metrics["rounds"]) == 2
    assert (run_dir / "checkpoints" / "round_002.npz").exists()
    assert "partition-id=1 num-partitions=2" in " ".join(fed.supernodes[1].args)
    assert not alive(pids), "Flower processes left running"


def test_simulation_engine_matches_inprocess_rounds(tmp_path):
    """Flower's simulation engine (Ray) runs the same app: same sampled clients, same seeds, so the
    round metrics equal the in-process loop's (up to float summation order in FedAvg)."""
    import time

    from adaptsim.federated.config import load_fed_experiment
    from adaptsim.federated.local_sim import run_inprocess
    from adaptsim.federated.sim_engine import run_simulation_mode

    from _flower_proc import TINY

    raw = {k: dict(v) for k, v in TINY.items()}
    raw["federated"] = {**raw["federated"], "mode": "simulation", "rounds": 1}
    cfg = load_fed_experiment(raw, "test")
    t = time.monotonic()
    sim = run_simulation_mode(cfg, tmp_path, num_cpus=2)
    print(f"simulation engine: {time.monotonic() - t:.1f}s for 1 round of 2 clients")
    ref = run_inprocess(cfg)
    assert len(sim) == 1 and sim[0]["replies"] == 2 and sim[0]["failures"] == 0
    assert sim[0]["accuracy"] == pytest.approx(ref[0]["accuracy"], abs=1e-9)
    assert sim[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-4)
    assert sim[0]["bytes_up"] == ref[0]["bytes_up"] and sim[0]["bytes_down"] == ref[0]["bytes_down"]
