"""The ``fcl`` run kind: a continual stream run federated (:mod:`adaptsim.federated.fcl.loop`).

Registered through the ``adaptsim.run_kinds`` entry point. A YAML names it with ``kind: fcl``
and has the continual sections plus ``fcl`` (:class:`~adaptsim.federated.fcl.config.FCLSettings`).
The run folder holds what a continual run writes (``metrics.json`` with ``R`` and its derived
metrics, ``accuracy_matrix.csv``, the plots), plus ``fcl_rounds.json`` (clients, partition sizes,
bytes up and down by kind, per round), ``client_accuracy.csv`` (after each experience, the global
model's accuracy on each client's seen classes; in-process engine) and, with ``fcl.centralised``, the centralised reference.
``fcl.engine`` picks the in-process loop or Flower (:mod:`adaptsim.federated.fcl.flower`: the
simulation engine or real SuperLink/SuperNode processes, which also leave Flower's
``flower_rounds.json``, ``checkpoints/`` and ``flower/`` logs in the run folder). With ``fcl.dp``
(in-process engine, :mod:`adaptsim.federated.fcl.dp`) ``metrics.json`` holds ``dp`` (epsilon per
client, noise multipliers, what is not covered) and every round of ``fcl_rounds.json`` the
clients' epsilon so far.

Checkpoints (in-process engine, ``run.checkpoint``): ``checkpoints/fcl_exp<t>.pt`` after each
federated experience (:func:`adaptsim.federated.fcl.loop.loop_state`) and
``checkpoints/central_exp<t>.pt`` after each experience of the centralised reference, only the
last of each kept;
``adaptsim run --resume RUN_DIR`` continues from the last of each and ends with the metrics of an
uninterrupted run (under DP with secret noise: the same epsilons, fresh noise). The Flower engines
refuse ``--resume``.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Mapping

import numpy as np

__all__ = ["register", "run_fcl_kind", "fcl_summary"]


def fcl_summary(m: Mapping[str, Any]) -> dict[str, float]:
    """The continual scalars plus bytes and, with a centralised reference, the gap to it."""
    from adaptsim.cl.builtin_kinds import continual_summary

    out = continual_summary(m)
    for k in ("bytes_up", "bytes_down"):
        if isinstance(m.get(k), (int, float)):
            out[k] = float(m[k])
    last = (m.get("client_accuracy") or [None])[-1]
    vals = [float(v) for v in (last or []) if isinstance(v, (int, float)) and np.isfinite(v)]
    if vals:  # the global model on each client's seen classes, after the last experience
        out["client_acc_mean"] = float(np.mean(vals))
        out["client_acc_min"] = float(np.min(vals))
    if isinstance((m.get("dp") or {}).get("max_epsilon"), (int, float)):
        out["max_epsilon"] = float(m["dp"]["max_epsilon"])
    ref = m.get("centralised") or {}
    if isinstance(ref.get("A_last"), (int, float)) and "A_last" in out:
        out["centralised_A_last"] = float(ref["A_last"])
        out["gap_A_last"] = float(ref["A_last"]) - out["A_last"]
    return out


def _prepare(cfg) -> None:
    from adaptsim.cl.config import ConfigError
    from adaptsim.cl.runner import prepare
    from adaptsim.strategies.sharing import check_sharing

    try:
        check_sharing(cfg.strategy.name, cfg.strategy.config)  # refused settings too, before any process starts
    except ValueError as e:
        raise ConfigError(f"strategy.name: {e}") from None
    prepare(cfg)


def _make_strategy_factory(cfg, stream, device):
    from adaptsim.cl.backbones import create_backbone
    from adaptsim.cl.features import FeatureCache
    from adaptsim.cl.train import seed_everything
    from adaptsim.strategies import StreamInfo, get_strategy

    seed_everything(cfg.run.seed)
    backbone = create_backbone(cfg.backbone).to(device).eval()
    info = StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))
    _, cls = get_strategy(cfg.strategy.name)
    cache = FeatureCache(batch_size=cfg.train.eval_batch_size, progress=False)

    def make():
        seed_everything(cfg.run.seed)  # every client starts from the same initial state
        bb = backbone if cls.frozen_features else copy.deepcopy(backbone)  # adapters go into the backbone
        return cls(cfg.strategy.config, bb, info, device=device, progress=False, feature_cache=cache)

    return make


def _privacy(cfg, stream, device):
    """The run's :class:`~adaptsim.federated.fcl.dp.FCLPrivacy` (``fcl.dp`` enabled)."""
    from adaptsim.cl.config import ConfigError
    from adaptsim.federated.fcl.dp import FCLPrivacy
    from adaptsim.strategies import get_strategy

    f = cfg.fcl
    n = sum(len(e.train) for e in stream)  # an upper bound of every client's examples
    if not f.dp.delta * n < 1:
        raise ConfigError(f"fcl.dp.delta={f.dp.delta:g} must be < 1/n for the stream's n={n} training examples "
                          f"(a client may hold them all); lower fcl.dp.delta")
    cls = get_strategy(cfg.strategy.name)[1]
    declared = getattr(cls, "dp_releases", None) or {}
    per_exp = f.rounds * declared.get("train", 0) + (declared.get("statistics", 0)
                                                      if getattr(cls, "statistics_round", False) else 0)
    return FCLPrivacy(f.dp, num_clients=f.num_clients, experiences=len(stream), rounds=f.rounds, releases=per_exp,
                      feature_clip=f.dp_feature_clip, stats_fraction=f.dp_stats_fraction,
                      seed=cfg.run.seed * 1000 + f.partition_seed, device=device)


