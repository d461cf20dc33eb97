"""SEMA: z-score buffer, expansion decisions, frozen old modules, state round-trip, end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from adaptsim.cl.backbones import BackboneConfig, create_backbone
from adaptsim.cl.data import ImageTensorDataset
from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import fit
from adaptsim.strategies.base import StreamInfo
from adaptsim.strategies.sema import SEMA, SEMAConfig, expandable_range, expansion_statistic
from adaptsim.strategies.sema_modules import ErrorBuffer, SEMALayer

CFG = dict(epochs=1, lr=0.05, rd_epochs=4, rd_lr=0.05, bottleneck=4, rd_dim=8, buffer_size=64,
           detect_batch_size=32, batch_size=16, expand_from=0.5, exp_threshold=2.0)


def _backbone(seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone(BackboneConfig(name="tiny_vit", img_size=28, tiny_patch=7, tiny_dim=32,
                                          tiny_depth=4, tiny_heads=4)).eval()


def _images(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, 28, 28) uint8: ``smooth`` = dim blurry blobs; ``ood`` = bright salt noise."""
    if kind == "smooth":
        low = torch.rand(n, 1, 7, 7, generator=gen) * 120
        return torch.nn.functional.interpolate(low, size=28, mode="bilinear").to(torch.uint8)
    return ((torch.rand(n, 1, 28, 28, generator=gen) > 0.5) * 255).to(torch.uint8)


def _exp(i: int, classes: tuple[int, ...], kind: str, n: int = 64) -> Experience:
    gen = torch.Generator().manual_seed(100 + i)
    x = _images(n, kind, gen)
    y = torch.tensor([classes[k % len(classes)] for k in range(n)])
    names = [str(c) for c in range(4)]
    ds = ImageTensorDataset(x, y.tolist(), names)
    return Experience(i, ds, ds.subset(list(range(16))), classes, i)


INFO = StreamInfo("class_incremental", 4, tuple(str(c) for c in range(4)), 2)


@pytest.fixture(scope="module")
def after_task1():
    torch.manual_seed(0)
    s = SEMA(SEMAConfig(**CFG), _backbone(), INFO)
    s.train_experience(_exp(0, (0, 1), "smooth"), fit)
    return s


# -- buffer and z-score against hand-computed values --------------------------------------------
def test_error_buffer_z_scores_and_rolling_by_hand():
    buf = ErrorBuffer(4)
    buf.add(torch.tensor([1.0, 2.0]))
    assert torch.equal(buf.z(torch.tensor([9.0])), torch.zeros(1))  # <= 2 values: no z yet
    buf.add(torch.tensor([3.0]))  # [1, 2, 3]: mean 2, unbiased std 1
    torch.testing.assert_close(buf.z(torch.tensor([4.0, 0.0, 2.5])), torch.tensor([2.0, 2.0, 0.5]))
    buf.add(torch.tensor([4.0, 5.0]))  # rolls to the newest 4: [2, 3, 4, 5]
    assert int(buf.length) == 4 and buf.values.tolist() == [2.0, 3.0, 4.0, 5.0]
    torch.testing.assert_close(buf.z(torch.tensor([5.0])), torch.tensor([1.5 / math.sqrt(5 / 3)]))
    buf.updating.fill_(False)
    buf.add(torch.tensor([100.0]))
    assert buf.values.tolist() == [2.0, 3.0, 4.0, 5.0]  # frozen buffers ignore new errors


def test_expansion_statistic_by_hand():
    layer = SEMALayer(4, 2, 2, 8)
    layer.add_adapter()
    layer.rds[0].buffer.add(torch.tensor([1.0, 2.0, 3.0]))  # mean 2, std 1
    layer.rds[1].buffer.add(torch.tensor([0.0, 2.0, 4.0]))  # mean 2, std 2
    errs = torch.tensor([[4.0, 2.0, 0.5], [4.0, 2.0, 0.5]])  # (n_rd, B)
    # per-sample |z|: rd0 [2, 0, 1.5] -> 7/6; rd1 [1, 0, 0.75] -> 7/12; min over RDs
    assert expansion_statistic(layer, errs, "sample_z") == pytest.approx(7 / 12)
    # batch mean 13/6: rd0 |13/6-2|/1*sqrt(3), rd1 |13/6-2|/2*sqrt(3); min
    assert expansion_statistic(layer, errs, "mean_z") == pytest.approx((1 / 6) / 2 * math.sqrt(3))


def test_expandable_range_scales_with_depth():
    assert list(expandable_range(12, 0.75, 1.0)) == [9, 10, 11]  # the official blocks 9-11
    assert list(expandable_range(4, 0.75, 1.0)) == [3]
    assert list(expandable_range(6, 0.5, 1.0)) == [3, 4, 5]


@pytest.mark.parametrize("field,value", [("expand_from", 1.0), ("detect_stat", "x"), ("head", "mlp"),
                                         ("buffer_size", 2), ("rd_dim", 0)])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        SEMAConfig(**{field: value})


