"""Flower glue without processes: run_config <-> config, the ClientApp handlers, the strategy rules.

The handlers and the strategy are called in-process with hand-built ``Message``/``Context``
objects (Flower's own unit-test pattern); the real-process paths are in test_flower_deploy.py.
"""

from __future__ import annotations

import math
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (ConfigRecord, Context, Error, Message, Metadata, MetricRecord,
                      RecordDict)
from flwr.common.config import flatten_dict

from adaptsim.cl.config import ConfigError
from adaptsim.federated.config import load_fed_experiment
from adaptsim.federated.flower_glue import (ENGINE_KEYS, arrays_to_record, experiment_from_run_config,
                                            experiment_to_run_config, record_to_arrays)

REPO = Path(__file__).resolve().parents[1]
TINY = {"scenario": {"dataset": {"name": "digits", "train_per_class": 12, "test_per_class": 6}},
        "backbone": {"name": "tiny_vit", "img_size": 16, "tiny_patch": 4, "tiny_dim": 32, "tiny_depth": 2,
                     "tiny_heads": 2},
        "federated": {"num_clients": 2, "clients_per_round": 2, "rounds": 2, "lr": 0.1, "num_threads": 1,
                      "partition": "iid", "min_replies": 2},
        "run": {"out_dir": "/tmp/runs", "plots": False}}


def _pyproject_run_config() -> dict:
    raw = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    return flatten_dict(raw["config"])


def _msg(content: RecordDict, mtype: str, dst: int = 5, mid: str = "m1") -> Message:
    md = Metadata(run_id=1, message_id=mid, src_node_id=1, dst_node_id=dst, reply_to_message_id="",
                  group_id="", created_at=time.time(), ttl=3600, message_type=mtype)
    return Message(content, metadata=md)


# -- run_config <-> experiment ---------------------------------------------------------------
def test_pyproject_declares_app_and_every_config_key():
    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "federated.fab_app:server_app",
                                 "clientapp": "federated.fab_app:client_app"}  # see test_fab.py
    rc = _pyproject_run_config()
    cfg = experiment_from_run_config(rc)
    # every key there is an experiment field (kebab-case) or an engine key
    assert set(rc) - set(ENGINE_KEYS) <= set(experiment_to_run_config(cfg))
    assert set(ENGINE_KEYS) <= set(rc)
    assert cfg.backbone.name == "tiny_vit" and cfg.scenario.dataset.name == "digits"


@pytest.mark.parametrize("overrides", [
    {},
    {"federated": {"dp": {"epsilon": 3.0}, "targets": ["q", "k", "v"], "head_lr": 0.2, "lora_blocks": 1}},
    {"federated": {"method": "lora", "partition": "dirichlet", "dirichlet_alpha": 0.1}},
], ids=["defaults", "dp-targets-optionals", "lora-dirichlet"])
def test_run_config_round_trips_the_experiment(overrides):
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["federated"] = {**raw["federated"], **overrides.get("federated", {})}
    cfg = load_fed_experiment(raw, "t")
    rc = experiment_to_run_config(cfg)
    assert all(isinstance(v, (bool, int, float, str)) for v in rc.values())  # Flower UserConfig types
    assert all("_" not in k for k in rc)                                       # kebab-case keys
    back = experiment_from_run_config({**rc, "run-dir": "/x", "round-timeout": 5.0})
    assert back.to_raw() == cfg.to_raw()


def test_run_config_decodes_null_and_lists_and_rejects_unknown_keys():
    rc = experiment_to_run_config(load_fed_experiment(TINY, "t"))
    assert rc["federated.dp.epsilon"] == "" and rc["federated.targets"] == "q,v"
    cfg = experiment_from_run_config({**rc, "federated.dp.epsilon": 8.0, "federated.targets": "v"})
    assert cfg.federated.dp.epsilon == 8.0 and cfg.federated.targets == ("v",)
    with pytest.raises(ConfigError, match="num_clientz"):
        experiment_from_run_config({**rc, "federated.num-clientz": 3})


def test_launch_run_config_carries_the_whole_experiment_and_wins_over_kebab_keys():
    from adaptsim.federated.flower_glue import launch_run_config

    raw = {k: dict(v) for k, v in TINY.items()}
    raw["federated"] = {**raw["federated"], "rounds": 7, "dp": {"epsilon": 3.0}}
    cfg = load_fed_experiment(raw, "t")
    rc = {**_pyproject_run_config(), **launch_run_config(cfg, "/tmp/x", 12.0)}
    back = experiment_from_run_config(rc)
    assert back.to_raw() == cfg.to_raw() and back.federated.rounds == 7
    assert rc["run-dir"] == "/tmp/x" and rc["round-timeout"] == 12.0


def test_array_record_round_trip_keeps_names_and_values():
    arrays = {"blocks.0.attn.lora_B": np.arange(6, dtype=np.float32).reshape(3, 2), "head.bias": np.ones(4, np.float32)}
    back = record_to_arrays(arrays_to_record(arrays))
    assert list(back) == list(arrays)
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


