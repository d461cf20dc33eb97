"""Sample-level DP for federated continual learning (``kind: fcl``, in-process engine).

Mechanisms (docs/federated.md, "DP in federated continual learning"):

* **DP-SGD of every client phase** (:func:`dp_fit`, generic over a strategy's :class:`Phase`,
  which has only ``loss_fn(x, y)``): per-example gradients of the phase's trainable parameters
  by microbatches of one example (the per-example loss includes the phase's data-independent
  regularisers: each per-example gradient is clipped, so that is still a valid DP-SGD step),
  written to ``p.grad_sample`` and stepped by Opacus' public ``DPOptimizer`` (clip to
  ``dp.max_grad_norm``, Gaussian noise from the noise generator of
  :func:`adaptsim.federated.privacy.dp_generators`), with Poisson sampling (Opacus'
  ``UniformWithReplacementSampler`` at ``q = 1 / ceil(n / batch_size)``, from the sampler
  generator). The phase's ``after_backward`` runs on the noised gradient (post-processing),
  ``after_step`` after the step; learning rates and schedules as :func:`adaptsim.cl.train.fit`.
  A phase with ``Phase.client_data = False`` (MOS's classifier alignment on samples drawn from
  released statistics) is post-processing and runs as the plain ``fit``.
* **Statistics release** (:func:`adaptsim.strategies.sharing.gaussian_release`): features clipped
  to ``fcl.dp_feature_clip`` before they enter class sums/outer products; Gaussian noise on every
  row of the current experience's classes, counted as Gaussian mechanisms at sample rate 1.
* **One accountant per client** (:class:`FCLPrivacy`) over all experiences and rounds
  (sequential composition). At the first DP phase of experience ``t`` a client solves its noise
  multiplier so that its history + ``(T - t)`` experiences of this experience's planned steps +
  the statistics releases it still has to make hit ``dp.epsilon`` exactly; a phase that would
  pass the target is skipped (the client leaves that round).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import default_collate

from adaptsim.cl.train import Phase, _optimizer, fit
from adaptsim.federated.privacy import BUDGET_TOLERANCE, dp_generators, epsilon_of, privacy_label

__all__ = ["per_example_grads", "dp_fit", "solve_noise_multiplier", "spent", "FCLPrivacy", "SIGMA_MAX"]

#: Largest noise multiplier the solver tries; a budget that needs more is treated as spent.
SIGMA_MAX = 1e4


def per_example_grads(loss_fn: Callable, params: list[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor
                      ) -> tuple[list[torch.Tensor], float]:
    """Per-example gradients ``[(B, *p.shape) per param]`` of ``loss_fn`` (microbatches of one)
    and the mean loss. Parameters an example does not reach get a zero gradient.

    Raises:
        FloatingPointError: a per-example loss is not finite.
    """
    per: list[list[torch.Tensor]] = [[] for _ in params]
    total = 0.0
    for i in range(len(y)):
        loss = loss_fn(x[i : i + 1], y[i : i + 1])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"per-example loss became {loss.item()}")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g, p in zip(per, grads, params):
            acc.append(torch.zeros_like(p) if g is None else g.detach())
        total += float(loss.detach())
    return [torch.stack(g) for g in per], total / max(len(y), 1)


def _batch(data, idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = getattr(data, "tensors", None)
    if tensors is not None and len(tensors) == 2:
        i = torch.as_tensor(idx, dtype=torch.long)
        x, y = tensors[0][i.to(tensors[0].device)], tensors[1][i.to(tensors[1].device)]
    else:
        x, y = default_collate([data[j] for j in idx])
    return x.to(device), y.to(device)


def dp_fit(phase: Phase, *, noise_multiplier: float, max_grad_norm: float, generators: tuple[Any, Any],
           device: torch.device | str = "cpu") -> dict:
    """DP-SGD over ``phase`` (see the module docstring); returns ``fit``'s dict plus ``sample_rate``.

    Args:
        phase: the strategy's phase (``client_data`` must be true: the caller routes the others).
        noise_multiplier: sigma (noise std ``sigma * max_grad_norm`` on the clipped sum).
        max_grad_norm: per-example clipping norm C.
        generators: ``(sampler generator, noise generator)`` of :func:`dp_generators`.
    """
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    n = len(phase.data)
    if phase.epochs <= 0 or n == 0:
        return {"loss": float("nan"), "steps": 0, "seconds": 0.0, "sample_rate": 0.0}
    steps_per_epoch = math.ceil(n / phase.batch_size)
    q = 1.0 / steps_per_epoch
    sampler_gen, noise_gen = generators
    inner = _optimizer(phase)
    # the mean over the expected Poisson batch, as Opacus' make_private sets it (int(n * q) <= batch_size)
    opt = DPOptimizer(inner, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                      expected_batch_size=max(1, int(n * q)), generator=noise_gen)
    params = list(opt.params)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=sampler_gen,
                                            steps=steps_per_epoch)
    total = phase.epochs * steps_per_epoch
    base_lrs = [g["lr"] for g in inner.param_groups]
    per_epoch = phase.schedule == "cosine" and phase.schedule_unit == "epoch"
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(inner, T_max=phase.epochs, eta_min=phase.min_lr)
             if per_epoch else None)
    step, start, epoch_loss = 0, time.perf_counter(), float("nan")
    for _ in range(phase.epochs):
        losses = []
        for idx in sampler:
            if phase.schedule == "cosine" and not per_epoch:
                frac = 0.5 * (1 + math.cos(math.pi * step / total))
                for g, lr0 in zip(inner.param_groups, base_lrs):
                    g["lr"] = phase.min_lr + (lr0 - phase.min_lr) * frac
            opt.zero_grad(set_to_none=True)
            if len(idx):
                x, y = _batch(phase.data, list(idx), device)
                grads, loss = per_example_grads(phase.loss_fn, params, x, y)
                losses.append(loss)
            else:  # an empty Poisson batch still steps: pure noise, counted by the accountant
                grads = [p.new_zeros((0, *p.shape)) for p in params]
            for p, g in zip(params, grads):
                p.grad_sample = g
            if opt.pre_step():  # clip, sum, noise, scale: p.grad is now the private gradient
                if phase.after_backward is not None:
                    phase.after_backward()
                inner.step()
            if phase.after_step is not None:
                phase.after_step()
            step += 1
        epoch_loss = float(np.mean(losses)) if losses else float("nan")
        if sched is not None:
            sched.step()
    opt.zero_grad(set_to_none=True)
    for p in params:
        p.grad_sample = None
    return {"loss": epoch_loss, "steps": step, "seconds": time.perf_counter() - start, "sample_rate": q}


def solve_noise_multiplier(history: list, future: list, dp, target: float) -> float | None:
    """The smallest sigma (to 1e-4 relative) with ``epsilon(history + future(sigma)) <= target``.

    Args:
        history: ``[(sigma, q, steps)]`` already spent.
        future: ``[(q, steps)]`` (sigma to solve) and ``(sigma, q, steps)`` triples (fixed), planned.
        dp: the :class:`~adaptsim.federated.config.DPConfig` (delta, accountant).
        target: the epsilon to hit.

    Returns:
        sigma, or ``None`` when even :data:`SIGMA_MAX` passes the target.
    """
    return _solve(tuple(map(tuple, history)), tuple(map(tuple, future)), float(dp.delta), dp.accountant,
                  float(target))


@functools.lru_cache(maxsize=4096)
def _rdp_unit(sigma: float, q: float) -> np.ndarray:
    """Opacus' RDP of one step at Opacus' default orders (cached: the subsampled case is slow)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def spent(history: list, dp) -> float:
    """Epsilon of ``history`` at ``dp.delta``. RDP: the sum Opacus' ``RDPAccountant.get_epsilon``
    computes (``steps * rdp(q, sigma)`` over the history, then ``get_privacy_spent``), from cached
    per-step vectors; other accountants: :func:`epsilon_of`."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    if dp.accountant != "rdp":
        return epsilon_of(history, dp)
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(n * _rdp_unit(s, q) for s, q, n in history)
    return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=dp.delta)[0])


@functools.lru_cache(maxsize=512)
def _solve(history: tuple, future: tuple, delta: float, accountant: str, target: float) -> float | None:
    from types import SimpleNamespace

    acc = SimpleNamespace(delta=delta, accountant=accountant)

    def eps(sigma: float) -> float:
        sigma = float(f"{sigma:.6g}")  # a short float: the cached per-step RDP is reused
        with warnings.catch_warnings():  # extreme trial sigmas sit at the ends of Opacus' orders
            warnings.simplefilter("ignore", UserWarning)
            return spent([*history, *[e if len(e) == 3 else (sigma, e[0], e[1]) for e in future]], acc)

    if eps(SIGMA_MAX) > target:
        return None
    hi = 1.0
    while eps(hi) > target:  # bracket: hi meets the target, hi / 2 does not (or hi is tiny)
        hi *= 2
    lo = hi / 2
    while eps(lo) <= target and lo > 1e-3:
        hi, lo = lo, lo / 2
    while hi / lo > 1 + 1e-3:  # bisection in log space to 0.1 %; hi always meets the target
        mid = math.sqrt(lo * hi)
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return float(f"{hi:.6g}")


@dataclass
class _Client:
    history: list = field(default_factory=list)
    sigma: dict = field(default_factory=dict)   # experience -> (sigma, q)
    released: int = 0                           # statistics mechanisms released so far
    skipped: bool = False                       # the current round's DP phase was skipped


class FCLPrivacy:
    """The DP of one fcl run: per-client accountants, DP fit functions and statistics releases.

    Args:
        dp: ``fcl.dp`` (:class:`~adaptsim.federated.config.DPConfig`, enabled).
        num_clients, experiences, rounds: the setting (T experiences of ``rounds`` training rounds).
        releases: statistics mechanisms a client releases per experience (the strategy's
            ``dp_releases`` summed over the experience's round kinds; 0: none).
        feature_clip: ``fcl.dp_feature_clip``.
        stats_fraction: ``fcl.dp_stats_fraction``: the share of epsilon the statistics releases
            alone would spend, when the strategy also trains on client data (else they get all).
        seed: base seed of the generators (used only with ``dp.reproducible``).
        device: device of the noise generator.
    """

    def __init__(self, dp, *, num_clients: int, experiences: int, rounds: int, releases: int,
                 feature_clip: float, stats_fraction: float, seed: int = 0, device: Any = "cpu") -> None:
        self.dp, self.T, self.rounds, self.M = dp, experiences, rounds, experiences * releases
        self.releases, self.clip, self.fraction = releases, feature_clip, stats_fraction
        self.seed, self.device = seed, device
        self.clients = [_Client() for _ in range(num_clients)]
        self.stats_sigma: float | None = None

    # -- the statistics' noise multiplier (one for the run, fixed at the first private event) --
    def _stats_sigma(self, trains: bool) -> float:
        if self.stats_sigma is None and self.M:
            share = self.fraction if trains else 1.0
            sigma = solve_noise_multiplier([], [(1.0, self.M)], self.dp, share * self.dp.epsilon)
            if sigma is None:
                raise ValueError("fcl.dp: the statistics releases alone cannot meet epsilon")
            self.stats_sigma = sigma
        return self.stats_sigma or 0.0

    def _reserved(self, c: _Client) -> list:
        left = self.M - c.released
        return [(self.stats_sigma, 1.0, left)] if left > 0 and self.stats_sigma else []

    def _gens(self, k: int, t: int, r: int, salt: int = 0):
        return dp_generators(self.dp, ((self.seed * 1009 + t) * 1009 + r) * 1009 + k * 2 + salt, self.device)

    # -- training ---------------------------------------------------------------------------------
    def fit_for(self, k: int, t: int, r: int, device: Any = "cpu") -> Callable[[Phase], dict]:
        """The ``FitFn`` of client ``k`` in round ``r`` of experience ``t``."""
        c = self.clients[k]
        c.skipped = False

        def dp_fn(phase: Phase) -> dict:
            if not getattr(phase, "client_data", True):
                return fit(phase, device=device)  # post-processing of released values: no DP needed
            n = len(phase.data)
            if phase.epochs <= 0 or n == 0:
                return {"loss": float("nan"), "steps": 0, "seconds": 0.0}
            self._stats_sigma(trains=True)
            spe = math.ceil(n / phase.batch_size)
            q, steps = 1.0 / spe, phase.epochs * spe
            if t not in c.sigma:
                future = [(q, (self.T - t) * self.rounds * steps), *self._reserved(c)]
                c.sigma[t] = (solve_noise_multiplier(c.history, future, self.dp, self.dp.epsilon), q)
            sigma, _ = c.sigma[t]
            nxt = [*c.history, (sigma, q, steps), *self._reserved(c)] if sigma is not None else None
            if nxt is None or spent(nxt, self.dp) > self.dp.epsilon * (1 + BUDGET_TOLERANCE):
                c.skipped = True  # the budget is spent: the client does not train (nor share) this round
                return {"loss": float("nan"), "steps": 0, "seconds": 0.0, "dp_skipped": 1}
            out = dp_fit(phase, noise_multiplier=sigma, max_grad_norm=self.dp.max_grad_norm,
                         generators=self._gens(k, t, r), device=device)
            c.history.append((float(sigma), float(out["sample_rate"]), int(out["steps"])))
            return {**out, "noise_multiplier": sigma}

        return dp_fn

    def skipped(self, k: int) -> bool:
        """Whether client ``k`` skipped its DP phase this round (budget spent)."""
        return self.clients[k].skipped

    # -- statistics -------------------------------------------------------------------------------
    def release(self, k: int, t: int, r: int, state, classes) -> Any:
        """Client ``k``'s ``state`` with its statistics noised (:func:`gaussian_release`) and counted.

        Raises:
            RuntimeError: the statistics differ from what the strategy declared (``dp_releases``),
                or the release would pass the budget (it is reserved, so this is a bug).
        """
        from adaptsim.strategies.sharing import SharedState, gaussian_release

        if not state.stats:
            return state
        parts = sum(2 + (s.outer is not None) for s in state.stats.values())
        if self.M == 0:
            raise RuntimeError(f"fcl.dp: the strategy shares statistics ({sorted(state.stats)}) "
                               "but declares no dp_releases, so they cannot be counted")
        c = self.clients[k]
        sigma = self._stats_sigma(trains=bool(c.history))
        if c.released + parts > self.M:
            raise RuntimeError(f"fcl.dp: client {k} releases more statistics than its strategy declared")
        nxt = [*c.history, (sigma, 1.0, parts)]
        if spent(nxt, self.dp) > self.dp.epsilon * (1 + BUDGET_TOLERANCE):
            raise RuntimeError(f"fcl.dp: client {k}'s statistics release would pass epsilon")
        gen = self._gens(k, t, r, salt=1)[1]
        stats = {name: gaussian_release(s, classes, clip=self.clip, noise_multiplier=sigma, generator=gen)
                 for name, s in sorted(state.stats.items())}
        c.history.append((float(sigma), 1.0, int(parts)))
        c.released += parts
        return SharedState(state.arrays, state.weight, stats, state.meta)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The accountants (histories, planned noise multipliers, releases so far) and the statistics'
        noise multiplier: what a resumed run needs to spend exactly what an uninterrupted one does.
        No seed or generator state is written (with secret noise a resumed run draws fresh noise)."""
        return {"stats_sigma": self.stats_sigma,
                "clients": [{"history": [tuple(h) for h in c.history], "sigma": dict(c.sigma),
                             "released": c.released} for c in self.clients]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["clients"]) != len(self.clients):
            raise ValueError(f"fcl.dp checkpoint has {len(state['clients'])} clients, the run {len(self.clients)}")
        self.stats_sigma = state["stats_sigma"]
        self.clients = [_Client([tuple(h) for h in c["history"]], {int(t): tuple(v) for t, v in c["sigma"].items()},
                                int(c["released"])) for c in state["clients"]]

    # -- reporting --------------------------------------------------------------------------------
    def epsilons(self) -> list[float]:
        """Epsilon spent so far, per client (at ``dp.delta``)."""
        return [spent(c.history, self.dp) for c in self.clients]

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` reports under ``dp``."""
        eps = self.epsilons()
        return {"privacy": privacy_label(self.dp), "target_epsilon": self.dp.epsilon, "delta": self.dp.delta,
                "accountant": self.dp.accountant, "max_grad_norm": self.dp.max_grad_norm,
                "feature_clip": self.clip, "stats_fraction": self.fraction,
                "stats_noise_multiplier": self.stats_sigma,
                "noise_multipliers": [{str(t): s for t, (s, _) in c.sigma.items()} for c in self.clients],
                "epsilon": eps, "max_epsilon": max(eps) if eps else 0.0,
                "not_covered": "the clients' example counts (FedAvg weights, partition sizes), treated as "
                               "public as in Federation v2"}
