"""Our metrics equal Avalanche's EvaluationPlugin metrics on the same run (via the bridge)."""

from __future__ import annotations

import numpy as np
import pytest

from adaptsim.cl.evaluate import evaluate_stream
from adaptsim.cl.features import FeatureCache
from adaptsim.cl.metrics import bwt, pilot_forgetting
from adaptsim.cl.train import fit, seed_everything
from adaptsim.strategies import StreamInfo, get_strategy


def _strategy(name, stream, backbone, **kw):
    config_cls, cls = get_strategy(name)
    info = StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))
    return cls(config_cls(**kw), backbone, info, feature_cache=FeatureCache())


@pytest.mark.parametrize("name, kw", [("simplecil", {}), ("finetune", {"epochs": 2})])
def test_metrics_match_avalanche(name, kw, tiny_backbone):
    from avalanche.benchmarks import nc_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from adaptsim.cl.data import DatasetConfig, load_dataset
    from adaptsim.strategies.avalanche_bridge import AvalancheBridge

    train, test = load_dataset(DatasetConfig(name="digits"))
    order = np.random.RandomState(1993).permutation(10).tolist()
    bm = nc_benchmark(train, test, n_experiences=3, task_labels=False, fixed_class_order=order,
                      per_exp_classes={0: 4}, class_ids_from_zero_from_first_exp=True)
    # Our path: the same split through adaptsim's stream builder.
    from adaptsim.cl.scenarios import ClassIncrementalArgs, build_stream

    stream = build_stream("class_incremental", ClassIncrementalArgs(
        dataset=DatasetConfig(name="digits"), initial_increment=4, increment=3))
    ours = _strategy(name, stream, tiny_backbone, **kw)
    R = []
    for t, exp in enumerate(stream):
        seed_everything(t)
        ours.train_experience(exp, fit)
        R.append(evaluate_stream(ours, list(stream)))
    R = np.array(R)

    theirs = _strategy(name, stream, tiny_backbone, **kw)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True),
                                 forgetting_metrics(experience=True, stream=True),
                                 bwt_metrics(experience=True, stream=True), loggers=[])
    bridge = AvalancheBridge(strategy=theirs, evaluator=evaluator)
    R_av = []
    for t, exp in enumerate(bm.train_stream):
        seed_everything(t)
        bridge.train(exp, eval_streams=[])
        res = bridge.eval(bm.test_stream)
        R_av.append([res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{k:03d}"] for k in range(3)])
    R_av = np.array(R_av)
    if name == "simplecil":  # deterministic: both drivers produce the same accuracy matrix
        np.testing.assert_allclose(R_av, R, atol=1e-6)
    # Avalanche's StreamBWT / StreamForgetting of the run equal ours computed from its matrix.
    assert res["StreamBWT/eval_phase/test_stream"] == pytest.approx(bwt(R_av), abs=1e-6)
    assert res["StreamForgetting/eval_phase/test_stream"] == pytest.approx(-bwt(R_av), abs=1e-6)
    if name == "finetune":
        assert bwt(R_av) < -0.05  # the check is not vacuous: finetune forgets
    # PILOT forgetting uses the best accuracy, so it is >= Avalanche's first-vs-last forgetting
    assert pilot_forgetting(R_av) >= -bwt(R_av) - 1e-9
