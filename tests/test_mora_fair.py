"""MoRA's fair protocol: the prototype head, the paper gate, the derived LoRA baseline, gate statistics."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptsim.cl import engine
from adaptsim.cl.train import fit, seed_everything
from adaptsim.strategies import Finetune, FinetuneConfig, MoRA, MoRAConfig, StreamInfo, get_strategy
from adaptsim.strategies.components.proto_head import FrozenPrototypeHead, adapters_off
from adaptsim.strategies.mora_gate import MoRALinear, Route, SelfActivationGate
from adaptsim.strategies.mora_lora import MoRALoRA, lora_baseline_config
from adaptsim.strategies.mora_stats import GateStats, gate_table

from _mora_common import synthetic_stream, tiny_vit

FAST = {"epochs": 1, "batch_size": 16, "experts_per_task": 4, "top_k": 4, "seed": 0, "expert_lr": 0.05}


@pytest.fixture(scope="module")
def stream():
    return synthetic_stream()


def info_of(stream) -> StreamInfo:
    return StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))


def spy_fit(phases):
    """fit, recording each phase and its groups' learning rates before the schedule moves them."""
    def run(phase):
        phase.lrs = {id(p): g["lr"] for g in phase.params for p in g["params"]}
        phases.append(phase)
        return fit(phase)
    return run


def class_means(backbone, exp) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        f = backbone(exp.train.x)
    return {int(c): f[exp.train.y == c].mean(0) for c in exp.train.y.unique()}


# -- head ----------------------------------------------------------------------------------------
def test_prototype_head_is_default_fixed_at_first_appearance_on_frozen_features(stream):
    pristine = tiny_vit()
    mora = MoRA(MoRAConfig(**FAST), tiny_vit(), info_of(stream))
    assert isinstance(mora.head, FrozenPrototypeHead)
    rows = {}
    for t, exp in enumerate(stream):
        seed_everything(t)
        mora.train_experience(exp, fit)
        for c, mean in class_means(pristine, exp).items():  # the pretrained features, experts off
            torch.testing.assert_close(mora.head.prototypes[c], mean, rtol=0, atol=1e-5)
        rows[t] = mora.head.prototypes.clone()
        assert sum(p.abs().sum() for p in mora.experts.parameters()) > 0
    for c in stream[0].classes:  # rows of task 0 never move
        assert torch.equal(rows[2][c], rows[0][c])
    # the trained experts change the features: prototypes from the adapted backbone would differ
    with torch.no_grad():
        adapted = mora.backbone(stream[2].train.x[:8])
        frozen = pristine(stream[2].train.x[:8])
    assert (adapted - frozen).abs().max() > 1e-3
    assert sum(p.numel() for p in mora.head.parameters()) == 0  # nothing in the head trains


def test_adapters_off_swaps_every_wrapper_and_restores_it(stream):
    mora = MoRA(MoRAConfig(**FAST), tiny_vit(), info_of(stream))
    for layer in mora.layers.values():
        layer.add_experts(4)
        with torch.no_grad():
            layer.experts.more_B["0"].normal_()
    x = stream[0].test.x[:4]
    with torch.no_grad():
        on = mora.backbone(x)
        with adapters_off(mora.backbone.model) as n:
            off = mora.backbone(x)
            assert not any(isinstance(m, MoRALinear) for m in mora.backbone.model.modules())
        again = mora.backbone(x)
    assert n == len(mora.layers) and torch.equal(on, again)
    torch.testing.assert_close(off, tiny_vit()(x))


def test_prototype_head_loss_is_over_current_classes_and_scaled(stream):
    phases = []
    mora = MoRA(MoRAConfig(**FAST, head_scale=7.0), tiny_vit(), info_of(stream))
    for exp in list(stream)[:2]:
        mora.train_experience(exp, spy_fit(phases))
    exp = stream[1]
    x, y = exp.train.x[:10], exp.train.y[:10]
    with torch.no_grad():
        feats = mora.backbone(x)
        cos = F.normalize(feats, dim=-1) @ F.normalize(mora.head.prototypes, dim=-1).t()
        cur = torch.tensor(exp.classes)
        expect = F.cross_entropy(7.0 * cos[:, cur], (y[:, None] == cur).float().argmax(1))
        assert torch.allclose(phases[-1].loss_fn(x, y), expect, atol=1e-5)
        # the old classes (task 0) are in the seen set but outside the loss
        seen = torch.tensor(mora.seen_classes)
        assert not torch.allclose(F.cross_entropy(7.0 * cos[:, seen], (y[:, None] == seen).float().argmax(1)), expect)
    cfg = MoRAConfig(head="prototype", loss_classes="seen")
    assert cfg.resolved_loss_classes == "seen" and MoRAConfig(head="linear").resolved_loss_classes == "seen"


