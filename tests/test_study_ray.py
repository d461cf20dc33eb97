"""Study engine on Ray: 2 local workers, and an existing head started by hand on 127.0.0.1.

Both give the same numbers as the in-process run. Each test keeps Ray's files in its own short
temporary folder (Ray's socket paths must stay short), and the hand-started head runs as
``ray start --head --block``, stopped through its own process: ``ray stop`` would stop every Ray
on the machine, other people's included.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from adaptsim.cl.rundir import RunDir, loads_json
from adaptsim.cl.study import run_study

pytest.importorskip("ray")

from test_study import FAST, STUDY, results, table_without_times  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    return run_study(STUDY, FAST, workers=0, out_dir=tmp_path_factory.mktemp("inproc"))


@pytest.fixture()
def ray_tmp(monkeypatch):
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _check_same_as_in_process(res, in_process) -> None:
    assert res.failed == [] and res.incomplete == []
    assert results(res.study_dir) == results(in_process.study_dir)
    assert table_without_times(res.table) == table_without_times(in_process.table)
    pids = {RunDir(res.study_dir / c["run_dir"]).status()["pid"]
            for c in loads_json((res.study_dir / "cells.json").read_text())["cells"]}
    assert os.getpid() not in pids  # the cells ran in Ray workers


def test_local_ray_two_workers(in_process, ray_tmp, tmp_path):
    res = run_study(STUDY, FAST, workers=2, out_dir=tmp_path)
    _check_same_as_in_process(res, in_process)
    assert res.ray_startup_s is not None and res.ray_startup_s < 120
    assert loads_json((res.study_dir / "cells.json").read_text())["cells"][0]["attempts"] == 1


def test_existing_head_by_address(in_process, ray_tmp, tmp_path):
    """``ray start --head`` by hand on 127.0.0.1, then the same study with address HOST:PORT and ray://."""
    import ray

    gcs, client, agent, metrics = _free_ports(4)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={ray_tmp}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:  # the head is up once its GCS and its client server accept connections
            assert head.poll() is None, "ray start --head exited"
            try:
                for port in (gcs, client):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up in 180 s"
                time.sleep(0.5)
        res = run_study(STUDY, FAST, address=f"127.0.0.1:{gcs}", out_dir=tmp_path / "gcs")
        _check_same_as_in_process(res, in_process)
        assert not ray.is_initialized()  # the study disconnected; the head keeps running
        assert head.poll() is None
        res = run_study(STUDY, FAST, address=f"ray://127.0.0.1:{client}", out_dir=tmp_path / "client")
        _check_same_as_in_process(res, in_process)
    finally:
        head.terminate()  # ray start --block stops its own processes on SIGTERM
        try:
            head.wait(90)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(30)
