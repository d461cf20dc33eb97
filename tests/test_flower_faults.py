"""Faults: a SuperNode killed in the middle of a round does not crash the server.

The round completes with the reply it has (``federated.min_replies=1``) after the round timeout,
and the failure is logged and counted. Slow (real processes); still run in CI.
"""

from __future__ import annotations

import threading
import time

import pytest

from adaptsim.federated.deploy import LocalFederation
from adaptsim.federated.flower_glue import read_rounds

from _flower_proc import alive, run_config, tree

pytestmark = pytest.mark.slow


def _kill_when_training(fed: LocalFederation, node: int, killed: threading.Event, deadline: float) -> None:
    """Kills SuperNode ``node`` as soon as it has received its first train message."""
    while time.monotonic() < deadline:
        if "Receiving: train message" in fed.log_text(f"supernode_{node}"):
            fed.kill_supernode(node)
            killed.set()
            return
        time.sleep(0.2)


def test_supernode_killed_mid_round_round_completes_with_remaining_reply(tmp_path):
    run_dir = tmp_path / "run"
    fed = LocalFederation(tmp_path / "fed", num_supernodes=2)
    killed, pids = threading.Event(), []
    try:
        fed.start()
        pids = tree(fed)
        killer = threading.Thread(target=_kill_when_training, args=(fed, 1, killed, time.monotonic() + 900))
        killer.start()
        # round timeout: long enough for the surviving client on a loaded 2-core machine
        status = fed.run(run_config(run_dir, round_timeout=150.0, rounds=1, min_replies=1), timeout=1200)
        killer.join()
    finally:
        fed.stop()
    assert killed.is_set(), "the SuperNode was never killed mid-round"
    assert status == "finished:completed"                          # the server did not crash
    rounds = read_rounds(run_dir)
    assert len(rounds) == 1
    assert rounds[0]["replies"] == 1 and rounds[0]["failures"] == 1
    # no reply before the timeout, or the SuperLink's "Node Unavailable" once heartbeats stop
    assert [f["client"] for f in rounds[0]["failed"]] == [1]
    assert "client 1 failed" in fed.log_text("flwr_run")          # logged in the ServerApp's log
    assert not alive(pids)


def test_below_min_replies_the_run_fails_loudly(tmp_path):
    """With min_replies=2 the same fault ends the run (status failed) instead of a silent round."""
    fed = LocalFederation(tmp_path / "fed", num_supernodes=2)
    killed = threading.Event()
    try:
        fed.start()
        killer = threading.Thread(target=_kill_when_training, args=(fed, 1, killed, time.monotonic() + 900))
        killer.start()
        with pytest.raises(RuntimeError, match="finished:failed"):
            fed.run(run_config(tmp_path / "run", round_timeout=60.0, rounds=1, min_replies=2), timeout=1200)
        killer.join()
    finally:
        fed.stop()
    assert "min_replies=2" in fed.log_text("flwr_run")
