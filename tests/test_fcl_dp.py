"""Sample-level DP of the fcl run kind: the DP fit's per-example gradients, clipping and secret
noise, the accountant spanning experiences, the statistics' Gaussian mechanism, DP runs, refusals."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from adaptsim.cl.train import Phase, fit
from adaptsim.federated.config import DPConfig
from adaptsim.federated.fcl.dp import FCLPrivacy, dp_fit, per_example_grads
from adaptsim.federated.privacy import dp_generators, epsilon_of
from adaptsim.strategies.sharing import ClassStats, class_stats, gaussian_release

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DP = DPConfig(epsilon=8.0, delta=1e-5, max_grad_norm=1.0)


def _phase(model, n=8, batch_size=8, lr=0.1, epochs=1, **kw):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    loss_fn = lambda a, b: nn.functional.cross_entropy(model(a), b) + 1e-2 * model.weight.pow(2).sum()  # noqa: E731
    return Phase("t", list(model.parameters()), loss_fn, TensorDataset(x, y), epochs, lr, batch_size,
                 optimizer="sgd", momentum=0.0, schedule="constant", **kw), x, y


def _model():
    torch.manual_seed(0)
    return nn.Linear(5, 3)


def _noiseless(phase, clip=1e6, seed=0):
    gens = dp_generators(DPConfig(epsilon=1.0, reproducible=True), seed)
    return dp_fit(phase, noise_multiplier=0.0, max_grad_norm=clip, generators=gens)


def test_per_example_gradients_equal_torch_func_and_a_noiseless_full_batch_step_equals_sgd():
    m = _model()
    phase, x, y = _phase(m)
    params = list(m.parameters())
    grads, _ = per_example_grads(phase.loss_fn, params, x, y)
    names = dict(m.named_parameters())

    def one(p, a, b):  # the per-example loss, including the phase's regulariser
        logits = torch.func.functional_call(m, p, (a[None],))
        return nn.functional.cross_entropy(logits, b[None]) + 1e-2 * p["weight"].pow(2).sum()

    ref = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))({k: v.detach() for k, v in names.items()}, x, y)
    for g, k in zip(grads, names):
        torch.testing.assert_close(g, ref[k])
    # q = 1 (batch_size = n), no noise, no clipping: the DP step is the plain full-batch SGD step
    m2 = copy.deepcopy(m)
    _noiseless(phase)
    fit(_phase(m2)[0])
    for a, b in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b)


def test_clipping_bounds_each_examples_contribution():
    m = _model()
    before = [p.detach().clone() for p in m.parameters()]
    phase, *_ = _phase(m, lr=1.0)
    clip = 1e-3
    _noiseless(phase, clip=clip)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(m.parameters(), before)])
    assert 0 < step.norm() <= clip * 8 / 8 + 1e-9  # lr * sum of n clipped grads / expected batch (n = B)
    m2 = _model()
    _noiseless(_phase(m2, lr=1.0)[0])
    step2 = torch.cat([(p.detach() - b).flatten() for p, b in zip(m2.parameters(), before)])
    assert step2.norm() > 100 * clip  # the unclipped step is far larger: the clip did act


def test_noise_is_secret_by_default_and_reproducible_on_request():
    def run(dp, seed=3):  # q = 1: every example in every step, so only the noise can differ
        m = _model()
        dp_fit(_phase(m, n=16, batch_size=16)[0], noise_multiplier=1.0, max_grad_norm=1.0,
               generators=dp_generators(dp, seed))
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    secret = DPConfig(epsilon=8.0)
    assert not torch.equal(run(secret), run(secret))
    rep = DPConfig(epsilon=8.0, reproducible=True)
    assert torch.equal(run(rep), run(rep)) and not torch.equal(run(rep, 3), run(rep, 4))


def test_accountant_spans_experiences_ends_at_the_target_and_skips_past_it():
    priv = FCLPrivacy(DP, num_clients=1, experiences=3, rounds=2, releases=0, feature_clip=1.0, stats_fraction=0.5)
    m = _model()
    for t in range(3):
        for r in range(2):
            out = priv.fit_for(0, t, r)(_phase(m, n=20, batch_size=5)[0])
            assert out["steps"] == 4 and not priv.skipped(0)
    eps = priv.epsilons()[0]
    assert 0.99 * DP.epsilon <= eps <= DP.epsilon * (1 + 1e-9)
    assert len(priv.clients[0].history) == 6
    sigmas = [priv.clients[0].sigma[t][0] for t in range(3)]  # planned over all experiences: equal
    assert sigmas == pytest.approx([sigmas[0]] * 3, rel=1e-2) and 0.3 < sigmas[0] < 10
    out = priv.fit_for(0, 2, 2)(_phase(m, n=20, batch_size=5)[0])  # one round more than planned
    assert priv.skipped(0) and out["steps"] == 0 and priv.epsilons()[0] == eps


def test_statistics_and_sgd_share_one_accountant():
    priv = FCLPrivacy(DP, num_clients=1, experiences=2, rounds=1, releases=5, feature_clip=2.0, stats_fraction=0.5)
    m = _model()
    f = torch.randn(30, 4, dtype=torch.float64) * 3
    y = torch.tensor([0, 1] * 15)
    from adaptsim.strategies.sharing import SharedState

    for t in range(2):
        priv.fit_for(0, t, 0)(_phase(m, n=20, batch_size=5)[0])
        st = SharedState(stats={"a": class_stats(f, y, 4, outer=True, clip=2.0), "b": class_stats(f, y, 4, clip=2.0)})
        out = priv.release(0, t, 0, st, [0, 1])
        assert out.stats["a"].noisy and out.stats["b"].outer is None
    eps = priv.epsilons()[0]
    assert 0.99 * DP.epsilon <= eps <= DP.epsilon * (1 + 1e-9)
    stats_only = epsilon_of([(priv.stats_sigma, 1.0, 10)], DP)
    assert stats_only == pytest.approx(0.5 * DP.epsilon, rel=1e-3)  # dp_stats_fraction of the budget


def test_gaussian_release_has_the_documented_noise_and_leaves_other_rows_alone():
    C, D, clip, sigma = 6, 12, 3.0, 2.0
    zero = ClassStats(np.zeros(C, np.int64), np.zeros((C, D)), np.zeros((C, D, D)))
    rows = [1, 2, 4]
    out = gaussian_release(zero, rows, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(0))
    assert np.all(out.counts[[0, 3, 5]] == 0) and np.all(out.sums[[0, 3, 5]] == 0) and np.all(out.outer[[0, 3, 5]] == 0)
    outs = [gaussian_release(zero, rows, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(s))
            for s in range(300)]
    counts = np.stack([o.counts[rows] for o in outs])
    assert counts.std() == pytest.approx(sigma, rel=0.06)
    assert np.stack([o.sums[rows] for o in outs]).std() == pytest.approx(sigma * clip, rel=0.03)
    outer = np.stack([o.outer[rows] for o in outs])
    assert outer.std() == pytest.approx(sigma * clip**2, rel=0.03)
    assert np.array_equal(outer, np.swapaxes(outer, -1, -2))  # symmetric
    with pytest.raises(ValueError, match="outside"):
        gaussian_release(zero + ClassStats(np.eye(C, dtype=np.int64)[0], np.zeros((C, D)), np.zeros((C, D, D))),
                         rows, clip=clip, noise_multiplier=sigma)


def test_clipping_bounds_the_features_and_noisy_statistics_stay_usable():
    f = torch.randn(40, 6, dtype=torch.float64) * 10
    y = torch.arange(40) % 2
    st = class_stats(f, y, 3, outer=True, clip=1.5)
    assert np.all(np.linalg.norm(st.sums, axis=1) <= 1.5 * 20 + 1e-9)
    noisy = gaussian_release(st, [0, 1], clip=1.5, noise_multiplier=50.0, generator=torch.Generator().manual_seed(0))
    noisy.counts[0] = -3.0  # a negative noisy count
    assert noisy.classes() == [0, 1] and np.all(np.isfinite(noisy.means()))
    cov = noisy.covariances()
    assert np.all(cov[0] == 0)  # a count below 2: no covariance (MOS adds its eps I)
    assert np.linalg.eigvalsh(cov[1]).min() > 0  # projected onto the PSD cone (+ ridge)
    torch.linalg.cholesky(torch.from_numpy(cov[1]).float().double())
    raw = noisy.outer[1] - noisy.counts[1] * np.outer(noisy.means()[1], noisy.means()[1])
    assert np.linalg.eigvalsh(raw).min() < 0  # the noise did break PSD: the projection acted


def test_a_phase_on_released_values_is_post_processing():
    priv = FCLPrivacy(DP, num_clients=1, experiences=1, rounds=1, releases=0, feature_clip=1.0, stats_fraction=0.5)
    m1, m2 = _model(), _model()
    priv.fit_for(0, 0, 0)(_phase(m1, client_data=False)[0])
    fit(_phase(m2)[0])
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert priv.clients[0].history == []


def _run(tmp_path, name, *extra):
    from adaptsim.cl.cli import main

    rc = main(["run", "scenarios/tiny_digits.yaml", "--kind=fcl", "--fcl.num_clients=3", "--fcl.dp.epsilon=8",
               "--fcl.dp_feature_clip=5", f"--run.out_dir={tmp_path}", f"--run.name={name}", "--run.plots=false",
               "--train.num_threads=1", *extra])
    return rc


@pytest.mark.parametrize("strategy", [["--strategy.name=simplecil"],
                                      ["--strategy.name=finetune", "--strategy.mode=head", "--strategy.epochs=2"]])
def test_dp_fcl_run_reports_epsilon_per_client(tmp_path, strategy):
    assert _run(tmp_path, "dp", *strategy) == 0
    m = json.loads((tmp_path / "dp" / "metrics.json").read_text())
    eps = m["dp"]["epsilon"]
    assert len(eps) == 3 and all(0.95 * 8 <= e <= 8 * (1 + 1e-9) for e in eps)
    assert m["dp"]["privacy"] == "sample-level DP-SGD (secret noise)" and m["setting"]["privacy"] == m["dp"]["privacy"]
    rounds = json.loads((tmp_path / "dp" / "fcl_rounds.json").read_text())
    assert [len(r["epsilon"]) for r in rounds] == [3] * 3 and rounds[-1]["epsilon"] == eps
    assert all(a <= b for r0, r1 in zip(rounds, rounds[1:]) for a, b in zip(r0["epsilon"], r1["epsilon"]))


@pytest.mark.parametrize("bad, msg", [(["--fcl.engine=simulation"], "inprocess"),
                                      (["--fcl.dp_feature_clip=0"], "dp_feature_clip"),
                                      (["--fcl.dp_stats_fraction=1.5"], "dp_stats_fraction"),
                                      (["--fcl.dp.delta=0.5"], "delta")])
def test_bad_dp_config_is_one_error_line(tmp_path, capsys, bad, msg):
    assert _run(tmp_path, "bad", *bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name, cfg", [
    ("mos", dict(epochs=1, batch_size=16, lr=0.05, crct_epochs=1, ca_samples_per_class=8, merge_mode="paper",
                 adapter_dropout=0.0)),
    ("pilora", dict(epochs=2, batch_size=16, lr=0.1))])
def test_dp_mos_and_pilora_release_counted_statistics(digits_stream, tiny_backbone, name, cfg, monkeypatch):
    import dataclasses
    import importlib

    from adaptsim.federated.fcl.loop import run_fcl
    from adaptsim.strategies import StreamInfo, get_strategy

    def small(e):
        return dataclasses.replace(e, train=e.train.subset(torch.arange(40)), test=e.test.subset(torch.arange(30)))

    stream = dataclasses.replace(digits_stream, experiences=tuple(small(e) for e in digits_stream.experiences[:2]))
    cfg_cls, cls = get_strategy(name)
    info = StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))

    def make():
        torch.manual_seed(0)
        return cls(cfg_cls(**cfg), copy.deepcopy(tiny_backbone), info)

    module, clips = importlib.import_module(f"adaptsim.strategies.{name}"), []
    real = module.class_stats
    monkeypatch.setattr(module, "class_stats", lambda *a, **kw: clips.append(kw.get("clip")) or real(*a, **kw))
    per_exp = sum(cls.dp_releases.values())
    priv = FCLPrivacy(DP, num_clients=2, experiences=2, rounds=1, releases=per_exp, feature_clip=2.0,
                      stats_fraction=0.5)
    out = run_fcl(stream, make, fit, num_clients=2, rounds=1, dp=priv)
    assert all(0.97 * DP.epsilon <= e <= DP.epsilon * (1 + 1e-9) for e in priv.epsilons())
    assert all(c.released == 2 * per_exp for c in priv.clients)  # every declared release was made and counted
    assert all(c.dp_feature_clip == 2.0 for c in out["clients"]) and np.isfinite(out["R"][-1][0])
    assert clips and set(clips) == {2.0}  # every released statistic was built from clipped features
    if name == "mos":
        assert out["server"].federated_stats.noisy
    else:  # one pass over each share after training, not one per epoch of Poisson batches
        assert sum(int(c._feat.counts.sum()) for c in out["clients"]) == 40
