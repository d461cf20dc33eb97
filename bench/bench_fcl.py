"""Federated continual learning benchmark: the cost of one federated round per experience, per
strategy, against the same strategy trained centralised on the same experience (the peer, taken
in the same run).

    HF_HUB_OFFLINE=1 python bench/bench_fcl.py [--study scenarios/studies/fcl_study.yaml]
        [--methods simplecil finetune mos pilora] [--alpha 0.5] [--threads 1]
        [--out bench/out/bench_fcl.json]

Each method runs with the strategy settings and budget overrides of the study file (its
``grid.strategy`` rows and ``overrides``), one seed, ``fcl.rounds`` 1: per experience, the wall
time of the federated round(s) (all clients one after the other on this machine, the server's
aggregation, loading the aggregate, MOS's statistics round), of which the time inside client
training (``fit``), the evaluation, and the centralised training of the same experience. The
ratio fed / centralised is what running the clients in sequence costs over one pooled run: the
same number of examples, in ``num_clients`` smaller pieces, plus the sharing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def _config(study: Path, strategy: dict, alpha: float, threads: int):
    from adaptsim.cl.config import apply_overrides, read_yaml
    from adaptsim.federated.fcl.config import FCLExperimentConfig

    spec = read_yaml(study)["study"]
    raw = read_yaml(study.parent / spec["base"])
    raw.pop("kind", None)
    over = {**spec.get("overrides", {}), **strategy, "fcl.dirichlet_alpha": alpha, "fcl.centralised": False,
            "fcl.rounds": 1, "train.num_threads": threads, "run.plots": False}
    return FCLExperimentConfig.from_raw(apply_overrides(raw, over), str(study))


def bench_method(cfg) -> dict:
    """Federated and centralised per-experience seconds of ``cfg``'s strategy."""
    import torch

    from adaptsim.cl.evaluate import evaluate_stream
    from adaptsim.cl.runner import prepare
    from adaptsim.cl.train import fit, seed_everything
    from adaptsim.federated.fcl.loop import run_fcl
    from adaptsim.federated.fcl.runkind import _make_strategy_factory

    torch.set_num_threads(cfg.train.num_threads)
    stream = prepare(cfg)
    make = _make_strategy_factory(cfg, stream, "cpu")
    fit_s = [0.0]

    def timed_fit(phase):
        t0 = time.perf_counter()
        out = fit(phase, device="cpu")
        fit_s[0] += time.perf_counter() - t0
        return out

    per_exp: list[dict] = []

    def on_exp(t, rec):
        per_exp.append({"seconds": rec["seconds"], "fit_seconds": fit_s[0]})
        fit_s[0] = 0.0

    f = cfg.fcl
    out = run_fcl(stream, make, timed_fit, num_clients=f.num_clients, rounds=1, partition=f.partition,
                  alpha=f.dirichlet_alpha, seed=f.partition_seed, eval_batch_size=cfg.train.eval_batch_size,
                  on_experience=on_exp)
    central, cen = make(), []
    evals = [e.eval_view() for e in stream.experiences]
    for t, exp in enumerate(stream.experiences):
        seed_everything(cfg.run.seed * 1000 + t)
        t0 = time.perf_counter()
        central.train_experience(exp, lambda phase: fit(phase, device="cpu"))
        t1 = time.perf_counter()
        evaluate_stream(central, evals[: t + 1], cfg.train.eval_batch_size)
        cen.append({"train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1})
    rounds = out["rounds"]
    T = len(stream)
    fed_s = sum(r["seconds"] for r in per_exp) / T
    cen_s = sum(c["train_seconds"] + c["eval_seconds"] for c in cen) / T
    return {"strategy": cfg.strategy.name, "experiences": T, "num_clients": f.num_clients,
            "fed_seconds_per_experience": fed_s,
            "fed_fit_seconds_per_experience": sum(r["fit_seconds"] for r in per_exp) / T,
            "server_seconds_per_experience": sum(r.get("server_seconds", 0.0) for r in rounds) / T,
            "central_seconds_per_experience": cen_s, "ratio_fed_over_central": fed_s / cen_s,
            "bytes_up_per_experience": sum(sum(r["bytes_up"].values()) for r in rounds) / T,
            "bytes_down_per_experience": sum(sum(r["bytes_down"].values()) for r in rounds) / T,
            "A_last_fed": out["R"][-1], "per_experience": per_exp, "central": cen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=Path("scenarios/studies/fcl_study.yaml"))
    p.add_argument("--methods", nargs="+", default=["simplecil", "finetune", "mos", "pilora"])
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/out/bench_fcl.json"))
    args = p.parse_args()
    from adaptsim.cl.config import read_yaml

    grid = {row["strategy.name"]: row for row in read_yaml(args.study)["study"]["grid"]["strategy"]}
    rows = []
    print(f"{'strategy':<10s} {'fed s/exp':>10s} {'in fit':>8s} {'server':>7s} {'central s/exp':>14s} {'fed/central':>12s} "
          f"{'MB up/exp':>10s} {'MB down/exp':>12s}")
    for name in args.methods:
        r = bench_method(_config(args.study, grid[name], args.alpha, args.threads))
        rows.append(r)
        print(f"{name:<10s} {r['fed_seconds_per_experience']:10.2f} {r['fed_fit_seconds_per_experience']:8.2f} "
              f"{r['server_seconds_per_experience']:7.2f} "
              f"{r['central_seconds_per_experience']:14.2f} {r['ratio_fed_over_central']:12.2f} "
              f"{r['bytes_up_per_experience'] / 1e6:10.2f} {r['bytes_down_per_experience'] / 1e6:12.2f}", flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": args.threads, "study": str(args.study), "alpha": args.alpha,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
