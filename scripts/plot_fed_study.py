"""Accuracy against target epsilon, one line per method, from a federated study's ``study.json``.

    python scripts/plot_fed_study.py runs/studies/fed_study/study.json docs/results/fed_study_epsilon.png

Each point is the mean final accuracy over the seeds of one (method, epsilon) group, with the
sample standard deviation as the error bar; epsilon = inf (no DP) is drawn at the right edge.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def series(study: dict) -> dict[str, list[tuple[float, float, float]]]:
    """{method: [(epsilon, mean accuracy %, std %), ...]} sorted by epsilon (inf last)."""
    out: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for g in study["groups"]:
        ov = g["overrides"]
        eps = ov.get("federated.dp.epsilon")
        m = g["metrics"]["final_accuracy"]
        out[str(ov.get("federated.method"))].append(
            (math.inf if eps is None else float(eps), 100 * m["mean"], 100 * (m["std"] or 0.0)))
    return {k: sorted(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_json", type=Path)
    ap.add_argument("out_png", type=Path)
    a = ap.parse_args(argv)
    if not a.study_json.is_file():
        print(f"error: {a.study_json} does not exist (run `adaptsim study` first)", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(json.loads(a.study_json.read_text()))
    finite = sorted({e for pts in data.values() for e, _, _ in pts if math.isfinite(e)})
    inf_x = (max(finite) * 2) if finite else 1.0
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for method, pts in data.items():
        xs = [inf_x if math.isinf(e) else e for e, _, _ in pts]
        ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xticks([*finite, inf_x], [*(f"{e:g}" for e in finite), "∞"])
    ax.set_xlabel("target ε (sample-level DP-SGD, δ = 1e-5)")
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    a.out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out_png, dpi=120)
    print(a.out_png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
