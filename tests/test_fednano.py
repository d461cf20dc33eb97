"""FedNano: VQA task, NanoAdapters, split channel, Fisher merging (hand-computed), rounds, baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptsim.federated.config import load_fed_experiment
from adaptsim.federated.fednano.data import ANSWERS, QUESTIONS, answer_of, make_vqa, question_tokens, split_public
from adaptsim.federated.fednano.fisher import aggregate, fedavg_arrays, fisher_merge, with_fisher
from adaptsim.federated.fednano.model import NanoAdapter

TINY = {"scenario": {"dataset": {"name": "digits", "train_per_class": 30, "test_per_class": 8}},
        "backbone": {"name": "tiny_vit", "img_size": 16, "tiny_patch": 4, "tiny_dim": 32, "tiny_depth": 2,
                     "tiny_heads": 2},
        "federated": {"method": "fednano", "num_clients": 3, "clients_per_round": 3, "rounds": 2, "lr": 0.5,
                      "partition": "iid", "batch_size": 32,
                      "fednano": {"pretrain_per_class": 4, "pretrain_steps": 60, "d_model": 32, "heads": 2}},
        "run": {"out_dir": "/tmp/runs", "plots": False}}


def _cfg(federated=None, **fednano):
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["federated"] = {**raw["federated"], **(federated or {}),
                        "fednano": {**TINY["federated"]["fednano"], **fednano}}
    return load_fed_experiment(raw, "test")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """The shared system, its pretraining cached in a private ``ADAPTSIM_CACHE`` (restored after)."""
    from adaptsim.federated.fednano.system import get_system

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTSIM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield get_system(_cfg())


# -- data ------------------------------------------------------------------------------------
def test_vqa_answers_and_public_split():
    assert answer_of(7, 0) == 7 and ANSWERS[answer_of(4, 1)] == "yes" and ANSWERS[answer_of(3, 1)] == "no"
    assert ANSWERS[answer_of(6, 2)] == "yes" and ANSWERS[answer_of(5, 2)] == "no"
    vqa = make_vqa(torch.tensor([2, 9]))
    assert len(vqa) == 2 * len(QUESTIONS)
    assert [ANSWERS[a] for a in vqa.answer] == ["2", "yes", "no", "9", "no", "yes"]
    assert question_tokens().shape == (3, 5) and question_tokens()[1, 0] == 0  # left padding
    y = np.repeat(np.arange(10), 7)
    pub, priv = split_public(y, 2, seed=0)
    assert len(pub) == 20 and not set(pub) & set(priv) and len(pub) + len(priv) == len(y)
    assert (np.bincount(y[pub]) == 2).all()


# -- aggregation (hand-computed) -------------------------------------------------------------
def test_fisher_merge_hand_computed():
    """theta* = sum_k (n_k F_k + eps) theta_k / sum_k (n_k F_k + eps) (Matena & Raffel's floor)."""
    p = [{"w": np.array([1.0, 5.0])}, {"w": np.array([3.0, 7.0])}]
    f = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.5, 0.0])}]
    n = [1, 3]
    e = 1e-8
    # entry 0: ((1 + e) 1 + (1.5 + e) 3) / (2.5 + 2e) = 2.2; entry 1 (no Fisher anywhere): FedAvg
    # (1*5 + 3*7) / 4 = 6.5 by default, the formula's unweighted mean (5 e + 7 e) / 2e = 6 without
    np.testing.assert_allclose(fisher_merge(p, f, n, eps=e)["w"], [2.2, 6.5], rtol=1e-6)
    np.testing.assert_allclose(fisher_merge(p, f, n, eps=e, fallback="none")["w"], [2.2, 6.0], rtol=1e-6)
    np.testing.assert_allclose(fedavg_arrays(p, n)["w"], [2.5, 6.5])
    # near-zero Fisher no longer shrinks toward 0: (1e-8 + e) 1 / (1e-8 + e) = 1 (was 0.5)
    tiny = fisher_merge([{"w": np.array([1.0])}], [{"w": np.array([1e-8])}], [1], eps=e)
    np.testing.assert_allclose(tiny["w"], [1.0], rtol=1e-6)
    # two clients with Fisher far below eps: about their mean 3 (was 7e-4)
    two = fisher_merge([{"w": np.array([2.0])}, {"w": np.array([4.0])}],
                       [{"w": np.array([1e-12])}, {"w": np.array([3e-12])}], [1, 1], eps=e)
    np.testing.assert_allclose(two["w"], [3.0], rtol=1e-3)
    # a client with real Fisher mass dominates one without: ((1 + e) 2 + e 4) / (1 + 2e) = 2
    dom = fisher_merge([{"w": np.array([2.0])}, {"w": np.array([4.0])}],
                       [{"w": np.array([1.0])}, {"w": np.array([0.0])}], [1, 1], eps=e)
    np.testing.assert_allclose(dom["w"], [2.0], rtol=1e-6)
    with pytest.raises(ValueError, match="negative"):
        fisher_merge(p, [{"w": np.array([-1.0, 0.0])}, f[1]], n)
    with pytest.raises(ValueError, match="fallback"):
        fisher_merge(p, f, n, fallback="zero")


