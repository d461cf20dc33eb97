"""Benchmark: MOS inference throughput, batched / lazy retrieval vs the per-adapter loop.

MOS (Sun et al., AAAI 2025, https://arxiv.org/abs/2412.09441) needs test features under stored
adapter sets. The official code runs one ViT forward per set (``loop``). ``batched`` runs the
T-times replicated batch once through the multi-adapter path (``AdapterBank.forward(x,
adapter_ids=...)``); ``lazy`` computes only the (sample, set) pairs the retrieval visits, one
mixed-id pass per round. All three must give identical predictions (checked here).

The MOS state is synthetic (no training, so T = 10 is affordable on a CPU): T stored adapter
sets with random non-zero weights, two classes per task, prototypes = mean adapter-0 features
of per-class template images. Two heads:

* ``aligned``: the head's rows are the class means under each class's own adapter set, so the
  retrieval settles within 1-2 rounds (as with a trained MOS);
* ``random``: a random head, the worst case for ``lazy`` (most samples run all 4 rounds).

Usage::

    python bench/bench_mos_retrieval.py --tasks 5 10 --batch 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import adaptsim.cl  # noqa: E402,F401  (torchvision compat first)
import torch  # noqa: E402

from adaptsim.cl.backbones import BackboneConfig, create_backbone  # noqa: E402
from adaptsim.strategies import MOS, MOSConfig, StreamInfo  # noqa: E402
from adaptsim.strategies.mos_retrieval import multi_adapter_features  # noqa: E402

MODES = ("loop", "batched", "lazy")


def build_state(args: argparse.Namespace, n_tasks: int, head: str) -> tuple[MOS, torch.Tensor]:
    """A MOS with ``n_tasks`` stored sets and a test batch (B, 1, 28, 28) uint8."""
    torch.manual_seed(0)
    bb = create_backbone(BackboneConfig(name=args.backbone, img_size=args.img_size)).eval()
    n_cls = 2 * n_tasks
    info = StreamInfo("class_incremental", n_cls, tuple(map(str, range(n_cls))), n_tasks)
    s = MOS(MOSConfig(retrieval="batched", merge_mode="paper"), bb, info)  # lazy retrieval needs paper mode
    for t in range(n_tasks):
        for layer in s.layers:
            layer.add(f"t{t}", trainable=False)
            A, B, b = layer.params(f"t{t}")
            B.data.normal_(0, args.adapter_std)
            b.data.normal_(0, args.adapter_std)
    s.seen_classes = list(range(n_cls))
    s.experiences_seen = n_tasks
    s.cls2task = torch.arange(n_cls) // 2
    g = torch.Generator().manual_seed(1)
    templates = torch.randint(0, 256, (n_cls, 1, 28, 28), generator=g)

    def images(labels: torch.Tensor) -> torch.Tensor:
        noise = torch.randint(-40, 41, (len(labels), 1, 28, 28), generator=g)
        return (templates[labels] + noise).clamp(0, 255).to(torch.uint8)

    y = torch.arange(n_cls).repeat_interleave(8)
    with torch.no_grad():
        feats = multi_adapter_features(bb, s.layers, images(y), range(n_tasks))  # (T, N, D)
        s.prototypes.set_prototypes(feats[0], y)
        if head == "aligned":
            own = feats[s.cls2task[y], torch.arange(len(y))]  # each image under its own task's set
            means = torch.stack([own[y == c].mean(0) for c in range(n_cls)])
            s.head.weight.copy_(10 * torch.nn.functional.normalize(means - means.mean(0), dim=-1))
            s.head.bias.zero_()
    test_y = torch.randint(0, n_cls, (args.batch,), generator=g)
    return s, images(test_y)


def time_mode(s: MOS, x: torch.Tensor, mode: str, repeats: int) -> tuple[float, torch.Tensor]:
    s.predict(x[:2], retrieval=mode)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pred = s.predict(x, retrieval=mode).argmax(-1)
        best = min(best, time.perf_counter() - t0)
    return best, pred


def count_passes(s: MOS, x: torch.Tensor) -> float:
    """Backbone block passes per image that ``lazy`` runs (counted with a block hook)."""
    seen = []
    h = s.backbone.blocks[0].register_forward_hook(lambda m, a, o: seen.append(o.shape[0]))
    try:
        s.predict(x, retrieval="lazy")
    finally:
        h.remove()
    return sum(seen) / x.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[5, 10])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backbone", default="imgfocus_vit_s14")
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--adapter-std", type=float, default=0.05)
    p.add_argument("--heads", nargs="+", default=["aligned", "random"])
    p.add_argument("--out", default="bench/out/mos_retrieval.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n_tasks in args.tasks:
        for head in args.heads:
            s, x = build_state(args, n_tasks, head)
            res = {m: time_mode(s, x, m, args.repeats) for m in MODES}
            preds = {m: r[1] for m, r in res.items()}
            same = all(torch.equal(preds[m], preds["loop"]) for m in MODES)
            loop_s = res["loop"][0]
            rows.append({
                "tasks": n_tasks, "head": head, "batch": args.batch, "identical_predictions": same,
                "lazy_passes_per_image": round(count_passes(s, x), 2),
                **{f"{m}_seconds": round(res[m][0], 4) for m in MODES},
                **{f"{m}_img_per_s": round(args.batch / res[m][0], 1) for m in MODES},
                **{f"{m}_speedup": round(loop_s / res[m][0], 2) for m in MODES},
            })
            r = rows[-1]
            print(f"T={n_tasks:<3d} head={head:<8s} loop {r['loop_img_per_s']:7.1f} img/s | batched "
                  f"{r['batched_img_per_s']:7.1f} ({r['batched_speedup']:.2f}x) | lazy {r['lazy_img_per_s']:7.1f} "
                  f"({r['lazy_speedup']:.2f}x, {r['lazy_passes_per_image']} passes/img) | identical={same}",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backbone": args.backbone, "img_size": args.img_size, "threads": args.threads,
            "torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
