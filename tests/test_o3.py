"""O3 continual unlearning: orthogonality penalty, soft weight, per-sample gated LoRA, detectors,
and forgetting vs retention on a tiny offline stream (digits, random tiny ViT)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaptsim.cl.backbones import BackboneConfig, create_backbone
from adaptsim.cl.data import DatasetConfig, load_dataset
from adaptsim.cl.train import fit
from adaptsim.cl.unlearning import split_request
from adaptsim.strategies.o3 import O3Config, O3Unlearner, orthogonal_penalty
from adaptsim.strategies.o3_detector import O3DetectorConfig, SoftWeight, contrastive_entropy

# One 8x8 patch: the CLS token of a random ViT then sees the whole digit (smaller patches
# average the spatial layout away and the head stays near chance).
TINY = BackboneConfig(name="tiny_vit", img_size=8, tiny_patch=8, tiny_dim=64, tiny_depth=2, tiny_heads=2)
CFG = O3Config(epochs=4, lr=3e-3, head_epochs=30, max_requests=2,
               detector=O3DetectorConfig(layers=(-2, -1), epochs=1))


def _model(cfg: O3Config = CFG) -> O3Unlearner:
    torch.manual_seed(0)
    return O3Unlearner(cfg, create_backbone(TINY).eval(), 10, seed=0)


@pytest.mark.parametrize("n_prev", [0, 1, 2], ids=["no-earlier", "one-earlier", "two-earlier"])
def test_orthogonal_penalty_matches_hand_computation(n_prev):
    g = torch.Generator().manual_seed(n_prev)
    cur = [torch.randn(2, 3, generator=g), torch.randn(2, 5, generator=g)]
    prev = [[torch.randn(2, 3, generator=g), torch.randn(2, 5, generator=g)] for _ in range(n_prev)]
    expected = 0.0
    for saved in prev:
        for a_i, a_j in zip(saved, cur):
            for p in range(2):
                for q in range(2):
                    expected += float(sum(a_i[p, k] * a_j[q, k] for k in range(a_i.shape[1]))) ** 2
    assert orthogonal_penalty(cur, prev).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_orthogonal_penalty_is_zero_for_orthogonal_rows():
    eye = torch.eye(4)
    assert orthogonal_penalty([eye[2:]], [[eye[:2]]]).item() == 0.0
    assert orthogonal_penalty([eye[:2]], [[eye[:2]]]).item() == pytest.approx(2.0)


def test_soft_weight_two_gaussian_cdf():
    from scipy.stats import norm

    fit_s, held_s = np.array([9.0, 11.0]), np.array([7.0, 9.0])  # means 10 and 8, held std 1
    raw = SoftWeight("symmetric", rescale=False).fit(fit_s, held_s)
    x = 7.0
    F = lambda s: 0.5 * (norm.cdf(s, 10, 1) + norm.cdf(s, 8, 1))  # noqa: E731
    gap = abs(F(x) - F(2 * 9.0 - x))
    assert raw(np.array([x]))[0] == pytest.approx(1 / (1 + math.exp(-(10 * (1 - gap) - 2))))
    assert raw(np.array([9.0]))[0] == pytest.approx(1 / (1 + math.exp(-8)))  # peak at x0
    assert raw(np.array([100.0]))[0] == pytest.approx(1 / (1 + math.exp(2)), abs=1e-6)  # symmetric
    one = SoftWeight("one_sided", rescale=True).fit(fit_s, held_s)
    w = one(np.array([-100.0, 9.0, 100.0]))
    assert w[0] == pytest.approx(0.0, abs=1e-6) and w[1] == pytest.approx(1.0) and w[2] == pytest.approx(1.0)


def test_contrastive_entropy_peaked_vs_uniform():
    z = torch.eye(6) * 5
    assert contrastive_entropy([z], [z], temperature=0.01).item() < 1e-3
    same = torch.ones(6, 4)
    assert contrastive_entropy([same, same], [same, same]).item() == pytest.approx(2 * math.log(6), rel=1e-5)


def test_per_sample_scale_on_gated_path_matches_scalar_runs():
    model = _model()
    with torch.no_grad():
        for layer in model.lora.values():
            layer.lora_B.normal_(std=0.5)  # B is zero at init: make the delta non-trivial
    x = load_dataset(DatasetConfig(name="digits", train_per_class=2))[0].x[:3]
    w = torch.tensor([0.0, 0.5, 1.0])
    with torch.no_grad():
        batched = model.encode(x, 0, w)[0]
        for i in range(3):
            single = model.encode(x[i:i + 1], 0, float(w[i]))[0]
            torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(batched[2], model.encode(x[2:3], 0, 0.0)[0][0], atol=1e-3)
        torch.testing.assert_close(batched[0:1], model.backbone(x[:1]), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def two_requests():
    """Original classifier, then two O3 requests (forget digit 0, then digit 1)."""
    torch.set_num_threads(1)
    train, test = load_dataset(DatasetConfig(name="digits", train_per_class=60, test_per_class=30))
    model = _model()
    model.fit_original(train, fit)
    original = model.accuracy(split_request(test, {0, 1})[1])[0]
    out = {"train": train, "test": test, "model": model, "original": original, "A_after": []}
    for k, classes in enumerate(({0}, {0, 1})):
        forget = split_request(train, {k})[0]
        retained = split_request(train, classes)[1]
        model.unlearn(forget, retained, fit)
        out["A_after"].append([a.detach().clone() for a in model.unlearn_A()])
    return out


def test_detector_weights_request_above_retained(two_requests):
    """Each detector's (post-processed) weight ranks its request's test data above retained data
    (the score's direction is not fixed with the official local-term sign, the weight's is)."""
    from sklearn.metrics import roc_auc_score

    m, test = two_requests["model"], two_requests["test"]
    for k, det in enumerate(m.detectors):
        inside, outside = split_request(test, {k})
        with torch.no_grad():
            w_in = det.weight(m.encode(inside.x, k + 1, 1.0)[1]).numpy()
            w_out = det.weight(m.encode(split_request(outside, {0, 1})[1].x, k + 1, 1.0)[1]).numpy()
        auc = roc_auc_score(np.r_[np.ones(len(w_in)), np.zeros(len(w_out))], np.r_[w_in, w_out])
        assert auc > 0.75, f"detector {k}: AUROC {auc:.3f}"


def test_o3_forgets_requests_and_keeps_retained_accuracy(two_requests):
    m, train, test = two_requests["model"], two_requests["train"], two_requests["test"]
    forget_test, retained_test = split_request(test, {0, 1})
    assert two_requests["original"] > 0.8  # a useful classifier to begin with
    # With the official ScienceQA gate (raw weights in (0.4, 0.9] are gated to 0) part of the
    # forget set keeps the base model here: measured 0.45 (train) and 0.33 (test), from > 0.9.
    assert m.accuracy(split_request(train, {0, 1})[0])[0] < 0.55  # chance is 0.1
    assert m.accuracy(forget_test)[0] < 0.45
    assert m.accuracy(retained_test)[0] >= two_requests["original"] - 0.05  # stated margin: 5 points


def test_soft_weighting_protects_retained_data(two_requests):
    """Without detectors (scale 1 everywhere) the same LoRA wrecks the retained classes."""
    m, test = two_requests["model"], two_requests["test"]
    retained = split_request(test, {0, 1})[1]
    with torch.no_grad():
        full = (m.head(m.encode(retained.x, 0, 1.0)[0]).argmax(1) == retained.y).float().mean().item()
    weighted, mean_w = m.accuracy(retained)
    assert mean_w < 0.2 and weighted > full + 0.1


def test_detector_training_leaves_unlearning_block_unchanged(two_requests):
    m = two_requests["model"]
    # saved_A is taken right after the unlearning phase; the detector phase ran afterwards.
    for saved, after in zip(m.saved_A, two_requests["A_after"]):
        for a, b in zip(saved, after):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(m.saved_A[0][0], m.saved_A[1][0])  # the LoRA did continue training


def test_too_many_requests_raise():
    m = _model(O3Config(epochs=1, head_epochs=1, max_requests=1, detector=O3DetectorConfig(layers=(-1,), epochs=0)))
    train = load_dataset(DatasetConfig(name="digits", train_per_class=10))[0]
    m.fit_original(train, fit)
    m.unlearn(split_request(train, {0})[0], train, fit)
    with pytest.raises(ValueError, match="max_requests"):
        m.unlearn(split_request(train, {1})[0], train, fit)


@pytest.mark.parametrize("kw,field", [({"name": "ga"}, "method.name"), ({"rank": 0}, "rank"),
                                      ({"orth_weight": -1.0}, "orth_weight")], ids=["name", "rank", "orth"])
def test_config_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        O3Config(**kw)
