"""Flower ServerApp of adaptsim (Message API): handshake, then :class:`FedMethodStrategy` rounds.

Paper: FFA-LoRA, "Improving LoRA in Privacy-preserving Federated Learning", Sun et al., ICLR 2024,
https://arxiv.org/abs/2403.12313.

Round 0 is a handshake (``query`` messages to every connected node): the server sends the seed
of the shared LoRA A matrices and learns which partition each node holds. Rounds 1..R run
Flower's strategy loop (``Strategy.start``) with the experiment's method on Flower's ``FedAvg``
(:mod:`adaptsim.federated.flower_strategy`); after every round the run
folder gets the same ``metrics.json``/plots/checkpoints as an in-process run, plus
``flower_rounds.json`` for the process that started ``flwr run``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from adaptsim.federated.flower_glue import experiment_from_run_config, route_logs_to_flower

logger = logging.getLogger(__name__)

app = ServerApp()


def handshake(grid: Grid, cfg, timeout: float) -> dict[int, int]:
    """Waits for ``num_clients`` nodes, sends them the A seed, maps partition id -> node id.

    Raises:
        TimeoutError: if too few nodes connect or answer within ``timeout`` seconds.
        ValueError: if a node's ``num-partitions`` differs from ``federated.num_clients``.
    """
    fed, deadline = cfg.federated, time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < fed.num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} of {fed.num_clients} SuperNodes connected after {timeout:.0f}s")
        time.sleep(0.5)
    config = ConfigRecord({"a-seed": fed.a_seed})
    msgs = [Message(RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            logger.warning("handshake: node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        met = reply.content["metrics"]
        if int(met["num-partitions"]) != fed.num_clients:
            raise ValueError(f"node {reply.metadata.src_node_id} has num-partitions={int(met['num-partitions'])}, "
                             f"federated.num_clients={fed.num_clients}")
        node_of[int(met["partition-id"])] = reply.metadata.src_node_id
    if len(node_of) < fed.min_replies:
        raise TimeoutError(f"handshake: {len(node_of)} nodes answered, min_replies={fed.min_replies}")
    logger.info("handshake: %d clients, partition -> node %s", len(node_of), node_of)
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
    FedMethodStrategy(cfg, handshake(grid, cfg, timeout), run_dir).start_run(grid, timeout)
