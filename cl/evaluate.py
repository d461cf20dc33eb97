"""Evaluation: accuracy of a strategy on test sets, with task identity hidden."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adaptsim.cl.scenarios import Experience

__all__ = ["accuracy", "evaluate_stream"]


@torch.no_grad()
def accuracy(strategy: Any, exp: Experience, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``strategy.predict`` on ``exp``'s test set (eval view: no task id)."""
    view = exp.eval_view()
    ds = view.test
    if len(ds) == 0:
        return float("nan")
    if getattr(strategy, "frozen_features", False) and strategy.feature_cache is not None:
        feats = strategy.feature_cache.get(strategy.backbone, ds.x, key=ds.fingerprint)
        preds = torch.cat([
            strategy.predict_from_features(feats[i : i + batch_size].to(strategy.device)).argmax(-1).cpu()
            for i in range(0, len(ds), batch_size)
        ])
    else:
        strategy.backbone.eval()
        preds = torch.cat([
            strategy.predict(ds.x[i : i + batch_size].to(strategy.device)).argmax(-1).cpu()
            for i in range(0, len(ds), batch_size)
        ])
    return float((preds == ds.y).float().mean())


def evaluate_stream(strategy: Any, experiences: Sequence[Experience], batch_size: int = 256,
                    progress: bool = False) -> list[float]:
    """Accuracy on each experience's test set, in stream order."""
    from tqdm.auto import tqdm

    return [accuracy(strategy, e, batch_size)
            for e in tqdm(experiences, desc="eval", leave=False, disable=not progress)]
