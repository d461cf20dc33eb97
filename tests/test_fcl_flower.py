"""Federated continual learning three ways: in process, Flower's simulation engine, real processes.

The ``fcl`` federated method (federated/methods/fcl.py) driven by a round engine must give what
the in-process FCL loop gives: the same accuracy matrix, bit-identical prototype statistics and
the same per-round records (sizes, bytes by kind). The Flower tests are slow (Ray start; one
``flwr-clientapp`` process per message in deployment) and marked ``slow``, like
tests/test_flower_deploy.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch



def _untimed(records):
    """Round records without their wall times (which differ between any two runs)."""
    return [{k: v for k, v in r.items() if k not in ("client_seconds", "server_seconds")} for r in records]

def _cfg(num_clients=3, two_experiences=False, **fcl):
    from adaptsim.cl.config import read_yaml
    from adaptsim.federated.fcl.config import FCLExperimentConfig

    raw = read_yaml("scenarios/tiny_digits.yaml")
    raw.pop("kind", None)
    if two_experiences:
        raw["scenario"] = {**raw["scenario"], "initial_increment": 5, "increment": 5}
    raw["fcl"] = {"num_clients": num_clients, **fcl}
    raw["train"] = {**raw["train"], "num_threads": 1}
    raw["run"] = {**raw["run"], "plots": False}
    return FCLExperimentConfig.from_raw(raw, "test")


def _reference(cfg):
    from adaptsim.cl.runner import prepare
    from adaptsim.cl.train import fit
    from adaptsim.federated.fcl.loop import run_fcl
    from adaptsim.federated.fcl.runkind import _make_strategy_factory

    stream = prepare(cfg)
    make = _make_strategy_factory(cfg, stream, "cpu")
    f = cfg.fcl
    return stream, run_fcl(stream, make, lambda p: fit(p, device="cpu"), num_clients=f.num_clients,
                           rounds=f.rounds, partition=f.partition, alpha=f.dirichlet_alpha, seed=f.partition_seed)


def _cli(tmp_path, name, *args):
    from adaptsim.cl.cli import main

    rc = main(["run", "scenarios/tiny_digits.yaml", "--kind=fcl", "--fcl.num_clients=2", "--scenario.initial_increment=5",
               "--scenario.increment=5", "--train.num_threads=1", f"--run.out_dir={tmp_path}", f"--run.name={name}",
               "--run.plots=false", *args])
    assert rc == 0
    d = tmp_path / name
    return json.loads((d / "metrics.json").read_text()), _untimed(json.loads((d / "fcl_rounds.json").read_text())), d


def test_shared_state_flattens_losslessly():
    from adaptsim.strategies.sharing import ClassStats, SharedState

    st = SharedState({"set/0/A": np.arange(6, dtype=np.float32).reshape(2, 3)}, 7,
                     {"class": ClassStats(np.array([1, 2]), np.ones((2, 3)), np.ones((2, 3, 3))),
                      "proto": ClassStats(np.array([3, 0]), np.full((2, 3), 0.1))}, {"phase": "train", "classes": [0, 1]})
    back = SharedState.from_arrays(st.to_arrays())
    assert back.weight == 7 and back.meta == st.meta and set(back.stats) == {"class", "proto"}
    assert np.array_equal(back.arrays["set/0/A"], st.arrays["set/0/A"]) and back.arrays["set/0/A"].dtype == np.float32
    assert back.stats["proto"].outer is None and np.array_equal(back.stats["class"].outer, st.stats["class"].outer)
    assert np.array_equal(back.stats["proto"].sums, st.stats["proto"].sums)


def test_fcl_method_on_the_round_engine_equals_the_fcl_loop(monkeypatch):
    """(a) rebuilt clients and the server's strategy inside the method: same R, same records
    (sizes, bytes by kind), bit-identical prototypes (SimpleCIL, 3 clients, Dirichlet 0.5, 3 experiences)."""
    import adaptsim.federated.methods as methods
    from adaptsim.federated.fcl.flower import fed_experiment_of, results_of_rounds
    from adaptsim.federated.local_sim import run_inprocess

    cfg = _cfg()
    stream, ref = _reference(cfg)
    made = []
    real = methods.fed_method
    monkeypatch.setattr(methods, "fed_method", lambda c: made.append(real(c)) or made[-1])
    fcfg = fed_experiment_of(cfg, len(stream), mode="inprocess")
    assert fcfg.federated.method == "fcl" and fcfg.federated.rounds == 3 and fcfg.federated.min_replies == 3
    out = results_of_rounds(run_inprocess(fcfg), len(stream))
    np.testing.assert_array_equal(np.array(out["R"]), np.array(ref["R"]))
    assert _untimed(out["rounds"]) == _untimed(ref["rounds"])
    assert len(set(out["rounds"][0]["client_sizes"])) > 1   # the shares really differ
    server = made[0].server_strategy()
    assert torch.equal(server.classifier.prototypes, ref["server"].classifier.prototypes)  # bit for bit
    assert bool(server.classifier.has_proto.all())


@pytest.mark.parametrize("strategy,rounds", [({"name": "finetune", "epochs": 1}, 2),
                                             ({"name": "mos", "epochs": 1, "crct_epochs": 1, "merge_mode": "paper"}, 1)])
def test_rebuilt_clients_continue_from_the_global_state(strategy, rounds):
    """(a) with trained parameters: finetune with 2 rounds per experience (a client that ignored
    the global state, or restarted from other randomness, would change R); MOS with its
    statistics round (``collect_statistics``; fcl.rounds + 1 server rounds per experience)."""
    from adaptsim.federated.fcl.config import FCLExperimentConfig
    from adaptsim.federated.fcl.flower import fed_experiment_of, results_of_rounds
    from adaptsim.federated.local_sim import run_inprocess

    raw = _cfg(num_clients=2, two_experiences=True, rounds=rounds).to_raw()
    raw["strategy"] = strategy
    cfg = FCLExperimentConfig.from_raw(raw, "test")
    stream, ref = _reference(cfg)
    fcfg = fed_experiment_of(cfg, len(stream), mode="inprocess")
    assert fcfg.federated.rounds == 2 * 2
    out = results_of_rounds(run_inprocess(fcfg), len(stream))
    np.testing.assert_array_equal(np.array(out["R"]), np.array(ref["R"]))
    assert _untimed(out["rounds"]) == _untimed(ref["rounds"]) and out["rounds"][0]["bytes_up"]["arrays"] > 0


def test_fcl_engine_routes_the_run_kind_to_flower(tmp_path, monkeypatch):
    """``fcl.engine`` is honoured: simulation/deployment go through run_fcl_flower (faked here
    with the method on the in-process round engine), inprocess does not."""
    import adaptsim.federated.fcl.flower as flower
    from adaptsim.federated.local_sim import run_inprocess

    calls = []

    def fake(cfg, stream, run_dir):
        calls.append(cfg.fcl.engine)
        return flower.results_of_rounds(run_inprocess(flower.fed_experiment_of(cfg, len(stream), mode="inprocess")),
                                        len(stream))

    monkeypatch.setattr(flower, "run_fcl_flower", fake)
    ref, ref_rounds, _ = _cli(tmp_path, "inprocess")
    assert calls == [] and ref["setting"]["engine"] == "inprocess"
    for engine in ("simulation", "deployment"):
        m, rounds, _ = _cli(tmp_path, engine, f"--fcl.engine={engine}")
        assert m["setting"]["engine"] == engine and m["R"] == ref["R"] and rounds == ref_rounds
    assert calls == ["simulation", "deployment"]


def test_fcl_engine_and_method_refuse_bad_input(tmp_path, capsys):
    from adaptsim.cl.cli import main
    from adaptsim.cl.config import ConfigError
    from adaptsim.federated.config import load_fed_experiment
    from adaptsim.federated.methods import fed_method_class

    rc = main(["run", "scenarios/tiny_digits.yaml", "--kind=fcl", "--fcl.engine=flower", f"--run.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "inprocess" in err and not any(tmp_path.iterdir())
    rc = main(["run", "scenarios/tiny_digits.yaml", "--kind=fcl", "--strategy.name=mos", "--strategy.merge_mode=official",
               "--fcl.engine=deployment", f"--run.out_dir={tmp_path}"])  # refused before any process starts
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "merge_mode='paper'" in err and not any(tmp_path.iterdir())
    cfg = load_fed_experiment({"federated": {"method": "fcl"}})
    with pytest.raises(ConfigError, match="fcl run kind"):
        fed_method_class("fcl").check(cfg)


@pytest.mark.slow
def test_simulation_engine_gives_the_in_process_accuracy_matrix(tmp_path, monkeypatch):
    """(b) 2 clients, 2 experiences x 1 round on Flower's simulation engine (Ray)."""
    import tempfile

    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short socket paths
    ref, ref_rounds, _ = _cli(tmp_path, "inprocess")
    sim, sim_rounds, d = _cli(tmp_path, "sim", "--fcl.engine=simulation")
    assert sim["setting"]["engine"] == "simulation" and (d / "flower_rounds.json").is_file()  # it ran on Flower
    assert len(sim["R"]) == 2 and sim["R"] == ref["R"] and sim_rounds == ref_rounds
    assert sim["A_last"] == ref["A_last"] and sim["bytes_up"] == ref["bytes_up"] > 0


@pytest.mark.slow
def test_real_superlink_and_two_supernodes_give_the_in_process_accuracy_matrix(tmp_path):
    """(c) the issue's done-when: flower-superlink + 2 flower-supernodes, 2 experiences x 1 round."""
    import psutil

    ref, ref_rounds, _ = _cli(tmp_path, "inprocess")
    dep, dep_rounds, d = _cli(tmp_path, "dep", "--fcl.engine=deployment")
    assert dep["setting"]["engine"] == "deployment"
    flower = json.loads((d / "flower_rounds.json").read_text())["rounds"]
    assert [r["replies"] for r in flower] == [2, 2] and all(r["failures"] == 0 for r in flower)
    assert all((d / "flower" / "logs" / f"supernode_{i}.log").is_file() for i in (0, 1))  # two real SuperNodes
    assert len(dep["R"]) == 2 and dep["R"] == ref["R"] and dep_rounds == ref_rounds
    assert dep["A_last"] == ref["A_last"] > 0
    left = [p.name() for p in psutil.Process().children(recursive=True)]
    assert not [n for n in left if "flower" in n or "flwr" in n], left