def test_linear_head_option_trains_at_lr(stream):
    phases = []
    mora = MoRA(MoRAConfig(**FAST, head="linear", lr=0.123), tiny_vit(), info_of(stream))
    assert isinstance(mora.head, nn.Linear)
    mora.train_experience(stream[0], spy_fit(phases))
    assert phases[0].lrs[id(mora.head.weight)] == 0.123


# -- gate ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate,renorm,scaling", [("paper", False, 1.0), ("renorm", True, 4.0)])
def test_gate_option_sets_the_layers_gate_and_scale(stream, gate, renorm, scaling):
    kw = {} if gate == "paper" else {"gate": gate}  # paper is the default
    mora = MoRA(MoRAConfig(**{**FAST, **kw}), tiny_vit(), info_of(stream))
    layer = next(iter(mora.layers.values()))
    assert layer.gate_cfg.renormalize is renorm and layer.experts.scaling == scaling
    layer.add_experts(12)
    route = layer.gate_cfg(layer.experts.scores_input(torch.randn(20, layer.experts.base_layer.in_features)))
    total = route.weights.sum(-1)
    kept = route.n_active > 0
    if renorm:
        torch.testing.assert_close(total[kept], torch.ones_like(total[kept]))
    else:  # softmax over all 12 experts, then masked to <= 4: never sums to 1
        assert (total < 1 - 1e-4).all()


def test_paper_gate_weights_are_the_masked_full_softmax():
    gate = SelfActivationGate(top_k=2, tau=0.5, delta=0.0)  # dataclass default: the paper
    h = torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    s = h / h.norm()
    full = torch.softmax(s / 0.5, -1)[0]
    r = gate(h)
    assert r.indices[0].tolist() == [0, 2]
    torch.testing.assert_close(r.weights[0], full[[0, 2]])


# -- the derived LoRA baseline -------------------------------------------------------------------
def test_mora_lora_same_layers_total_rank_head_and_lrs(stream):
    cfg = MoRAConfig(**{**FAST, "lr": 0.02, "expert_lr": 0.003})
    mora = MoRA(cfg, tiny_vit(), info_of(stream))
    base = MoRA(dataclasses.replace(cfg, adapter="lora"), tiny_vit(), info_of(stream))
    assert type(base) is MoRALoRA and get_strategy("mora") == (MoRAConfig, MoRA)
    assert sorted(base.lora) == sorted(mora.layers)  # the same wrapped linears
    ft = base.config
    assert ft.rank == 4 * 3 and ft.alpha == 12.0 and next(iter(base.lora.values())).rank == 12
    assert isinstance(base.head, FrozenPrototypeHead) and ft.head_scale == cfg.head_scale
    phases = []
    base.train_experience(stream[0], spy_fit(phases))
    assert set(phases[0].lrs.values()) == {0.003} and phases[0].epochs == cfg.epochs  # LoRA at expert_lr, no head params
    lin = MoRA(MoRAConfig(**{**FAST, "head": "linear", "lr": 0.02, "expert_lr": 0.003, "adapter": "lora"}),
               tiny_vit(), info_of(stream))
    phases.clear()
    lin.train_experience(stream[0], spy_fit(phases))
    by_param = phases[0].lrs
    assert by_param[id(lin.head.weight)] == 0.02
    assert {by_param[id(p)] for p in lin.lora.parameters() if p.requires_grad} == {0.003}
    with pytest.raises(ValueError, match="clip_text"):
        lora_baseline_config(MoRAConfig(head="clip_text"), 3)


def test_finetune_prototype_head_and_head_lr(stream):
    assert FinetuneConfig().head == "linear" and FinetuneConfig().head_lr is None
    info = info_of(stream)
    pristine = tiny_vit()
    ft = Finetune(FinetuneConfig(mode="lora", head="prototype", epochs=1, lr=0.05), tiny_vit(), info)
    for exp in list(stream)[:2]:
        ft.train_experience(exp, fit)
        for c, mean in class_means(pristine, exp).items():
            torch.testing.assert_close(ft.head.prototypes[c], mean, rtol=0, atol=1e-5)
    phases = []
    ft = Finetune(FinetuneConfig(mode="lora", head_lr=0.5, epochs=1), tiny_vit(), info)
    ft.train_experience(stream[0], spy_fit(phases))
    assert phases[0].lrs[id(ft.head.weight)] == 0.5
    with pytest.raises(ValueError, match="prototype"):
        FinetuneConfig(head="prototype")  # mode="head": that is simplecil