def test_aggregate_dispatch_strips_fisher_and_skips_empty_clients():
    a = with_fisher({"w": np.array([1.0])}, {"w": np.array([1.0])})
    b = with_fisher({"w": np.array([4.0])}, {"w": np.array([2.0])})
    c = with_fisher({"w": np.array([100.0])}, {"w": np.array([5.0])})
    fis = aggregate([(a, 2), (b, 1), (c, 0)], "fisher")
    assert set(fis) == {"w"}
    np.testing.assert_allclose(fis["w"], [(2 * 1 * 1 + 1 * 2 * 4) / (2 + 2)], rtol=1e-6)  # 2.5
    np.testing.assert_allclose(aggregate([(a, 2), (b, 1), (c, 0)], "fedavg")["w"], [2.0])
    with pytest.raises(ValueError, match="Fisher"):
        aggregate([({"w": np.array([1.0])}, 1)], "fisher")


def test_nano_adapter_per_example_grads_are_exact():
    torch.manual_seed(0)
    ad = NanoAdapter(6, 2, 4.0, seed=3)
    with torch.no_grad():
        ad.up.weight.normal_()
    x, g = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    got = ad.per_example_grads(x, g)
    for i in range(4):
        ad.zero_grad()
        (ad(x[i:i + 1]) * g[i:i + 1]).sum().backward()
        torch.testing.assert_close(got["down.weight"][i], ad.down.weight.grad)
        torch.testing.assert_close(got["up.weight"][i], ad.up.weight.grad)


# -- split training --------------------------------------------------------------------------
def test_split_channel_gradient_equals_end_to_end_and_counts_bytes(system):
    from torch.nn import functional as F

    from adaptsim.federated.fednano.task import SplitChannel

    edge, server, data = system.edge, system.server, system.clients[0]
    with torch.no_grad():
        edge.img_adapter.up.weight.normal_(0, 0.1)
    enc, q, y = system.enc_train[data.image[:16]], system.qtok[data.question[:16]], data.answer[:16]
    ch = SplitChannel(server)
    edge.zero_grad()
    tokens = edge(enc, q)                               # (16, S, d)
    loss, grad = ch.train_step(tokens.detach(), y)
    tokens.backward(grad)
    split = {n: p.grad.clone() for n, p in edge.named_parameters() if p.requires_grad}
    edge.zero_grad()
    ref = F.cross_entropy(server(edge(enc, q)), y)
    ref.backward()
    for n, p in edge.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(split[n], p.grad)
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    assert ch.bytes_up == tokens.numel() * 4 + y.numel() * 8 and ch.bytes_down == tokens.numel() * 4 + 4
    assert ch.round_trips == 1
    assert all(not p.requires_grad and p.grad is None for p in server.parameters())
    with torch.no_grad():
        edge.img_adapter.up.weight.zero_()


def test_client_fit_trains_adapters_only_and_reports_split_bytes(system):
    cfg = system.cfg
    before = {k: v.clone() for k, v in system.server.state_dict().items()}
    frozen = {k: v.clone() for k, v in system.edge.frozen_state().items()}
    out, n, met, state = client_fit_(system, cfg)
    assert n == len(system.clients[0]) and state["rounds_done"] == 1
    names = set(system.edge.adapter_names())
    assert set(out) == names | {f"fisher::{k}" for k in names}   # adapters + their Fisher, nothing else
    assert any(np.abs(out[k]).sum() > 0 for k in names if "up" in k)          # up left zero init
    assert all((out[f"fisher::{k}"] >= 0).all() for k in names)
    assert met["bytes_fisher_up"] == sum(out[f"fisher::{k}"].nbytes for k in names)
    S, d = system.enc_train.shape[1] + system.qtok.shape[1], system.server.pos.shape[-1]
    # one local epoch + one Fisher pass, each sends every example's tokens (float32) and answer (int64)
    assert met["bytes_activations_up"] == 2 * n * (S * d * 4 + 8)
    assert met["bytes_activations_up"] > 100 * sum(out[k].nbytes for k in names)
    for k, v in system.server.state_dict().items():
        torch.testing.assert_close(v, before[k])                     # the server model never changes
    for k, v in system.edge.frozen_state().items():
        torch.testing.assert_close(v, frozen[k])                     # connector/embeddings frozen


