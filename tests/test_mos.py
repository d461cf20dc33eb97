"""MOS: immutable stored adapter sets, EMA merge, retrieval (batched == loop), prototypes, state."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from adaptsim.cl.train import fit
from adaptsim.strategies import MOS, MOSConfig, StreamInfo
from adaptsim.strategies.mos_adapters import MOSAdapterLayer, ema_merge_
from adaptsim.strategies.mos_retrieval import multi_adapter_features, refine

TINY = dict(epochs=1, batch_size=32, lr=0.05, crct_epochs=1, ca_samples_per_class=16, eval_batch_size=256,
            merge_mode="paper")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small(exp, n=80):
    g = torch.Generator().manual_seed(exp.id)
    idx = torch.randperm(len(exp.train), generator=g)[:n]
    return dataclasses.replace(exp, train=exp.train.subset(idx), test=exp.test.subset(torch.arange(min(60, len(exp.test)))))


def _make(tiny_backbone_cfg, stream, **kw):
    from adaptsim.cl.backbones import create_backbone

    torch.manual_seed(0)
    bb = create_backbone(tiny_backbone_cfg).eval()
    info = StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))
    return MOS(MOSConfig(**{**TINY, **kw}), bb, info)


def _clone_set(s: MOS, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for layer in s.layers for p in layer.params(name)]


@pytest.fixture(scope="module")
def trained(digits_stream, tiny_backbone_cfg):
    """Paper-mode MOS after 3 small tasks, with copies of sets t0/t1 taken when they were stored."""
    exps = [_small(e) for e in digits_stream]
    s = _make(tiny_backbone_cfg, digits_stream)
    copies = {}
    for e in exps:
        s.train_experience(e, fit)
        copies[f"t{e.id}"] = _clone_set(s, f"t{e.id}")
        s.predict(e.test.x)  # evaluation must not touch stored sets either
    return s, exps, copies


def test_stored_sets_unchanged_after_later_tasks_paper_mode(trained):
    s, _, copies = trained
    assert s.stored == ["t0", "t1", "t2"]
    for name in ("t0", "t1"):
        for a, b in zip(copies[name], _clone_set(s, name)):
            assert torch.equal(a, b), name
    assert not any(p.requires_grad for layer in s.layers for p in layer.parameters())
    # carried over, then trained: t1 started from t0 and moved away from it
    assert not torch.equal(copies["t0"][1], copies["t1"][1])


def test_ema_merge_matches_hand_computation():
    torch.manual_seed(0)
    layer = MOSAdapterLayer(6, 3)
    for n in ("t0", "t1", "t2"):
        layer.add(n)
        for p in layer.params(n):
            p.data.normal_()
    before = {n: [p.detach().clone() for p in layer.params(n)] for n in ("t0", "t1", "t2")}
    ema_merge_(layer, "t2", ["t0", "t1"], beta=0.1)
    for i, p in enumerate(layer.params("t2")):
        hand = 0.9 * before["t2"][i] + 0.1 * (before["t0"][i] + before["t1"][i]) / 2
        torch.testing.assert_close(p.detach(), hand)
    for n in ("t0", "t1"):  # sources untouched
        assert all(torch.equal(a, b) for a, b in zip(before[n], layer.params(n)))


def test_merge_runs_after_every_optimizer_step(digits_stream, tiny_backbone_cfg):
    """With a negligible learning rate, k steps leave t2 = m + 0.9^k (t1 - m), m = mean(t0, t1)."""
    exps = [_small(e, 40) for e in digits_stream]
    s = _make(tiny_backbone_cfg, digits_stream, crct_epochs=0)
    for e in exps[:2]:
        s.train_experience(e, fit)
    t0, t1 = _clone_set(s, "t0"), _clone_set(s, "t1")
    s.config = dataclasses.replace(s.config, lr=1e-12, weight_decay=0.0, reg=0.0)
    steps = s.train_experience(exps[2], fit)["steps"]
    assert steps == 2
    for a, b, c in zip(t0, t1, _clone_set(s, "t2")):
        m = (a + b) / 2
        torch.testing.assert_close(c, m + 0.9**steps * (b - m), atol=1e-6, rtol=1e-5)


def test_official_mode_merges_inside_forward_and_drifts_stored_sets(digits_stream, tiny_backbone_cfg):
    exps = [_small(e, 40) for e in digits_stream]
    s = _make(tiny_backbone_cfg, digits_stream, merge_mode="official", crct_epochs=0)
    for e in exps[:2]:
        s.train_experience(e, fit)
    depth = len(s.layers)
    t0, t1 = _clone_set(s, "t0"), _clone_set(s, "t1")
    state = copy.deepcopy(s.state_dict())
    s.predict(exps[0].test.x)  # one eval forward: stored set 1 merged once per block, set 0 never
    for a, b, c in zip(t0, t1, _clone_set(s, "t1")):
        torch.testing.assert_close(c, a + 0.9**depth * (b - a), atol=1e-6, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(t0, _clone_set(s, "t0")))
    drifted = _clone_set(s, "t1")
    s.load_state_dict(state)  # the per-set loop drifts each set exactly as the batched pass does
    s.predict(exps[0].test.x, retrieval="loop")
    for a, b in zip(drifted, _clone_set(s, "t1")):
        torch.testing.assert_close(a, b)


def test_refine_converges_to_fixed_point_or_stops_at_max_iter():
    cls2task = torch.tensor([0, 0, 1, 1, 2, 2])
    nxt = torch.tensor([1, 1, 0])  # head on adapter tau predicts a class of task nxt[tau]

    def get_features(a, tau):
        return torch.nn.functional.one_hot(tau, 3).float()

    def head(f):
        return torch.nn.functional.one_hot(2 * nxt[f.argmax(-1)], 6).float()

    final = refine(head, get_features, torch.tensor([0, 1, 2]), cls2task, max_iter=4)
    assert cls2task[final.argmax(-1)].tolist() == [1, 1, 1]  # 0->1->1, 1->1, 2->0->1->1
    cyc = torch.tensor([1, 0, 0])  # 0 <-> 1 never settles: stop after max_iter rounds
    head2 = lambda f: torch.nn.functional.one_hot(2 * cyc[f.argmax(-1)], 6).float()  # noqa: E731
    out = refine(head2, get_features, torch.tensor([0]), cls2task, max_iter=4)
    assert cls2task[out.argmax(-1)].item() == 0  # rounds use tau 0,1,0,1: the 4th predicts task 0
    out3 = refine(head2, get_features, torch.tensor([0]), cls2task, max_iter=3)
    assert cls2task[out3.argmax(-1)].item() == 1


def test_batched_retrieval_equals_loop(trained):
    s, exps, _ = trained
    x = torch.cat([e.test.x[:20] for e in exps])
    ids = range(len(s.stored))
    fb = multi_adapter_features(s.backbone, s.layers, x, ids, batched=True)
    fl = multi_adapter_features(s.backbone, s.layers, x, ids, batched=False)
    torch.testing.assert_close(fb, fl, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fl[0], fl[2])  # the sets really differ
    preds = {m: s.predict(x, retrieval=m).argmax(-1) for m in ("batched", "loop", "lazy")}
    assert torch.equal(preds["batched"], preds["loop"]) and torch.equal(preds["lazy"], preds["loop"])


def test_prototype_classifier_uses_first_adapter_features(trained):
    s, exps, _ = trained
    e = exps[2]
    f0 = multi_adapter_features(s.backbone, s.layers, e.train.x, [0, 2], batched=False)
    for c in e.classes:
        m = e.train.y == c
        torch.testing.assert_close(s.prototypes.prototypes[c], f0[0][m].mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.class_means[c], f0[1][m].mean(0), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(f0[0][m].mean(0), f0[1][m].mean(0), atol=1e-4)


def test_checkpoint_round_trip_gives_identical_predictions(trained, digits_stream, tiny_backbone_cfg, tmp_path):
    s, exps, _ = trained
    torch.save(s.state_dict(), tmp_path / "mos.pt")
    s2 = _make(tiny_backbone_cfg, digits_stream)
    s2.load_state_dict(torch.load(tmp_path / "mos.pt", weights_only=True))
    x = torch.cat([e.test.x for e in exps])
    assert torch.equal(s.predict(x), s2.predict(x))
    assert s2.stored == s.stored and torch.equal(s2.cls2task, s.cls2task)


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="merge_mode"):
        MOSConfig(merge_mode="fast")
    with pytest.raises(ValueError, match="retrieval"):
        MOSConfig(merge_mode="official", retrieval="lazy")


def test_three_task_stream_end_to_end(tmp_path):
    from adaptsim.cl.experiment import load_experiment
    from adaptsim.cl.runner import run

    cfg = load_experiment("scenarios/tiny_digits.yaml", {
        "strategy": {"name": "mos", **TINY},
        "run": {"out_dir": str(tmp_path), "plots": False},
        "train": {"num_threads": 1, "eval_future": False},
    })
    m = run(cfg).metrics
    assert len(m["R"]) == 3 and m["strategy_metrics"]["adapter_sets"] == 3
    assert 0.0 <= m["A_last"] <= 1.0
    assert m["trainable_params"] < 20_000
