"""Study-engine benchmark: 8 cells of the tiny study, sequential in one process vs Ray 2 x 1.

    HF_HUB_OFFLINE=1 python bench/bench_study.py [--seeds 4] [--out bench/out/bench_study.json]
        [-- --backbone.img_size=56 ...]      # heavier cells: the same 8 cells with more tokens

``scenarios/studies/tiny_digits_study.yaml`` with ``--seeds`` seeds (2 methods x 4 seeds = 8 cells)
runs, each mode in a fresh process (``adaptsim study``, so every mode pays its own imports):

- ``sequential``: ``--workers 0``, every cell in one process with the study's default threads
  (all cores), and again with 1 thread (``--study.threads_per_worker=1``);
- ``ray``: 2 local Ray workers x 1 thread.

Targets (issue 11): Ray at least 1.6x faster than sequential; Ray's start-up (``ray.init``) under
15 s of the total. Overhead per cell = (worker-seconds of the Ray study after start-up - the
cells' seconds in the sequential run) / cells: what a cell costs in a Ray worker beyond its own
work (the worker's imports, scheduling, idle tail), spread over the cells.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "scenarios" / "studies" / "tiny_digits_study.yaml"

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from adaptsim.cl.study import run_study
r = run_study(sys.argv[1], json.loads(sys.argv[2]), workers=int(sys.argv[3]), out_dir=sys.argv[4])
print("BENCH_JSON " + json.dumps({"study_s": r.wall_s, "ray_startup_s": r.ray_startup_s, "failed": r.failed,
      "cells": [c["seconds"] for c in r.cells], "import_s": time.perf_counter() - t0 - r.wall_s}))
"""


def _load() -> list[float]:
    return list(os.getloadavg())


def run_mode(name: str, seeds: int, workers: int, extra: dict, tmp: Path) -> dict:
    overrides = {"study.seeds": list(range(seeds)), **extra}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(STUDY), json.dumps(overrides), str(workers),
                           str(tmp / name)], capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(line[len("BENCH_JSON "):])
    if out["failed"]:
        raise SystemExit(f"{name}: cells failed: {out['failed']}")
    return {"mode": name, "workers": workers, "overrides": overrides, "wall_s": wall, **out,
            "cells_sum_s": sum(out["cells"]), "load_after": _load()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=4, help="seeds per method (2 methods): 4 gives 8 cells")
    p.add_argument("--out", default="bench/out/bench_study.json")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every cell, e.g. --backbone.img_size=56 "
                   "(after --, so argparse leaves them alone)")
    args = p.parse_args()
    from adaptsim.cl.config import parse_overrides

    extra = parse_overrides(args.overrides)
    tmp = Path(tempfile.mkdtemp(prefix="bench_study"))
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    load_before = _load()
    try:
        seq = run_mode("sequential", args.seeds, 0, extra, tmp)
        seq1 = run_mode("sequential_1thread", args.seeds, 0, {**extra, "study.threads_per_worker": 1}, tmp)
        ray = run_mode("ray_2x1", args.seeds, 2, {**extra, "study.threads_per_worker": 1}, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(ray["cells"])
    best_seq = min(seq, seq1, key=lambda r: r["wall_s"])
    ratio = best_seq["wall_s"] / ray["wall_s"]
    overhead = (2 * (ray["study_s"] - (ray["ray_startup_s"] or 0.0)) - best_seq["cells_sum_s"]) / n
    summary = {
        "cells": n, "ratio_vs_best_sequential": ratio, "ratio_vs_default_sequential": seq["wall_s"] / ray["wall_s"],
        "target_ratio": 1.6, "ratio_met": ratio >= 1.6,
        "ray_startup_s": ray["ray_startup_s"], "target_startup_s": 15.0,
        "startup_met": (ray["ray_startup_s"] or 0.0) < 15.0, "overhead_per_cell_s": overhead,
        "ray_cell_mean_s": ray["cells_sum_s"] / n, "sequential_cell_mean_s": best_seq["cells_sum_s"] / n,
    }
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
               "load_before": load_before}
    report = {"overrides": extra, "machine": machine,
              "runs": [seq, seq1, ray], "summary": summary}
    print(f"{'mode':<20} {'wall s':>8} {'study s':>8} {'imports s':>9} {'ray.init s':>10} {'Σ cells s':>10}")
    for r in (seq, seq1, ray):
        init = f"{r['ray_startup_s']:.1f}" if r["ray_startup_s"] is not None else "-"
        print(f"{r['mode']:<20} {r['wall_s']:8.1f} {r['study_s']:8.1f} {r['import_s']:9.1f} {init:>10} "
              f"{r['cells_sum_s']:10.1f}")
    met = {True: "met", False: "NOT met"}
    print(f"ratio best sequential / ray = {ratio:.2f} (target >= 1.6: {met[summary['ratio_met']]}); "
          f"ray.init {ray['ray_startup_s']:.1f} s (target < 15 s: {met[summary['startup_met']]}); "
          f"overhead per cell {overhead:.2f} s; load average before {load_before[0]:.2f}, "
          f"after {ray['load_after'][0]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
