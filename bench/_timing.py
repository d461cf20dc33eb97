"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import time
from typing import Callable


def make_timer(device: str, *, warmup: int = 25, rep: int = 100, cpu_reps: int = 10) -> Callable[[Callable], float]:
    """Return ``time_ms(fn)``: ``triton.testing.do_bench`` on CUDA, min of perf_counter runs on CPU.

    The CPU timer takes the minimum of ``cpu_reps`` runs after one warm-up call, which is robust
    to other jobs on a shared machine.
    """
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=warmup, rep=rep)

    def cpu(fn: Callable) -> float:
        fn()
        ts = []
        for _ in range(cpu_reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return min(ts)

    return cpu
