"""Node-bound partitions and the A-hash handshake, in process (constructed Flower Messages).

The server binds a partition to the ``src_node_id`` of the first node claiming it, refuses a
second claimant and a node whose frozen A hash differs, derives a reply's partition from its
node and bounds ``num-examples`` by the partition's known size.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from adaptsim.federated.config import load_fed_experiment
from adaptsim.federated.flower_glue import arrays_to_record, experiment_to_run_config, record_to_arrays

TINY = {"scenario": {"dataset": {"name": "digits", "train_per_class": 12, "test_per_class": 6}},
        "backbone": {"name": "tiny_vit", "img_size": 16, "tiny_patch": 4, "tiny_dim": 32, "tiny_depth": 2,
                     "tiny_heads": 2},
        "federated": {"num_clients": 3, "clients_per_round": 3, "rounds": 1, "lr": 0.1, "num_threads": 1,
                      "partition": "iid", "min_replies": 1},
        "run": {"out_dir": "/tmp/runs", "plots": False}}


def _cfg(**fed):
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["federated"] = {**raw["federated"], **fed}
    return load_fed_experiment(raw, "t")


def _sent(content: RecordDict, mtype: str, dst: int, mid: str) -> Message:
    """A message as the node ``dst`` receives it (a reply built from it comes from ``dst``)."""
    md = Metadata(run_id=1, message_id=mid, src_node_id=1, dst_node_id=dst, reply_to_message_id="",
                  group_id="", created_at=time.time(), ttl=3600, message_type=mtype)
    return Message(content, metadata=md)


def _hello(cfg, node: int, pid: int, a_hash: str | None = None) -> Message:
    """A handshake reply of node ``node``: through the real ClientApp unless ``a_hash`` is forced."""
    from adaptsim.federated.client_app import app

    query = _sent(RecordDict({"config": ConfigRecord({"a-seed": cfg.federated.a_seed})}), "query", node, f"q{node}")
    if a_hash is None:
        ctx = Context(run_id=1, node_id=node, node_config={"partition-id": pid, "num-partitions": 3},
                      state=RecordDict(), run_config=experiment_to_run_config(cfg))
        return app(query, ctx)
    met = MetricRecord({"partition-id": pid, "num-partitions": 3})
    return Message(RecordDict({"metrics": met, "config": ConfigRecord({"a-hash": a_hash})}), reply_to=query)


class _Grid:
    def __init__(self, replies):
        self.replies = replies

    def get_node_ids(self):
        return [m.metadata.src_node_id for m in self.replies]

    def send_and_receive(self, msgs, timeout=None):
        return self.replies


@pytest.fixture
def server_identity(monkeypatch):
    """What Flower sets in a ServerApp process before the strategy builds Messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _round(s, replies_of):
    """configure_train, then aggregate_train with ``replies_of(sent by dst node)``."""
    glob = {"head.bias": np.zeros(2, np.float32)}
    msgs = list(s.configure_train(1, arrays_to_record(glob), ConfigRecord(), None))
    sent = {m.metadata.dst_node_id: _sent(m.content, "train", m.metadata.dst_node_id, f"t{i}")
            for i, m in enumerate(msgs)}
    arrays, _ = s.aggregate_train(1, replies_of(sent))
    return sent, record_to_arrays(arrays)


def _reply(to: Message, pid: int, value: float, n: int) -> Message:
    met = MetricRecord({"num-examples": n, "partition-id": pid, "epsilon": 2.5, "loss": 0.5, "budget-spent": 0})
    arrays = {"head.bias": np.full(2, value, np.float32)}
    return Message(RecordDict({"arrays": arrays_to_record(arrays), "metrics": met}), reply_to=to)


