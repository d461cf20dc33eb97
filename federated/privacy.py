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
- Secret randomness (``dp.reproducible: false``, the default): the Gaussian noise and the
  Poisson sampling use ``torch.Generator``s seeded per client and round from OS entropy
  (``secrets.randbits``), never sent or logged (:func:`dp_generators`). This is secret, so the
  server cannot subtract the noise, but it is *not* a CSPRNG (torch's CPU generator is
  MT19937) and has no floating-point-attack mitigation; Opacus' ``secure_mode`` needs
  ``torchcsprng``, which does not install on Python 3.11 / torch 2.13 (docs/methods/ffa_lora.md).
- The accountant history lives on the client's node (:class:`NodeDPStore`, one JSON file per
  run and partition, written atomically) and is restored from there after a restart; the
  client restores whichever of the node's copy and the Flower/in-process client state has
  spent more (:func:`longer_history`). The server keeps every reported epsilon as an audit
  trail (:func:`mirror_epsilon`: the max of what it had and what it is told).
- delta must be below ``1 / n_k`` for every client (:func:`check_delta`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptsim.cl.config import ConfigError
from adaptsim.federated.config import DPConfig

log = logging.getLogger(__name__)

__all__ = ["DPPlan", "plan_dp", "make_accountant", "flatten_history", "unflatten_history",
           "epsilon_of", "would_exceed", "BUDGET_TOLERANCE", "NOT_PRIVATE", "privacy_label",
           "dp_generators", "check_delta", "NodeDPStore", "longer_history", "mirror_epsilon"]

#: What every summary of a ``dp.reproducible: true`` run says about its epsilon.
NOT_PRIVATE = "not private (reproducible noise)"

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


def privacy_label(dp: DPConfig) -> str:
    """How to read the epsilon of a run with ``dp``: ``"no DP"``, :data:`NOT_PRIVATE` (seeded
    noise) or ``"sample-level DP-SGD (secret noise)"``."""
    if not dp.enabled:
        return "no DP"
    return NOT_PRIVATE if dp.reproducible else "sample-level DP-SGD (secret noise)"


def dp_generators(dp: DPConfig, seed: int, device: Any = "cpu") -> tuple[Any, Any]:
    """``(sampler generator, noise generator)`` of one client round.

    Args:
        dp: ``dp.reproducible`` picks seeded (``seed``, ``seed + 1``) or secret generators.
        seed: the round's seed (used only when reproducible).
        device: device of the noise generator (the sampler's is always CPU).

    Returns:
        Two ``torch.Generator``s. Secret ones are seeded from ``secrets.randbits(63)``; the seed
        is not stored, logged or returned.
    """
    import torch

    if dp.reproducible:
        return torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed + 1)
    return (torch.Generator().manual_seed(secrets.randbits(63)),
            torch.Generator(device=device).manual_seed(secrets.randbits(63)))


def check_delta(delta: float, n_examples: int, client_id: int | str) -> None:
    """Raises unless ``delta < 1 / n_examples`` (a larger delta allows releasing one record).

    Raises:
        ConfigError: naming the client and its size.
    """
    if n_examples >= 1 and not delta * n_examples < 1:
        raise ConfigError(f"federated.dp.delta={delta:g} must be < 1/n_k for every client: client {client_id} "
                          f"has n_k={n_examples} examples (1/n_k={1 / n_examples:.3g}); lower dp.delta")


def longer_history(a: list[tuple[float, float, int]],
                   b: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The history that took more private steps (the node's copy and the client state should
    agree; after a lost state or a stale file the larger one is the conservative choice)."""
    return list(a) if sum(n for *_, n in a) >= sum(n for *_, n in b) else list(b)


def mirror_epsilon(previous: float | None, reported: float) -> float:
    """The server's audit value of a client's epsilon: never below what it saw before."""
    return float(reported) if previous is None or math.isnan(previous) else max(float(previous), float(reported))


class NodeDPStore:
    """A client's DP accountant state on its own node: one JSON file per run name and partition.

    ``<state_dir>/dp_<run>_p<partition>.json`` holding ``{"run", "partition", "noise_multiplier",
    "dp_history"}``. In process the state dir is ``RUN_DIR/nodes/<partition>``; on a SuperNode the
    node config's ``state-dir`` (default ``$FLWR_HOME/adaptsim_dp_state``).

    Args:
        state_dir: the node's state directory (created on first save).
        run_name: the study/run this accountant belongs to (the run folder name).
        partition: the client's partition id.
    """

    def __init__(self, state_dir: str | Path, run_name: str, partition: int) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name or "run")
        self.run_name, self.partition = run_name, int(partition)
        self.path = Path(state_dir) / f"dp_{safe}_p{int(partition)}.json"

    def load(self) -> dict[str, Any]:
        """``{"noise_multiplier", "dp_history"}`` as saved, or ``{}`` when there is no file yet.

        Raises:
            ValueError: if the file belongs to another run or partition.
        """
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        if data.get("run") != self.run_name or int(data.get("partition", -1)) != self.partition:
            raise ValueError(f"{self.path} holds run {data.get('run')!r} partition {data.get('partition')}, "
                             f"not run {self.run_name!r} partition {self.partition}")
        return {k: data[k] for k in ("noise_multiplier", "dp_history") if k in data}

    def save(self, noise_multiplier: float, history: list[tuple[float, float, int]]) -> None:
        """Writes the state atomically (temp file + ``os.replace``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"run": self.run_name, "partition": self.partition,
                                   "noise_multiplier": float(noise_multiplier),
                                   "dp_history": flatten_history(history)}))
        os.replace(tmp, self.path)