# -- ClientApp handlers ----------------------------------------------------------------------
def test_client_app_handshake_train_and_state_across_rounds():
    from adaptsim.federated.client_app import app
    from adaptsim.federated.task import get_model, initial_arrays, trainable_arrays

    cfg = load_fed_experiment(TINY, "t")
    rc = experiment_to_run_config(cfg)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 1, "num-partitions": 2},
                  state=RecordDict(), run_config=rc)
    glob = initial_arrays(cfg)
    train_msg = _msg(RecordDict({"arrays": arrays_to_record(glob), "config": ConfigRecord({"server-round": 1})}),
                     "train", mid="t1")
    # without the round-0 handshake the client refuses (its A could differ from everyone else's)
    with pytest.raises(RuntimeError, match="A seed"):
        app(train_msg, ctx)   # (Flower's runtime turns this into an error reply)

    hello = app(_msg(RecordDict({"config": ConfigRecord({"a-seed": cfg.federated.a_seed})}), "query"), ctx)
    assert dict(hello.content["metrics"]) == {"partition-id": 1, "num-partitions": 2}

    out = app(train_msg, ctx)
    sent = record_to_arrays(out.content["arrays"])
    assert set(sent) == set(trainable_arrays(get_model(cfg), "ffa_lora"))
    assert not any("lora_A" in k for k in sent)              # FFA-LoRA never sends A
    assert any(not np.array_equal(sent[k], glob[k]) for k in sent)   # it trained
    met = out.content["metrics"]
    assert met["partition-id"] == 1 and met["num-examples"] > 0 and math.isinf(met["epsilon"])

    train_msg2 = _msg(RecordDict({"arrays": arrays_to_record(glob), "config": ConfigRecord({"server-round": 2})}),
                      "train", mid="t2")
    app(train_msg2, ctx)
    from adaptsim.federated.flower_glue import state_get
    assert state_get(ctx)["client"]["rounds_done"] == 2       # context.state carried across calls


# -- strategy rules (min_replies, failures, bytes) -------------------------------------------
def _strategy(min_replies: int, tmp_path: Path):
    from adaptsim.federated.flower_strategy import FedMethodStrategy

    raw = {k: dict(v) for k, v in TINY.items()}
    raw["federated"] = {**raw["federated"], "num_clients": 3, "clients_per_round": 3, "min_replies": min_replies}
    return FedMethodStrategy(load_fed_experiment(raw, "t"), {0: 10, 1: 11, 2: 12}, tmp_path)


class _Grid:
    def get_node_ids(self):
        return [10, 11, 12]


def _reply(to: Message, pid: int, value: float, n: int) -> Message:
    arrays = {"head.bias": np.full(2, value, np.float32)}
    met = MetricRecord({"num-examples": n, "partition-id": pid, "epsilon": 2.5, "loss": 0.5, "budget-spent": 0})
    return Message(RecordDict({"arrays": arrays_to_record(arrays), "metrics": met}), reply_to=to)


@pytest.fixture
def server_identity(monkeypatch):
    """What Flower sets in a ServerApp process before the strategy builds Messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_strategy_completes_round_with_replies_it_has_and_logs_failures(caplog, server_identity, tmp_path):
    s = _strategy(min_replies=2, tmp_path=tmp_path)
    glob = {"head.bias": np.zeros(2, np.float32)}
    msgs = list(s.configure_train(1, arrays_to_record(glob), ConfigRecord(), _Grid()))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [10, 11, 12]
    sent = [_msg(m.content, "train", dst=m.metadata.dst_node_id, mid=f"x{i}") for i, m in enumerate(msgs)]
    replies = [_reply(sent[0], 0, 1.0, 10), _reply(sent[1], 1, 4.0, 30)]    # client 2: no reply (killed)
    with caplog.at_level("WARNING"):
        arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(record_to_arrays(arrays)["head.bias"], (1.0 * 10 + 4.0 * 30) / 40)
    rr = s.replies
    assert len(rr.results) == 2 and rr.failures == 1
    assert rr.traffic.totals() == {"bytes_up": 2 * 8, "bytes_down": 3 * 8}
    assert rr.failed == [{"client": 2, "reason": "no reply before the round timeout"}]
    assert "client 2 failed" in caplog.text
    assert s.book.epsilon["0"] == 2.5 and s.book.epsilon["1"] == 2.5

    # an error reply counts as a failure too; below min_replies the round fails loudly
    s2 = _strategy(min_replies=2, tmp_path=tmp_path)
    msgs = list(s2.configure_train(1, arrays_to_record(glob), ConfigRecord(), _Grid()))
    sent = [_msg(m.content, "train", dst=m.metadata.dst_node_id, mid=f"y{i}") for i, m in enumerate(msgs)]
    crashed = Message(Error(code=0, reason="ClientApp crashed"), reply_to=sent[1])
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="min_replies=2"):
        s2.aggregate_train(1, [_reply(sent[0], 0, 1.0, 10), crashed])
    assert "client 1 failed (ClientApp crashed)" in caplog.text
