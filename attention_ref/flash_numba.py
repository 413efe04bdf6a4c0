"""Stage 06: FlashAttention-2 as Numba-jitted loops, in two tiers.

``numba_flash_forward`` returns ``(out, lse)`` and ``numba_flash_backward`` returns
``(dq, dk, dv)``, with the semantics of :func:`attention_ref.dot_product.scaled_dot_product_attention`
(PyTorch's SDPA): shapes ``q (..., Hq, L, E)``, ``k (..., H, S, E)``, ``v (..., H, S, Ev)``, default
scale ``1/sqrt(E)``, causal masks aligned top-left (``tril(ones(L, S))``) or bottom-right
(``tril(ones(L, S), S - L)``), sliding windows aligned the same way, key-padding lengths per batch
entry, grouped-query attention (query head ``n`` uses KV head ``n // (Hq / H)``) and **rows with
every key masked give 0** (``lse = -inf``, zero gradients).

Every mask this module supports is a *band* (``attention_ref.masks.band``): query row ``i`` (at
aligned position ``p = i``, or ``i + S - L`` bottom-right) sees exactly the keys ``lo(i) <= j < hi(i)``
of ``masks.key_range``, compiled here as ``_key_range``::

    lo(i) = max(0, p - left)                       (left unbounded: L + S)
    hi(i) = min(S, length[b], p + right + 1)       (causal: right = 0)

Both bounds grow with ``i``, so a block of query rows sees one contiguous range of key blocks and
the kernels skip every tile outside it (Dao 2023, §3.1.1: causal tiles above the diagonal are never
computed); only tiles that straddle a bound are masked element by element.

The kernels come first; the last section of this file is the glue that checks the inputs (through
``attention_ref.contract``, like every function of the package), packs them, and serves
``flash_attention(..., backend="numba")`` with the NumPy backend's answers.

Two tiers, selected by ``kernel=``:

``"readable"``
    FlashAttention-2, Algorithm 1 (forward) and FlashAttention Algorithm 4 with FA-2's
    ``D = rowsum(dO * O)`` pre-pass (backward), written loop for loop like the NumPy
    ``attention_ref.flash`` code: one query block against one key block at a time, the tile
    ``S = tau Q_i K_j^T`` as plain loops, ``-inf`` for masked logits and natural ``exp``.

``"fast"``
    The same FA-2 loops reorganised for the CPU, in the way PyTorch's CPU flash kernel is built:
    the two tile products ``S = Q_i K_j^T`` and ``P V_j`` go to BLAS (``np.dot`` inside the
    kernel, i.e. SciPy's OpenBLAS), the loops keep the masks, the online softmax (a vectorised
    ``2^x``) and the rescaling; the backward pass is one KV-stationary sweep that also
    accumulates dQ in a fixed number of private partial sums. Each optimisation is named in a
    comment where it is applied, with its measured gain (float32 forward, no mask, 2 threads,
    ``benchmarks/ablation_kernels.py`` steps 0-6 measured by ``benchmarks/bench_cpu.py``;
    numbers in ``benchmarks/results/cpu.json``). Any head dimension (BLAS has no fast path to
    miss); tiles are ``BLOCK_Q`` query rows by ``BLOCK_K`` keys.

Threads: the kernels run in Numba's thread pool (``NUMBA_NUM_THREADS``) and BLAS is limited to
one thread inside them (through threadpoolctl when it is installed). Results are bit-identical
from run to run: every output element is written by one work item in a fixed order, and the dQ
partial sums are added in a fixed order whatever the thread count.

Numba is an optional dependency: ``import attention_ref`` never imports this module; the first call
compiles the kernels (seconds) and ``cache=True`` stores them on disk (``NUMBA_CACHE_DIR``), so a
second process loads them in a fraction of a second.

Fast-math: the kernels use ``fastmath={"reassoc", "contract", "arcp", "nsz"}`` (not ``True``,
which also assumes no infinities and would silently break ``-inf`` masks). The fast tier masks with
a large finite negative number and guards fully masked rows explicitly.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numba as nb
import numpy as np
from numba import prange

from .contract import check_attention, check_choice, check_gradients, check_real
from .dot_product import attention_arrays, default_scale, sum_kv_heads
from .masks import checked_band, key_range

__all__ = ["numba_flash_forward", "numba_flash_backward"]

# Fast-math subset that keeps inf/NaN semantics (no "nnan", "ninf"): lets LLVM reassociate sums
# (vectorised reductions), fuse multiply-adds and use reciprocals, but -inf stays -inf.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

# Readable tier: square tiles, as in the NumPy reference.
READABLE_BLOCK = 64


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Masked logit in the fast tier (log2 units): finite, so that fast-math cannot assume it away;
# any exponent below -126 is flushed to exactly 0 by _exp2_*.
_NEG = -1.0e30


# ---------------------------------------------------------------------------------------------
# shared helper: the band of keys a query row sees
# ---------------------------------------------------------------------------------------------
# masks.key_range compiled: the one definition of the band. (Numba's disk cache notices edits to
# this file only: after editing masks.key_range, clear NUMBA_CACHE_DIR / __pycache__.)
_band_key_range = nb.njit(cache=True, inline="always")(key_range)


@nb.njit(cache=True, inline="always")
def _key_range(i, L, S, offset, causal, left, right, length):
    """Keys ``lo <= j < hi`` visible to query row ``i``: the band (offset, left, right) of
    ``masks.band`` (the glue folds causal into right; ``causal`` is honoured too), cut at ``length``."""
    return _band_key_range(i, offset, left, min(right, 0) if causal else right, min(S, length))


# ---------------------------------------------------------------------------------------------
# readable tier: FlashAttention-2 loop for loop
# ---------------------------------------------------------------------------------------------
@nb.njit(parallel=True, cache=True)
def _fwd_readable(q, k, v, scale, lengths, offset, causal, left, right, out, lse):
    """q (B, Hq, L, E), k (B, H, S, E), v (B, H, S, Ev) -> out (B, Hq, L, Ev), lse (B, Hq, L)."""
    B, Hq, L, E = q.shape
    H, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // H
    Br = READABLE_BLOCK
    Bc = READABLE_BLOCK
    Tr = (L + Br - 1) // Br
    Tc = (S + Bc - 1) // Bc
    # FA-2: the outer loop over query blocks is the parallel one (one (b, h, i) per work item)
    for item in prange(B * Hq * Tr):
        b = item // (Hq * Tr)
        h = (item // Tr) % Hq
        i = item % Tr
        hk = h // group  # GQA: query head h reads KV head h // (Hq / H)
        r0 = i * Br
        r1 = min(L, r0 + Br)
        m = np.full(r1 - r0, -np.inf, dtype=q.dtype)  # running row max
        ell = np.zeros(r1 - r0, dtype=q.dtype)  # running row sum (relative to m)
        acc = np.zeros((r1 - r0, Ev), dtype=q.dtype)  # unnormalised output
        s_tile = np.empty((r1 - r0, Bc), dtype=q.dtype)
        lo_blk, _ = _key_range(r0, L, S, offset, causal, left, right, lengths[b])
        _, hi_blk = _key_range(r1 - 1, L, S, offset, causal, left, right, lengths[b])
        for j in range(Tc):
            c0 = j * Bc
            c1 = min(S, c0 + Bc)
            if c1 <= lo_blk or c0 >= hi_blk:
                continue  # tile wholly masked: skipped
            # S_ij = tau Q_i K_j^T, masked logits -> -inf
            for r in range(r1 - r0):
                lo, hi = _key_range(r0 + r, L, S, offset, causal, left, right, lengths[b])
                for c in range(c1 - c0):
                    if lo <= c0 + c < hi:
                        dot = 0.0
                        for e in range(E):
                            dot += q[b, h, r0 + r, e] * k[b, hk, c0 + c, e]
                        s_tile[r, c] = scale * dot
                    else:
                        s_tile[r, c] = -np.inf
            # online softmax: m_new = max(m, rowmax S); P = exp(S - m_new);
            # ell = exp(m - m_new) ell + rowsum P; O = diag(exp(m - m_new)) O + P V_j
            for r in range(r1 - r0):
                m_new = m[r]
                for c in range(c1 - c0):
                    m_new = max(m_new, s_tile[r, c])
                if m_new == -np.inf:
                    continue  # every key so far masked: nothing to add
                alpha = math.exp(m[r] - m_new)  # exp(-inf) = 0 on the first visible tile
                row_sum = 0.0
                for e in range(Ev):
                    acc[r, e] *= alpha
                for c in range(c1 - c0):
                    p = math.exp(s_tile[r, c] - m_new)  # masked: exp(-inf) = 0
                    row_sum += p
                    for e in range(Ev):
                        acc[r, e] += p * v[b, hk, c0 + c, e]
                ell[r] = alpha * ell[r] + row_sum
                m[r] = m_new
        # O_i = diag(ell)^-1 O_i;  L_i = m_i + log(ell_i);  fully masked rows: O = 0, L = -inf
        for r in range(r1 - r0):
            if ell[r] > 0.0:
                for e in range(Ev):
                    out[b, h, r0 + r, e] = acc[r, e] / ell[r]
                lse[b, h, r0 + r] = m[r] + math.log(ell[r])
            else:
                for e in range(Ev):
                    out[b, h, r0 + r, e] = 0.0
                lse[b, h, r0 + r] = -np.inf


@nb.njit(parallel=True, cache=True)
def _bwd_readable(q, k, v, do, lse, delta, scale, lengths, offset, causal, left, right, dq, dk, dv):
    """Recompute P = exp(S - L) tile by tile; dV += P^T dO; dS = P (dO V^T - D); dQ += tau dS K;
    dK += tau dS^T Q.  One work item per (b, KV head): the query heads of a GQA group are summed
    inside it, so no two threads write the same dK, dV (and dQ rows belong to one item)."""
    B, Hq, L, E = q.shape
    H, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // H
    Br = READABLE_BLOCK
    Bc = READABLE_BLOCK
    Tr = (L + Br - 1) // Br
    Tc = (S + Bc - 1) // Bc
    for item in prange(B * H):
        b = item // H
        hk = item % H
        p_tile = np.empty((Br, Bc), dtype=q.dtype)
        ds_tile = np.empty((Br, Bc), dtype=q.dtype)
        for h in range(hk * group, (hk + 1) * group):
            for j in range(Tc):  # outer loop over key blocks (FA-1 Algorithm 4)
                c0 = j * Bc
                c1 = min(S, c0 + Bc)
                for i in range(Tr):
                    r0 = i * Br
                    r1 = min(L, r0 + Br)
                    lo_blk, _ = _key_range(r0, L, S, offset, causal, left, right, lengths[b])
                    _, hi_blk = _key_range(r1 - 1, L, S, offset, causal, left, right, lengths[b])
                    if c1 <= lo_blk or c0 >= hi_blk:
                        continue  # tile wholly masked: skipped
                    for r in range(r1 - r0):
                        lo, hi = _key_range(r0 + r, L, S, offset, causal, left, right, lengths[b])
                        for c in range(c1 - c0):
                            if lo <= c0 + c < hi:
                                dot = 0.0
                                for e in range(E):
                                    dot += q[b, h, r0 + r, e] * k[b, hk, c0 + c, e]
                                p = math.exp(scale * dot - lse[b, h, r0 + r])  # P = exp(S - L)
                                dp = 0.0  # dP = dO V^T
                                for e in range(Ev):
                                    dp += do[b, h, r0 + r, e] * v[b, hk, c0 + c, e]
                                p_tile[r, c] = p
                                ds_tile[r, c] = p * (dp - delta[b, h, r0 + r])  # dS = P (dP - D)
                            else:
                                p_tile[r, c] = 0.0
                                ds_tile[r, c] = 0.0
                    for r in range(r1 - r0):
                        for c in range(c1 - c0):
                            p = p_tile[r, c]
                            ds = ds_tile[r, c]
                            for e in range(Ev):  # dV_j += P^T dO_i
                                dv[b, hk, c0 + c, e] += p * do[b, h, r0 + r, e]
                            for e in range(E):
                                # dQ_i += tau dS K_j ;  dK_j += tau dS^T Q_i
                                dq[b, h, r0 + r, e] += scale * ds * k[b, hk, c0 + c, e]
                                dk[b, hk, c0 + c, e] += scale * ds * q[b, h, r0 + r, e]


# ---------------------------------------------------------------------------------------------
# fast tier: the same FA-2 loops around BLAS tile products, with a vectorised softmax
# ---------------------------------------------------------------------------------------------
# Key block of the fast tier (a compile-time constant: the softmax loops over it have a fixed trip
# count, so LLVM unrolls and vectorises them) and query rows per parallel work item.
# Optimisation (tile size): 32 query rows x 128 keys keeps a thread's tiles (Q_i, K_j, V_j, S, O:
# about 100 KiB in float32) well inside the 1 MiB L2; 64 x 128 tiles ran at 134 GFLOP/s, these
# at 222 (+65%, ablation step 5 -> 6; float32 forward, N = 4096, 2 threads). 128 x 256 and
# 64 x 256 were slower still in the tuning runs.
BLOCK_K = 128
BLOCK_Q = 32
# Fixed number of key-block chunks per head in the backward pass: each chunk owns a private dQ
# partial sum; a fixed count (not the thread count) keeps results bit-identical on any machine.
BWD_CHUNKS = 4


# Optimisation (vectorised 2^x): llvmlite has no vector exp, so `math.exp` stays one scalar libm
# call per logit; this Horner polynomial plus an exponent built with integer bit operations
# vectorises. Working in log2 units (log2(e) folded into Q once) makes it exp2. Measured on the
# loop kernel: 54 -> 79 GFLOP/s (+46%, ablation step 1 -> 2).
@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp2_f32(x, bits, pow2):
    """x[:] = 2**x[:] in place (float32, rel. error ~1e-7); inputs below -126 give exactly 0."""
    for c in range(BLOCK_K):
        xc = max(x[c], np.float32(-126.0))
        nf = np.floor(xc + np.float32(0.5))
        bits[c] = (np.int32(nf) + np.int32(127)) << np.int32(23)  # 2^n as IEEE-754 bits
    for c in range(BLOCK_K):
        xc = max(x[c], np.float32(-126.0))
        f = xc - np.floor(xc + np.float32(0.5))  # f in [-0.5, 0.5]
        # Taylor series of 2^f = e^(f ln 2), degree 7 (error < 5e-9 on [-0.5, 0.5])
        y = np.float32(1.5252733804059838e-05)
        y = y * f + np.float32(0.00015403530393381606)
        y = y * f + np.float32(0.0013333558146428441)
        y = y * f + np.float32(0.009618129107628477)
        y = y * f + np.float32(0.055504108664821576)
        y = y * f + np.float32(0.2402265069591007)
        y = y * f + np.float32(0.6931471805599453)
        y = y * f + np.float32(1.0)
        x[c] = y * pow2[c] if x[c] >= np.float32(-126.0) else np.float32(0.0)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp2_f64(x, bits, pow2):
    """x[:] = 2**x[:] in place (float64, rel. error ~2e-16); inputs below -126 give exactly 0."""
    for c in range(BLOCK_K):
        xc = max(x[c], -126.0)
        nf = np.floor(xc + 0.5)
        bits[c] = (np.int64(nf) + np.int64(1023)) << np.int64(52)
    for c in range(BLOCK_K):
        xc = max(x[c], -126.0)
        f = xc - np.floor(xc + 0.5)
        # Taylor series of 2^f, degree 12 (error < 3e-16 on [-0.5, 0.5])
        y = 2.5678435993488196e-11
        y = y * f + 4.44553827187081e-10
        y = y * f + 7.054911620801121e-09
        y = y * f + 1.0178086009239696e-07
        y = y * f + 1.3215486790144305e-06
        y = y * f + 1.5252733804059838e-05
        y = y * f + 0.00015403530393381606
        y = y * f + 0.0013333558146428441
        y = y * f + 0.009618129107628477
        y = y * f + 0.055504108664821576
        y = y * f + 0.2402265069591007
        y = y * f + 0.6931471805599453
        y = y * f + 1.0
        x[c] = y * pow2[c] if x[c] >= -126.0 else 0.0


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp2_row(x, bits32, pow32, bits64, pow64):
    """x = 2**x over one row of a tile, in the precision of ``x`` (chosen at compile time)."""
    if x.itemsize == 4:
        _exp2_f32(x, bits32, pow32)
    else:
        _exp2_f64(x, bits64, pow64)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _row_max(x, m16):
    """max(x) over one row of a tile.
    Optimisation (vectorised row max): a plain `mx = max(mx, x[c])` is one serial chain of scalar
    maxima (LLVM may not reorder it without the no-NaN flag); sixteen running maxima updated
    element-wise are a vector max per 16 logits. Measured: 116 -> 134 GFLOP/s (+16%, ablation
    step 4 -> 5)."""
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
def _mask_row(x, j0, lo, hi):
    """Logits of keys outside [lo, hi) -> a large finite negative (fast-math cannot drop it)."""
    for c in range(BLOCK_K):
        j = j0 + c
        if j < lo or j >= hi:
            x[c] = _NEG


@nb.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _fwd_fast(qs, kp, vp, lengths, offset, causal, left, right, L, S, out, lse2):
    """qs (B, Hq, L, E) = Q tau log2(e); kp (B, H, nkb, BLOCK_K, E) and vp (B, H, nkb, BLOCK_K, Ev):
    K and V cut into zero-padded key blocks -> out (B, Hq, L, Ev), lse2 (B, Hq, L) in log2 units."""
    B, Hq, _, E = qs.shape
    H = kp.shape[1]
    Ev = vp.shape[4]
    group = Hq // H
    nqb = (L + BLOCK_Q - 1) // BLOCK_Q
    for item in prange(B * Hq * nqb):
        bh = item // nqb
        t = item % nqb
        # Optimisation (causal load balance): prange hands each thread a contiguous range of
        # items; interleaving the query-block order (first, last, second, second-to-last, ...)
        # gives every thread a mix of short (top) and long (bottom) causal rows. Not measured
        # separately here; with it, causal runs 1.8x faster than no mask at N = 4096 (10.8 vs
        # 19.6 ms float32), close to the ideal 2x of skipping half the tiles.
        qb = t // 2 if t % 2 == 0 else nqb - 1 - t // 2
        b = bh // Hq
        h = bh % Hq
        hk = h // group  # GQA: query head h reads KV head h // (Hq / H)
        i0 = qb * BLOCK_Q
        nr = min(L, i0 + BLOCK_Q) - i0
        Qb = qs[b, h, i0 : i0 + nr]
        # scratch allocated once per work item, never inside the loops
        s = np.empty((BLOCK_Q, BLOCK_K), dtype=qs.dtype)
        pv = np.empty((BLOCK_Q, Ev), dtype=qs.dtype)
        o = np.zeros((BLOCK_Q, Ev), dtype=qs.dtype)
        m = np.full(BLOCK_Q, _NEG, dtype=qs.dtype)
        ell = np.zeros(BLOCK_Q, dtype=qs.dtype)
        alpha = np.ones(BLOCK_Q, dtype=qs.dtype)
        lo = np.empty(BLOCK_Q, dtype=np.int64)
        hi = np.empty(BLOCK_Q, dtype=np.int64)
        m16 = np.empty(16, dtype=qs.dtype)
        bits32 = np.empty(BLOCK_K, dtype=np.int32)
        bits64 = np.empty(BLOCK_K, dtype=np.int64)
        pow32 = bits32.view(np.float32)
        pow64 = bits64.view(np.float64)
        for r in range(nr):
            lo[r], hi[r] = _key_range(i0 + r, L, S, offset, causal, left, right, lengths[b])
        # tile skipping: the block's rows see keys [lo[0], hi[nr-1]) (both bounds grow with i)
        jb_start = lo[0] // BLOCK_K
        jb_stop = (hi[nr - 1] + BLOCK_K - 1) // BLOCK_K if hi[nr - 1] > lo[0] else jb_start
        for jb in range(jb_start, jb_stop):
            j0 = jb * BLOCK_K
            # Optimisation (BLAS tiles): S = Q_i K_j^T and P V_j go to the BLAS gemm through
            # np.dot (SciPy's OpenBLAS), as in PyTorch's CPU flash kernel. Measured: with 64-row
            # tiles it was *slower* than the best hand-written loops (142 -> 116 GFLOP/s,
            # ablation step 3 -> 4): the gemm is fast but the softmax loops then dominate. It pays
            # off with the vectorised row max and 32-row tiles (222 GFLOP/s, steps 5 and 6), and
            # it works for every head dimension, where the loops wanted d fixed at compile time.
            np.dot(Qb, kp[b, hk, jb].T, s[:nr])
            inside = j0 >= lo[nr - 1] and j0 + BLOCK_K <= hi[0]  # no row needs masking
            for r in range(nr):
                x = s[r]
                if not inside:
                    _mask_row(x, j0, lo[r], hi[r])
                # online softmax: m_new = max(m, rowmax S); P = 2^(S - m_new);
                # ell = 2^(m - m_new) ell + rowsum P; O = diag(2^(m - m_new)) O + P V_j
                m_new = max(m[r], _row_max(x, m16))
                if m_new < 0.5 * _NEG:  # every key seen so far is masked: P = 0
                    for c in range(BLOCK_K):
                        x[c] = 0.0
                    alpha[r] = 1.0
                    continue
                for c in range(BLOCK_K):
                    x[c] = x[c] - m_new
                _exp2_row(x, bits32, pow32, bits64, pow64)
                total = x[0] - x[0]  # a zero of the input dtype
                for c in range(BLOCK_K):
                    total += x[c]
                a = np.exp2(m[r] - m_new) if m[r] > 0.5 * _NEG else total - total
                alpha[r] = a
                ell[r] = a * ell[r] + total
                m[r] = m_new
            np.dot(s[:nr], vp[b, hk, jb], pv[:nr])
            for r in range(nr):
                a = alpha[r]
                orow = o[r]
                pvrow = pv[r]
                for e in range(Ev):
                    orow[e] = a * orow[e] + pvrow[e]
        # O_i = diag(ell)^-1 O_i ; lse = m + log2(ell) ; fully masked rows -> 0 and -inf
        for r in range(nr):
            orow = out[b, h, i0 + r]
            if ell[r] > 0.0:
                for e in range(Ev):
                    orow[e] = o[r, e] / ell[r]
                lse2[b, h, i0 + r] = m[r] + np.log2(ell[r])
            else:
                for e in range(Ev):
                    orow[e] = 0.0
                lse2[b, h, i0 + r] = -np.inf


@nb.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _bwd_fast(qs, kp, vp, dop, lse2, delta, lengths, offset, causal, left, right, L, S,
              dq_part, dk, dv):
    """FA-2 backward, one pass: a work item (b, KV head, chunk t) owns the key blocks
    t, t + BWD_CHUNKS, ... (interleaved: causal load balance) and, for each, every query block that
    sees it: P = 2^(S - lse2), dS = P (dO V^T - D), dV_j += P^T dO, dK_j += dS^T Q,
    dQ_partial[t] += dS K_j.  Scales (tau, ln 2) are applied by the caller.
    Optimisation (one backward sweep): FA-2's separate dK/dV and dQ passes recompute S, P and dP
    twice (14 N^2 d FLOPs instead of 10, and twice the exponentials); here each tile is computed
    once and dQ goes to BWD_CHUNKS private partial sums (no atomics, deterministic). Not measured
    against a two-pass BLAS version (the backward pass reaches 232 GFLOP/s counted as 2.5x the
    forward FLOPs, float32, N = 4096)."""
    B, Hq, _, E = qs.shape
    H, nkb = kp.shape[1], kp.shape[2]
    Ev = vp.shape[4]
    group = Hq // H
    T = dq_part.shape[0]
    for item in prange(B * H * T):
        b = item // (H * T)
        hk = (item // T) % H
        t = item % T
        s = np.empty((BLOCK_Q, BLOCK_K), dtype=qs.dtype)
        dp = np.empty((BLOCK_Q, BLOCK_K), dtype=qs.dtype)
        tk = np.empty((BLOCK_K, E), dtype=qs.dtype)
        tv = np.empty((BLOCK_K, Ev), dtype=qs.dtype)
        tq = np.empty((BLOCK_Q, E), dtype=qs.dtype)
        bits32 = np.empty(BLOCK_K, dtype=np.int32)
        bits64 = np.empty(BLOCK_K, dtype=np.int64)
        pow32 = bits32.view(np.float32)
        pow64 = bits64.view(np.float64)
        length = lengths[b]
        for jb in range(t, nkb, T):
            j0 = jb * BLOCK_K
            kb = kp[b, hk, jb]
            vb = vp[b, hk, jb]
            dkb = dk[b, hk, jb]
            dvb = dv[b, hk, jb]
            # the rows that see this block form one contiguous range (both bounds grow with i)
            i_first = L
            i_last = -1
            for i in range(L):
                lo, hi = _key_range(i, L, S, offset, causal, left, right, length)
                if hi > lo and hi > j0 and lo < j0 + BLOCK_K:
                    i_first = min(i_first, i)
                    i_last = i
            for h in range(hk * group, (hk + 1) * group):
                for i0 in range(i_first, i_last + 1, BLOCK_Q):
                    nr = min(BLOCK_Q, i_last + 1 - i0)
                    Qb = qs[b, h, i0 : i0 + nr]
                    DOb = dop[b, h, i0 : i0 + nr]
                    np.dot(Qb, kb.T, s[:nr])  # S (log2 units)
                    np.dot(DOb, vb.T, dp[:nr])  # dP = dO V_j^T
                    for r in range(nr):
                        lo, hi = _key_range(i0 + r, L, S, offset, causal, left, right, length)
                        x = s[r]
                        y = dp[r]
                        if j0 < lo or j0 + BLOCK_K > hi:
                            _mask_row(x, j0, lo, hi)
                        l2 = lse2[b, h, i0 + r]
                        for c in range(BLOCK_K):
                            x[c] = x[c] - l2
                        _exp2_row(x, bits32, pow32, bits64, pow64)  # P = 2^(S - lse2)
                        d = delta[b, h, i0 + r]
                        for c in range(BLOCK_K):
                            y[c] = x[c] * (y[c] - d)  # dS = P (dP - D)
                    np.dot(s[:nr].T, DOb, tv)  # dV_j += P^T dO_i
                    np.dot(dp[:nr].T, Qb, tk)  # dK_j += dS^T Q_i
                    for c in range(BLOCK_K):
                        for e in range(Ev):
                            dvb[c, e] += tv[c, e]
                        for e in range(E):
                            dkb[c, e] += tk[c, e]
                    np.dot(dp[:nr], kb, tq[:nr])  # dQ_i += dS K_j
                    dqb = dq_part[t, b, h]
                    for r in range(nr):
                        for e in range(E):
                            dqb[i0 + r, e] += tq[r, e]


# =============================================================================================
# Glue between attention_ref and the kernels above (plain Python; nothing below is compiled).
#
# flash_attention(..., backend="numba") and flash_attention_backward(..., backend="numba") check
# their inputs (attention_ref.contract) and land in flash_attention_numba /
# flash_attention_backward_numba; numba_flash_forward / numba_flash_backward check the same way
# and reach both tiers. All four end in _forward / _backward, which pack (..., H, L, E) into
# (B, H, L, E), run float16 in float32, give empty inputs (L, S, E or the batch = 0: no tile to
# run) to the NumPy cores of attention_ref.flash, and make a row with a NaN logit NaN, so that
# this backend answers exactly what the NumPy backend answers.
# =============================================================================================
_KERNELS = ("fast", "readable")


_BLAS_CONTROLLER: Any = None


def _single_threaded_blas():
    """Context in which BLAS runs on one thread: the fast tier calls gemm from every Numba
    thread, and a multi-threaded BLAS inside them spins on the same cores.
    Optimisation (single-threaded BLAS inside the kernels): measured 83 -> 127 GFLOP/s of CPU
    time (float32 forward, N = 4096, one Numba thread, OpenBLAS with 2 vs 1 threads).
    Uses threadpoolctl when installed; otherwise a no-op."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()
    if _BLAS_CONTROLLER is False:
        return contextlib.nullcontext()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def _as_4d(x: np.ndarray) -> np.ndarray:
    """(..., H, L, E) -> contiguous (B, H, L, E); 3-D (H, L, E) -> (1, H, L, E); 2-D -> (1, 1, L, E).
    B is computed, not inferred, so that zero sizes reshape too."""
    shape = (1,) * max(0, 4 - x.ndim) + tuple(x.shape)
    return np.ascontiguousarray(x.reshape((math.prod(shape[:-3]),) + shape[-3:]))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """(B, H, S, D) -> (B, H, rows, D), zero rows appended (keys beyond S are masked anyway)."""
    if x.shape[2] == rows:
        return x
    out = np.zeros(x.shape[:2] + (rows,) + x.shape[3:], dtype=x.dtype)
    out[:, :, : x.shape[2]] = x
    return out