def _save_latest(rd, prefix: str, t: int, state) -> None:
    """Writes ``checkpoints/<prefix><t>.pt`` (atomically), then removes the earlier ones: a checkpoint
    holds every client's strategy (with LoRA, the frozen base layers too), so only the last is kept."""
    rd.save_checkpoint(f"{prefix}{t}.pt", state)
    for p in rd.checkpoint_dir.glob(f"{prefix}*.pt"):
        idx = p.name[len(prefix):-3]
        if idx.isdigit() and int(idx) < t:
            p.unlink()


def run_fcl_kind(cfg, rd, *, resume: bool = False, stop_after: int | None = None, prepared: Any = None):
    """Runs ``cfg`` into the run folder ``rd`` and writes its outputs; ``resume`` continues from the
    folder's checkpoints, ``stop_after`` stops (returns ``None``) after that many experiences."""
    import torch

    from adaptsim.cl.evaluate import evaluate_stream
    from adaptsim.cl.metrics import summarize
    from adaptsim.cl.runner import prepare
    from adaptsim.cl.train import fit, seed_everything
    from adaptsim.federated.fcl.flower import run_fcl_flower
    from adaptsim.federated.fcl.loop import run_fcl
    from adaptsim.federated.privacy import privacy_label

    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = cfg.train.resolved_device()
    stream = prepared if prepared is not None else prepare(cfg)
    make = _make_strategy_factory(cfg, stream, device)
    f = cfg.fcl
    if resume and f.engine != "inprocess":
        from adaptsim.cl.config import ConfigError

        raise ConfigError(f"fcl.engine={f.engine}: runs cannot be resumed (only fcl.engine=inprocess "
                          "checkpoints every experience); start it again")
    t0 = time.perf_counter()
    dp = _privacy(cfg, stream, device) if f.dp.enabled else None
    if f.engine == "inprocess":
        last = rd.latest_checkpoint("fcl_exp") if resume else None
        out = run_fcl(stream, make, lambda phase: fit(phase, device=device), num_clients=f.num_clients,
                      rounds=f.rounds, partition=f.partition, alpha=f.dirichlet_alpha, seed=f.partition_seed,
                      eval_batch_size=cfg.train.eval_batch_size, dp=dp, device=device,
                      checkpoint=(lambda t, st: _save_latest(rd, "fcl_exp", t, st)) if cfg.run.checkpoint
                      else None,
                      resume=rd.load_checkpoint(last[1], map_location=device) if last else None,
                      stop_after=stop_after)
        if out is None:
            return None
    else:
        out = run_fcl_flower(cfg, stream, rd.path)
    wall = time.perf_counter() - t0
    R = np.array(out["R"], dtype=float)
    n = stream.test_sizes()
    multi = stream.kind != "class_incremental"
    metrics: dict[str, Any] = {
        "config_hash": cfg.config_hash(), "scenario": stream.kind, "strategy": cfg.strategy.name,
        "setting": {"num_clients": f.num_clients, "rounds": f.rounds, "partition": f.partition,
                    "dirichlet_alpha": f.dirichlet_alpha, "engine": f.engine,
                    "privacy": privacy_label(f.dp)},
        "experiences": [e.name for e in stream], "R": R.tolist(), "test_sizes": n,
        **summarize(np.nan_to_num(R), n, None, multi_domain=multi),
        "bytes_up": int(sum(sum(r["bytes_up"].values()) for r in out["rounds"])),
        "bytes_down": int(sum(sum(r["bytes_down"].values()) for r in out["rounds"])),
        "wall_seconds_this_process": wall,
    }
    if dp is not None:  # per client, over all experiences and rounds (fcl_rounds.json: per round)
        metrics["dp"] = dp.summary()
    if out.get("client_accuracy"):  # in-process engine: per experience, per client
        metrics["client_accuracy"] = out["client_accuracy"]
    if f.centralised:  # re-seeded every experience, as continual runs: resumes from its own checkpoints
        central = make()
        Rc = []
        evals = [e.eval_view() for e in stream.experiences]
        if resume and (cp := rd.latest_checkpoint("central_exp")) is not None:
            ck = rd.load_checkpoint(cp[1], map_location=device)
            central.load_state_dict(ck["strategy"])
            central.on_resume(list(stream.experiences[: cp[0] + 1]))
            Rc = list(ck["R"])
        for t, exp in enumerate(stream.experiences):
            if t < len(Rc):
                continue
            seed_everything(cfg.run.seed * 1000 + t)
            central.train_experience(exp, lambda phase: fit(phase, device=device))
            row = evaluate_stream(central, evals[: t + 1], cfg.train.eval_batch_size)
            Rc.append(row + [float("nan")] * (len(stream) - len(row)))
            if cfg.run.checkpoint:
                _save_latest(rd, "central_exp", t, {"strategy": central.state_dict(), "R": Rc})
        Rc = np.array(Rc, dtype=float)
        metrics["centralised"] = {"R": Rc.tolist(), **summarize(np.nan_to_num(Rc), n, None, multi_domain=multi)}
    rd.write_json("fcl_rounds.json", out["rounds"])
    rd.write_metrics(metrics)
    rd.write_csv("accuracy_matrix.csv", R.tolist(), [f"exp{k}" for k in range(R.shape[1])])
    if out.get("client_accuracy"):
        rd.write_csv("client_accuracy.csv", out["client_accuracy"], [f"client{k}" for k in range(f.num_clients)])
    if cfg.run.plots:
        from adaptsim.cl.plots import plot_accuracy_matrix, plot_curve

        name = f"{cfg.strategy.name} federated ({f.num_clients} clients)"
        plot_accuracy_matrix(R, rd.file("accuracy_matrix.png"), f"{name}: R[t, k] (%)")
        plot_curve(metrics["A_t"], rd.file("accuracy_curve.png"), title=name)
    return metrics


def register() -> None:
    """Entry point of group ``adaptsim.run_kinds``."""
    from adaptsim.cl.runkinds import RunKind, register_run_kind
    from adaptsim.federated.fcl.config import FCLExperimentConfig

    register_run_kind(RunKind(
        name="fcl", description="federated continual learning: a CL strategy inside federated clients",
        config_from_raw=FCLExperimentConfig.from_raw, run=run_fcl_kind, prepare=_prepare,
        matches=lambda raw: "fcl" in raw and "strategy" in raw,  # continual matches too: YAMLs say kind: fcl
        label=lambda cfg: f"fcl-{cfg.strategy.name}",
        summary=fcl_summary, threads_key="train.num_threads", seed_keys=("fcl.partition_seed",),
        resumable=True))  # in-process engine; the Flower engines refuse --resume (run_fcl_kind)
