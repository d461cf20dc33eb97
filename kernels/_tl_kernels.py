"""The ``@triton.jit`` kernels (imported lazily by :func:`.triton_kernels.kernels`).

This module imports Triton at its top, so it is only imported on the first launch; see
:mod:`.triton_kernels` for what each kernel computes.
"""

# ruff: noqa: N803, N806  (kernel arguments follow Triton's upper-case pointer convention)
import triton
import triton.language as tl


@triton.jit
def _rows(pid, SSTART, SLEN, ROWS, M, SEG: tl.constexpr, HAS_ROWS: tl.constexpr,
          BM: tl.constexpr):
    """Row indices (int64) and validity of row block ``pid`` (of segment program_id(1))."""
    local = pid * BM + tl.arange(0, BM)
    if SEG:
        s = tl.program_id(1)
        start = tl.load(SSTART + s)
        n = tl.load(SLEN + s)
        valid = local < n
        pos = start + local
        if HAS_ROWS:
            rows = tl.load(ROWS + pos, mask=valid, other=0)
        else:
            rows = pos
    else:
        valid = local < M
        rows = local
    return rows.to(tl.int64), valid

@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 operands, no TF32 (and bf16 under the numpy interpreter)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b.to(a.dtype))

@triton.jit
def shrink(X, W, PRE, BIAS, GW, GI, H, DG, ROWS, SADP, SSTART, SLEN,
           M, K, R, RB, KSEL,
           sxm, sxk, swr, swk, spm, spr, sgm, sgr, sim, sij, shm, shr, sdm, sdr,
           scaling,
           SEG: tl.constexpr, HAS_ROWS: tl.constexpr, BWD: tl.constexpr,
           LOAD_PRE: tl.constexpr, HAS_BIAS: tl.constexpr, GATE: tl.constexpr,
           HAS_GW: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
           DEBUG: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    if SEG:
        if pid * BM >= tl.load(SLEN + tl.program_id(1)):
            return
        roff = tl.load(SADP + tl.program_id(1)) * RB
        r0 = 0
        RL = RB  # local ranks of one adapter, one tile (BR >= RB)
    else:
        roff = 0
        r0 = tl.program_id(1) * BR
        RL = R
    rows, valid = _rows(pid, SSTART, SLEN, ROWS, M, SEG, HAS_ROWS, BM)
    rr = r0 + tl.arange(0, BR)  # local rank index
    rmask = rr < RL
    mr = valid[:, None] & rmask[None, :]
    if LOAD_PRE and not BWD:
        acc = tl.load(PRE + rows[:, None] * spm + rr[None, :] * spr, mask=mr, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        rk = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(X + rows[:, None] * sxm + kk[None, :] * sxk,
                        mask=valid[:, None] & (kk < K)[None, :], other=0.0)  # (BM, BK)
            w = tl.load(W + (roff + rr)[None, :] * swr + kk[:, None] * swk,
                        mask=rmask[None, :] & (kk < K)[:, None], other=0.0)  # (BK, BR)
            acc += _dot(x, w, IEEE)
    # gate tile g (BM, BR)
    if GATE == 1:
        g = tl.load(GW + rows[:, None] * sgm + rr[None, :] * sgr, mask=mr, other=0.0).to(tl.float32)
    elif GATE == 2:
        g = tl.zeros((BM, BR), dtype=tl.float32)
        for j in range(0, KSEL):
            ij = tl.load(GI + rows * sim + j * sij, mask=valid, other=-1)
            if DEBUG:
                tl.device_assert((ij >= 0) & (ij < R), "TopKGate index out of range")
            if HAS_GW:
                wj = tl.load(GW + rows * sgm + j * sgr, mask=valid, other=0.0).to(tl.float32)
            else:
                wj = tl.where(valid, 1.0, 0.0)
            g += tl.where(ij[:, None] == rr[None, :], wj[:, None], 0.0)
    elif GATE == 3:
        sc = tl.load(GW + rows * sgm, mask=valid, other=0.0).to(tl.float32)  # (BM,) row scale
        g = sc[:, None] + tl.zeros((BM, BR), dtype=tl.float32)
    else:
        g = tl.full((BM, BR), 1.0, dtype=tl.float32)
    ho = H + rows[:, None] * shm + rr[None, :] * shr
    if BWD:
        pre = tl.load(PRE + rows[:, None] * spm + rr[None, :] * spr, mask=mr, other=0.0).to(tl.float32)
        dh = acc * scaling
        phi = pre
        if ACT == 1:
            phi = tl.maximum(pre, 0.0)
        dphi = dh * phi  # d loss / d g
        if GATE == 1:
            tl.store(DG + rows[:, None] * sdm + rr[None, :] * sdr, dphi, mask=mr)
        elif GATE == 2:
            for j in range(0, KSEL):
                ij = tl.load(GI + rows * sim + j * sij, mask=valid, other=-1)
                vj = tl.sum(tl.where(ij[:, None] == rr[None, :], dphi, 0.0), axis=1)
                own = valid & (ij >= r0) & (ij < r0 + BR) & (ij < RL)
                tl.store(DG + rows * sdm + j * sdr, vj, mask=own)
        elif GATE == 3:  # (M, n_rank_tiles) partial row sums; one column in SEG mode
            if SEG:
                tl.store(DG + rows * sdm, tl.sum(dphi, axis=1), mask=valid)
            else:
                tl.store(DG + rows * sdm + tl.program_id(1) * sdr, tl.sum(dphi, axis=1), mask=valid)
        dpre = dh * g
        if ACT == 1:
            dpre = tl.where(pre > 0.0, dpre, 0.0)
        tl.store(ho, dpre.to(H.dtype.element_ty), mask=mr)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + roff + rr, mask=rmask, other=0.0).to(tl.float32)[None, :]
        if not LOAD_PRE:
            tl.store(PRE + rows[:, None] * spm + rr[None, :] * spr, acc, mask=mr)
        phi = acc
        if ACT == 1:
            phi = tl.maximum(acc, 0.0)
        tl.store(ho, (phi * g * scaling).to(H.dtype.element_ty), mask=mr)

@triton.jit
def expand(H, W, Y, BIAS, ROWS, SADP, SSTART, SLEN, M, N, R, RB,
           shm, shr, swn, swr, sym, syn,
           SEG: tl.constexpr, HAS_ROWS: tl.constexpr, ACCUM: tl.constexpr,
           HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
           BN: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    n_n = tl.cdiv(N, BN)
    if SEG:
        pid_m = pid // n_n
        pid_n = pid % n_n
        if pid_m * BM >= tl.load(SLEN + tl.program_id(1)):
            return
        roff = tl.load(SADP + tl.program_id(1)) * RB
        RL = RB
    else:  # grouped ordering: GROUP_M row blocks share each B tile while it is in L2
        n_m = tl.cdiv(M, BM)
        per_group = GROUP_M * n_n
        first_m = (pid // per_group) * GROUP_M
        gm = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % gm
        pid_n = (pid % per_group) // gm
        roff = 0
        RL = R
    rows, valid = _rows(pid_m, SSTART, SLEN, ROWS, M, SEG, HAS_ROWS, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for j0 in range(0, RL, BR):
        rj = j0 + tl.arange(0, BR)
        h = tl.load(H + rows[:, None] * shm + rj[None, :] * shr,
                    mask=valid[:, None] & (rj < RL)[None, :], other=0.0)  # (BM, BR)
        w = tl.load(W + rn[None, :] * swn + (roff + rj)[:, None] * swr,
                    mask=nmask[None, :] & (rj < RL)[:, None], other=0.0)  # (BR, BN)
        acc += _dot(h, w, IEEE)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    yo = Y + rows[:, None] * sym + rn[None, :] * syn
    ymask = valid[:, None] & nmask[None, :]
    if ACCUM:
        acc += tl.load(yo, mask=ymask, other=0.0).to(tl.float32)
    tl.store(yo, acc.to(Y.dtype.element_ty), mask=ymask)

@triton.jit
def outer(D, X, OUT, ROWS, SADP, SSTART, SLEN, M, C, R, RB,
          sdm, sdr, sxm, sxc, sos, sor, soc, SPLIT,
          SEG: tl.constexpr, HAS_ROWS: tl.constexpr,
          IEEE: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    split = tl.program_id(2)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    if SEG:
        s = tl.program_id(0)
        lo = tl.load(SSTART + s)
        n = tl.load(SLEN + s)
        roff = tl.load(SADP + s) * RB
        rr = tl.arange(0, BR)
        RL = RB
    else:
        lo = 0
        n = M
        roff = 0
        rr = tl.program_id(0) * BR + tl.arange(0, BR)
        RL = R
    chunk = tl.cdiv(tl.cdiv(n, SPLIT), BM) * BM
    start = split * chunk
    stop = tl.minimum(start + chunk, n)
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for m0 in range(start, stop, BM):
        local = m0 + tl.arange(0, BM)
        valid = local < stop
        if HAS_ROWS:
            rows = tl.load(ROWS + lo + local, mask=valid, other=0).to(tl.int64)
        else:
            rows = (lo + local).to(tl.int64)
        d = tl.load(D + rows[:, None] * sdm + rr[None, :] * sdr,
                    mask=valid[:, None] & (rr < RL)[None, :], other=0.0)  # (BM, BR)
        x = tl.load(X + rows[:, None] * sxm + rc[None, :] * sxc,
                    mask=valid[:, None] & (rc < C)[None, :], other=0.0)  # (BM, BC)
        acc += _dot(tl.trans(d), x, IEEE)
    tl.store(OUT + split * sos + (roff + rr)[:, None] * sor + rc[None, :] * soc, acc,
             mask=(rr < RL)[:, None] & (rc < C)[None, :])

@triton.jit(debug=True)
def check_range(V, n, lo, hi, BLOCK: tl.constexpr):
    """Device-side bounds check (debug mode): ``lo <= V[i] < hi``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(V + offs, mask=offs < n, other=lo)
    tl.device_assert((v >= lo) & (v < hi), "adaptsim kernel: index out of range")

