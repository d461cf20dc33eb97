"""Faults: a SuperNode killed in the middle of a round does not crash the server.

The round completes with the reply it has (``federated.min_replies=1``) after the round timeout,
and the failure is logged and counted; with ``min_replies=2`` the run fails with the strategy's
exact message. Slow (real processes); still run in CI.
"""

from __future__ import annotations

import threading
import time

import pytest

from adaptsim.federated.deploy import LocalFederation
from adaptsim.federated.flower_glue import read_rounds

from _flower_proc import alive, isolated_env, run_config, tree  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_env")]


class Killer:
    """A thread that kills SuperNode ``node`` once it has received its first train message.

    ``killed`` is set when it did; :meth:`stop` ends the thread (stop event, join timeout).
    """

    def __init__(self, fed: LocalFederation, node: int, deadline_s: float = 900.0) -> None:
        self.fed, self.node, self.deadline = fed, node, time.monotonic() + deadline_s
        self.killed, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kill-supernode-{node}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            if "Receiving: train message" in self.fed.log_text(f"supernode_{self.node}"):
                self.fed.kill_supernode(self.node)
                self.killed.set()
                return
            self._stop.wait(0.2)

    def start(self) -> "Killer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the killer thread did not stop"


def test_supernode_killed_mid_round_round_completes_with_remaining_reply(tmp_path):
    run_dir = tmp_path / "run"
    fed = LocalFederation(tmp_path / "fed", num_supernodes=2)
    killer, pids = None, []
    try:
        fed.start()
        pids = tree(fed)
        killer = Killer(fed, 1).start()
        # round timeout: long enough for the surviving client on a loaded 2-core machine
        status = fed.run(run_config(run_dir, round_timeout=150.0, rounds=1, min_replies=1), timeout=1200)
    finally:
        if killer is not None:
            killer.stop()
        fed.stop()
    assert killer.killed.is_set(), "the SuperNode was never killed mid-round"
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
    killer = None
    try:
        fed.start()
        killer = Killer(fed, 1).start()
        with pytest.raises(RuntimeError, match="finished:failed"):
            fed.run(run_config(tmp_path / "run", round_timeout=60.0, rounds=1, min_replies=2), timeout=1200)
    finally:
        if killer is not None:
            killer.stop()
        fed.stop()
    assert killer.killed.is_set(), "the SuperNode was never killed mid-round"
    assert "round 1: 1 replies < min_replies=2" in fed.log_text("flwr_run")  # the strategy's message
