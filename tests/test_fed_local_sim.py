"""In-process federated loop, runner and config: run folder, metrics, bytes, resume, faults."""

from __future__ import annotations

import json

import pytest

from adaptsim.cl.config import ConfigError
from adaptsim.federated import local_sim
from adaptsim.federated.comm import array_bytes
from adaptsim.federated.config import load_fed_experiment
from adaptsim.federated.runner import run_fed, run_from_raw
from adaptsim.federated.task import get_model, initial_arrays, trainable_arrays

from _fed_common import TINY, _one_thread  # noqa: E402,F401  (autouse fixture)


def _raw(tmp_path, name="r", **fed):
    base = {"method": "ffa_lora", "num_clients": 4, "clients_per_round": 3, "rounds": 2, "lr": 0.5,
            "head_lr": 0.2, "batch_size": 32, "partition": "dirichlet", "dirichlet_alpha": 1.0}
    return {"scenario": {"dataset": {"name": "digits"}}, "backbone": TINY,
            "federated": {**base, **fed}, "run": {"out_dir": str(tmp_path), "name": name}}


def test_config_is_strict_and_validated():
    with pytest.raises(ConfigError, match=r"unknown key 'num_client'.*num_clients"):
        load_fed_experiment({"federated": {"num_client": 3}})
    with pytest.raises(ConfigError, match="top level"):
        load_fed_experiment({"federated": {}, "strategy": {}})
    with pytest.raises(ConfigError, match="federated.method"):
        load_fed_experiment({"federated": {"method": "fedprox"}})
    with pytest.raises(ConfigError, match="clients_per_round"):
        load_fed_experiment({"federated": {"num_clients": 2, "clients_per_round": 3}})
    with pytest.raises(ConfigError, match="dp.epsilon"):
        load_fed_experiment({"federated": {"dp": {"epsilon": -1}}})
    with pytest.raises(ConfigError, match="unknown key 'name' in section 'scenario'"):
        load_fed_experiment({"federated": {}, "scenario": {"name": "digits"}})
    cfg = load_fed_experiment({"federated": {"dp": {"epsilon": float("inf")}}})
    assert not cfg.federated.dp.enabled
    assert load_fed_experiment(cfg.to_raw()) == cfg  # the written config.yaml round-trips


def test_sample_clients_seeded():
    a = local_sim.sample_clients(10, 3, seed=0, round_idx=2)
    assert a == local_sim.sample_clients(10, 3, seed=0, round_idx=2) and len(set(a)) == 3
    assert any(local_sim.sample_clients(10, 3, 0, r) != a for r in range(3, 8))
    assert local_sim.sample_clients(4, 4, 0, 0) == [0, 1, 2, 3]


