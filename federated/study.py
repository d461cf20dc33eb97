"""Sweep {lora, ffa_lora} x epsilon and tabulate final accuracy, epsilon spent and traffic.

Paper: FFA-LoRA, "Improving LoRA in Privacy-preserving Federated Learning", Sun et al., ICLR 2024,
https://arxiv.org/abs/2403.12313 (their Table 1 compares LoRA and FFA-LoRA at eps in {inf, 6, 3, 1}).

Launch: ``python -m adaptsim.federated.study scenarios/fed_study.yaml [--federated.rounds=3 ...]``.
The YAML is a federated scenario (``scenario``/``backbone``/``federated``/``run``) plus::

    study:
      name: fed_study                 # folder under run.out_dir
      methods: [lora, ffa_lora]
      epsilons: [null, 8, 3, 1]       # null = no DP
      lr: {lora: 0.05, ffa_lora: 0.5} # per-method adapter learning rate (FFA needs ~10x)

Each cell runs in-process as its own run folder ``<out_dir>/<name>/<method>-eps<eps>``; a cell
whose folder already holds ``metrics.json`` is read instead of re-run (a killed study continues).
The study folder gets ``study.json``, ``study.md`` (the table) and ``accuracy_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from adaptsim.cl.config import ConfigError, apply_overrides, from_dict, parse_overrides, read_yaml
from adaptsim.federated.config import METHODS

log = logging.getLogger(__name__)

__all__ = ["StudyConfig", "run_study", "format_table", "main"]


@dataclass(frozen=True)
class StudyConfig:
    """Attributes: name (study folder), methods, epsilons (None = no DP), lr (method -> adapter lr)."""

    name: str = "fed_study"
    methods: tuple[str, ...] = ("lora", "ffa_lora")
    epsilons: tuple[float | None, ...] = (None, 8.0, 3.0, 1.0)
    lr: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"study.methods: unknown method {m!r}; available: {METHODS}")
        for m in self.lr:
            if m not in self.methods:
                raise ValueError(f"study.lr: {m!r} is not in study.methods")
        if not self.methods or not self.epsilons:
            raise ValueError("study.methods and study.epsilons must not be empty")

    def __hash__(self) -> int:  # dict field: hash by name only (never used as a key)
        return hash(self.name)


def _eps_tag(eps: float | None) -> str:
    return "inf" if eps is None or not math.isfinite(eps) else f"{eps:g}"


def run_study(raw: Mapping[str, Any], source: str = "") -> list[dict[str, Any]]:
    """Runs every (method, epsilon) cell of the study and writes the study folder.

    Args:
        raw: the study YAML (``study`` section plus a federated scenario).
        source: the YAML path.

    Returns:
        One row per cell: method, epsilon, lr, final/best accuracy, max epsilon spent, bytes,
        seconds, run_dir.

    Raises:
        ConfigError: on an invalid ``study`` section or scenario.
    """
    from adaptsim.federated.config import load_fed_experiment
    from adaptsim.federated.runner import plot_accuracy_vs_epsilon, run_fed

    raw = dict(raw)
    study = from_dict(StudyConfig, raw.pop("study", None), "study")
    base = load_fed_experiment(raw, source)  # validate once before running anything
    out = Path(base.run.out_dir) / study.name
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in study.methods:
        for eps in study.epsilons:
            cell = copy.deepcopy(raw)
            fed = cell.setdefault("federated", {})
            fed["method"] = method
            fed["dp"] = {**fed.get("dp", {}), "epsilon": eps}
            if method in study.lr:
                fed["lr"] = study.lr[method]
            cell.setdefault("run", {}).update(out_dir=str(out), name=f"{method}-eps{_eps_tag(eps)}")
            cfg = load_fed_experiment(cell, source)
            run_dir = out / cfg.run.name
            t0 = time.perf_counter()
            if (run_dir / "metrics.json").exists():
                metrics = json.loads((run_dir / "metrics.json").read_text())
                log.info("study: %s already done, reading it", run_dir)
            else:
                metrics = run_fed(cfg).metrics
            s = metrics["summary"]
            rows.append({"method": method, "epsilon": eps, "lr": cfg.federated.lr,
                         "final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"],
                         "max_epsilon": s["max_epsilon"], "bytes_up": s["bytes_up"],
                         "bytes_down": s["bytes_down"], "seconds": s["seconds"],
                         "wall_seconds": time.perf_counter() - t0, "run_dir": str(run_dir)})
            (out / "study.json").write_text(json.dumps(rows, indent=1, default=str))
    (out / "study.md").write_text(format_table(rows))
    series = {m: ([r["epsilon"] or math.inf for r in rows if r["method"] == m],
                  [r["final_accuracy"] for r in rows if r["method"] == m]) for m in study.methods}
    plot_accuracy_vs_epsilon(series, out / "accuracy_vs_epsilon.png", title="final accuracy vs target epsilon")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one row per epsilon, one column group per method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    epsilons = list(dict.fromkeys(r["epsilon"] for r in rows))
    head = "| target ε | " + " | ".join(f"{m} acc (%) | {m} ε spent | {m} MB up" for m in methods) + " |"
    sep = "|---|" + "---|---|---|" * len(methods)
    lines = [head, sep]
    for eps in epsilons:
        cells = []
        for m in methods:
            r = next((r for r in rows if r["method"] == m and r["epsilon"] == eps), None)
            if r is None:
                cells += ["-", "-", "-"]
                continue
            spent = r["max_epsilon"]
            spent_s = "∞" if spent is None or (isinstance(spent, float) and not math.isfinite(spent)) else f"{spent:.2f}"
            cells += [f"{100 * r['final_accuracy']:.1f}", spent_s, f"{r['bytes_up'] / 1e6:.2f}"]
        lines.append(f"| {_eps_tag(eps).replace('inf', '∞')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m adaptsim.federated.study STUDY.yaml [--section.key=value ...]``."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("config")
    args, rest = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        raw = apply_overrides(read_yaml(args.config), parse_overrides(rest))
        rows = run_study(raw, source=args.config)
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
