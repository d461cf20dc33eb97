"""Registry and baseline strategies: every registered strategy runs a 3-experience stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptsim.cl.evaluate import evaluate_stream
from adaptsim.cl.features import FeatureCache
from adaptsim.cl.metrics import summarize
from adaptsim.cl.train import fit, seed_everything
from adaptsim.strategies import StreamInfo, get_strategy, list_strategies


# Small settings so every strategy's smoke run takes seconds.
FAST: dict[str, dict] = {
    "mos": dict(epochs=1, batch_size=32, lr=0.05, crct_epochs=1, ca_samples_per_class=16),
    "pilora": dict(epochs=3, lr=0.5),
    "sema": dict(epochs=2, rd_epochs=1, rd_dim=16, bottleneck=8, detect_batch_size=64),
    "mora": dict(epochs=1, experts_per_task=4, top_k=4),
}


def run_stream(name, stream, backbone, **cfg_kw):
    config_cls, cls = get_strategy(name)
    info = StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))
    strategy = cls(config_cls(**cfg_kw), backbone, info, feature_cache=FeatureCache())
    rows = []
    for t, exp in enumerate(stream):
        seed_everything(t)
        strategy.train_experience(exp, fit)
        rows.append(evaluate_stream(strategy, list(stream)))
    return strategy, np.array(rows)


def test_registry_fails_loudly():
    with pytest.raises(KeyError, match="available: .*simplecil"):
        get_strategy("simplecl")
    assert {"finetune", "joint", "simplecil"} <= set(list_strategies())


@pytest.mark.parametrize("name", list_strategies())
def test_every_strategy_runs_three_experiences(name, digits_stream, tiny_backbone):
    config_cls, cls = get_strategy(name)
    if "class_incremental" not in cls.SUPPORTED_SCENARIOS:
        pytest.skip(f"{name} does not run class-incremental streams")
    strategy, R = run_stream(name, digits_stream, tiny_backbone, **FAST.get(name, {}))
    assert R.shape == (3, 3) and np.isfinite(R).all()
    n_seen = len(strategy.seen_classes)
    assert n_seen == 10
    # Smoke level (the random tiny ViT has weak features; each method's own tests check its
    # behaviour): it learned something (some just-trained experience well above the 0.1 chance
    # over 10 classes) and its final predictions are not worse than chance.
    assert np.diag(R).max() > 0.3
    assert summarize(R, digits_stream.test_sizes())["A_last"] >= 0.1


def test_simplecil_beats_finetune_on_old_classes(digits_stream, tiny_backbone):
    _, r_simple = run_stream("simplecil", digits_stream, tiny_backbone)
    _, r_ft = run_stream("finetune", digits_stream, tiny_backbone, epochs=5, lr=0.01)
    # finetune forgets: its first experience's accuracy collapses after later ones
    assert r_ft[0, 0] - r_ft[2, 0] > 0.3
    assert summarize(r_simple)["forgetting"] < summarize(r_ft)["forgetting"]


def test_simplecil_prototypes_are_class_means(digits_stream, tiny_backbone):
    strategy, _ = run_stream("simplecil", digits_stream, tiny_backbone)
    exp = digits_stream[0]
    with torch.no_grad():
        feats = tiny_backbone(exp.train.x)
    c = exp.classes[0]
    assert torch.allclose(strategy.classifier.prototypes[c], feats[exp.train.y == c].mean(0), atol=1e-5)


def test_state_dict_round_trip(digits_stream, tiny_backbone):
    strategy, _ = run_stream("finetune", digits_stream, tiny_backbone, epochs=1)
    config_cls, cls = get_strategy("finetune")
    info = strategy.info
    fresh = cls(config_cls(epochs=1), tiny_backbone, info)
    fresh.load_state_dict(strategy.state_dict())
    x = digits_stream[2].test.x[:16]
    assert torch.equal(fresh.predict(x), strategy.predict(x))


def test_trainable_parameters_exclude_backbone_weights(digits_stream, tiny_backbone):
    config_cls, cls = get_strategy("finetune")
    info = StreamInfo(digits_stream.kind, digits_stream.n_classes, digits_stream.class_names, 3)
    strategy = cls(config_cls(mode="lora", rank=8), tiny_backbone, info)
    dim, depth = 64, 4  # tiny_vit: LoRA rank 8 on each block's qkv (dim -> 3*dim), plus the head
    assert strategy.trainable_parameter_count() == depth * (8 * dim + 3 * dim * 8) + (dim * 10 + 10)
