"""MoRA routing statistics: active ranks during evaluation, and per-task gate statistics.

Part of MoRA (:mod:`adaptsim.strategies.mora`). Both collectors are recorder hooks of
:class:`~adaptsim.strategies.mora_gate.MoRALinear`: ``recorder(layer, route, h)`` on every
forward, with the layer's :class:`~adaptsim.strategies.mora_gate.Route` and its raw
activations ``h = x A^T`` (M, R).

* :class:`ActiveRankStats` -- histogram of active experts per (token, layer) during ``predict``.
* :class:`GateStats` -- per expert group (the experts added by one task): how many of the
  route's top-k slots, and of its active slots, each group takes; the mean ``|a_i . x|`` of each
  group's experts; and the fraction of (token, layer) pairs with no active expert.
* :func:`key_norms` -- mean L2 norm of the keys ``a_i`` of each group, over all layers.

``python -m adaptsim.strategies.mora_stats RUN_OR_STUDY_DIR`` prints the gate statistics that
runs wrote into ``metrics.json`` (``strategy_metrics.gate_stats``) as a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["ActiveRankStats", "GateStats", "gate_statistics", "gate_table", "key_norms"]


class ActiveRankStats:
    """Collects active-expert counts per token and per image during evaluation."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.names: dict[int, str] = {}  # id(layer) -> qualified name
        self.reset()

    def reset(self) -> None:
        self.hist = torch.zeros(self.top_k + 1, dtype=torch.long)  # (token, layer) pairs by count
        self.per_layer: dict[str, list[float]] = {}  # name -> [sum, count]
        self.per_image: list[torch.Tensor] = []
        self._batch: list[torch.Tensor] = []

    def __call__(self, layer: Any, route: Any, h: torch.Tensor) -> None:
        """Recorder hook; ``route.n_active`` is (B, ...) for one forward."""
        n = route.n_active.detach().cpu()
        self.hist += torch.bincount(n.reshape(-1), minlength=self.top_k + 1)[: self.top_k + 1]
        acc = self.per_layer.setdefault(self.names.get(id(layer), "?"), [0.0, 0.0])
        acc[0] += float(n.sum())
        acc[1] += n.numel()
        self._batch.append(n.reshape(n.shape[0], -1).float().mean(1) if n.dim() else n.float().reshape(1))

    def end_batch(self) -> None:
        """Closes one predict call: the per-image mean over tokens and layers."""
        if self._batch and all(b.shape == self._batch[0].shape for b in self._batch):
            self.per_image.append(torch.stack(self._batch).mean(0))
        self._batch = []

    def summary(self) -> dict[str, Any]:
        total = int(self.hist.sum())
        if total == 0:
            return {}
        ks = torch.arange(self.top_k + 1, dtype=torch.float64)
        p = self.hist.double() / total
        mean = float((p * ks).sum())
        out: dict[str, Any] = {
            "mean_per_token": mean,
            "std_per_token": float(((p * (ks - mean) ** 2).sum()).sqrt()),
            "hist_per_token": {str(k): int(c) for k, c in enumerate(self.hist.tolist())},
            "mean_per_layer": {k: v[0] / max(v[1], 1) for k, v in self.per_layer.items()},
        }
        if self.per_image:
            img = torch.cat(self.per_image)
            q = torch.quantile(img, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=img.dtype))
            out["per_image_mean_quantiles"] = dict(zip(["min", "p10", "p50", "p90", "max"], q.tolist()))
        return out


def _group_ids(sizes: list[int], device: torch.device) -> torch.Tensor:
    """(R,) group index of every expert, for groups of the given sizes."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                   torch.tensor(sizes, device=device))


class GateStats:
    """Per-group routing counts over every MoRA layer, for one set of inputs.

    Groups are the tasks' expert groups (all layers grow together, so group ``g`` is task ``g``
    everywhere). ``old`` = groups before the newest one, ``new`` = the newest group.
    """

    def __init__(self) -> None:
        self.topk = torch.zeros(0, dtype=torch.float64)  # slots in the top-k list, per group
        self.active = torch.zeros(0, dtype=torch.float64)  # slots with weight > 0, per group
        self.act_abs = torch.zeros(0, dtype=torch.float64)  # sum of |a_i . x| per group
        self.act_n = torch.zeros(0, dtype=torch.float64)  # (token, expert) pairs per group
        self.pairs = 0  # (token, layer) pairs
        self.no_active = 0  # (token, layer) pairs with no active expert

    def _grow(self, G: int) -> None:
        for name in ("topk", "active", "act_abs", "act_n"):
            t = getattr(self, name)
            if t.numel() < G:
                setattr(self, name, torch.cat([t, torch.zeros(G - t.numel(), dtype=torch.float64)]))

    @torch.no_grad()
    def __call__(self, layer: Any, route: Any, h: torch.Tensor) -> None:
        sizes = layer.group_sizes()
        G = len(sizes)
        self._grow(G)
        gid = _group_ids(sizes, h.device)  # (R,)
        slot_g = gid[route.indices]  # (M, k)
        self.topk += torch.bincount(slot_g.reshape(-1), minlength=G).double().cpu()
        self.active += torch.bincount(slot_g[route.weights > 0], minlength=G).double().cpu()
        a = h.detach().abs().double().sum(0)  # (R,)
        self.act_abs += torch.zeros(G, dtype=torch.float64, device=a.device).index_add(0, gid, a).cpu()
        self.act_n += torch.tensor(sizes, dtype=torch.float64) * h.shape[0]
        self.pairs += int(route.n_active.numel())
        self.no_active += int((route.n_active == 0).sum())

    def summary(self) -> dict[str, Any]:
        """Shares of top-k / active slots per group and old vs new, |a.x| per group, no-active fraction."""
        G = self.topk.numel()
        if G == 0 or self.pairs == 0:
            return {}
        top, act = self.topk / self.topk.sum().clamp_min(1), self.active / self.active.sum().clamp_min(1)
        return {
            "topk_share_per_group": top.tolist(),
            "active_share_per_group": act.tolist(),
            "topk_share_new": float(top[-1]), "topk_share_old": float(top[:-1].sum()),
            "active_share_new": float(act[-1]), "active_share_old": float(act[:-1].sum()),
            "mean_abs_activation_per_group": (self.act_abs / self.act_n.clamp_min(1)).tolist(),
            "no_active_fraction": self.no_active / self.pairs,
            "mean_active": float(self.active.sum()) / self.pairs,
        }


@torch.no_grad()
def key_norms(layers: Any) -> list[float]:
    """Mean ``||a_i||_2`` of each group's keys over every layer (``layers``: MoRALinear values)."""
    sums: list[float] = []
    counts: list[int] = []
    for layer in layers:
        for g, A in enumerate(layer.experts.more_A.values()):
            if g == len(sums):
                sums.append(0.0)
                counts.append(0)
            sums[g] += float(A.detach().norm(dim=1).sum())
            counts[g] += int(A.shape[0])
    return [s / max(c, 1) for s, c in zip(sums, counts)]


