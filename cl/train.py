"""The training loop: the only code in adaptsim that calls ``optimizer.step()``.

A strategy describes what to train as one or more :class:`Phase` objects and hands each to
:func:`fit`. Multi-phase methods (SEMA's adapter then descriptor phases, MOS's classifier
alignment) simply call ``fit`` several times with their own optimisers.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

__all__ = ["Phase", "fit", "FitFn", "seed_everything", "TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Run-wide training settings (strategies keep their own epochs and learning rates).

    Attributes:
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when available).
        num_threads: torch CPU threads (0 = leave torch's default).
        eval_batch_size: batch size for evaluation and feature extraction.
        progress: show tqdm progress bars.
        eval_future: also evaluate test sets of experiences not trained yet (needed for FWT and
            MTIL transfer; doubles evaluation cost).
    """

    device: str = "auto"
    num_threads: int = 2
    eval_batch_size: int = 256
    progress: bool = True
    eval_future: bool = True

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"train.device must be cpu, cuda or auto, got {self.device!r}")
        if self.eval_batch_size < 1:
            raise ValueError("train.eval_batch_size must be >= 1")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class Phase:
    """One optimisation phase.

    Attributes:
        name: shown in the progress bar and returned stats.
        params: parameters to optimise, or a list of param-group dicts (``{"params": [...],
            "lr": ...}``) for per-group learning rates.
        loss_fn: ``(x, y) -> loss`` doing the forward pass; x is a batch from ``data``.
        data: a dataset of ``(x, y)`` pairs.
        epochs: passes over ``data``.
        lr: base learning rate.
        batch_size: mini-batch size (shuffled, seeded).
        optimizer: ``sgd`` (momentum), ``adam`` or ``adamw``.
        momentum: SGD momentum.
        weight_decay: weight decay.
        schedule: ``cosine`` (to ``min_lr``) or ``constant``.
        schedule_unit: how often the cosine schedule steps: ``step`` (every optimiser step, over
            all ``epochs * len(loader)`` steps) or ``epoch`` (once per epoch, as the official
            PILOT/MOS/SEMA code does with ``torch.optim.lr_scheduler.CosineAnnealingLR(opt,
            T_max=epochs, eta_min=min_lr)``: epoch ``e`` trains at ``min_lr + (lr - min_lr) *
            (1 + cos(pi * e / epochs)) / 2``).
        min_lr: final learning rate of the cosine schedule.
        after_backward: called after ``loss.backward()``, before the step (gradient masks).
        after_step: called after each optimiser step (e.g. MOS's adapter merge).
        seed: seeds the batch order.
        client_data: the phase trains on private data (default). ``False``: it trains only on
            values derived from already released ones (MOS's classifier alignment on samples of
            the released class statistics), so under DP (``fcl.dp``) it is post-processing and
            runs as the plain :func:`fit`.
    """

    name: str
    params: Sequence[nn.Parameter] | Sequence[dict]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    data: Dataset
    epochs: int
    lr: float
    batch_size: int = 32
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    schedule_unit: Literal["step", "epoch"] = "step"
    min_lr: float = 0.0
    after_backward: Callable[[], None] | None = None
    after_step: Callable[[], None] | None = None
    seed: int = 0
    client_data: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"phase {self.name!r}: schedule must be cosine or constant, got {self.schedule!r}")
        if self.schedule_unit not in ("step", "epoch"):
            raise ValueError(f"phase {self.name!r}: schedule_unit must be step or epoch, got {self.schedule_unit!r}")


FitFn = Callable[[Phase], dict]


def _optimizer(phase: Phase) -> torch.optim.Optimizer:
    params = list(phase.params)
    if params and not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError(f"phase {phase.name!r} has no trainable parameters")
    if phase.optimizer == "sgd":
        return torch.optim.SGD(params, lr=phase.lr, momentum=phase.momentum, weight_decay=phase.weight_decay)
    if phase.optimizer == "adam":
        return torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=phase.lr, weight_decay=phase.weight_decay)
    raise ValueError(f"unknown optimizer {phase.optimizer!r}")


def fit(phase: Phase, *, device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Run ``phase`` and return ``{"loss": last-epoch mean loss, "steps": n, "seconds": t}``."""
    if phase.epochs <= 0 or len(phase.data) == 0:
        return {"loss": float("nan"), "steps": 0, "seconds": 0.0}
    gen = torch.Generator().manual_seed(phase.seed)
    loader = DataLoader(phase.data, batch_size=phase.batch_size, shuffle=True, generator=gen, drop_last=False)
    opt = _optimizer(phase)
    total = phase.epochs * len(loader)
    base_lrs = [g["lr"] for g in opt.param_groups]
    step = 0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=phase.name, leave=False, dynamic_ncols=True)
    per_epoch = phase.schedule == "cosine" and phase.schedule_unit == "epoch"
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=phase.epochs, eta_min=phase.min_lr)
             if per_epoch else None)
    epoch_loss = float("nan")
    for _ in range(phase.epochs):
        losses = []
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if phase.schedule == "cosine" and not per_epoch:
                frac = 0.5 * (1 + math.cos(math.pi * step / total))
                for g, lr0 in zip(opt.param_groups, base_lrs):
                    g["lr"] = phase.min_lr + (lr0 - phase.min_lr) * frac
            loss = phase.loss_fn(x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"phase {phase.name!r}: loss became {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if phase.after_backward is not None:
                phase.after_backward()
            opt.step()
            if phase.after_step is not None:
                phase.after_step()
            losses.append(loss.item())
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        epoch_loss = float(np.mean(losses))
        if sched is not None:
            sched.step()
    if bar is not None:
        bar.close()
    return {"loss": epoch_loss, "steps": step, "seconds": time.perf_counter() - start}