# -- expansion decisions -------------------------------------------------------------------------
def test_expands_on_ood_task_not_on_same_distribution(after_task1):
    same = copy.deepcopy(after_task1)
    _, z_same = same.detect(_exp(1, (2, 3), "smooth").train.x[:32])
    same.train_experience(_exp(1, (2, 3), "smooth"), fit)
    assert same.expansions == [], z_same
    assert set(same.adapters_per_layer().values()) == {1}

    ood = copy.deepcopy(after_task1)
    choice, z_ood = ood.detect(_exp(1, (2, 3), "ood").train.x[:32])
    assert choice is not None and choice == min(i for i, z in z_ood.items() if z > CFG["exp_threshold"])
    ood.train_experience(_exp(1, (2, 3), "ood"), fit)
    assert ood.expansions and all(t == 1 for t, _ in ood.expansions), z_ood
    assert len(set(ood.expansions)) == len(ood.expansions)  # at most one per layer per task
    assert max(ood.adapters_per_layer().values()) == 2
    assert ood.run_metrics()["sema_n_expansions"] == len(ood.expansions)


def test_old_adapters_rds_router_columns_bit_identical_after_later_task(after_task1):
    s = copy.deepcopy(after_task1)
    old = {k: v.clone() for k, v in s.layers.state_dict().items()}
    old_shallow = {k: v.clone() for k, v in s.shallow.state_dict().items()}
    head0 = s.head.weight.detach().clone()
    s.train_experience(_exp(1, (2, 3), "ood"), fit)
    assert s.expansions  # the later task did grow the model
    new = s.layers.state_dict()
    for k, v in old.items():
        assert torch.equal(new[k], v), k
    assert all(torch.equal(s.shallow.state_dict()[k], v) for k, v in old_shallow.items())
    grown = [k for k in new if k not in old]
    assert any("sema_B.a1" in k for k in grown) and any("rds.1." in k for k in grown)
    assert any(new[k].abs().sum() > 0 for k in grown if "sema_B.a1" in k)  # new adapter trained
    assert not torch.equal(s.head.weight, head0)


# -- state and end to end ------------------------------------------------------------------------
def test_state_dict_roundtrip_gives_identical_predictions():
    torch.manual_seed(0)  # with every option on: cosine head and class statistics are state too
    cfg = SEMAConfig(**{**CFG, "router_fix": True, "head": "cosine", "ca_epochs": 1})
    s = SEMA(cfg, _backbone(), INFO)
    s.train_experience(_exp(0, (0, 1), "smooth"), fit)
    s.train_experience(_exp(1, (2, 3), "ood"), fit)
    assert s.expansions
    state = s.state_dict()
    torch.manual_seed(123)  # fresh modules start from different random weights
    t = SEMA(cfg, _backbone(), INFO)
    t.load_state_dict(state)
    x = _exp(1, (2, 3), "ood").test.x
    assert t.adapters_per_layer() == s.adapters_per_layer() and t.expansions == s.expansions
    assert torch.equal(t.predict(x), s.predict(x))
    assert not any(p.requires_grad for p in t.layers.parameters())


def test_router_fix_routes_old_data_to_old_adapter(after_task1):
    """Official routing lets the new column take over; the RD term sends old data home."""
    weights = {}
    for fix in (False, True):
        s = copy.deepcopy(after_task1)
        for layer in s.layers.values():
            layer.rd_route_weight = 1.0 if fix else 0.0
        s.train_experience(_exp(1, (2, 3), "ood"), fit)
        i = s.expansions[0][1]
        layer = s._layer(i)
        s._pass(_exp(0, (0, 1), "smooth").train.x[:32], [i])
        w = layer.router_weights(layer.last_xbar, layer.last_errors)
        weights[fix] = float(w[:, 0].mean())
    assert weights[True] > weights[False] and weights[True] > 0.5, weights


def test_three_task_stream_end_to_end_with_resume(tmp_path):
    """The runner trains 2 tasks, stops (checkpoint), resumes from it and finishes task 3."""
    from adaptsim.cl.experiment import load_experiment
    from adaptsim.cl.runner import run

    cfg = load_experiment("scenarios/tiny_digits.yaml", {
        "strategy.name": "sema", "strategy.epochs": 1, "strategy.rd_epochs": 2, "strategy.rd_dim": 8,
        "strategy.bottleneck": 4, "strategy.exp_threshold": 1.0, "run.out_dir": str(tmp_path)})
    first = run(cfg, stop_after=2)
    res = run(resume=first.run_dir)
    R = torch.as_tensor(res.metrics["R"])
    assert R.shape == (3, 3) and torch.isfinite(R).all()
    sm = res.metrics["strategy_metrics"]
    assert set(sm["sema_adapters_per_layer"]) == {"3"}  # tiny_vit depth 4: block 3 expandable
    assert sm["sema_n_expansions"] == len(sm["sema_expansions"])