@torch.no_grad()
def gate_statistics(layers: list[Any], backbone: Any, probes: list[torch.Tensor],
                    device: torch.device | str, batch_size: int = 128) -> dict[str, Any]:
    """Gate statistics of ``layers`` on each task's probe images (the last probe = the newest task).

    Returns:
        ``key_norm_per_group``, ``per_input_task`` (one :meth:`GateStats.summary` per probe, with
        ``input_task``), ``old_inputs`` (all probes but the last one pooled; ``{}`` after the first
        task) and ``current_inputs`` (the last probe).
    """
    per_task, pooled_old = [], GateStats()
    for j, x in enumerate(probes):
        own = GateStats()
        sinks = [own] + ([pooled_old] if j < len(probes) - 1 else [])

        def record(layer: Any, route: Any, h: torch.Tensor, sinks: list[GateStats] = sinks) -> None:
            for sink in sinks:
                sink(layer, route, h)

        for layer in layers:
            layer.recorder = record
        try:
            for i in range(0, len(x), batch_size):
                backbone(x[i : i + batch_size].to(device))
        finally:
            for layer in layers:
                layer.recorder = None
        per_task.append({"input_task": j, **own.summary()})
    return {"key_norm_per_group": key_norms(layers), "per_input_task": per_task,
            "old_inputs": pooled_old.summary(), "current_inputs": {k: v for k, v in per_task[-1].items()
                                                                   if k != "input_task"} if per_task else {}}


_LABEL_KEYS = ("adapter", "head", "gate", "top_k", "delta", "epochs")


def _label(run_dir: Path) -> dict[str, Any]:
    """The strategy settings that tell runs apart (from ``config.yaml``; {} without one)."""
    import yaml

    f = run_dir / "config.yaml"
    strat = (yaml.safe_load(f.read_text()) or {}).get("strategy", {}) if f.exists() else {}
    return {k: strat.get(k) for k in _LABEL_KEYS}


def _rows(metrics_files: list[Path]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    labels = {f: _label(f.parent) for f in metrics_files}
    varying = [k for k in _LABEL_KEYS if len({str(lab[k]) for lab in labels.values()}) > 1]
    rows: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for f in metrics_files:
        m = json.loads(f.read_text())
        name = " ".join(f"{k}={labels[f][k]}" for k in varying) or "all"
        for entry in (m.get("strategy_metrics") or {}).get("gate_stats", []):
            t = entry["after_experience"]
            for key, s in (("old", entry.get("old_inputs")), ("current", entry.get("current_inputs"))):
                if s:
                    rows.setdefault((name, t, key), []).append({**s, "key_norm_per_group": entry["key_norm_per_group"]})
    return rows


def gate_table(path: str | Path) -> str:
    """Markdown table (mean ± std over runs) of the gate statistics under ``path`` (a run or a study)."""
    path = Path(path)
    files = sorted(path.rglob("metrics.json")) if path.is_dir() else [path]
    cols = ("topk_share_old", "topk_share_new", "active_share_old", "active_share_new",
            "no_active_fraction", "mean_active")
    out = ["| runs | after task | inputs | n | " + " | ".join(cols) + " | key norm old | key norm new |",
           "|---" * (len(cols) + 6) + "|"]

    def ms(vals: list[float]) -> str:
        v = torch.tensor(vals, dtype=torch.float64)
        return f"{float(v.mean()):.3f}" + (f" ± {float(v.std()):.3f}" if len(vals) > 1 else "")

    for (name, t, key), rs in sorted(_rows(files).items()):
        kn_old = [sum(r["key_norm_per_group"][:-1]) / max(len(r["key_norm_per_group"]) - 1, 1) for r in rs]
        kn_new = [r["key_norm_per_group"][-1] for r in rs]
        out.append(f"| {name} | {t} | {key} | {len(rs)} | " + " | ".join(ms([r[c] for r in rs]) for c in cols)
                   + f" | {ms(kn_old) if t else '–'} | {ms(kn_new)} |")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover - a reporting helper
    if len(sys.argv) != 2:
        print("usage: python -m adaptsim.strategies.mora_stats RUN_OR_STUDY_DIR", file=sys.stderr)
        sys.exit(2)
    print(gate_table(sys.argv[1]))