def client_fit_(system, cfg):
    from adaptsim.federated.fednano.task import client_fit

    return client_fit(system, dict(system.initial), system.clients[0], cfg, None, client_id=0, round_idx=0)


def test_inprocess_rounds_improve_and_keep_bytes_apart(system):
    from adaptsim.federated.local_sim import run_inprocess
    from adaptsim.federated.fednano.system import get_system
    from adaptsim.federated.fednano.task import evaluate

    cfg = _cfg({"rounds": 3, "lr": 0.5, "local_epochs": 2}, aggregation="fedavg")
    nano = get_system(cfg)   # same encoder tokens and pretrained server model as `system`
    init = evaluate(nano, dict(nano.initial))
    rounds = run_inprocess(cfg)
    # measured: loss 1.140 -> 1.091, accuracy 51.7 -> 56.3 % (split gradients zeroed: no change)
    assert len(rounds) == 3 and rounds[-1]["loss"] < init["loss"] - 0.03, (init, rounds)
    assert rounds[-1]["accuracy"] > init["accuracy"] + 0.02, (init, rounds)
    adapters = sum(a.nbytes for a in nano.initial.values())
    r = rounds[0]
    assert r["bytes_down"] == 3 * adapters and r["bytes_up"] == 3 * adapters and r["bytes_fisher_up"] == 0
    assert r["bytes_activations_up"] > 50 * r["bytes_up"] and r["bytes_gradients_down"] > 0
    assert r["bytes_model_download"] == 3 * nano.download_bytes() and rounds[1]["bytes_model_download"] == 0


def test_ffa_lora_baseline_sends_b_only_and_downloads_the_model(system):
    from adaptsim.federated.fednano.system import get_system
    from adaptsim.federated.fednano.task import client_fit

    cfg = _cfg(baseline="ffa_lora", aggregation="fedavg")
    base = get_system(cfg)
    assert base.initial and all("lora_B" in k for k in base.initial)
    out, n, met, _ = client_fit(base, dict(base.initial), base.clients[0], cfg, None, client_id=0, round_idx=0)
    assert set(out) == set(base.initial) and met["bytes_activations_up"] == 0
    assert any(np.abs(v).sum() > 0 for v in out.values())
    assert base.download_bytes() == system.download_bytes() + sum(
        v.numel() * 4 for v in system.server.state_dict().values())
    with pytest.raises(ValueError, match="aggregation"):
        client_fit(base, dict(base.initial), base.clients[0], _cfg(baseline="ffa_lora"), None)


def test_dp_is_refused_because_split_training_sends_tokens_and_labels(system):
    from adaptsim.cl.config import ConfigError
    from adaptsim.federated.local_sim import run_inprocess
    from adaptsim.federated.fednano.task import client_fit, refuse_dp

    cfg = _cfg({"dp": {"epsilon": 8.0}}, aggregation="fedavg")
    with pytest.raises(ConfigError, match="split training sends the adapted tokens and the answer ids"):
        refuse_dp(cfg)
    with pytest.raises(ConfigError, match="federated.dp with method fednano"):
        client_fit(system, dict(system.initial), system.clients[0], cfg, None)
    with pytest.raises(ConfigError, match="federated.dp"):   # a config error, not a failed client
        run_inprocess(cfg)
    refuse_dp(_cfg(aggregation="fedavg"))                     # no DP: fine


def test_config_validation_and_offline_hf_model_error(monkeypatch):
    from adaptsim.federated.fednano.server_model import ServerModelUnavailableError, hf_body

    with pytest.raises(ValueError, match="fednano.aggregation"):
        _cfg(aggregation="mean")
    with pytest.raises(ValueError, match="d_model"):
        _cfg(d_model=30, heads=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ServerModelUnavailableError, match="server_model: tiny"):
        hf_body("no-such-org/no-such-model-xyz")
