"""Security on loopback: a TLS SuperLink (certificates from scripts/make_certs.sh) with Flower's
SuperNode authentication. Registered SuperNodes train over TLS; an unregistered one is refused.
Slow (real processes); still run in CI.
"""

from __future__ import annotations

import subprocess

import httpx
import pytest

from adaptsim.federated.deploy import LocalFederation, make_certs, make_node_keys
from adaptsim.federated.flower_glue import read_rounds

from _flower_proc import alive, run_config, tree

pytestmark = pytest.mark.slow


def test_tls_superlink_with_node_auth_refuses_unregistered_supernode(tmp_path):
    tls = make_certs(tmp_path / "certs")
    keys = [make_node_keys(tmp_path / "keys", f"node{i}") for i in range(2)]
    rogue_key, _ = make_node_keys(tmp_path / "keys", "rogue")       # never registered
    fed = LocalFederation(tmp_path / "fed", num_supernodes=2, tls=tls, node_keys=keys)
    rogue, pids = None, []
    try:
        fed.start()
        pids = tree(fed)
        # TLS is really on: the CA-verified https endpoint answers, plain http does not
        assert httpx.get(f"https://{fed.address}/health", verify=str(tls.ca_cert), timeout=10).is_success
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{fed.address}/health", timeout=10)
        rogue = fed.start_supernode(1, private_key=rogue_key, log_name="rogue", max_retries=1)
        assert rogue.wait(timeout=300) != 0                            # refused, exits
        status = fed.run(run_config(tmp_path / "run", rounds=1), timeout=1200)
        listed = subprocess.run(["flwr", "supernode", "list", fed.connection, "--format", "json"],
                                capture_output=True, text=True, env=fed.env, cwd=fed.workdir).stdout
    finally:
        if rogue is not None:
            from adaptsim.federated.deploy import stop_process
            stop_process(rogue)
        fed.stop()
    assert "Failed to activate SuperNode" in fed.log_text("rogue")
    assert "No SuperNode found with the given public key" in fed.log_text("superlink")
    assert listed.count('"node-id"') == 2                              # only the registered two
    assert status == "finished:completed"
    assert read_rounds(tmp_path / "run")[0]["replies"] == 2            # both registered nodes trained over TLS
    assert not alive(pids)
