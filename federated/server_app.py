"""Flower ServerApp of adaptsim (Message API): handshake, then :class:`FedMethodStrategy` rounds.

Paper: FFA-LoRA, "Improving LoRA in Privacy-preserving Federated Learning", Sun et al., ICLR 2024,
https://arxiv.org/abs/2403.12313.

Round 0 is a handshake (``query`` messages to every connected node): the server sends the seed
of the shared LoRA A matrices and binds each partition to the first node that claims it
(:func:`bind_partitions`: a second claimant, a node whose A hash differs, is refused). Rounds 1..R run
Flower's strategy loop (``Strategy.start``) with the experiment's method on Flower's ``FedAvg``
(:mod:`adaptsim.federated.flower_strategy`); after every round the run
folder gets the same ``metrics.json``/plots/checkpoints as an in-process run, plus
``flower_rounds.json`` for the process that started ``flwr run``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from adaptsim.federated.flower_glue import experiment_from_run_config, route_logs_to_flower

logger = logging.getLogger(__name__)

app = ServerApp()


def handshake(grid: Grid, cfg, timeout: float, refused: list[dict] | None = None) -> dict[int, int]:
    """Waits for ``num_clients`` nodes, sends them the A seed, binds partition id -> node id.

    Args:
        refused: if given, gets one ``{node, partition, reason}`` per node refused by
            :func:`bind_partitions`.

    Raises:
        TimeoutError: if too few nodes connect or are bound within ``timeout`` seconds.
        ValueError: if a node's ``num-partitions`` differs from ``federated.num_clients``.
    """
    fed, deadline = cfg.federated, time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < fed.num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} of {fed.num_clients} SuperNodes connected after {timeout:.0f}s")
        time.sleep(0.5)
    config = ConfigRecord({"a-seed": fed.a_seed})
    msgs = [Message(RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    node_of = bind_partitions(cfg, grid.send_and_receive(msgs, timeout=timeout), refused)
    if len(node_of) < fed.min_replies:
        raise TimeoutError(f"handshake: {len(node_of)} nodes bound, min_replies={fed.min_replies}")
    logger.info("handshake: %d clients, partition -> node %s", len(node_of), node_of)
    return node_of


def bind_partitions(cfg, replies: Iterable[Message], refused: list[dict] | None = None) -> dict[int, int]:
    """Binds each partition id to the ``src_node_id`` (Flower's reply metadata) of the first
    node that claims it with the right A hash; later the strategy derives a client's partition
    from its node only.

    A node is refused (logged as an error, recorded in ``refused``, never sampled) when its
    partition id is out of range, its ``a-hash`` differs from the method's
    :meth:`~adaptsim.federated.methods.base.FedMethod.frozen_a_hash` on the server (methods
    without a frozen A skip this), or its partition is already bound to another node.

    Raises:
        ValueError: if a node's ``num-partitions`` differs from ``federated.num_clients``.
    """
    from adaptsim.federated.methods import fed_method

    fed = cfg.federated
    want = fed_method(cfg).frozen_a_hash() or ""
    refused = [] if refused is None else refused
    node_of: dict[int, int] = {}
    for reply in replies:
        src = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("handshake: node %d failed: %s", src, reply.error.reason)
            continue
        met = reply.content["metrics"]
        if int(met["num-partitions"]) != fed.num_clients:
            raise ValueError(f"node {src} has num-partitions={int(met['num-partitions'])}, "
                             f"federated.num_clients={fed.num_clients}")
        pid = int(met["partition-id"])
        conf = reply.content.config_records.get("config")
        got = str(conf.get("a-hash", "")) if conf is not None else ""
        if not 0 <= pid < fed.num_clients:
            reason = f"node {src} claims partition {pid}, outside [0, {fed.num_clients}); node refused"
        elif want and got != want:
            reason = (f"node {src} (partition {pid}): A hash {got[:16] or '(none)'} differs from the "
                      f"server's {want[:16]}; node refused")
        elif pid in node_of:
            reason = (f"node {src} claims partition {pid}, already bound to node {node_of[pid]}; "
                      f"node {src} refused")
        else:
            node_of[pid] = src
            continue
        logger.error("handshake: %s", reason)
        refused.append({"node": int(src), "partition": pid, "reason": reason})
    return node_of


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs ``federated.rounds`` rounds and writes the run folder."""
    from adaptsim.cl.rundir import RunDir
    from adaptsim.federated.runner import new_run_dir

    route_logs_to_flower()
    cfg = experiment_from_run_config(context.run_config)
    own_dir = not str(context.run_config.get("run-dir", ""))  # `flwr run .` without the run engine
    run_dir = new_run_dir(cfg) if own_dir else Path(str(context.run_config["run-dir"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        _serve(grid, cfg, run_dir, float(context.run_config.get("round-timeout", 600.0)))
    except BaseException as exc:
        if own_dir:
            RunDir(run_dir).mark_failed(f"{type(exc).__name__}: {exc}")
        raise
    if own_dir:
        RunDir(run_dir).mark_finished()
    logger.info("run folder: %s", run_dir)


def _serve(grid: Grid, cfg, run_dir: Path, timeout: float) -> None:
    import torch

    from adaptsim.federated.flower_strategy import FedMethodStrategy

    if cfg.federated.num_threads:
        torch.set_num_threads(cfg.federated.num_threads)
    refused: list[dict] = []
    node_of = handshake(grid, cfg, timeout, refused)
    FedMethodStrategy(cfg, node_of, run_dir, refused=refused).start_run(grid, timeout)
