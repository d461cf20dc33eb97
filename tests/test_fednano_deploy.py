"""FedNano over real Flower processes: a SuperLink, two SuperNodes and `flwr run .` on loopback.

Slow (every Flower message starts a `flwr-clientapp` process); reuses FLOWER's helpers.
"""

from __future__ import annotations

import json

import pytest

from adaptsim.federated.deploy import LocalFederation
from adaptsim.federated.flower_glue import read_rounds

from _flower_proc import alive, run_config, tree

pytestmark = pytest.mark.slow

NANO = {"pretrain_per_class": 4, "pretrain_steps": 60, "d_model": 32, "heads": 2, "aggregation": "fisher"}


def test_fednano_round_on_superlink_and_two_supernodes(tmp_path):
    run_dir = tmp_path / "run"
    fed = LocalFederation(tmp_path / "fed", num_supernodes=2)
    pids = []
    try:
        fed.start()
        pids = tree(fed)
        status = fed.run(run_config(run_dir, method="fednano", local_epochs=1, fednano=NANO), timeout=1200)
        pids = sorted(set(pids + tree(fed)))
    finally:
        fed.stop()
    assert status == "finished:completed", fed.log_text("flwr_run")[-3000:]
    rounds, initial = read_rounds(run_dir, with_initial=True)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["replies"] == 2 and r["failures"] == 0 for r in rounds)
    assert rounds[-1]["accuracy"] > initial["accuracy"], (initial, rounds)
    r = rounds[0]
    # Flower carried adapters down and adapters + Fisher up; split traffic is reported apart
    assert r["bytes_up"] == 2 * r["bytes_down"] and r["bytes_fisher_up"] == r["bytes_down"]
    assert r["bytes_activations_up"] > 20 * r["bytes_up"] and r["bytes_gradients_down"] > 0
    assert r["bytes_model_download"] > 0 and rounds[1]["bytes_model_download"] == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "fednano" and metrics["mode"] == "deployment"
    assert not alive(pids), "Flower processes left running"
