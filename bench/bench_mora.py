"""Benchmark of MoRA layers: the kernel's gated top-k path against dense masked LoRA.

Both paths compute the same numbers (tests/test_mora.py checks it); they differ in how the
delta is evaluated after the self-activation scores ``h = x A^T`` (M, R) are known:

* ``gated``: :class:`~adaptsim.strategies.adapters.RankExpertLoRA` with ``topk_indices`` ->
  ``adaptsim.kernels.rank_sparse_lora`` with a ``TopKGate`` (Triton on CUDA: cost ~ k; the
  plain-torch reference on CPU, which materialises a dense (M, R) gate).
* ``dense``: dense masked LoRA, ``(h * W) B^T`` with a dense (M, R) weight matrix (cost ~ R).

Shapes: the four wrapped linears of one ViT block (qkv, proj, fc1, fc2) at width ``--dim``,
``--tokens`` tokens; R experts per layer (the last ``--new`` of them trainable, as in training
a new task), top-k = ``--top-k``. Timed: inference (no-grad forward) and training
(forward + backward) through all four layers.

GPU: ``python bench/bench_mora.py`` (bf16, ``triton.testing.do_bench``).
CPU: ``python bench/bench_mora.py --device cpu`` (fp32, min of 10 runs, shared machine).
Prints a table and writes JSON to ``bench/out/bench_mora_<device>.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from _timing import make_timer
from torch import nn

from adaptsim.strategies.mora_gate import MoRALinear, SelfActivationGate


def _timer(device: str):
    """Returns ``time_ms(fn)`` (see ``bench/_timing.py``)."""
    return make_timer(device, warmup=10, rep=50)


def build_block(dim: int, R: int, new: int, top_k: int, compute: str, device: str, dtype: torch.dtype):
    """Four MoRA layers (qkv, proj, fc1, fc2 shapes) with R experts, the last ``new`` trainable."""
    gate = SelfActivationGate(top_k=top_k, tau=0.1, delta=-1.0)  # delta=-1: exactly k active
    shapes = [(dim, 3 * dim), (dim, dim), (dim, 4 * dim), (4 * dim, dim)]
    torch.manual_seed(0)
    layers = []
    for d_in, d_out in shapes:
        layer = MoRALinear(nn.Linear(d_in, d_out), gate, scaling=float(top_k), compute=compute)
        layer.add_experts(R - new)
        layer.add_experts(new)
        with torch.no_grad():
            for b in layer.experts.more_B.values():
                b.normal_(std=0.02)
        layers.append(layer.to(device, dtype))
    return layers


def run_block(layers, xs):
    """Runs each layer on its own input; returns the sum of outputs (one scalar graph)."""
    return sum(layer(x).float().sum() for layer, x in zip(layers, xs))


def bench(args) -> list[dict]:
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    time_ms = _timer(device)
    rows = []
    for R in args.experts:
        res = {}
        for compute in ("gated", "dense"):
            layers = build_block(args.dim, R, args.new, args.top_k, compute, device, dtype)
            xs = [torch.randn(args.tokens, layer.experts.base_layer.in_features, device=device, dtype=dtype)
                  for layer in layers]
            params = [p for layer in layers for p in layer.parameters() if p.requires_grad]

            def infer():
                with torch.no_grad():
                    run_block(layers, xs)

            def train():
                torch.autograd.grad(run_block(layers, xs), params)

            res[compute] = {"infer_ms": time_ms(infer), "train_ms": time_ms(train)}
        row = {"R": R, "top_k": args.top_k, "tokens": args.tokens, "dim": args.dim, **{
            f"{c}_{k}": v for c, d in res.items() for k, v in d.items()}}
        row["speedup_infer"] = row["dense_infer_ms"] / row["gated_infer_ms"]
        row["speedup_train"] = row["dense_train_ms"] / row["gated_train_ms"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dim", type=int, default=None, help="width (default 768 GPU, 384 CPU)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens M (default 32*197 GPU, 32*17 CPU)")
    ap.add_argument("--experts", type=int, nargs="+", default=[64, 128], help="experts per layer R")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--new", type=int, default=8, help="trainable (current-task) experts")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: robust on a shared machine)")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    args.dim = args.dim or (768 if gpu else 384)
    args.tokens = args.tokens or (32 * 197 if gpu else 32 * 17)
    torch.set_num_threads(args.threads)
    rows = bench(args)
    head = f"{'R':>5} {'k':>3} {'M':>6} {'dim':>5} | {'infer gated':>11} {'dense':>8} {'x':>5} | {'train gated':>11} {'dense':>8} {'x':>5}"
    print(f"MoRA block (qkv, proj, fc1, fc2) on {args.device}; times in ms; x = dense / gated")
    print(head)
    for r in rows:
        print(f"{r['R']:>5} {r['top_k']:>3} {r['tokens']:>6} {r['dim']:>5} | {r['gated_infer_ms']:>11.2f} "
              f"{r['dense_infer_ms']:>8.2f} {r['speedup_infer']:>5.2f} | {r['gated_train_ms']:>11.2f} "
              f"{r['dense_train_ms']:>8.2f} {r['speedup_train']:>5.2f}")
    out = Path(__file__).parent / "out" / f"bench_mora_{args.device}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": args.threads}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
