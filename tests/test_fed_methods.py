"""The federated-method registry, the one in-process round engine and the one Flower adapter.

- the registry lists lora / ffa_lora / fednano and fails loudly on unknown or bad names;
- a method registered from outside (a toy with client state across rounds and arbitrary named
  arrays, as the federated continual-learning methods will be) runs on both engines unchanged;
- for real methods, one round driven through the Flower adapter (``FedMethodStrategy`` +
  the ClientApp handlers, called in-process with hand-built Messages) gives the same aggregated
  parameters and the same round record as the in-process engine;
- no method-name branch outside ``federated/methods/`` (grep).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from adaptsim.cl.config import ConfigError
from adaptsim.federated.config import load_fed_experiment
from adaptsim.federated.flower_glue import arrays_to_record, launch_run_config, record_to_arrays
from adaptsim.federated.methods import (FedMethod, fed_method, fed_method_class, fed_method_entry, list_fed_methods,
                                        register_fed_method)
from adaptsim.federated.methods import base as methods_base

from _fed_common import TINY, _one_thread  # noqa: F401  (autouse fixture)

FED = Path(__file__).resolve().parents[1] / "federated"


# -- registry ----------------------------------------------------------------------------------
def test_registry_lists_the_methods_with_their_config_and_run_kind():
    from adaptsim.federated.config import FederatedConfig
    from adaptsim.federated.fednano.config import FedNanoConfig

    assert {"lora", "ffa_lora", "fednano"} <= set(list_fed_methods())
    assert fed_method_entry("fednano").config_cls is FedNanoConfig
    assert fed_method_entry("ffa_lora").config_cls is FederatedConfig
    assert fed_method_class("lora").sends_a and not fed_method_class("ffa_lora").sends_a
    assert {fed_method_class(n).run_kind for n in ("lora", "ffa_lora")} == {"federated"}
    assert fed_method_class("fednano").run_kind == "fednano"


def test_unknown_method_error_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"unknown federated method 'ffa_lroa'; available: fcl, fednano, ffa_lora, lora"
                                       r".*did you mean 'ffa_lora'"):
        fed_method_class("ffa_lroa")
    with pytest.raises(ConfigError, match=r"federated.method must be a registered method, one of "
                                          r"\['fcl', 'fednano', 'ffa_lora', 'lora'\]; got 'fedprox'"):
        load_fed_experiment({"federated": {"method": "fedprox"}})
    with pytest.raises(ValueError, match="already registered"):
        register_fed_method("lora", object)(type("Again", (FedMethod,), {}))
    with pytest.raises(ValueError, match="lower_snake"):
        register_fed_method("FedX", object)(type("Bad", (FedMethod,), {}))


# -- a method from outside: state across rounds, arbitrary named arrays --------------------------
class _ToyConfig:
    """(the toy's options would live here)"""


class ToySum(FedMethod):
    """Client k sends its round count and ``w + k`` under made-up names; the server averages ``w``."""

    def initial_arrays(self):
        return {"w": np.zeros(3, np.float32)}

    def aggregate(self, results, global_arrays):
        total = sum(n for _, n in results)
        return {"w": sum(a["w"] * n for a, n in results) / total}

    def evaluate(self, arrays):
        return {"accuracy": float(arrays["w"].mean()), "loss": 0.0, "num_examples": 1}

    def round_metrics(self, replies, evaluation):
        return {"rounds_seen": int(replies.sum_metric("rounds_seen"))}

    def client_fit(self, arrays, partition_id, client_state, *, round_idx, node_store=None):
        state = dict(client_state or {"rounds_seen": 0})
        state["rounds_seen"] += 1
        out = {"w": arrays["w"] + partition_id, "cl::memory": np.full(2, state["rounds_seen"], np.float32)}
        met = {"loss": 1.0, "epsilon": float("inf"), "budget_spent": 0, "rounds_seen": state["rounds_seen"]}
        return out, partition_id + 1, met, state


@pytest.fixture
def toy():
    register_fed_method("toy_sum", _ToyConfig)(ToySum)
    try:
        yield load_fed_experiment({"federated": {"method": "toy_sum", "num_clients": 3, "clients_per_round": 3,
                                                 "rounds": 2, "min_replies": 2},
                                   "run": {"plots": False}}, "t")
    finally:
        methods_base._REGISTRY._entries.pop("toy_sum")


def _msg(content: RecordDict, mtype: str, dst: int, mid: str) -> Message:
    md = Metadata(run_id=1, message_id=mid, src_node_id=1, dst_node_id=dst, reply_to_message_id="",
                  group_id="", created_at=time.time(), ttl=3600, message_type=mtype)
    return Message(content, metadata=md)


@pytest.fixture
def server_identity(monkeypatch):
    """What Flower sets in a ServerApp process before the strategy builds Messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _flower_rounds(cfg, run_dir: Path, rounds: int) -> tuple[list[dict], list[dict]]:
    """``rounds`` rounds of the Flower adapter, each client's reply computed by the ClientApp
    handlers (handshake, then train) on per-node Contexts; returns (round records, global arrays)."""
    from adaptsim.federated.client_app import app
    from adaptsim.federated.flower_strategy import FedMethodStrategy

    n = cfg.federated.num_clients
    run_dir.mkdir(parents=True, exist_ok=True)   # (the ServerApp creates it)
    node_of = {p: 100 + p for p in range(n)}
    rc = launch_run_config(cfg, run_dir)
    ctx = {p: Context(run_id=1, node_id=node_of[p], node_config={"partition-id": p, "num-partitions": n},
                      state=RecordDict(), run_config=rc) for p in range(n)}
    for p in range(n):
        hello = RecordDict({"config": ConfigRecord({"a-seed": cfg.federated.a_seed})})
        app(_msg(hello, "query", node_of[p], f"q{p}"), ctx[p])
    s = FedMethodStrategy(cfg, node_of, run_dir)
    arrays = arrays_to_record(fed_method(cfg).initial_arrays())
    s.central_evaluate(0, arrays)
    part_of, globals_ = {v: k for k, v in node_of.items()}, []
    for r in range(1, rounds + 1):
        msgs = list(s.configure_train(r, arrays, ConfigRecord(), None))
        replies = [app(_msg(m.content, "train", m.metadata.dst_node_id, f"t{r}-{i}"), ctx[part_of[m.metadata.dst_node_id]])
                   for i, m in enumerate(msgs)]
        arrays, _ = s.aggregate_train(r, replies)
        s.central_evaluate(r, arrays)
        globals_.append(record_to_arrays(arrays))
    return s.book.rounds, globals_


_VOLATILE = ("seconds",)


def _same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in _VOLATILE} == {k: v for k, v in rb.items() if k not in _VOLATILE}


def test_a_registered_method_runs_on_both_engines_with_state_and_named_arrays(toy, tmp_path, server_identity):
    from adaptsim.federated.local_sim import load_checkpoint, run_inprocess

    rounds = run_inprocess(toy, tmp_path / "inproc")
    # round 1: w_k = k with weights k + 1 -> (0*1 + 1*2 + 2*3) / 6; client states carried across rounds
    assert rounds[0]["accuracy"] == pytest.approx(8 / 6)
    assert [r["rounds_seen"] for r in rounds] == [3, 6]
    _, states, _ = load_checkpoint(tmp_path / "inproc", 2)
    assert states == {"0": {"rounds_seen": 2}, "1": {"rounds_seen": 2}, "2": {"rounds_seen": 2}}
    assert rounds[0]["bytes_up"] == 3 * (12 + 8) and rounds[0]["bytes_down"] == 3 * 12   # every named array counted
    flower, _ = _flower_rounds(toy, tmp_path / "flower", 2)
    _same_records(rounds, flower)


def test_any_method_resumes_in_process_with_its_client_state(toy, tmp_path):
    from adaptsim.federated.local_sim import run_inprocess

    full = run_inprocess(toy, tmp_path / "full")
    assert len(run_inprocess(toy, tmp_path / "cut", stop_after=1)) == 1
    resumed = run_inprocess(toy, tmp_path / "cut", resume=True)
    _same_records(full, resumed)                 # rounds_seen = 6 in round 2: states came back
    assert resumed[-1]["rounds_seen"] == 6


@pytest.mark.parametrize("method", ["ffa_lora", "lora", "fednano"])
def test_flower_adapter_and_inprocess_engine_agree_on_one_round(method, tmp_path, server_identity, monkeypatch):
    """Same client replies -> same aggregated parameters and the same round record, bit for bit."""
    from adaptsim.federated.local_sim import load_checkpoint, run_inprocess

    monkeypatch.setenv("ADAPTSIM_CACHE", str(tmp_path / "cache"))
    if method == "fednano":
        fed = {"method": "fednano", "num_clients": 3, "clients_per_round": 2, "rounds": 1, "lr": 0.5,
               "partition": "iid", "batch_size": 32,
               "fednano": {"pretrain_per_class": 2, "pretrain_steps": 20, "d_model": 32, "heads": 2,
                           "aggregation": "fisher"}}
        data = {"name": "digits", "train_per_class": 12, "test_per_class": 4}
    else:
        fed = {"method": method, "num_clients": 3, "clients_per_round": 2, "rounds": 1, "lr": 0.3,
               "partition": "iid", "batch_size": 16}
        data = {"name": "digits", "train_per_class": 12, "test_per_class": 4}
    cfg = load_fed_experiment({"scenario": {"dataset": data}, "backbone": TINY, "federated": fed,
                               "run": {"plots": False}}, "t")
    rounds = run_inprocess(cfg, tmp_path / "inproc")
    inproc, _, _ = load_checkpoint(tmp_path / "inproc", 1)
    flower, globals_ = _flower_rounds(cfg, tmp_path / "flower", 1)
    assert sorted(inproc) == sorted(globals_[0])
    for k in inproc:
        np.testing.assert_array_equal(globals_[0][k], inproc[k], err_msg=k)
    assert any(not np.array_equal(inproc[k], v) for k, v in fed_method(cfg).initial_arrays().items())  # it moved
    _same_records(rounds, flower)
    assert rounds[0]["replies"] == 2 and rounds[0]["failures"] == 0


# -- no method-name branch outside the registry ------------------------------------------------
def test_no_method_name_branch_outside_the_method_registry():
    names = "|".join(map(re.escape, list_fed_methods()))
    quoted = rf"""['"]({names})['"]"""
    patterns = [rf"(==|!=)\s*{quoted}", rf"{quoted}\s*(==|!=)", rf"\bin\s*[\(\[\{{][^)\]}}]*{quoted}",
                r"\.method\s*(==|!=)", r"\.method\s+(not\s+)?in\s*[\(\[\{]\s*['\"]", r"_is_fednano|method_is_\w+"]
    offenders = []
    for path in sorted(FED.glob("*.py")):   # federated/methods/ and the methods' own packages are the registry side
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(re.search(p, code) for p in patterns):
                offenders.append(f"{path.name}:{no}: {line.strip()}")
    assert not offenders, "method-name branches outside federated/methods/:\n" + "\n".join(offenders)
    strategy = (FED / "flower_strategy.py").read_text()
    assert "_construct_messages" not in strategy and "object_id" not in strategy   # Flower's public API only