def test_run_folder_metrics_bytes_and_learning(tmp_path):
    res = run_from_raw(_raw(tmp_path, rounds=3, partition="iid", local_epochs=2), source="fed_tiny.yaml")
    d = res.run_dir
    for f in ("config.yaml", "metrics.json", "accuracy_vs_round.png", "accuracy_vs_epsilon.png",
              "checkpoints/round_003.npz", "checkpoints/round_003.json"):
        assert (d / f).exists(), f
    m = json.loads((d / "metrics.json").read_text())
    rounds = m["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    keys = {"round", "accuracy", "loss", "epsilon", "bytes_up", "bytes_down", "seconds", "replies", "failures"}
    assert keys <= set(rounds[0])
    cfg = load_fed_experiment(_raw(tmp_path))
    per_client = array_bytes(trainable_arrays(get_model(cfg), "ffa_lora"))
    assert all(r["bytes_up"] == r["bytes_down"] == 3 * per_client and r["replies"] == 3 for r in rounds)
    assert set(rounds[-1]["epsilon"]) == {"0", "1", "2", "3"} and rounds[-1]["epsilon"]["0"] == "inf"  # no DP: inf -> "inf" (RunDir's JSON encoding)
    from adaptsim.federated.task import client_dataset, evaluate

    before = evaluate(get_model(cfg), initial_arrays(cfg), client_dataset(cfg, 0, 4)[1])
    assert rounds[-1]["loss"] < before["loss"] - 0.02  # the global model improved
    # vanilla LoRA moves A too: more bytes per round
    res2 = run_from_raw(_raw(tmp_path, name="lora", method="lora", rounds=1, lr=0.05))
    assert res2.metrics["rounds"][0]["bytes_up"] > rounds[0]["bytes_up"]


def test_resume_matches_uninterrupted_run(tmp_path):
    full = run_from_raw(_raw(tmp_path, name="full", dp={"epsilon": 5.0, "reproducible": True}))
    cfg = load_fed_experiment(_raw(tmp_path, name="cut", dp={"epsilon": 5.0, "reproducible": True}))
    part = run_fed(cfg, stop_after=1)
    assert not part.finished and json.loads((part.run_dir / "status.json").read_text())["status"] == "running"
    assert len(json.loads((part.run_dir / "metrics.json").read_text())["rounds"]) == 1
    resumed = run_fed(resume=part.run_dir)
    a = [(r["accuracy"], r["epsilon"]) for r in full.metrics["rounds"]]
    b = [(r["accuracy"], r["epsilon"]) for r in resumed.metrics["rounds"]]
    assert a == b  # client DP states and global arrays came back from the checkpoint
    # seeded noise is labelled in every round and the summary; each client's accountant is on its node
    assert resumed.metrics["summary"]["privacy"] == "not private (reproducible noise)"
    assert all(r["privacy"] == "not private (reproducible noise)" for r in resumed.metrics["rounds"])
    trained = sorted(c for c, e in resumed.metrics["rounds"][-1]["epsilon"].items() if e)
    assert trained and sorted(p.parent.name for p in (part.run_dir / "nodes").glob("*/dp_*.json")) == trained
    assert all(0 < e <= 5.0 for e in resumed.metrics["rounds"][-1]["epsilon"].values() if e)


def test_failed_client_does_not_fail_the_round(tmp_path, monkeypatch):
    from adaptsim.federated.methods.lora import FFALoRA

    real = FFALoRA.client_fit

    def flaky(self, arrays, partition_id, state, **kw):
        if partition_id == 1:
            raise RuntimeError("client 1 crashed")
        return real(self, arrays, partition_id, state, **kw)

    monkeypatch.setattr(FFALoRA, "client_fit", flaky)
    cfg = load_fed_experiment(_raw(tmp_path, clients_per_round=4, rounds=1, min_replies=3))
    rounds = local_sim.run_inprocess(cfg)
    assert rounds[0]["failures"] == 1 and rounds[0]["replies"] == 3
    assert rounds[0]["failed"] == [{"client": 1, "reason": "RuntimeError: client 1 crashed"}]
    cfg4 = load_fed_experiment(_raw(tmp_path, clients_per_round=4, rounds=1, min_replies=4))
    with pytest.raises(RuntimeError, match="min_replies"):
        local_sim.run_inprocess(cfg4)


def test_budget_spent_clients_stop_and_say_so(tmp_path):
    """Clients whose sigma was planned for 2 rounds refuse a 3rd; the model stays as it was."""
    import dataclasses

    cfg = load_fed_experiment(_raw(tmp_path, rounds=2, clients_per_round=4, dp={"epsilon": 3.0}))
    rounds = local_sim.run_inprocess(cfg, tmp_path / "run")
    assert all(not r["budget_spent"] for r in rounds)
    eps = [max(r["epsilon"].values()) for r in rounds]
    assert 0 < eps[0] < eps[1] <= 3.0
    cfg3 = dataclasses.replace(cfg, federated=dataclasses.replace(cfg.federated, rounds=3))
    rounds3 = local_sim.run_inprocess(cfg3, tmp_path / "run", resume=True)
    last = rounds3[-1]
    assert last["round"] == 3 and sorted(last["budget_spent"]) == [0, 1, 2, 3]
    assert last["accuracy"] == rounds3[1]["accuracy"] and max(last["epsilon"].values()) == eps[1]
