"""Sample-level DP: sigma calibrated for all rounds, one accountant per client across rounds,
epsilon never below Opacus's accountant, clients stop when the budget is spent."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("opacus")

from adaptsim.federated.config import DPConfig, load_fed_experiment  # noqa: E402
from adaptsim.federated.privacy import (epsilon_of, flatten_history, plan_dp,  # noqa: E402
                                        unflatten_history, would_exceed)
from adaptsim.federated.task import client_dataset, client_fit, get_model, initial_arrays  # noqa: E402

from _fed_common import TINY, _one_thread  # noqa: E402,F401  (autouse fixture)


def _cfg(**fed):
    base = {"method": "ffa_lora", "num_clients": 4, "clients_per_round": 4, "rounds": 2, "lr": 0.5,
            "batch_size": 64, "partition": "iid", "dp": {"epsilon": 4.0, "delta": 1e-5}}
    return load_fed_experiment({"scenario": {"dataset": {"name": "digits"}}, "backbone": TINY,
                                "federated": {**base, **fed}})


def test_plan_budget_fits_exactly_the_planned_rounds():
    dp = DPConfig(epsilon=3.0)
    plan = plan_dp(450, 64, local_epochs=2, rounds=3, dp=dp)
    assert plan.steps_per_round == 2 * math.ceil(450 / 64) and plan.total_steps == 3 * plan.steps_per_round
    assert plan.sample_rate == pytest.approx(1 / math.ceil(450 / 64))
    spent = [(plan.noise_multiplier, plan.sample_rate, plan.total_steps)]
    assert 0.9 * 3.0 < epsilon_of(spent, dp) <= 3.0
    two = [(plan.noise_multiplier, plan.sample_rate, 2 * plan.steps_per_round)]
    assert not would_exceed(two, plan, dp)  # the third round fits
    assert would_exceed(spent, plan, dp)  # a fourth does not
    assert plan_dp(450, 64, 2, 3, DPConfig(epsilon=1.0)).noise_multiplier > plan.noise_multiplier


def test_history_flatten_roundtrip():
    h = [(1.25, 0.125, 8), (0.5, 0.25, 3)]
    flat = flatten_history(h)
    assert all(isinstance(v, float) for v in flat)
    assert unflatten_history(flat) == h
    with pytest.raises(ValueError, match="triples"):
        unflatten_history([1.0, 2.0])


def test_epsilon_reported_every_round_never_below_opacus_then_budget_spent():
    from opacus.accountants import RDPAccountant

    cfg = _cfg()
    model = get_model(cfg)
    train, _ = client_dataset(cfg, 1, 4)
    arrays, state = initial_arrays(cfg), None
    plan = plan_dp(len(train), 64, 1, 2, cfg.federated.dp)
    total_steps, reported = 0, []
    for r in range(2):
        arrays, n, metrics, state = client_fit(model, arrays, train, cfg, state, client_id=1)
        assert n == len(train) and metrics["budget_spent"] == 0
        total_steps += metrics["steps"]
        # independent reference: a fresh Opacus accountant over every step taken so far
        ref = RDPAccountant()
        ref.history = [(plan.noise_multiplier, plan.sample_rate, total_steps)]
        eps_ref = ref.get_epsilon(delta=1e-5)
        assert metrics["epsilon"] >= eps_ref * (1 - 1e-9)
        assert metrics["epsilon"] == pytest.approx(eps_ref, rel=1e-6)
        reported.append(metrics["epsilon"])
    assert reported[0] < reported[1] <= 4.0
    assert state["rounds_done"] == 2 and state["noise_multiplier"] == plan.noise_multiplier
    # round 3 would exceed the budget: the client does not train and says so
    before = {k: v.copy() for k, v in arrays.items()}
    out, n, metrics, state3 = client_fit(model, arrays, train, cfg, state, client_id=1)
    assert metrics["budget_spent"] == 1 and n == 0 and metrics["steps"] == 0
    assert metrics["epsilon"] == pytest.approx(reported[-1])
    assert state3["rounds_done"] == 2
    assert all(np.array_equal(out[k], before[k]) for k in before)


def test_opacus_hooks_removed_and_non_private_run_reports_inf():
    cfg = _cfg()
    model = get_model(cfg)
    train, _ = client_dataset(cfg, 0, 4)
    client_fit(model, initial_arrays(cfg), train, cfg, None)
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())  # the cached model is clean again
    cfg_nodp = _cfg(dp={"epsilon": None})
    _, _, metrics, state = client_fit(get_model(cfg_nodp), initial_arrays(cfg_nodp), train, cfg_nodp, None)
    assert metrics["epsilon"] == math.inf and state["dp_history"] == []


def test_dp_clips_per_example_gradients():
    """With C tiny and sigma ~ 0 the update is bounded by lr * C per step (no DP: it is not)."""
    cfg = _cfg(dp={"epsilon": 1e6, "max_grad_norm": 1e-4}, lr=1.0, head_lr=1.0, rounds=1)
    model = get_model(cfg)
    train, _ = client_dataset(cfg, 2, 4)
    g = initial_arrays(cfg)
    out, _, m, _ = client_fit(model, g, train, cfg, None, client_id=2)
    moved = math.sqrt(sum(float(((out[k] - g[k]) ** 2).sum()) for k in g))
    # each step moves by at most lr * (C + sigma*C*noise)/batch-ish; with sigma tiny: <= steps * C * lr
    assert moved <= m["steps"] * 1e-4 * 1.0 * 1.5 + 1e-6
    cfg2 = _cfg(dp={"epsilon": None}, lr=1.0, head_lr=1.0, rounds=1)
    out2, _, m2, _ = client_fit(get_model(cfg2), g, train, cfg2, None, client_id=2)
    moved2 = math.sqrt(sum(float(((out2[k] - g[k]) ** 2).sum()) for k in g))
    assert moved2 > 100 * moved
