"""DP that holds against the server: secret noise by default, the accountant on the client's node
(restart resumes epsilon), delta < 1/n_k, noised parameters == sent parameters, empty Poisson
batches still release noise, reproducible runs say they are not private."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("opacus")

from adaptsim.cl.config import ConfigError  # noqa: E402
from adaptsim.federated.config import DPConfig, load_fed_experiment  # noqa: E402
from adaptsim.federated.privacy import (NOT_PRIVATE, NodeDPStore, check_delta, dp_generators,  # noqa: E402
                                        epsilon_of, longer_history, mirror_epsilon, plan_dp,
                                        privacy_label)
from adaptsim.federated.task import client_dataset, client_fit, get_model, initial_arrays  # noqa: E402

from _fed_common import TINY, _one_thread  # noqa: E402,F401  (autouse fixture)


def _cfg(**dp):
    fed = {"method": "ffa_lora", "num_clients": 4, "clients_per_round": 4, "rounds": 3, "lr": 0.5,
           "batch_size": 64, "partition": "iid", "dp": {"epsilon": 4.0, "delta": 1e-5, **dp}}
    return load_fed_experiment({"scenario": {"dataset": {"name": "digits"}}, "backbone": TINY, "federated": fed})


def _fit(cfg, client_id=1, state=None, store=None, method=None):
    model = get_model(cfg)
    train, _ = client_dataset(cfg, client_id, 4)
    return client_fit(model, initial_arrays(cfg), train, cfg, state, client_id=client_id, round_idx=0,
                      node_store=store)


def test_pure_helpers():
    assert privacy_label(DPConfig(epsilon=2.0, reproducible=True)) == NOT_PRIVATE
    assert privacy_label(DPConfig(epsilon=2.0)) != NOT_PRIVATE and privacy_label(DPConfig()) == "no DP"
    s1, n1 = dp_generators(DPConfig(epsilon=1.0), seed=5)
    s2, n2 = dp_generators(DPConfig(epsilon=1.0), seed=5)
    assert not torch.equal(torch.randn(4, generator=n1), torch.randn(4, generator=n2))  # secret seeds
    assert not torch.equal(torch.rand(4, generator=s1), torch.rand(4, generator=s2))
    r1, m1 = dp_generators(DPConfig(epsilon=1.0, reproducible=True), seed=5)
    r2, m2 = dp_generators(DPConfig(epsilon=1.0, reproducible=True), seed=5)
    assert torch.equal(torch.randn(4, generator=m1), torch.randn(4, generator=m2))
    assert torch.equal(torch.rand(4, generator=r1), torch.rand(4, generator=r2))
    check_delta(1e-3, 999, 0)
    with pytest.raises(ConfigError, match=r"client 7 has n_k=1000"):
        check_delta(1e-3, 1000, 7)
    a, b = [(1.0, 0.1, 5)], [(1.0, 0.1, 5), (1.0, 0.1, 5)]
    assert longer_history(a, b) == b and longer_history(b, a) == b and longer_history([], a) == a
    assert mirror_epsilon(None, 1.5) == 1.5 and mirror_epsilon(2.0, 1.5) == 2.0 and mirror_epsilon(1.0, 1.5) == 1.5


def test_two_clients_with_the_same_config_draw_different_noise_unless_reproducible():
    secret = _cfg()
    a, _, ma, _ = _fit(secret)
    b, _, mb, _ = _fit(secret)  # same client id, config, arrays and round: only the secret seeds differ
    assert ma["privacy"] != NOT_PRIVATE
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    seeded = _cfg(reproducible=True)
    c, _, mc, _ = _fit(seeded)
    d, _, _, _ = _fit(seeded)
    assert mc["privacy"] == NOT_PRIVATE
    assert all(np.array_equal(c[k], d[k]) for k in c)


def test_restarted_client_resumes_its_accountant_from_the_node(tmp_path):
    cfg = _cfg()
    _, _, m1, state1 = _fit(cfg, store=NodeDPStore(tmp_path / "node1", "study-a", 1))
    # a restart: new store object, no client state (context.state is gone), same node directory
    _, _, m2, state2 = _fit(cfg, state=None, store=NodeDPStore(tmp_path / "node1", "study-a", 1))
    assert 0 < m1["epsilon"] < m2["epsilon"] <= cfg.federated.dp.epsilon
    assert state2["noise_multiplier"] == state1["noise_multiplier"]
    q = plan_dp(len(client_dataset(cfg, 1, 4)[0]), 64, 1, 3, cfg.federated.dp).sample_rate
    steps = m1["steps"] + m2["steps"]
    assert m2["epsilon"] == pytest.approx(epsilon_of([(state1["noise_multiplier"], q, steps)], cfg.federated.dp))
    # a lost node file but a surviving client state resumes too; the larger history wins
    _, _, m3, _ = _fit(cfg, state=state2, store=NodeDPStore(tmp_path / "fresh", "study-a", 1))
    assert m3["epsilon"] > m2["epsilon"]
    # another study or partition does not share the accountant, a foreign file is refused
    _, _, m_other, _ = _fit(cfg, store=NodeDPStore(tmp_path / "node1", "study-b", 1))
    assert m_other["epsilon"] == pytest.approx(m1["epsilon"])
    foreign = NodeDPStore(tmp_path / "node1", "study-a", 1)
    foreign.path.write_text(foreign.path.read_text().replace('"partition": 1', '"partition": 2'))
    with pytest.raises(ValueError, match="partition 2"):
        foreign.load()


@pytest.mark.parametrize("method", ["ffa_lora", "lora"])
def test_noised_parameter_set_equals_sent_parameter_set(method):
    cfg = load_fed_experiment({"scenario": {"dataset": {"name": "digits"}}, "backbone": TINY,
                               "federated": {"method": method, "num_clients": 4, "clients_per_round": 4,
                                             "rounds": 3, "batch_size": 64, "partition": "iid",
                                             "dp": {"epsilon": 4.0}}})
    out, _, met, _ = _fit(cfg)
    trainable = sorted(n for n, p in get_model(cfg).named_parameters() if p.requires_grad)
    assert met["dp_params"] == sorted(out) == trainable
    assert {"head.weight", "head.bias"} <= set(out)
    assert any("lora_A" in k for k in out) == (method == "lora")


def test_delta_must_be_below_one_over_n_k_for_every_client():
    cfg = _cfg(delta=0.01)  # IID digits over 4 clients: about 449 examples each
    n = len(client_dataset(cfg, 2, 4)[0])
    with pytest.raises(ConfigError, match=rf"client 2 has n_k={n} "):
        _fit(cfg, client_id=2)


def test_empty_poisson_batch_still_releases_noise_and_is_counted():
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from adaptsim.federated.local_train import step
    from adaptsim.federated.task import _trainable_groups

    cfg = _cfg()
    model = get_model(cfg)
    x = torch.randn(8, 5, 32)
    opt = torch.optim.SGD(_trainable_groups(model, cfg.federated), lr=0.5)
    engine = PrivacyEngine()
    model.train()
    module, opt, _ = engine.make_private(module=model, optimizer=opt, noise_multiplier=1.0, max_grad_norm=1.0,
                                         data_loader=DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)),
                                                                batch_size=4))
    try:
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert step(module, opt, (x[:0], torch.zeros(0, dtype=torch.long))) is None
        moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        assert sorted(moved) == sorted(before)  # pure noise reached every privatised parameter
        assert engine.accountant.history == [(1.0, 0.5, 1)]
    finally:
        module._close()
        model.eval()


def test_reproducible_summary_says_not_private():
    from adaptsim.federated.runner import summarize_rounds

    rounds = [{"round": 1, "accuracy": 0.5, "loss": 1.0, "epsilon": {"0": 1.0, "1": 2.5}, "bytes_up": 1,
               "bytes_down": 1, "seconds": 1.0},
              {"round": 2, "accuracy": 0.6, "loss": 0.9, "epsilon": {"0": 1.5, "1": 2.0}, "bytes_up": 1,
               "bytes_down": 1, "seconds": 1.0}]
    s = summarize_rounds(rounds, dp=DPConfig(epsilon=3.0, reproducible=True))
    assert s["privacy"] == NOT_PRIVATE
    assert s["max_epsilon"] == 2.5  # the audit trail: never below any epsilon a client reported
    assert summarize_rounds(rounds, dp=DPConfig(epsilon=3.0))["privacy"] != NOT_PRIVATE
    assert summarize_rounds([{**r, "privacy": NOT_PRIVATE} for r in rounds])["privacy"] == NOT_PRIVATE
    assert math.isnan(summarize_rounds([{**r, "epsilon": {}} for r in rounds])["max_epsilon"])


def test_delta_check_runs_before_a_run_folder_exists(tmp_path):
    from adaptsim.federated.runner import run_fed

    cfg = load_fed_experiment({"scenario": {"dataset": {"name": "digits"}}, "backbone": TINY,
                               "federated": {"num_clients": 4, "clients_per_round": 4, "rounds": 1,
                                             "partition": "iid", "dp": {"epsilon": 4.0, "delta": 0.01}},
                               "run": {"out_dir": str(tmp_path / "runs"), "plots": False}})
    with pytest.raises(ConfigError, match=r"client 0 has n_k=\d+ "):
        run_fed(cfg)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_clientapp_keeps_the_accountant_in_the_nodes_state_dir_across_a_supernode_restart(tmp_path):
    """A restarted SuperNode (fresh ``context.state``) resumes epsilon from its ``state-dir``."""
    import time

    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    from adaptsim.federated.client_app import app
    from adaptsim.federated.flower_glue import arrays_to_record, launch_run_config

    cfg = load_fed_experiment({"scenario": {"dataset": {"name": "digits"}}, "backbone": TINY,
                               "federated": {"num_clients": 2, "clients_per_round": 2, "rounds": 3,
                                             "batch_size": 64, "partition": "iid", "dp": {"epsilon": 4.0}}})
    rc = launch_run_config(cfg, tmp_path / "study-x")

    def msg(content, mtype, mid):
        md = Metadata(run_id=1, message_id=mid, src_node_id=1, dst_node_id=5, reply_to_message_id="",
                      group_id="", created_at=time.time(), ttl=3600, message_type=mtype)
        return Message(content, metadata=md)

    def node_lifetime(server_round):
        ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config=rc,
                      node_config={"partition-id": 1, "num-partitions": 2, "state-dir": str(tmp_path / "node")})
        app(msg(RecordDict({"config": ConfigRecord({"a-seed": cfg.federated.a_seed})}), "query", "q"), ctx)
        train = RecordDict({"arrays": arrays_to_record(initial_arrays(cfg)),
                            "config": ConfigRecord({"server-round": server_round})})
        return float(app(msg(train, "train", f"t{server_round}"), ctx).content["metrics"]["epsilon"])

    eps1 = node_lifetime(1)
    assert (tmp_path / "node" / "dp_study-x_p1.json").exists()
    eps2 = node_lifetime(2)  # new Context: what Flower gives a restarted SuperNode
    assert 0 < eps1 < eps2 <= 4.0
