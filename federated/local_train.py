"""The one local-training loop of every federated method: local epochs of SGD or DP-SGD.

Departure from ``adaptsim.cl.train.fit`` (otherwise the only optimiser loop): DP-SGD needs
Opacus' ``DPOptimizer`` and Poisson ``DPDataLoader``, which ``fit`` does not build, so federated
local training has this short loop (plain SGD, constant learning rate). A method supplies its
model, its parameter groups, its data and a ``backward(module, batch) -> loss`` function (the
default is cross-entropy of ``module(x)``; FedNano's split step back-propagates the token
gradients the server returns); the loop owns batching, the optimiser, DP and the checks.

DP (``plan`` given): Opacus' ``PrivacyEngine`` with the accountant restored from ``history``,
Poisson sampling from the sampler generator and Gaussian noise from the noise generator of
:func:`adaptsim.federated.privacy.dp_generators` (secret by default). An empty Poisson batch
still steps, as the analysed mechanism does: the DP optimiser adds its noise to a zero clipped
sum and its accountant counts the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from adaptsim.federated.privacy import dp_generators, make_accountant

__all__ = ["local_train", "step", "cross_entropy_backward", "LocalResult"]

Backward = Callable[[nn.Module, Sequence[torch.Tensor]], float]


def cross_entropy_backward(module: nn.Module, batch: Sequence[torch.Tensor]) -> float:
    """``loss = CE(module(x), y)``; back-propagates it and returns its value."""
    *xs, y = batch
    loss = F.cross_entropy(module(*xs), y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"client loss became {loss.item()}")
    loss.backward()
    return loss.item()


def step(module: nn.Module, opt: torch.optim.Optimizer, batch: Sequence[torch.Tensor],
         backward: Backward = cross_entropy_backward) -> float | None:
    """One optimiser step on ``batch`` (labels last); returns the loss (``None`` for an empty batch).

    An empty batch (only under DP's Poisson sampling) gets empty per-example gradients
    (``p.grad_sample``, Opacus' attribute) instead of a forward pass on zero examples, then steps:
    the DP optimiser releases pure noise and its accountant counts the step.

    Raises:
        FloatingPointError: if the loss is not finite.
    """
    opt.zero_grad(set_to_none=True)
    if len(batch[-1]) == 0:
        for p in opt.params if hasattr(opt, "params") else [p for g in opt.param_groups for p in g["params"]]:
            p.grad_sample = p.new_zeros((0, *p.shape))
        opt.step()
        return None
    loss = backward(module, batch)
    if not np.isfinite(loss):
        raise FloatingPointError(f"client loss became {loss}")
    opt.step()
    return loss


@dataclass
class LocalResult:
    """What :func:`local_train` returns: mean loss, steps, DP history and the noised parameters."""

    loss: float
    steps: int
    history: list = field(default_factory=list)
    noised: list[str] = field(default_factory=list)


def local_train(model: nn.Module, groups: list[dict], data: Dataset, fed: Any, seed: int, *,
                backward: Backward = cross_entropy_backward, plan: Any = None,
                history: list | None = None) -> LocalResult:
    """``fed.local_epochs`` epochs of SGD (``plan is None``) or DP-SGD over ``data``.

    Args:
        model: the client model (its trainable parameters are those in ``groups``).
        groups: optimiser parameter groups (``{"params": [...], "lr": ...}``).
        data: a dataset of tensor tuples, labels last.
        fed: the ``FederatedConfig`` (lr, momentum, batch_size, local_epochs, dp).
        seed: seeds the batch order (and, with ``dp.reproducible``, the DP noise).
        backward: ``backward(module, batch) -> loss value`` (must call ``backward``).
        plan: a :class:`~adaptsim.federated.privacy.DPPlan` for DP-SGD, else ``None``.
        history: the accountant history to continue from (DP only).

    Returns:
        :class:`LocalResult`; ``noised`` names the parameters Opacus clipped and noised.
    """
    dev = next(model.parameters()).device
    opt = torch.optim.SGD(groups, lr=fed.lr, momentum=fed.momentum)
    sampler_gen, noise_gen = (dp_generators(fed.dp, seed, dev) if plan is not None
                              else (torch.Generator().manual_seed(seed), None))
    # Opacus' DPDataLoader draws its Poisson batches from this loader's generator
    loader = DataLoader(data, batch_size=fed.batch_size, shuffle=True, generator=sampler_gen)
    module, engine, noised = model, None, []
    history = list(history or [])
    model.train()  # Opacus validates training mode; frozen backbones keep their own eval()
    if plan is not None:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant=fed.dp.accountant)
        engine.accountant = make_accountant(fed.dp.accountant, history)  # restored, not reset
        module, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=fed.dp.max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks",
            noise_generator=noise_gen)
        assert abs(loader.sample_rate - plan.sample_rate) < 1e-12, "Opacus sample rate differs from plan"
        name_of = {id(p): n for n, p in model.named_parameters()}
        noised = sorted(name_of[id(p)] for p in opt.params)  # what DPOptimizer clips and noises
    losses, steps = [], 0
    try:
        for _ in range(fed.local_epochs):
            for batch in loader:
                loss = step(module, opt, [t.to(dev) for t in batch], backward)
                if loss is not None:
                    losses.append(loss)
                steps += 1
    finally:
        if engine is not None:
            history = list(engine.accountant.history)
            module._close()  # remove Opacus hooks: the cached model is reused next round
        model.eval()
    return LocalResult(float(np.mean(losses)) if losses else float("nan"), steps, history, noised)
