"""Benchmark of the rank-sparse LoRA kernel against the base GEMM, PEFT LoRA, the masked
reference and a loop over adapters.

The four issue-#12 targets are measured by ``bench/gpu_targets.py`` (run by
``bench/gpu_check.sh``); this script prints the wider grid.

GPU (default): ``python bench/bench_rank_sparse_lora.py`` -- M=8192, K=N in {768, 4096},
R in {16, 64}, active fraction in {1/8, 1/2, 1}, bf16, fwd and fwd+bwd, timed with
``triton.testing.do_bench``; multi-adapter: 10 adapters, random adapter id per sample.
CPU smoke run: ``python bench/bench_rank_sparse_lora.py --device cpu --quick`` -- tiny shapes,
reference/loop paths only, one thread, minimum of 10 ``time.perf_counter`` runs.
Prints a table and writes JSON to ``bench/out/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from _timing import make_timer
import torch.nn.functional as F

from adaptsim.kernels import AdapterGate, TopKGate, rank_sparse_lora, rank_sparse_lora_ref


def _timer(device: str):
    """Returns ``time_ms(fn)`` (see ``bench/_timing.py``)."""
    return make_timer(device, warmup=25, rep=100)


def _peft_layer(base: torch.nn.Linear, r: int):
    """PEFT's dense LoRA Linear, or None if peft is not installed."""
    try:
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return None
    layer = PeftLinear(base, "default", r=r, lora_alpha=r)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    return layer


def _step(fn, params, bwd: bool):
    """fwd, or fwd + bwd driven by a fixed supplied grad-output (not ``y.sum()``)."""
    gy = {}

    def run():
        y = fn()
        if bwd:
            if "g" not in gy:
                gy["g"] = torch.randn_like(y)
            torch.autograd.grad(y, params, gy["g"])
    return run


def bench_lora(M, K, R, frac, *, device, dtype, quick, time_ms) -> list[dict]:
    """One LoRA configuration: base GEMM vs adapter paths, fwd and fwd+bwd."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    base = torch.nn.Linear(K, K, bias=False, device=device, dtype=dtype).requires_grad_(False)
    A = (torch.randn(R, K, device=device, dtype=dtype, generator=g) / K**0.5).requires_grad_()
    B = torch.randn(K, R, device=device, dtype=dtype, generator=g).requires_grad_()
    k = max(1, int(R * frac))
    gate = None if k == R else TopKGate(torch.rand(M, R, device=device, generator=g).topk(k, 1).indices)
    xg = x.clone().requires_grad_()
    paths = {
        "base_gemm": (lambda: base(xg), [xg]),
        "masked_ref": (lambda: base(xg) + rank_sparse_lora_ref(xg, A, B, gate=gate), [xg, A, B]),
    }
    if device == "cuda":
        paths["kernel"] = (lambda: rank_sparse_lora(xg, A, B, gate=gate, backend="triton",
                                                    base_weight=base.weight), [xg, A, B])
    peft = None if quick else _peft_layer(base, R)
    if peft is not None and frac == 1:
        pp = [xg, peft.lora_A["default"].weight, peft.lora_B["default"].weight]
        paths["peft_dense"] = (lambda: peft(xg), pp)
    rows = []
    for bwd in (False, True):
        res = {name: time_ms(_step(fn, ps, bwd)) for name, (fn, ps) in paths.items()}
        rows.append(dict(kind="lora", M=M, K=K, N=K, R=R, frac=frac, bwd=bwd, ms=res))
    return rows


def bench_multi(M, K, r, n_adapters, n_samples, *, device, dtype, time_ms) -> list[dict]:
    """Multi-adapter: one adapter id per sample; kernel vs loop over adapters vs masked ref."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=g).requires_grad_()
    A = (torch.randn(n_adapters * r, K, device=device, dtype=dtype, generator=g) / K**0.5).requires_grad_()
    B = torch.randn(K, n_adapters * r, device=device, dtype=dtype, generator=g).requires_grad_()
    ids = torch.randint(0, n_adapters, (n_samples,), device=device, generator=g)
    tok_ids = ids.repeat_interleave(M // n_samples)
    gate = AdapterGate(ids, r, tokens_per_id=M // n_samples)  # one SGMV segment per sample

    def loop():
        y = torch.zeros(M, K, device=device, dtype=dtype)
        for a in range(n_adapters):
            rows = (tok_ids == a).nonzero().flatten()
            sl = slice(a * r, (a + 1) * r)
            y = y.index_add(0, rows, F.linear(F.linear(x[rows], A[sl]), B[:, sl]))
        return y

    paths = {"loop": loop, "masked_ref": lambda: rank_sparse_lora_ref(x, A, B, gate=gate)}
    if device == "cuda":
        paths["kernel"] = lambda: rank_sparse_lora(x, A, B, gate=gate, backend="triton")
    rows = []
    for bwd in (False, True):
        res = {name: time_ms(_step(fn, [x, A, B], bwd)) for name, fn in paths.items()}
        rows.append(dict(kind="multi", M=M, K=K, N=K, R=r, n_adapters=n_adapters, bwd=bwd, ms=res))
    return rows


def _print(rows: list[dict]) -> None:
    cols = sorted({c for row in rows for c in row["ms"]})
    head = f"{'kind':6} {'M':>6} {'K=N':>5} {'R':>4} {'frac':>6} {'pass':8}" + "".join(f"{c:>12}" for c in cols)
    print(head + "\n" + "-" * len(head))
    for row in rows:
        frac = f"{row.get('frac', 0):.3f}" if row["kind"] == "lora" else f"n={row['n_adapters']}"
        cells = "".join(f"{row['ms'][c]:12.3f}" if c in row["ms"] else f"{'-':>12}" for c in cols)
        print(f"{row['kind']:6} {row['M']:6d} {row['K']:5d} {row['R']:4d} {frac:>6} "
              f"{'fwd+bwd' if row['bwd'] else 'fwd':8}{cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (for a CPU smoke run)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/out/rank_sparse_lora_<device>.json)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu --quick for a smoke run")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    time_ms = _timer(args.device)
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.quick:
        M, dims, ranks, n_samples = 256, [64, 128], [16, 64], 16
    else:
        M, dims, ranks, n_samples = 8192, [768, 4096], [16, 64], 32
    rows = []
    for K in dims:
        for R in ranks:
            for frac in (1 / 8, 1 / 2, 1.0):
                rows += bench_lora(M, K, R, frac, device=args.device, dtype=dtype, quick=args.quick,
                                   time_ms=time_ms)
        rows += bench_multi(M, K, 16, 10, n_samples, device=args.device, dtype=dtype, time_ms=time_ms)
    _print(rows)
    out = Path(args.out or Path(__file__).parent / "out" / f"rank_sparse_lora_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=args.device, dtype=str(dtype), quick=args.quick, torch=torch.__version__,
                machine=platform.processor() or platform.machine(),
                gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
