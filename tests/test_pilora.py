"""PILoRA: incremental LoRA, its losses, the server's prototype re-weighting, federated contract."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from adaptsim.cl.train import fit


def _info(stream):
    from adaptsim.strategies import StreamInfo

    return StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def make(digits_stream, tiny_backbone):
    import copy

    from adaptsim.strategies import PILoRA, PILoRAConfig

    def build(**kw):
        kw = {"epochs": 1, "lr": 0.1, "lora_lr": 1e-2, "temperature": 0.05, **kw}
        torch.manual_seed(0)
        return PILoRA(PILoRAConfig(**kw), copy.deepcopy(tiny_backbone), _info(digits_stream))

    return build


def _small(exp, n=64):
    idx = np.sort(np.random.default_rng(0).permutation(len(exp.train))[:n])  # every class, in a fixed order
    return dataclasses.replace(exp, train=exp.train.subset(idx))


def _lora_state(st):
    return {k: v.clone() for k, v in st.lora.state_dict().items() if ".lora_" in k}


def test_a_new_experience_adds_a_lora_and_leaves_the_old_one_bit_identical(make, digits_stream):
    st = make()
    e0, e1 = (_small(e) for e in digits_stream.experiences[:2])
    st.train_experience(e0, fit)
    old = _lora_state(st)
    assert old and all(k.endswith(".e0") for k in old)
    assert any(v.abs().sum() > 0 for k, v in old.items() if "lora_B" in k)  # it trained
    st.train_experience(e1, fit)
    assert st.lora_names == ["e0", "e1"]
    now = _lora_state(st)
    assert all(torch.equal(now[k], v) for k, v in old.items())  # bit-identical
    assert any(now[k.replace(".e0", ".e1")].abs().sum() > 0 for k in old if "lora_B" in k)


def test_rounds_of_one_experience_continue_the_same_lora(make, digits_stream):
    st = make()
    e0 = _small(digits_stream.experiences[0])
    st.train_experience(e0, fit)
    after1 = _lora_state(st)
    st.config = dataclasses.replace(st.config, epochs=0)  # a round that trains nothing
    st.train_experience(e0, fit)
    assert st.lora_names == ["e0"] and st.round == 2
    assert all(torch.equal(v, _lora_state(st)[k]) for k, v in after1.items())  # not re-initialised


def test_orthogonality_loss_value_and_gradient_by_hand():
    from adaptsim.strategies.pilora_lora import IncrementalQVLoRA, orthogonality_loss

    layer = IncrementalQVLoRA(torch.nn.Linear(6, 18), rank=2)
    layer.add("e0", 1)
    assert orthogonality_loss([layer]).item() == 0.0  # nothing to be orthogonal to yet
    layer.add("e1", 2)
    Aq0, _, Av0, _ = layer.pair("e0")
    Aq1, _, Av1, _ = layer.pair("e1")
    loss = orthogonality_loss([layer])
    want = sum(abs(float(Aq0[i].detach() @ Aq1[j].detach())) + abs(float(Av0[i].detach() @ Av1[j].detach()))
               for i in range(2) for j in range(2))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    # d/dA_1 sum |A_0 A_1^T| = sign(A_0 A_1^T)^T A_0; the old A gets no gradient
    torch.testing.assert_close(Aq1.grad, torch.sign(Aq0 @ Aq1.T).T.detach() @ Aq0.detach())
    assert Aq0.grad is None or not Aq0.grad.any()
    opt = torch.optim.SGD([Aq1, Av1], lr=0.05)
    before = loss.item()
    for _ in range(40):
        opt.zero_grad()
        orthogonality_loss([layer]).backward()
        opt.step()
    assert orthogonality_loss([layer]).item() < 0.5 * before


def test_training_lowers_orthogonality_when_ort_weight_is_on(make, digits_stream):
    from adaptsim.strategies.pilora_lora import orthogonality_loss

    e0, e1 = (_small(e) for e in digits_stream.experiences[:2])
    ort = {}
    for w in (0.0, 5.0):
        st = make(ort_weight=w, lora_lr=5e-3, batch_size=16, epochs=2)
        st.train_experience(e0, fit)
        st.train_experience(e1, fit)
        ort[w] = orthogonality_loss(list(st.lora.values())).item()
    assert ort[5.0] < 0.5 * ort[0.0]


_OPTION_RUNS: dict = {}


@pytest.mark.parametrize("field,value", [("temperature", 0.5), ("pl_weight", 5.0), ("l1_weight", 1.0),
                                         ("lora_lr", 0.1), ("rank", 2), ("lora_blocks", (1,)),
                                         ("proto_init_std", 1.0), ("seed", 3), ("weight_decay", 1.0),
                                         ("lr", 0.01), ("batch_size", 7),
                                         ("loss_classes", "seen")])
def test_every_option_changes_the_trained_model(make, digits_stream, field, value):
    e0 = _small(digits_stream.experiences[0], 32)
    x = digits_stream.experiences[0].test.x[:32]
    outs = []
    for kw in ({}, {field: value}):
        key = tuple(kw.items())
        if key not in _OPTION_RUNS:  # the default run is shared by the parametrisations
            st = make(**kw)
            st.train_experience(e0, fit)
            _OPTION_RUNS[key] = st.predict(x)
        outs.append(_OPTION_RUNS[key])
    assert not torch.equal(outs[0], outs[1])


def test_round_schedule_decays_the_learning_rates_over_rounds(make, digits_stream):
    e0 = _small(digits_stream.experiences[0])
    moved = {}
    for R in (None, 1):  # R = 1: round 1 trains at lr * (1 + cos(pi)) / 2 = 0
        st = make(round_schedule=R)
        st.train_experience(e0, fit)
        before = _lora_state(st), st.protos.prototypes.clone()
        st.train_experience(e0, fit)
        moved[R] = not torch.equal(before[1], st.protos.prototypes)
    assert moved[None] and not moved[1]


def test_merge_modes(make, digits_stream):
    from adaptsim.strategies.pilora_lora import IncrementalQVLoRA, lora_terms

    layer = IncrementalQVLoRA(torch.nn.Linear(4, 12), rank=1)
    for i in range(3):
        layer.add(f"e{i}", i)
        torch.nn.init.normal_(layer.pair(f"e{i}")[1])
    x = torch.randn(5, 4)
    base = layer.base_layer(x)
    layer.use(lora_terms(layer, "sum"))
    q = sum(x @ (layer.pair(f"e{i}")[1] @ layer.pair(f"e{i}")[0]).T for i in range(3))
    torch.testing.assert_close(layer(x)[:, :4], base[:, :4] + q)
    torch.testing.assert_close(layer(x)[:, 4:8], base[:, 4:8])  # keys untouched
    layer.use(lora_terms(layer, "official"))
    (A0, B0), (A2, B2) = layer.pair("e0")[:2], layer.pair("e2")[:2]
    torch.testing.assert_close(layer(x)[:, :4], base[:, :4] + x @ ((B0 + B2) @ (A0 + A2)).T)
    layer.use(lora_terms(layer, "current"))
    torch.testing.assert_close(layer(x)[:, :4], base[:, :4] + x @ (B2 @ A2).T)
    # and the strategy predicts with the configured merge
    e0, e1 = (_small(e) for e in digits_stream.experiences[:2])
    preds = []
    for m in ("sum", "official"):
        st = make(merge=m)
        for e in (e0, e1):
            st.train_experience(e, fit)
        preds.append(st.predict(digits_stream.experiences[0].test.x[:32]))
    assert not torch.equal(*preds)


def test_reweight_prototypes_by_hand():
    from adaptsim.strategies.pilora_proto import reweight_prototypes

    # 3 clients, 1 class, 1-d features; clients 0 and 1 hold the class (means 0 and 2)
    protos = np.array([[[0.0]], [[1.0]], [[4.0]]])
    means = np.array([[[0.0]], [[2.0]], [[9.0]]])  # client 2's mean must be ignored
    has = np.array([[True], [True], [False]])
    # distance sums: c0 = |0-0| + |0-2| = 2, c1 = 1 + 1 = 2, c2 = 4 + 2 = 6 -> scores 1/2, 1/2, 1/6
    # min-max: 1, 1, 0 -> softmax(/0.2): e^5, e^5, 1
    e5 = math.exp(5.0)
    w = np.array([e5, e5, 1.0]) / (2 * e5 + 1)
    got = reweight_prototypes(protos, means, has, 0.2)
    assert got.shape == (1, 1) and got[0, 0] == pytest.approx(float(w @ [0.0, 1.0, 4.0]), rel=1e-12)
    # no client holds the class, or all scores equal: uniform 1/M
    assert reweight_prototypes(protos, means, np.zeros((3, 1), bool), 0.2)[0, 0] == pytest.approx(5 / 3)
    assert reweight_prototypes(protos[:1], means[:1], has[:1], 0.2)[0, 0] == 0.0


def test_server_reweights_the_prototypes_and_the_ablation_averages_them(make, digits_stream):
    from adaptsim.federated.fcl.loop import split_experience
    from adaptsim.strategies.pilora_proto import reweight_prototypes

    e0 = digits_stream.experiences[0]
    shares = split_experience(e0, 3, "dirichlet", alpha=0.5, seed=0)
    got = {}
    for rw in (True, False):
        clients = [make(reweight=rw, reweight_temperature=0.5) for _ in shares]
        states = []
        for c, s in zip(clients, shares):
            c.train_experience(_small(s, 48), fit)
            states.append(c.shareable_state())
        agg = make(reweight=rw, reweight_temperature=0.5).aggregate_shared(states)
        cls = list(e0.classes)
        got[rw] = agg.arrays["prototypes"][cls]
        protos = np.stack([s.arrays["proto_current"] for s in states])
        if rw:
            means = np.stack([s.stats["features"].means()[cls] for s in states])
            has = np.stack([s.stats["features"].counts[cls] > 0 for s in states])
            want = reweight_prototypes(protos, means, has, 0.5)  # the configured tau, not 0.2
        else:
            w = np.array([s.weight for s in states], np.float64)
            want = np.einsum("m,mkd->kd", w / w.sum(), protos.astype(np.float64))
        np.testing.assert_allclose(got[rw], want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(got[True], got[False])


def test_federated_fresh_client_reaches_the_server_and_beats_chance(make, digits_stream):
    from adaptsim.federated.fcl.loop import run_fcl

    stream = dataclasses.replace(digits_stream, experiences=tuple(_small(e, 150) for e in digits_stream.experiences))
    kw = {"epochs": 3, "batch_size": 16, "lr": 0.5, "lora_lr": 1e-5, "temperature": 1.0}  # official loss settings
    out = run_fcl(stream, lambda: make(**kw), fit, num_clients=3, rounds=2, partition="dirichlet",
                  alpha=0.5, seed=0)
    server, agg = out["server"], out["global"]
    assert server.lora_names == ["e0", "e1", "e2"] and agg.meta["round"] == 2
    fresh = make(**kw)
    fresh.load_shared_state(agg)
    x = torch.cat([e.test.x[:40] for e in digits_stream.experiences])
    assert torch.equal(fresh.predict(x), server.predict(x))
    s_state, f_state = server.lora.state_dict(), fresh.lora.state_dict()
    assert all(torch.equal(v, f_state[k]) for k, v in s_state.items())
    assert torch.equal(fresh.protos.prototypes, server.protos.prototypes)
    # clients upload only the newest LoRA; the server sends every LoRA back
    last = out["rounds"][-1]
    assert last["bytes_down"]["arrays"] > last["bytes_up"]["arrays"] / last["clients"]
    R = out["R"]
    assert R[0][0] > 1 / len(digits_stream.experiences[0].classes)  # above chance on the first experience
    assert np.mean(R[-1]) > 1.5 / digits_stream.n_classes  # and on all seen classes at the end


def test_config_validation():
    from adaptsim.strategies import PILoRAConfig

    for bad in ({"merge": "avg"}, {"rank": 0}, {"lora_blocks": ()}, {"reweight_temperature": 0.0},
                {"ort_weight": -1.0}, {"round_schedule": 0}, {"loss_classes": "current"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PILoRAConfig(**bad)


def test_state_dict_round_trip_rebuilds_the_loras(make, digits_stream):
    st = make()
    for e in digits_stream.experiences[:2]:
        st.train_experience(_small(e, 32), fit)
    state = st.state_dict()
    back = make()
    back.load_state_dict(state)
    x = digits_stream.experiences[0].test.x[:32]
    assert back.lora_names == ["e0", "e1"] and torch.equal(back.predict(x), st.predict(x))
