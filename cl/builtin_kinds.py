"""The run kinds that live in ``adaptsim.cl``: ``continual`` and ``unlearning``.

Each is one :func:`adaptsim.cl.runkinds.register_run_kind` call: a strict config loader, a run
function writing into a :class:`adaptsim.cl.rundir.RunDir`, how to recognise its YAMLs, and the
scalar results a study aggregates. The federated kinds register from ``adaptsim.federated``
through the ``adaptsim.run_kinds`` entry point.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from adaptsim.cl.config import apply_overrides
from adaptsim.cl.runkinds import RunKind, register_run_kind

__all__ = ["continual_summary", "unlearning_summary"]

# Scalar results of a continual run that studies aggregate (metrics.json key -> study column).
_CL_SCALARS = ("A_last", "avg_incremental_accuracy", "forgetting", "bwt", "fwt", "trainable_params",
               "stored_params")
_MTIL = ("transfer", "average", "last")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def continual_summary(m: Mapping[str, Any]) -> dict[str, float]:
    """A_last, Ā, forgetting, BWT, FWT, MTIL, parameters and seconds of a continual run."""
    out: dict[str, float] = {}
    for k in _CL_SCALARS:
        if (v := _num(m.get(k))) is not None:
            out[k] = v
    mtil = m.get("mtil")
    if isinstance(mtil, Mapping):
        for k in _MTIL:
            if (v := _num(mtil.get(k))) is not None:
                out[f"mtil_{k}"] = v
    for k in ("train_seconds", "eval_seconds"):
        if isinstance(m.get(k), list):
            out[k] = float(sum(x for x in m[k] if isinstance(x, (int, float))))
    return out


def unlearning_summary(m: Mapping[str, Any]) -> dict[str, float]:
    """Final forgotten/retained accuracies, forget quality, utility, mean detector false-positive
    rate and seconds of an unlearning run."""
    from adaptsim.cl.unlearning_metrics import summary_numbers

    final = m.get("final") or {}
    out = {k: float(final[k]) for k in ("forget_train_acc", "forget_test_acc", "retained_test_acc")
           if _num(final.get(k)) is not None and not math.isnan(final[k])}
    out.update(summary_numbers(final))
    for k in ("train_seconds", "eval_seconds"):
        if isinstance(m.get(k), list):
            out[k] = float(sum(m[k]))
    return out


def _cl_preprocess(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    from adaptsim.cl.experiment import switch_strategy

    return apply_overrides(switch_strategy(raw, overrides), overrides)


def _cl_from_raw(raw: Mapping[str, Any], source: str):
    from adaptsim.cl.experiment import experiment_from_raw

    return experiment_from_raw(raw, source)


def _cl_prepare(cfg):
    from adaptsim.cl.runner import prepare
    from adaptsim.strategies import check_scenario

    stream = prepare(cfg)
    check_scenario(cfg.strategy.name, stream.kind)
    return stream


def _cl_run(cfg, rd, **kw):
    from adaptsim.cl.runner import run_stream

    return run_stream(cfg, rd, **kw)


def _un_from_raw(raw: Mapping[str, Any], source: str):
    from adaptsim.cl.unlearning import unlearning_from_raw

    return unlearning_from_raw(raw, source)


def _un_prepare(cfg):
    from adaptsim.cl.unlearning import prepare_unlearning

    return prepare_unlearning(cfg)


def _un_run(cfg, rd, **kw):
    from adaptsim.cl.unlearning import run_requests

    return run_requests(cfg, rd, **kw)


register_run_kind(RunKind(
    name="continual",
    description="a continual-learning stream (class-, domain-incremental, multi-domain) with a strategy",
    config_from_raw=_cl_from_raw, run=_cl_run, prepare=_cl_prepare, preprocess=_cl_preprocess,
    matches=lambda raw: "strategy" in raw and not ({"federated", "unlearning"} & set(raw)),
    label=lambda cfg: cfg.strategy.name, summary=continual_summary,
))

register_run_kind(RunKind(
    name="unlearning",
    description="continual unlearning: a trained classifier, then forget requests (O3 and baselines)",
    config_from_raw=_un_from_raw, run=_un_run, prepare=_un_prepare,
    matches=lambda raw: "unlearning" in raw,
    label=lambda cfg: cfg.method.name, summary=unlearning_summary,
))
