"""Drive an adaptsim strategy with an Avalanche training template.

``AvalancheBridge`` is a ``SupervisedTemplate`` whose training step hands each Avalanche
experience to the adaptsim strategy's ``train_experience`` (with :func:`adaptsim.cl.train.fit`)
and whose model is the strategy's ``predict``. Avalanche's ``EvaluationPlugin`` metrics
(accuracy, forgetting, BWT, loggers) then work unchanged::

    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin
    bridge = AvalancheBridge(strategy=strategy, evaluator=EvaluationPlugin(accuracy_metrics(experience=True)))
    for exp in benchmark.train_stream:
        bridge.train(exp)
        bridge.eval(benchmark.test_stream)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptsim.cl import compat as _compat  # noqa: F401
from adaptsim.cl.data import ImageTensorDataset
from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import fit
from avalanche.training.templates import SupervisedTemplate

__all__ = ["AvalancheBridge", "from_avalanche_experience"]


class _PredictModule(nn.Module):
    """An ``nn.Module`` face for ``strategy.predict`` (finite scores for Avalanche's loss)."""

    def __init__(self, strategy: Any) -> None:
        super().__init__()
        self.strategy = strategy
        self._dummy = nn.Parameter(torch.zeros(1))  # Avalanche builds an optimiser over the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.nan_to_num(self.strategy.predict(x), neginf=-1e9, posinf=1e9)


def from_avalanche_experience(av_exp: Any, class_names: list[str]) -> Experience:
    """Materialise an Avalanche experience as an adaptsim :class:`Experience` (train side)."""
    xs, ys = [], []
    for batch in DataLoader(av_exp.dataset, batch_size=1024, shuffle=False):
        xs.append(batch[0])
        ys.append(batch[1])
    x, y = torch.cat(xs), torch.cat(ys)
    if x.dtype != torch.uint8:
        raise TypeError("the bridge expects uint8 image tensors (adaptsim datasets)")
    empty = ImageTensorDataset(x[:0], y[:0], class_names)
    return Experience(
        id=int(av_exp.current_experience), train=ImageTensorDataset(x, y, class_names), test=empty,
        classes=tuple(sorted(int(c) for c in av_exp.classes_in_this_experience)),
        task_id=int(av_exp.current_experience),
    )


class AvalancheBridge(SupervisedTemplate):
    """An Avalanche template that trains and evaluates an adaptsim strategy.

    Args:
        strategy: an :class:`adaptsim.strategies.Strategy`.
        evaluator: an Avalanche ``EvaluationPlugin``.
        eval_mb_size: evaluation batch size.
        plugins: further Avalanche plugins.
    """

    def __init__(self, *, strategy: Any, evaluator: Any, eval_mb_size: int = 256, plugins=None) -> None:
        model = _PredictModule(strategy)
        super().__init__(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), train_mb_size=eval_mb_size,
            train_epochs=1, eval_mb_size=eval_mb_size, device=strategy.device, plugins=plugins,
            evaluator=evaluator, eval_every=-1,
        )
        self.adaptsim_strategy = strategy

    def _train_exp(self, experience: Any, eval_streams=None, **kwargs) -> None:
        exp = from_avalanche_experience(experience, list(self.adaptsim_strategy.info.class_names))
        device = self.adaptsim_strategy.device
        self.adaptsim_strategy.train_experience(exp, lambda phase: fit(phase, device=device))
