"""FedNano study: {FedAvg, Fisher merging, FFA-LoRA} x {IID, Dirichlet 0.5, Dirichlet 0.1}.

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang et al., arXiv 2506.14824 (https://arxiv.org/abs/2506.14824).

``python -m adaptsim.federated.fednano.study scenarios/fednano.yaml [--federated.rounds=3 ...]``
runs every cell in one process (the encoder tokens and the pretrained server model are shared),
each as a normal run folder under ``run.out_dir/<study name>/``, and writes ``study.json`` and
``study.md`` (the table: accuracy, bytes of adapters/Fisher, of activations/gradients, one-time
downloads, wall time). A cell whose folder already holds ``metrics.json`` is read, not re-run.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

from adaptsim.cl.config import read_yaml

__all__ = ["VARIANTS", "PARTITIONS", "run_study", "format_table"]

log = logging.getLogger(__name__)

VARIANTS = {"fednano_fedavg": {"baseline": "none", "aggregation": "fedavg"},
            "fednano_fisher": {"baseline": "none", "aggregation": "fisher"},
            "ffa_lora": {"baseline": "ffa_lora", "aggregation": "fedavg"}}
PARTITIONS = {"iid": {"partition": "iid"}, "dir0.5": {"partition": "dirichlet", "dirichlet_alpha": 0.5},
              "dir0.1": {"partition": "dirichlet", "dirichlet_alpha": 0.1}}


def _mb(x: float) -> str:
    return f"{x / 1e6:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the study rows (bytes are totals over all rounds and clients, in MB)."""
    head = ("| variant | partition | final acc | best acc | acc which/even/>5 | adapters+Fisher up MB | "
            "adapters down MB | activations up MB | gradients down MB | one-time download MB | wall s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['partition']} | {100 * r['final_accuracy']:.1f} | "
                     f"{100 * r['best_accuracy']:.1f} | {r['per_question']} | {_mb(r['bytes_up'])} | "
                     f"{_mb(r['bytes_down'])} | {_mb(r['bytes_activations_up'])} | "
                     f"{_mb(r['bytes_gradients_down'])} | {_mb(r['bytes_model_download'])} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _row(variant: str, part: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    rounds = metrics["rounds"]
    tot = {k: sum(int(r.get(k, 0) or 0) for r in rounds) for k in
           ("bytes_up", "bytes_down", "bytes_activations_up", "bytes_gradients_down", "bytes_model_download")}
    last = rounds[-1]
    perq = "/".join(f"{100 * last.get(f'accuracy_q{k}', float('nan')):.0f}" for k in range(3))
    return {"variant": variant, "partition": part, "final_accuracy": last["accuracy"],
            "best_accuracy": max(r["accuracy"] for r in rounds), "per_question": perq,
            "seconds": sum(r["seconds"] for r in rounds), "accuracy_by_round": [r["accuracy"] for r in rounds], **tot}


def run_study(raw: Mapping[str, Any], source: str = "", name: str = "fednano_study") -> list[dict[str, Any]]:
    """Runs (or reads) every variant x partition cell; writes ``study.json`` and ``study.md``.

    Args:
        raw: the base scenario (``federated.method: fednano``), overrides applied.
        source: where it came from.
        name: study folder under ``run.out_dir``.

    Returns:
        One row per cell.
    """
    from adaptsim.federated.config import load_fed_experiment
    from adaptsim.federated.runner import run_fed

    base = load_fed_experiment(raw, source)
    out = Path(base.run.out_dir) / name
    rows = []
    for part, pover in PARTITIONS.items():
        for variant, vover in VARIANTS.items():
            cell = copy.deepcopy(dict(raw))
            fed = dict(cell["federated"])
            fed.update(pover)
            fed["fednano"] = {**dict(fed.get("fednano") or {}), **vover}
            cell["federated"] = fed
            cell["run"] = {**dict(cell.get("run") or {}), "out_dir": str(out), "name": f"{variant}-{part}"}
            run_dir = out / f"{variant}-{part}"
            if (run_dir / "metrics.json").exists():
                metrics = json.loads((run_dir / "metrics.json").read_text())
            else:
                metrics = run_fed(load_fed_experiment(cell, source)).metrics
            rows.append(_row(variant, part, metrics))
            log.info("study cell %s/%s: final accuracy %.4f", variant, part, rows[-1]["final_accuracy"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(rows, indent=1))
    (out / "study.md").write_text(format_table(rows) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m adaptsim.federated.fednano.study CONFIG.yaml [--key=value ...]``."""
    from adaptsim.cl.config import apply_overrides, parse_overrides

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raw = apply_overrides(read_yaml(argv[0]), parse_overrides(argv[1:]))
    print(format_table(run_study(raw, source=argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
