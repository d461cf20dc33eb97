"""Federated benchmark: rounds per minute (in-process vs Flower's simulation engine) and the
cost of an Opacus DP-SGD step against a non-private step for LoRA-only training.

    HF_HUB_OFFLINE=1 python bench/bench_federated.py [--clients 100] [--per-round 10] [--rounds 3]
        [--skip-sim] [--dp-reps 3] [--out bench/out/bench_federated.json]

Targets (issue 5): simulation engine within 1.5x of the in-process loop (steady-state rounds
per minute); a DP step at most 2x a non-private step. The simulation-engine total also includes
starting the SuperLink, Ray and the actors (reported separately as ``startup_s``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RAW = {"scenario": {"dataset": {"name": "digits"}},
       "backbone": {"name": "tiny_vit", "img_size": 16, "tiny_patch": 4, "tiny_dim": 32, "tiny_depth": 2,
                    "tiny_heads": 2},
       "federated": {"num_clients": 100, "clients_per_round": 10, "rounds": 3, "lr": 0.1, "partition": "iid",
                     "min_partition_size": 1, "num_threads": 1, "batch_size": 8},
       "run": {"out_dir": "/tmp/runs", "plots": False}}


def _cfg(args, **fed):
    from adaptsim.federated.config import load_fed_experiment

    raw = {k: dict(v) for k, v in RAW.items()}
    raw["federated"] = {**raw["federated"], "num_clients": args.clients, "clients_per_round": args.per_round,
                        "rounds": args.rounds, **fed}
    return load_fed_experiment(raw, "bench")


def _rpm(rounds: list[dict]) -> dict:
    secs = [r["seconds"] for r in rounds]
    steady = secs[1:] or secs  # the first round builds caches (model, prefix tokens)
    return {"round_seconds": secs, "rounds_per_min_steady": 60.0 / float(np.mean(steady)),
            "rounds_per_min_all": 60.0 * len(secs) / sum(secs)}


def bench_inprocess(args) -> dict:
    from adaptsim.federated.local_sim import run_inprocess

    t = time.perf_counter()
    rounds = run_inprocess(_cfg(args))
    return {"wall_s": time.perf_counter() - t, **_rpm(rounds)}


def bench_simulation(args) -> dict:
    from adaptsim.federated.sim_engine import run_simulation_mode

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        rounds = run_simulation_mode(_cfg(args, mode="simulation"), Path(d))
        wall = time.perf_counter() - t
    res = {"wall_s": wall, **_rpm(rounds)}
    res["startup_s"] = wall - sum(res["round_seconds"])
    return res


def bench_dp_step(args) -> dict:
    """Seconds per local step, non-private vs DP-SGD (same client, same data, LoRA B + head)."""
    from adaptsim.federated.task import client_dataset, client_fit, get_model, initial_arrays

    out = {}
    for name, eps in (("sgd", None), ("dp_sgd", 8.0)):
        cfg = _cfg(args, num_clients=4, clients_per_round=4, batch_size=32, local_epochs=1,
                   dp={"epsilon": eps}, rounds=100)
        model, glob = get_model(cfg), initial_arrays(cfg)
        train_ds, _ = client_dataset(cfg, 0, 4)
        client_fit(model, glob, train_ds, cfg, None)  # warm-up: prefix tokens, Opacus import
        per_step = []
        for rep in range(args.dp_reps):
            _, _, met, _ = client_fit(model, glob, train_ds, cfg, None, round_idx=rep + 1)
            per_step.append(met["seconds"] / max(met["steps"], 1))
        out[name] = {"s_per_step": float(np.median(per_step)), "steps": int(met["steps"]),
                     "examples": len(train_ds)}
    out["dp_over_sgd"] = out["dp_sgd"]["s_per_step"] / out["sgd"]["s_per_step"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dp-reps", type=int, default=3)
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--out", default="bench/out/bench_federated.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    res = {"machine": f"{platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
           "python": sys.version.split()[0], "command": " ".join(["python", *sys.argv]),
           "args": vars(args)}
    res["inprocess"] = bench_inprocess(args)
    if not args.skip_sim:
        res["simulation"] = bench_simulation(args)
        res["sim_over_inprocess"] = (res["inprocess"]["rounds_per_min_steady"]
                                     / res["simulation"]["rounds_per_min_steady"])
    res["dp_step"] = bench_dp_step(args)
    res["load_after"] = os.getloadavg()[0]

    print(f"{'path':<22}{'rounds/min (steady)':>22}{'rounds/min (all)':>20}{'wall s':>10}")
    for key in ("inprocess", "simulation"):
        if key in res:
            r = res[key]
            print(f"{key:<22}{r['rounds_per_min_steady']:>22.2f}{r['rounds_per_min_all']:>20.2f}{r['wall_s']:>10.1f}")
    if "sim_over_inprocess" in res:
        print(f"simulation slowdown vs in-process (steady): {res['sim_over_inprocess']:.2f}x (target <= 1.5x)")
    d = res["dp_step"]
    print(f"step: sgd {1e3 * d['sgd']['s_per_step']:.1f} ms, dp-sgd {1e3 * d['dp_sgd']['s_per_step']:.1f} ms "
          f"-> {d['dp_over_sgd']:.2f}x (target <= 2x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
