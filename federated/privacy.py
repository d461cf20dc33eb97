"""Sample-level DP-SGD accounting for federated clients (Opacus), as pure-ish functions.

Paper: FFA-LoRA, Sun et al., ICLR 2024, https://arxiv.org/abs/2403.12313 (section 5: DP-SGD run
locally by each client, delta = 1e-5, an accountant over all local steps of all rounds).

Decisions:
- The noise multiplier is fixed once per client, in its first round, from
  ``get_noise_multiplier(target_epsilon, delta, sample_rate, steps=rounds * local_epochs *
  steps_per_epoch)``: it assumes the client takes part in every round. With client sampling
  (``clients_per_round < num_clients``) a client trains in fewer rounds, so the epsilon it
  actually spends (the one reported) is below the target.
- Poisson sampling (Opacus' ``DPDataLoader``, sample rate ``1 / ceil(n / batch_size)``), because
  the RDP/PRV analysis of the subsampled Gaussian mechanism assumes it; fixed shuffled batches
  would make the reported epsilon optimistic. Without DP, clients use fixed shuffled batches.
- One accountant per client across rounds: its history ``[(sigma, q, steps), ...]`` is stored
  flat (``[sigma1, q1, n1, sigma2, ...]``, floats only, so it fits a Flower ``ConfigRecord``) in
  the client state and restored into a fresh Opacus accountant before the next round.
- Budget: before training, the client checks whether one more round would take it past the
  target epsilon; if so it does not train and reports ``budget_spent = 1``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

from adaptsim.federated.config import DPConfig

log = logging.getLogger(__name__)

__all__ = ["DPPlan", "plan_dp", "make_accountant", "flatten_history", "unflatten_history",
           "epsilon_of", "would_exceed", "BUDGET_TOLERANCE"]

# get_noise_multiplier stops within epsilon_tolerance=0.01 *below* the target; this slack only
# absorbs float noise in the comparison.
BUDGET_TOLERANCE = 1e-9


@dataclass(frozen=True)
class DPPlan:
    """Per-client DP schedule.

    Attributes:
        sample_rate: Poisson sampling rate q = 1 / steps_per_epoch.
        steps_per_round: local steps one round takes (local_epochs * steps_per_epoch).
        total_steps: steps the noise multiplier is calibrated for (all rounds).
        noise_multiplier: sigma (noise std = sigma * max_grad_norm).
    """

    sample_rate: float
    steps_per_round: int
    total_steps: int
    noise_multiplier: float


def plan_dp(n_examples: int, batch_size: int, local_epochs: int, rounds: int, dp: DPConfig) -> DPPlan:
    """Computes the sample rate, step counts and noise multiplier for a client.

    Args:
        n_examples: the client's training examples.
        batch_size: expected batch size.
        local_epochs: local epochs per round.
        rounds: rounds the budget must last.
        dp: target epsilon/delta and accountant.

    Returns:
        The plan.

    Raises:
        ValueError: if DP is disabled or the client has no data.
    """
    if not dp.enabled:
        raise ValueError("plan_dp needs dp.epsilon set")
    if n_examples < 1:
        raise ValueError("plan_dp: client has no training examples")
    steps_per_epoch = math.ceil(n_examples / batch_size)
    q = 1.0 / steps_per_epoch
    per_round = local_epochs * steps_per_epoch
    total = rounds * per_round
    return DPPlan(q, per_round, total, _noise_multiplier(dp.epsilon, dp.delta, q, total, dp.accountant))


@functools.lru_cache(maxsize=256)
def _noise_multiplier(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """Opacus' ``get_noise_multiplier`` (a binary search: slow, so cached per process)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant=accountant))


def make_accountant(kind: str, history: list[tuple[float, float, int]] | None = None):
    """A fresh Opacus accountant of ``kind`` holding ``history``."""
    from opacus.accountants import create_accountant

    acc = create_accountant(kind)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in (history or [])]
    return acc


def flatten_history(history: list[tuple[float, float, int]]) -> list[float]:
    """``[(sigma, q, n), ...]`` -> ``[sigma, q, n, ...]`` (floats; ConfigRecord-friendly)."""
    return [float(v) for entry in history for v in entry]


def unflatten_history(flat: list[float] | None) -> list[tuple[float, float, int]]:
    """Inverse of :func:`flatten_history`.

    Raises:
        ValueError: if the length is not a multiple of 3.
    """
    flat = list(flat or [])
    if len(flat) % 3:
        raise ValueError(f"DP history must hold triples, got {len(flat)} values")
    return [(float(flat[i]), float(flat[i + 1]), int(round(flat[i + 2]))) for i in range(0, len(flat), 3)]


def epsilon_of(history: list[tuple[float, float, int]], dp: DPConfig) -> float:
    """Epsilon spent by ``history`` at ``dp.delta`` under ``dp.accountant`` (0 for no steps)."""
    if not history:
        return 0.0
    key = tuple((float(s), float(q), int(n)) for s, q, n in history)
    return _epsilon(key, dp.delta, dp.accountant)


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple, delta: float, accountant: str) -> float:
    """Opacus' epsilon of a history (cached: the RDP/PRV conversion is slow)."""
    return float(make_accountant(accountant, list(history)).get_epsilon(delta=delta))


def would_exceed(history: list[tuple[float, float, int]], plan: DPPlan, dp: DPConfig) -> bool:
    """Whether one more round (``plan.steps_per_round`` steps) would pass the target epsilon."""
    nxt = list(history) + [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
    return epsilon_of(nxt, dp) > dp.epsilon * (1 + BUDGET_TOLERANCE)