def test_duplicate_partition_claim_is_refused_and_never_sampled(server_identity, tmp_path: Path, caplog):
    from adaptsim.federated.flower_strategy import FedMethodStrategy
    from adaptsim.federated.server_app import handshake

    cfg = _cfg()
    refused: list[dict] = []
    grid = _Grid([_hello(cfg, 10, 0), _hello(cfg, 11, 1), _hello(cfg, 12, 1)])  # node 12 claims 1 again
    with caplog.at_level("ERROR"):
        node_of = handshake(grid, cfg, 5.0, refused)
    assert node_of == {0: 10, 1: 11}
    assert [(r["node"], r["partition"]) for r in refused] == [(12, 1)]
    assert "node 12 claims partition 1, already bound to node 11" in refused[0]["reason"]
    assert "already bound to node 11" in caplog.text
    s = FedMethodStrategy(cfg, node_of, tmp_path, refused=refused)
    sent, _ = _round(s, lambda sent: [_reply(sent[10], 0, 1.0, 10), _reply(sent[11], 1, 3.0, 10)])
    assert 12 not in sent                                    # the refused node is not sampled
    assert s.replies.failed == [{"client": 2, "reason": "no connected SuperNode"}]


def test_reply_partition_comes_from_its_node_and_num_examples_is_bounded(server_identity, tmp_path: Path):
    from adaptsim.federated.flower_strategy import FedMethodStrategy

    cfg = _cfg()
    s = FedMethodStrategy(cfg, {0: 10, 1: 11, 2: 12}, tmp_path)
    size = s.method.partition_sizes()
    assert size == [40, 40, 40]                               # 120 digits, IID over 3 partitions
    _, out = _round(s, lambda sent: [_reply(sent[10], 0, 1.0, 10),
                                     _reply(sent[11], 1, 100.0, size[1] + 1),   # inflated weight
                                     _reply(sent[12], 0, 50.0, 10)])            # node 12 says "partition 0"
    np.testing.assert_allclose(out["head.bias"], 1.0)          # only node 10's honest reply aggregated
    failed = {f["client"]: f["reason"] for f in s.replies.failed}
    assert set(failed) == {1, 2}
    assert "num-examples=41" in failed[1] and "partition 1" in failed[1] and "node 11" in failed[1]
    assert "bound to partition 2" in failed[2] and "says partition 0" in failed[2]


def test_mismatched_a_hash_is_refused_honest_nodes_bound(server_identity, tmp_path: Path):
    from adaptsim.federated.methods import fed_method
    from adaptsim.federated.server_app import handshake

    for method in ("ffa_lora", "lora"):
        cfg = _cfg(method=method)
        want = fed_method(cfg).frozen_a_hash()
        other = fed_method(_cfg(method=method, a_seed=cfg.federated.a_seed + 1)).frozen_a_hash()
        assert want and other and want != other               # the hash depends on A
        good = _hello(cfg, 10, 0)
        assert good.content["config"]["a-hash"] == want        # the ClientApp reports the server's hash
        refused: list[dict] = []
        node_of = handshake(_Grid([good, _hello(cfg, 11, 1, a_hash=other), _hello(cfg, 12, 2)]), cfg, 5.0,
                            refused)
        assert node_of == {0: 10, 2: 12}, method
        assert [(r["node"], r["partition"]) for r in refused] == [(11, 1)]
        assert "A hash" in refused[0]["reason"] and "node 11" in refused[0]["reason"]


def test_honest_nodes_are_all_bound_and_aggregated(server_identity, tmp_path: Path):
    from adaptsim.federated.flower_glue import read_rounds
    from adaptsim.federated.flower_strategy import FedMethodStrategy
    from adaptsim.federated.server_app import handshake

    cfg = _cfg()
    node_of = handshake(_Grid([_hello(cfg, 10 + p, p) for p in range(3)]), cfg, 5.0)
    assert node_of == {0: 10, 1: 11, 2: 12}
    s = FedMethodStrategy(cfg, node_of, tmp_path)
    _, out = _round(s, lambda sent: [_reply(sent[10 + p], p, float(p), 10 * (p + 1)) for p in range(3)])
    np.testing.assert_allclose(out["head.bias"], (0 * 10 + 1 * 20 + 2 * 30) / 60)
    assert s.replies.failures == 0 and len(s.replies.results) == 3
    s.central_evaluate(0, arrays_to_record(s.method.initial_arrays()))
    assert read_rounds(tmp_path, with_initial=True)[0] == []     # the hand-back file is written
