"""The steps that took the Numba forward kernel from plain loops to ``kernel="fast"``.

Each step is a complete forward pass for one head without masks (q, k, v of shape (N, d), N a
multiple of 128), kept here, outside the library, so that the benchmark can measure the gain of
every change (``bench_cpu.py --ablation``) and notebook 06 can show it. The library's
``attention_ref.flash_numba`` holds the first (``readable``) and the last (``fast``) step.

step 0  readable tier: one (query block, key block) tile at a time, element loops, math.exp
step 1  loops reorganised: K packed transposed per key block, row views, a compile-time key block,
        two query rows per pass (register blocking), scale * log2(e) folded into Q; math.exp
step 2  + vectorised 2^x (polynomial + exponent bits) instead of scalar math.exp
step 3  + scalar accumulators: the reduction over d runs into locals (no store per step)
step 4  + BLAS tiles: S = Q_i K_j^T and P V_j through np.dot (64 x 128 tiles), scalar row max
step 5  + vectorised row max (16 running maxima)
step 6  + one pass for e^x and the row sum (the library's helper), row max by halving, raw
        logits with the scale applied in the exponent; still 64 x 128 tiles
step 7  + the tiles chosen for this machine (``tile_sizes()``), the row maximum found in the
        exponential's pass and rescaling only when it grows by more than 8 / tau (lazy
        rescaling) = ``kernel="fast"``

Steps 1-6 carry their own copies of the helpers they used (the library has moved on); step 6
uses the library's ``_exp_sum``.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange

from attention_ref.flash_numba import (
    _FASTMATH,
    _LOG2E,
    _exp_sum,
    numba_flash_forward,
)

ROWS = 64  # query rows per work item in steps 1-6
BLOCK_K = 128  # keys per tile in steps 1-6 (a compile-time constant in steps 1-5)


# --- helpers of steps 2-5: 2^x over a row in two passes, 16 running maxima ---------------------
@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp2_f32(x, bits, pow2):
    """x[:] = 2**x[:] in place (float32); inputs below -126 give exactly 0."""
    for c in range(BLOCK_K):
        xc = max(x[c], np.float32(-126.0))
        nf = np.floor(xc + np.float32(0.5))
        bits[c] = (np.int32(nf) + np.int32(127)) << np.int32(23)  # 2^n as IEEE-754 bits
    for c in range(BLOCK_K):
        xc = max(x[c], np.float32(-126.0))
        f = xc - np.floor(xc + np.float32(0.5))  # f in [-0.5, 0.5]
        y = np.float32(1.5252733804059838e-05)  # Taylor series of 2^f, degree 7
        y = y * f + np.float32(0.00015403530393381606)
        y = y * f + np.float32(0.0013333558146428441)
        y = y * f + np.float32(0.009618129107628477)
        y = y * f + np.float32(0.055504108664821576)
        y = y * f + np.float32(0.2402265069591007)
        y = y * f + np.float32(0.6931471805599453)
        y = y * f + np.float32(1.0)
        x[c] = y * pow2[c] if x[c] >= np.float32(-126.0) else np.float32(0.0)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp2_row(x, bits32, pow32, bits64, pow64):
    """x = 2**x over one row (float32 only in these benchmarks)."""
    _exp2_f32(x, bits32, pow32)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _row_max16(x, m16):
    """max(x) with sixteen running maxima (a vector max per 16 logits)."""
    for u in range(16):
        m16[u] = x[u]
    for c0 in range(16, BLOCK_K, 16):
        for u in range(16):
            m16[u] = max(m16[u], x[c0 + u])
    mx = m16[0]
    for u in range(1, 16):
        mx = max(mx, m16[u])
    return mx


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _row_max_halving(x, tmp):
    """max(x) for a row whose length is a power of two >= 32: the row halved into ``tmp``
    (element-wise maxima of the two halves, then of the halves of ``tmp``), a few independent
    vector loops instead of one serial chain of maxima (the library used this until its row
    maximum became one vectorised reduction, ``_row_max``)."""
    h = x.shape[0] // 2
    for j in range(h):
        tmp[j] = max(x[j], x[j + h])
    while h > 16:
        h //= 2
        for j in range(h):
            tmp[j] = max(tmp[j], tmp[j + h])
    for j in range(8):
        tmp[j] = max(tmp[j], tmp[j + 8])
    for j in range(4):
        tmp[j] = max(tmp[j], tmp[j + 4])
    return max(max(tmp[0], tmp[2]), max(tmp[1], tmp[3]))


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _finish(o0, ell, out_row, Dv):
    for e in range(Dv):
        out_row[e] = o0[e] / ell


@nb.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _step1(qs, kt, vb, out, use_exp2):
    """A-form loops: s[c] += q[e] K^T[e, c] (accumulators in arrays), o[e] += p[c] V[c, e]."""
    L, D = qs.shape
    nkb = kt.shape[0]
    Dv = vb.shape[2]
    for qb in prange(L // ROWS):
        s0 = np.empty(BLOCK_K, qs.dtype)
        s1 = np.empty(BLOCK_K, qs.dtype)
        o0 = np.empty(Dv, qs.dtype)
        o1 = np.empty(Dv, qs.dtype)
        bits32 = np.empty(BLOCK_K, np.int32)
        bits64 = np.empty(BLOCK_K, np.int64)
        pow32 = bits32.view(np.float32)
        pow64 = bits64.view(np.float64)
        for i in range(qb * ROWS, qb * ROWS + ROWS, 2):
            q0 = qs[i]
            q1 = qs[i + 1]
            o0[:] = 0.0
            o1[:] = 0.0
            m0 = q0[0] - q0[0] - 1e30
            m1 = m0
            l0 = q0[0] - q0[0]
            l1 = l0
            for jb in range(nkb):
                ktb = kt[jb]
                for c in range(BLOCK_K):
                    s0[c] = 0.0
                    s1[c] = 0.0
                for e in range(D):
                    a0 = q0[e]
                    a1 = q1[e]
                    row = ktb[e]
                    for c in range(BLOCK_K):
                        s0[c] += a0 * row[c]
                        s1[c] += a1 * row[c]
                mx0 = s0[0]
                mx1 = s1[0]
                for c in range(BLOCK_K):
                    mx0 = max(mx0, s0[c])
                    mx1 = max(mx1, s1[c])
                n0 = max(m0, mx0)
                n1 = max(m1, mx1)
                for c in range(BLOCK_K):
                    s0[c] -= n0
                    s1[c] -= n1
                if use_exp2:
                    _exp2_row(s0, bits32, pow32, bits64, pow64)
                    _exp2_row(s1, bits32, pow32, bits64, pow64)
                else:
                    for c in range(BLOCK_K):
                        s0[c] = math.exp(s0[c] * 0.6931471805599453)
                        s1[c] = math.exp(s1[c] * 0.6931471805599453)
                t0 = s0[0] - s0[0]
                t1 = t0
                for c in range(BLOCK_K):
                    t0 += s0[c]
                    t1 += s1[c]
                al0 = np.exp2(m0 - n0)
                al1 = np.exp2(m1 - n1)
                l0 = al0 * l0 + t0
                l1 = al1 * l1 + t1
                m0 = n0
                m1 = n1
                for e in range(Dv):
                    o0[e] *= al0
                    o1[e] *= al1
                vbb = vb[jb]
                for c in range(BLOCK_K):
                    a0 = s0[c]
                    a1 = s1[c]
                    vr = vbb[c]
                    for e in range(Dv):
                        o0[e] += a0 * vr[e]
                        o1[e] += a1 * vr[e]
            _finish(o0, l0, out[i], Dv)
            _finish(o1, l1, out[i + 1], Dv)


@nb.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _step3(qs, kb, vt, out):
    """Dot-product form: a0 = sum_e q[e] K[c, e] into local scalars; o[e] = sum_c p[c] V^T[e, c]."""
    L = qs.shape[0]
    nkb = kb.shape[0]
    for qb in prange(L // ROWS):
        s0 = np.empty(BLOCK_K, qs.dtype)
        s1 = np.empty(BLOCK_K, qs.dtype)
        o0 = np.empty(64, qs.dtype)
        o1 = np.empty(64, qs.dtype)
        bits32 = np.empty(BLOCK_K, np.int32)
        bits64 = np.empty(BLOCK_K, np.int64)
        pow32 = bits32.view(np.float32)
        pow64 = bits64.view(np.float64)
        for i in range(qb * ROWS, qb * ROWS + ROWS, 2):
            q0 = qs[i]
            q1 = qs[i + 1]
            o0[:] = 0.0
            o1[:] = 0.0
            zero = q0[0] - q0[0]
            m0 = zero - 1e30
            m1 = m0
            l0 = zero
            l1 = zero
            for jb in range(nkb):
                kbb = kb[jb]
                mx0 = zero - 1e30
                mx1 = mx0
                for c in range(BLOCK_K):
                    kr = kbb[c]
                    a0 = zero
                    a1 = zero
                    for e in range(64):  # compile-time head dimension
                        a0 += q0[e] * kr[e]
                        a1 += q1[e] * kr[e]
                    s0[c] = a0
                    s1[c] = a1
                    mx0 = max(mx0, a0)
                    mx1 = max(mx1, a1)
                n0 = max(m0, mx0)
                n1 = max(m1, mx1)
                for c in range(BLOCK_K):
                    s0[c] -= n0
                    s1[c] -= n1
                _exp2_row(s0, bits32, pow32, bits64, pow64)
                _exp2_row(s1, bits32, pow32, bits64, pow64)
                t0 = zero
                t1 = zero
                for c in range(BLOCK_K):
                    t0 += s0[c]
                    t1 += s1[c]
                al0 = np.exp2(m0 - n0)
                al1 = np.exp2(m1 - n1)
                l0 = al0 * l0 + t0
                l1 = al1 * l1 + t1
                m0 = n0
                m1 = n1
                vtb = vt[jb]
                for e in range(64):
                    vr = vtb[e]
                    a0 = zero
                    a1 = zero
                    for c in range(BLOCK_K):
                        a0 += s0[c] * vr[c]
                        a1 += s1[c] * vr[c]
                    o0[e] = al0 * o0[e] + a0
                    o1[e] = al1 * o1[e] + a1
            _finish(o0, l0, out[i], 64)
            _finish(o1, l1, out[i + 1], 64)


@nb.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _step4(qs, kb, vb, out, vector_max):
    """BLAS tiles: np.dot for Q_i K_j^T and P V_j; softmax loops per row."""
    L = qs.shape[0]
    nkb = kb.shape[0]
    Dv = vb.shape[2]
    for qb in prange(L // ROWS):
        Qb = qs[qb * ROWS : qb * ROWS + ROWS]
        s = np.empty((ROWS, BLOCK_K), qs.dtype)
        pv = np.empty((ROWS, Dv), qs.dtype)
        o = np.zeros((ROWS, Dv), qs.dtype)
        m = np.full(ROWS, -1e30, qs.dtype)
        ell = np.zeros(ROWS, qs.dtype)
        alpha = np.empty(ROWS, qs.dtype)
        m16 = np.empty(16, qs.dtype)
        bits32 = np.empty(BLOCK_K, np.int32)
        bits64 = np.empty(BLOCK_K, np.int64)
        pow32 = bits32.view(np.float32)
        pow64 = bits64.view(np.float64)
        for jb in range(nkb):
            np.dot(Qb, kb[jb].T, s)
            for r in range(ROWS):
                x = s[r]
                if vector_max:
                    mx = _row_max16(x, m16)
                else:
                    mx = x[0]
                    for c in range(BLOCK_K):
                        mx = max(mx, x[c])
                mn = max(m[r], mx)
                for c in range(BLOCK_K):
                    x[c] -= mn
                _exp2_row(x, bits32, pow32, bits64, pow64)
                t = x[0] - x[0]
                for c in range(BLOCK_K):
                    t += x[c]
                alpha[r] = np.exp2(m[r] - mn)
                ell[r] = alpha[r] * ell[r] + t
                m[r] = mn
            np.dot(s, vb[jb], pv)
            for r in range(ROWS):
                for e in range(Dv):
                    o[r, e] = alpha[r] * o[r, e] + pv[r, e]
        for r in range(ROWS):
            _finish(o[r], ell[r], out[qb * ROWS + r], Dv)


@nb.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _step6(q, kb, vb, tau, out):
    """Step 5's loop with the library's softmax helpers: raw logits S = Q_i K_j^T, one pass for
    P = e^(tau (S - m)) and its row sum, the row max by halving."""
    L = q.shape[0]
    nkb = kb.shape[0]
    Dv = vb.shape[2]
    for qb in prange(L // ROWS):
        Qb = q[qb * ROWS : qb * ROWS + ROWS]
        s = np.empty((ROWS, BLOCK_K), q.dtype)
        pv = np.empty((ROWS, Dv), q.dtype)
        o = np.zeros((ROWS, Dv), q.dtype)
        m = np.full(ROWS, -np.inf, q.dtype)
        ell = np.zeros(ROWS, q.dtype)
        alpha = np.empty(ROWS, q.dtype)
        tmp = np.empty(BLOCK_K // 2, q.dtype)
        for jb in range(nkb):
            np.dot(Qb, kb[jb].T, s)
            for r in range(ROWS):
                x = s[r]
                mn = max(m[r], _row_max_halving(x, tmp))
                t = _exp_sum(x, mn, tau)
                alpha[r] = np.exp(tau * (m[r] - mn))
                ell[r] = alpha[r] * ell[r] + t
                m[r] = mn
            np.dot(s, vb[jb], pv)
            for r in range(ROWS):
                for e in range(Dv):
                    o[r, e] = alpha[r] * o[r, e] + pv[r, e]
        for r in range(ROWS):
            _finish(o[r], ell[r], out[qb * ROWS + r], Dv)


def _pack(q, k, v):
    N, d = k.shape
    qs = np.ascontiguousarray(q * q.dtype.type(_LOG2E / math.sqrt(d)))
    kb = k.reshape(N // BLOCK_K, BLOCK_K, d)
    vb = v.reshape(N // BLOCK_K, BLOCK_K, v.shape[1])
    return qs, kb, vb


def step(n: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Forward pass of step ``n`` (0-7) for one head: q, k, v (N, d) -> out (N, d)."""
    if n == 0:
        return numba_flash_forward(q, k, v, kernel="readable")[0]
    if n == 7:
        return numba_flash_forward(q, k, v, kernel="fast")[0]
    from attention_ref.flash_numba import _single_threaded_blas

    qs, kb, vb = _pack(q, k, v)
    out = np.empty((q.shape[0], v.shape[1]), q.dtype)
    if n in (1, 2):
        kt = np.ascontiguousarray(kb.transpose(0, 2, 1))
        _step1(qs, kt, vb, out, n == 2)
    elif n == 6:
        with _single_threaded_blas():
            _step6(q, kb, vb, q.dtype.type(1 / math.sqrt(q.shape[1])), out)
    elif n == 3:
        if q.shape[1] != 64 or v.shape[1] != 64:
            raise ValueError("step 3 is written for d = 64")
        _step3(qs, kb, np.ascontiguousarray(vb.transpose(0, 2, 1)), out)
    else:  # 4, 5
        with _single_threaded_blas():
            _step4(qs, kb, vb, out, n == 5)
    return out


STEPS = {
    0: "readable: element loops, math.exp",
    1: "loops reorganised (packed K^T, row views, 2 rows)",
    2: "+ vectorised 2^x",
    3: "+ scalar accumulators, d = 64 at compile time",
    4: "+ BLAS tiles (np.dot), 64 x 128",
    5: "+ vectorised row max",
    6: "+ one pass for e^x and row sum, row max by halving",
    7: "+ the machine's tiles, lazy rescaling = kernel='fast'",
}
