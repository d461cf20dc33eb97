"""Evaluation: accuracy of a strategy on test sets, with task identity hidden."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adaptsim.cl.scenarios import Experience

__all__ = ["accuracy", "predictions", "evaluate_stream"]


@torch.no_grad()
def predictions(strategy: Any, exp: Experience, batch_size: int = 256) -> torch.Tensor:
    """Top-1 predictions of ``strategy.predict`` on ``exp``'s test set (eval view: no task id), on CPU."""
    ds = exp.eval_view().test
    if len(ds) == 0:
        return torch.empty(0, dtype=torch.long)
    if getattr(strategy, "frozen_features", False) and strategy.feature_cache is not None:
        feats = strategy.feature_cache.get(strategy.backbone, ds.x, key=ds.fingerprint)
        return torch.cat([
            strategy.predict_from_features(feats[i : i + batch_size].to(strategy.device)).argmax(-1).cpu()
            for i in range(0, len(ds), batch_size)
        ])
    strategy.backbone.eval()
    return torch.cat([
        strategy.predict(ds.x[i : i + batch_size].to(strategy.device)).argmax(-1).cpu()
        for i in range(0, len(ds), batch_size)
    ])


def accuracy(strategy: Any, exp: Experience, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``strategy.predict`` on ``exp``'s test set (eval view: no task id)."""
    ds = exp.eval_view().test
    if len(ds) == 0:
        return float("nan")
    return float((predictions(strategy, exp, batch_size) == ds.y).float().mean())


def evaluate_stream(strategy: Any, experiences: Sequence[Experience], batch_size: int = 256,
                    progress: bool = False) -> list[float]:
    """Accuracy on each experience's test set, in stream order."""
    from tqdm.auto import tqdm

    return [accuracy(strategy, e, batch_size)
            for e in tqdm(experiences, desc="eval", leave=False, disable=not progress)]