def _run_forward(q, k, v, scale, lengths, band, kernel):
    """The kernels on packed float32/float64 arrays q (B, Hq, L, E), k (B, H, S, E), v (B, H, S, Ev)
    with L, S, E, B > 0 -> out (B, Hq, L, Ev), lse (B, Hq, L)."""
    B, Hq, L, E = q.shape
    S, Ev, dtype = k.shape[2], v.shape[3], q.dtype
    offset, left, right = band  # causal is folded into right: the kernels' causal flag stays False
    args = (lengths, offset, False, left, right)
    out = np.empty((B, Hq, L, Ev), dtype=dtype)
    lse = np.empty((B, Hq, L), dtype=dtype)
    if kernel == "readable":
        _fwd_readable(q, k, v, scale, *args, out, lse)
        return out, lse
    nkb = -(-S // BLOCK_K)
    # Optimisation (fold the scale): Q * tau * log2(e) once, so logits come out in log2 units
    # (one multiply per logit saved; part of ablation step 1, not measured on its own)
    qs = np.ascontiguousarray(q * dtype.type(scale * _LOG2E))
    kp = _pad_rows(k, nkb * BLOCK_K).reshape(B, -1, nkb, BLOCK_K, E)
    vp = _pad_rows(v, nkb * BLOCK_K).reshape(B, -1, nkb, BLOCK_K, Ev)
    with _single_threaded_blas():
        _fwd_fast(qs, kp, vp, *args, L, S, out, lse)
    lse *= dtype.type(_LN2)  # log2 -> natural log (-inf stays -inf)
    return out, lse


def _run_backward(q, k, v, o, lse, do, scale, lengths, band, kernel):
    """The backward kernels on packed arrays (as _run_forward, plus o, do (B, Hq, L, Ev) and
    lse (B, Hq, L)) -> dq (B, Hq, L, E), dk (B, H, S, E), dv (B, H, S, Ev)."""
    B, Hq, L, E = q.shape
    H, S, Ev, dtype = k.shape[1], k.shape[2], v.shape[3], q.dtype
    offset, left, right = band
    args = (lengths, offset, False, left, right)
    # FA-2 pre-pass: D_i = rowsum(dO_i * O_i)
    delta = np.ascontiguousarray(np.einsum("bhle,bhle->bhl", do, o))
    if kernel == "readable":
        dq = np.zeros((B, Hq, L, E), dtype=dtype)
        dk, dv = np.zeros((B, H, S, E), dtype=dtype), np.zeros((B, H, S, Ev), dtype=dtype)
        _bwd_readable(q, k, v, do, lse, delta, scale, *args, dq, dk, dv)
        return dq, dk, dv
    nkb = -(-S // BLOCK_K)
    qs = np.ascontiguousarray(q * dtype.type(scale * _LOG2E))
    kp = _pad_rows(k, nkb * BLOCK_K).reshape(B, H, nkb, BLOCK_K, E)
    vp = _pad_rows(v, nkb * BLOCK_K).reshape(B, H, nkb, BLOCK_K, Ev)
    lse2 = lse * dtype.type(_LOG2E)
    dq_part = np.zeros((BWD_CHUNKS, B, Hq, L, E), dtype=dtype)
    dk = np.zeros((B, H, nkb, BLOCK_K, E), dtype=dtype)
    dv = np.zeros((B, H, nkb, BLOCK_K, Ev), dtype=dtype)
    with _single_threaded_blas():
        _bwd_fast(qs, kp, vp, do, lse2, delta, *args, L, S, dq_part, dk, dv)
    # dQ = tau sum_t dQ_t (fixed order); dK = tau dS^T Q = ln2 dS^T (Q tau log2 e)
    dq = dq_part.sum(axis=0) * dtype.type(scale)
    return dq, dk.reshape(B, H, -1, E)[:, :, :S] * dtype.type(_LN2), dv.reshape(B, H, -1, Ev)[:, :, :S]


def _numpy_cores_inputs(q, k, v, lengths):
    """For the NumPy cores: key/value heads repeated for GQA, the key lengths as a mask (B, Hq, L, S)."""
    return attention_arrays(q, k, v, np.arange(k.shape[2]) < lengths[:, None, None, None])[1:]


def _nan_rows(q, k, out, lse, band, lengths):
    """Make a row with a NaN logit NaN, as the NumPy path does (the kernels drop a NaN logit or give
    its row 0): the rows whose query, or a key they see, holds a NaN. Looked for only when q or k
    holds a NaN at all, which costs one pass over them."""
    q_nan, k_nan = np.isnan(q).any(axis=-1), np.isnan(k).any(axis=-1)  # (B, Hq, L), (B, H, S)
    if not (q_nan.any() or k_nan.any()):
        return out, lse
    group = q.shape[1] // k.shape[1]
    nan_keys_before = np.concatenate([np.zeros(k_nan.shape[:-1] + (1,), int), np.cumsum(k_nan, axis=-1)], axis=-1)
    for b, h, i in np.ndindex(*lse.shape):
        lo, hi = key_range(i, *band, int(lengths[b]))
        seen = nan_keys_before[b, h // group]
        if lo < hi and (q_nan[b, h, i] or seen[hi] > seen[lo]):
            out[b, h, i], lse[b, h, i] = np.nan, np.nan
    return out, lse


def _check_numpy(**arrays: Any) -> None:
    for name, x in arrays.items():
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array for the numba backend (its kernels run on the CPU), "
                            f"got {type(x).__module__}.{type(x).__name__}")


def _work(*arrays: np.ndarray) -> list[np.ndarray]:
    """Packed (B, H, L, E) copies in the compute dtype: float16 runs in float32."""
    work = np.float32 if arrays[0].dtype == np.float16 else arrays[0].dtype
    return [_as_4d(x.astype(work, copy=False)) for x in arrays]


def _forward(query, key, value, scale, band, lengths, kernel):
    """Checked inputs -> (out (..., Hq, L, Ev) in query's dtype, lse (..., Hq, L))."""
    _check_numpy(query=query, key=key, value=value)
    q, k, v = _work(query, key, value)
    if min(q.shape + k.shape + v.shape) == 0:
        from .flash import forward_fa2

        k, v, mask = _numpy_cores_inputs(q, k, v, lengths)
        out, lse = forward_fa2(q, k, v, mask, scale, band, 64, 64)
    else:
        out, lse = _nan_rows(q, k, *_run_forward(q, k, v, scale, lengths, band, kernel), band, lengths)
    return out.astype(query.dtype, copy=False).reshape(*query.shape[:-1], value.shape[-1]), lse.reshape(query.shape[:-1])


def _backward(query, key, value, out, lse, grad_out, scale, band, lengths, kernel):
    """Checked inputs -> (dq, dk, dv) shaped like query, key, value, in their dtype."""
    _check_numpy(query=query, key=key, value=value, out=out, lse=lse, grad_out=grad_out)
    q, k, v, o, do = _work(query, key, value, out, grad_out)
    lse4 = np.ascontiguousarray(lse.astype(q.dtype, copy=False).reshape(q.shape[:-1]))
    if min(q.shape + k.shape + v.shape) == 0:
        from .flash import backward_fa2

        k_rep, v_rep, mask = _numpy_cores_inputs(q, k, v, lengths)
        dq, dk, dv = backward_fa2(q, k_rep, v_rep, o, lse4, do, mask, scale, band, 64, 64)
        dk, dv = sum_kv_heads(dk, k), sum_kv_heads(dv, v)
    else:
        dq, dk, dv = _run_backward(q, k, v, o, lse4, do, scale, lengths, band, kernel)
    return tuple(np.ascontiguousarray(g).astype(x.dtype, copy=False).reshape(x.shape)
                 for g, x in ((dq, query), (dk, key), (dv, value)))


def _key_lengths(key_lengths: Any, batch_shape: tuple[int, ...], S: int) -> np.ndarray:
    """key_lengths (ints broadcastable to the batch shape, or None: all S keys) -> int64 (B,)."""
    if key_lengths is None:
        return np.full(math.prod(batch_shape), S, dtype=np.int64)
    kl = np.asarray(key_lengths)
    if not np.issubdtype(kl.dtype, np.integer):
        raise TypeError(f"key_lengths must be integers, got dtype {kl.dtype}")
    try:
        kl = np.broadcast_to(kl, batch_shape)
    except ValueError:
        raise ValueError(f"key_lengths of shape {kl.shape} does not broadcast to the batch shape {batch_shape} "
                         f"of query") from None
    if np.any(kl < 0):
        raise ValueError(f"key_lengths must be >= 0, got {kl}")
    return np.ascontiguousarray(np.minimum(kl, S).reshape(-1).astype(np.int64))


def _key_lengths_from_padding_mask(attn_mask: Any, query_shape: tuple[int, ...], S: int) -> np.ndarray:
    """A boolean key-padding mask (..., 1, 1, S) -> the int key lengths (B,) of the kernels.

    The kernels take the number of valid keys per batch element instead of a mask; this only works
    when the mask is True on a prefix of the keys and the same for every head and query. Any other
    mask raises ValueError.
    """
    batch = tuple(query_shape[:-3])
    if attn_mask is None:
        return _key_lengths(None, batch, S)
    m = np.asarray(attn_mask)
    if m.dtype != np.bool_:
        raise ValueError(f"the numba backend accepts only a boolean key-padding attn_mask, got dtype {m.dtype}")
    nd = len(batch) + 3
    if m.ndim > nd or m.shape[-1] not in (1, S):
        raise ValueError(f"the numba backend needs a key-padding attn_mask of shape (..., 1, 1, S={S}), got {m.shape}")
    m = m.reshape((1,) * (nd - m.ndim) + m.shape)
    if m.shape[-3] != 1 or m.shape[-2] != 1:
        raise ValueError(f"the numba backend only supports a key-padding attn_mask of shape (..., 1, 1, S); got "
                         f"{attn_mask.shape} (masks that vary over heads or queries need backend='numpy')")
    m = np.broadcast_to(m[..., 0, 0, :], batch + (S,))
    lengths = m.sum(axis=-1).astype(np.int64)
    if not np.array_equal(m, np.arange(S) < lengths[..., None]):
        raise ValueError("the numba backend only supports key-padding masks whose True entries form a prefix of "
                         "the keys in every batch element; use backend='numpy' for this attn_mask")
    return lengths.reshape(-1)


def _not_supported(**options: Any) -> None:
    for name, value in options.items():
        if value is not None and value is not False:
            raise ValueError(f"{name} is not supported by the numba backend; use backend='numpy'")


def flash_attention_numba(query, key, value, attn_mask, scale, band, block_mask, return_lse, return_stats):
    """``flash_attention(..., backend="numba")``, its inputs already checked (τ = ``scale`` and the
    ``band`` computed): the fast kernel; a boolean attn_mask only as a key-padding mask."""
    _not_supported(block_mask=block_mask, return_stats=return_stats)
    lengths = _key_lengths_from_padding_mask(attn_mask, query.shape, key.shape[-2])
    out, lse = _forward(query, key, value, scale, band, lengths, "fast")
    return (out, lse) if return_lse else out


def flash_attention_backward_numba(query, key, value, out, lse, grad_out, attn_mask, scale, band, block_mask):
    """``flash_attention_backward(..., backend="numba")``, its inputs already checked."""
    _not_supported(block_mask=block_mask)
    lengths = _key_lengths_from_padding_mask(attn_mask, query.shape, key.shape[-2])
    return _backward(query, key, value, out, lse, grad_out, scale, band, lengths, "fast")


def numba_flash_forward(
    query: np.ndarray, key: np.ndarray, value: np.ndarray, *, scale: float | None = None, is_causal: bool = False,
    causal_alignment: str = "top_left", window: tuple[int | None, int | None] | None = None,
    key_lengths: Any = None, enable_gqa: bool = False, kernel: str = "fast",
) -> tuple[np.ndarray, np.ndarray]:
    """FlashAttention-2 forward pass (Dao 2023, Algorithm 1) as a Numba kernel.

    Shapes: ``query (..., Hq, L, E)``, ``key (..., H, S, E)``, ``value (..., H, S, Ev)``
    (also 2-D ``(L, E)``); NumPy arrays of one floating dtype (float16 runs in float32).

    Computes ``O = softmax(tau Q K^T + mask) V`` one query block at a time with the online
    softmax: for each visible key block ``m_new = max(m, rowmax S)``, ``P = exp(S - m_new)``,
    ``l = exp(m - m_new) l + rowsum P``, ``O = diag(exp(m - m_new)) O + P V_j``; at the end
    ``O = diag(l)^-1 O`` and ``lse = m + log l``.

    ``is_causal`` / ``window = (left, right)`` (``None`` = unbounded) are aligned by
    ``causal_alignment`` (``"top_left"`` or ``"bottom_right"``); ``key_lengths`` (ints, shape
    ``query.shape[:-3]`` or broadcastable) masks keys ``j >= key_lengths[b]``; ``enable_gqa`` lets
    ``Hq`` be a multiple of ``H``. ``kernel="readable"`` runs the loop-for-loop tier.

    Returns ``(out (..., Hq, L, Ev), lse (..., Hq, L))``; rows whose keys are all masked give
    ``out = 0`` and ``lse = -inf``, rows with a NaN logit NaN.
    """
    check_attention(query, key, value, None, enable_gqa)
    check_choice("kernel", kernel, _KERNELS)
    _check_numpy(query=query, key=key, value=value)
    L, S = query.shape[-2], key.shape[-2]
    band = checked_band(L, S, is_causal, window, causal_alignment)
    scale = default_scale(query.shape[-1]) if scale is None else check_real("scale", scale)
    return _forward(query, key, value, scale, band, _key_lengths(key_lengths, tuple(query.shape[:-3]), S), kernel)


def numba_flash_backward(
    query: np.ndarray, key: np.ndarray, value: np.ndarray, out: np.ndarray, lse: np.ndarray,
    grad_out: np.ndarray, *, scale: float | None = None, is_causal: bool = False,
    causal_alignment: str = "top_left", window: tuple[int | None, int | None] | None = None,
    key_lengths: Any = None, enable_gqa: bool = False, kernel: str = "fast",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlashAttention backward pass by recomputation (Dao 2022, Algorithm 4; FA-2's D pre-pass).

    Shapes as :func:`numba_flash_forward`, plus ``out (..., Hq, L, Ev)`` and ``lse (..., Hq, L)``
    from the forward pass and ``grad_out = dL/dO (..., Hq, L, Ev)``.

    ``D = rowsum(dO * O)``; for every visible tile ``P = exp(tau Q_i K_j^T - lse_i)``,
    ``dV_j += P^T dO_i``, ``dS = P * (dO_i V_j^T - D_i)``, ``dQ_i += tau dS K_j``,
    ``dK_j += tau dS^T Q_i``. With GQA the gradients of the query heads sharing a KV head are summed.

    Returns ``(dq (..., Hq, L, E), dk (..., H, S, E), dv (..., H, S, Ev))``; fully masked rows
    contribute nothing (their ``dq`` is 0).
    """
    check_attention(query, key, value, None, enable_gqa)
    check_gradients(query, value, out, lse, grad_out)
    check_choice("kernel", kernel, _KERNELS)
    L, S = query.shape[-2], key.shape[-2]
    band = checked_band(L, S, is_causal, window, causal_alignment)
    scale = default_scale(query.shape[-1]) if scale is None else check_real("scale", scale)
    lengths = _key_lengths(key_lengths, tuple(query.shape[:-3]), S)
    return _backward(query, key, value, out, lse, grad_out, scale, band, lengths, kernel)
