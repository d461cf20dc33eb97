"""Flower ClientApp of adaptsim (Message API): converts Messages to and from :mod:`.task` calls.

Paper: FFA-LoRA, "Improving LoRA in Privacy-preserving Federated Learning", Sun et al., ICLR 2024,
https://arxiv.org/abs/2403.12313.

- ``query`` (round 0): stores the ``a-seed`` the server sends in ``context.state`` and answers
  with this node's ``partition-id``/``num-partitions`` (from the SuperNode's node config) and,
  in a ``config`` record, ``a-hash``: the method's :meth:`~adaptsim.federated.methods.base.FedMethod.frozen_a_hash`
  of the A built from that seed (``""`` for methods without a frozen A); the server refuses a
  node whose hash differs from its own.
- ``train``: the experiment's method (:mod:`adaptsim.federated.methods`) builds (or reuses, per
  process) its model with A from that seed, runs its ``client_fit`` and keeps its state (the DP
  accountant for LoRA / FFA-LoRA) in
  ``context.state`` across rounds (Flower keeps ``context.state`` per node and run) and in a
  file on the node (:func:`~adaptsim.federated.flower_glue.node_dp_store`), which survives a
  SuperNode restart.
- ``evaluate``: accuracy and loss of the received arrays (the method's evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from adaptsim.federated.flower_glue import (arrays_to_record, experiment_from_run_config, metrics_to_record,
                                            node_dp_store, record_to_arrays, state_get, state_put)

app = ClientApp()


def _setup(context: Context) -> tuple[Any, int, int, dict]:
    """(experiment with the server's A seed, partition id, number of partitions, client state)."""
    import torch

    cfg = experiment_from_run_config(context.run_config)
    pid, nparts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    state = state_get(context)
    if "a_seed" in state:  # A must be bit-identical on every client: use the server's seed
        cfg = dataclasses.replace(cfg, federated=dataclasses.replace(cfg.federated, a_seed=int(state["a_seed"])))
    if cfg.federated.num_threads:
        torch.set_num_threads(cfg.federated.num_threads)
    return cfg, pid, nparts, state


@app.query()
def handshake(msg: Message, context: Context) -> Message:
    """Round 0: remember the server's ``a-seed``; report this node's partition and A hash."""
    from adaptsim.federated.methods import fed_method

    state = state_get(context)
    state["a_seed"] = int(msg.content["config"]["a-seed"])
    state_put(context, state)
    cfg = _setup(context)[0]
    metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"]),
                            "num-partitions": int(context.node_config["num-partitions"])})
    config = ConfigRecord({"a-hash": fed_method(cfg).frozen_a_hash() or ""})
    return Message(RecordDict({"metrics": metrics, "config": config}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round of the experiment's method: global arrays in, what the method sends out.

    Raises:
        RuntimeError: if this node never received the server's A seed (round 0).
        ValueError: if the node's ``num-partitions`` differs from ``federated.num_clients``.
    """
    from adaptsim.federated.methods import fed_method

    cfg, pid, nparts, state = _setup(context)
    if "a_seed" not in state:
        raise RuntimeError(f"client {pid}: no A seed from the server (missed the round-0 handshake)")
    if nparts != cfg.federated.num_clients:
        raise ValueError(f"node num-partitions={nparts} differs from federated.num_clients={cfg.federated.num_clients}")
    server_round = int(msg.content["config"]["server-round"])
    arrays, n, met, state["client"] = fed_method(cfg).client_fit(
        record_to_arrays(msg.content["arrays"]), pid, state.get("client"), round_idx=server_round - 1,
        node_store=node_dp_store(context, cfg, pid))
    state_put(context, state)
    metrics = MetricRecord({**metrics_to_record(met), "num-examples": int(n), "partition-id": pid})
    return Message(RecordDict({"arrays": arrays_to_record(arrays), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy and loss of the received global arrays (the method's evaluation)."""
    from adaptsim.federated.methods import fed_method

    cfg, pid, _, _ = _setup(context)
    ev = fed_method(cfg).evaluate(record_to_arrays(msg.content["arrays"]))
    metrics = MetricRecord({"num-examples": int(ev["num_examples"]), "accuracy": float(ev["accuracy"]),
                            "loss": float(ev["loss"]), "partition-id": pid})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