# -- gate statistics -----------------------------------------------------------------------------
class _Layer:
    def __init__(self, sizes):
        self.sizes = sizes

    def group_sizes(self):
        return self.sizes


def test_gate_stats_hand_computed():
    st = GateStats()
    # 3 tokens, k = 2, groups of sizes [2, 2]: experts 0,1 old, 2,3 new
    idx = torch.tensor([[0, 3], [2, 1], [3, 2]])
    w = torch.tensor([[0.5, 0.2], [0.3, 0.0], [0.0, 0.0]])
    h = torch.tensor([[1.0, -2.0, 0.0, 4.0], [0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    st(_Layer([2, 2]), Route(idx, w, torch.tensor([2, 1, 0])), h)
    s = st.summary()
    assert s["topk_share_per_group"] == [2 / 6, 4 / 6]
    assert s["active_share_old"] == pytest.approx(1 / 3) and s["active_share_new"] == pytest.approx(2 / 3)
    assert s["no_active_fraction"] == pytest.approx(1 / 3) and s["mean_active"] == pytest.approx(1.0)
    assert s["mean_abs_activation_per_group"] == pytest.approx([(1 + 2 + 1 + 1) / 6, (4 + 2 + 2 + 1 + 1) / 6])


@pytest.mark.parametrize("delta,no_active", [(-1.0, 0.0), (1.0, 1.0)])
def test_gate_stats_per_task_in_run_metrics(stream, delta, no_active):
    mora = MoRA(MoRAConfig(**FAST, delta=delta, gate_probe=5), tiny_vit(), info_of(stream))
    for t, exp in enumerate(stream):
        seed_everything(t)
        mora.train_experience(exp, fit)
    gs = mora.run_metrics()["gate_stats"]
    assert [e["after_experience"] for e in gs] == [0, 1, 2]
    for t, e in enumerate(gs):
        assert [p["input_task"] for p in e["per_input_task"]] == list(range(t + 1))
        assert len(e["key_norm_per_group"]) == t + 1
        assert e["current_inputs"]["no_active_fraction"] == no_active
        if t:
            old = e["old_inputs"]
            assert old["topk_share_old"] + old["topk_share_new"] == pytest.approx(1.0)
            assert len(old["topk_share_per_group"]) == t + 1
    assert gs[2]["key_norm_per_group"][:2] == pytest.approx(gs[1]["key_norm_per_group"])  # old keys frozen
    state = copy.deepcopy(mora.state_dict())
    assert state["extra"]["gate_history"] == gs
    off = MoRA(MoRAConfig(**FAST, gate_probe=0), tiny_vit(), info_of(stream))
    off.train_experience(stream[0], fit)
    assert off.run_metrics()["gate_stats"] == []


def test_gate_stats_reach_metrics_json(tmp_path):
    over = {"strategy.name": "mora", "strategy.epochs": 1, "strategy.experts_per_task": 2, "strategy.top_k": 2,
            "strategy.gate_probe": 4, "run.out_dir": str(tmp_path), "run.name": "m", "run.plots": False,
            "scenario.dataset.train_per_class": 6, "scenario.dataset.test_per_class": 4}
    kind, cfg = engine.load("scenarios/tiny_digits.yaml", over)
    res = engine.run_config(cfg, kind)
    m = json.loads((res.run_dir / "metrics.json").read_text())
    gs = m["strategy_metrics"]["gate_stats"]
    assert len(gs) == 3 and gs[2]["old_inputs"]["topk_share_new"] >= 0 and m["strategy_metrics"]["gate"] == "paper"
    table = gate_table(tmp_path)
    row = next(r for r in table.splitlines() if r.startswith("| all | 2 | old | 1 |"))
    assert f"{gs[2]['old_inputs']['topk_share_new']:.3f}" in row


@pytest.mark.parametrize("field,value", [("gate", "soft"), ("head", "text"), ("head_scale", 0.0),
                                         ("gate_probe", -1), ("loss_classes", "all"),
                                         ("adapter", "lora_baseline")])
def test_new_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        MoRAConfig(**{field: value})
