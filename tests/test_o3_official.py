"""O3's official pieces as options: weight post-processing, per-block mean of the orthogonality
penalty, the local term's sign, detector training until its adapter moved, checkpoint state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptsim.cl.backbones import BackboneConfig, create_backbone
from adaptsim.cl.data import DatasetConfig, load_dataset
from adaptsim.cl.train import fit
from adaptsim.cl.unlearning import split_request
from adaptsim.strategies import o3 as o3_module
from adaptsim.strategies.o3 import O3Config, O3Unlearner, orthogonal_penalty
from adaptsim.strategies.o3_detector import GlocalScorer, O3Detector, O3DetectorConfig
from adaptsim.strategies.o3_weights import postprocess_weight

TINY = BackboneConfig(name="tiny_vit", img_size=8, tiny_patch=8, tiny_dim=64, tiny_depth=2, tiny_heads=2)


def _model(cfg: O3Config) -> O3Unlearner:
    torch.manual_seed(0)
    return O3Unlearner(cfg, create_backbone(TINY).eval(), 10, seed=0)


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_dataset(DatasetConfig(name="digits", train_per_class=30, test_per_class=10))


# (kind, raw sigmoid weight, gated weight): ScienceQA eval_o3.py and TOFU run_ood.py, by hand.
GATES = [
    ("scienceqa", 0.95, 1.2), ("scienceqa", 0.9, 0.0), ("scienceqa", 0.6, 0.0), ("scienceqa", 0.4, 0.4),
    ("scienceqa", 0.35, 0.35), ("scienceqa", 0.3, 0.0), ("scienceqa", 0.12, 0.0),
    ("tofu", 0.99, 1.0), ("tofu", 0.32, 1.0), ("tofu", 0.25, 0.625), ("tofu", 0.2, 0.0), ("tofu", 0.12, 0.0),
    ("none", 0.25, 0.25), ("none", 0.95, 0.95),
]


@pytest.mark.parametrize("kind,w,expected", GATES, ids=[f"{k}-{w}" for k, w, _ in GATES])
def test_postprocess_matches_official_gates(kind, w, expected):
    assert postprocess_weight(np.array([w]), kind)[0] == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["scienceqa", "tofu", "none"])
def test_detector_weight_uses_configured_postprocess(kind):
    g = torch.Generator().manual_seed(0)
    fit_f = [torch.randn(40, 6, generator=g)]
    held_f = [torch.randn(10, 6, generator=g)]
    test_f = [torch.randn(200, 6, generator=g) * 2]
    det = O3Detector(O3DetectorConfig(layers=(-1,), postprocess=kind))
    det.fit(fit_f, held_f)
    raw = det.weight_fn.raw(det.score(test_f))
    got = det.weight(test_f).numpy()
    np.testing.assert_allclose(got, postprocess_weight(raw, kind), rtol=1e-6)
    if kind != "none":  # the gate really changed something on these scores
        assert not np.allclose(got, raw)


def test_rescale_needs_postprocess_none():
    with pytest.raises(ValueError, match="rescale"):
        O3DetectorConfig(rescale=True)
    O3DetectorConfig(rescale=True, postprocess="none")


def test_orthogonal_penalty_mean_over_blocks():
    g = torch.Generator().manual_seed(1)
    cur = [torch.randn(2, 4, generator=g) for _ in range(3)]
    prev = [[torch.randn(2, 4, generator=g) for _ in range(3)]]
    total = orthogonal_penalty(cur, prev, reduction="sum")
    # layers 0 and 1 sit in one block, layer 2 in another: official = block sums averaged
    assert orthogonal_penalty(cur, prev, reduction="mean", groups=[0, 0, 1]).item() == pytest.approx(total.item() / 2)
    assert orthogonal_penalty(cur, prev, reduction="mean").item() == pytest.approx(total.item() / 3)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_training_loss_uses_configured_orth_reduction(monkeypatch, digits, reduction):
    seen = []
    real = o3_module.orthogonal_penalty

    def spy(cur, prev, **kw):
        seen.append(kw)
        return real(cur, prev, **kw)

    monkeypatch.setattr(o3_module, "orthogonal_penalty", spy)
    cfg = O3Config(epochs=1, head_epochs=1, max_requests=2, orth_reduction=reduction,
                   detector=O3DetectorConfig(layers=(-1,), epochs=0))
    m = _model(cfg)
    assert m.orth_groups == [0, 1]  # qkv of two blocks
    train = digits[0]
    m.fit_original(train, fit)
    for c in (0, 1):
        m.unlearn(split_request(train, {c})[0], train, fit)
    assert seen and all(kw["reduction"] == reduction and kw["groups"] == [0, 1] for kw in seen)


def test_local_sign_flips_only_the_local_term():
    g = torch.Generator().manual_seed(2)
    fit_f, x = [torch.randn(30, 5, generator=g)], [torch.randn(7, 5, generator=g)]
    cos = (F.normalize(x[0].double(), dim=-1) @ F.normalize(fit_f[0].double(), dim=-1).T).max(1).values
    dets = {}
    for sign in (-1, 1):
        det = O3Detector(O3DetectorConfig(layers=(-1,), local_sign=sign))
        det.fit(fit_f, fit_f)
        dets[sign] = det.scorer.score(x)[:, 0]
    torch.testing.assert_close(dets[1] - dets[-1], 2000.0 * cos)
    plain = GlocalScorer(1000.0, 1).fit(fit_f).score(x)[:, 0]
    torch.testing.assert_close(dets[1], plain)


def test_local_sign_validation():
    with pytest.raises(ValueError, match="local_sign"):
        O3DetectorConfig(local_sign=0)


@pytest.mark.parametrize("min_movement,expected_epochs", [(0.0, 1), (1e6, 3)], ids=["off", "unreachable"])
def test_detector_trains_until_adapter_moved(digits, min_movement, expected_epochs):
    cfg = O3Config(epochs=1, head_epochs=1, max_requests=1,
                   detector=O3DetectorConfig(layers=(-1,), epochs=1, min_movement=min_movement, max_epochs=3))
    m = _model(cfg)
    train = digits[0]
    m.fit_original(train, fit)
    before = m._slot_vector(1)
    stats = m.unlearn(split_request(train, {0})[0], train, fit)
    assert stats["detector_epochs"] == expected_epochs
    moved = float((m._slot_vector(1) - before).norm() / before.norm())
    assert stats["detector_adapter_rel_change"] == pytest.approx(moved, rel=1e-5) and moved > 0


def test_checkpoint_state_restores_predictions(digits):
    cfg = O3Config(epochs=1, head_epochs=2, max_requests=2, detector=O3DetectorConfig(layers=(-2, -1), epochs=1))
    train, test = digits
    m = _model(cfg)
    m.fit_original(train, fit)
    m.unlearn(split_request(train, {0})[0], train, fit)
    buf = io.BytesIO()
    torch.save(m.checkpoint_state(), buf)
    buf.seek(0)
    fresh = _model(cfg)
    fresh.load_checkpoint_state(torch.load(buf, weights_only=True))
    a, b = m.predict_full(test.x), fresh.predict_full(test.x)
    for k in ("prob", "w", "wk"):
        torch.testing.assert_close(a[k], b[k])
    assert fresh.n_requests == 1 and fresh.forgotten == [0] and len(fresh.saved_A) == 1


def test_o3_importable_like_other_methods():
    from adaptsim.strategies import O3, O3Config as Cfg

    assert O3 is O3Unlearner and Cfg is O3Config
