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
    The same FA-2 loops reorganised for the CPU, in the way PyTorch's CPU flash kernel is built: the
    two tile products ``Z = Q_i K_j^T`` and ``P V_j`` go to BLAS's ``?gemm``, called from inside the
    kernel (``P V_j`` accumulates into ``O`` in place): Intel MKL when the ``mkl`` package is
    installed (``pip install attention_ref[mkl]``), else SciPy's OpenBLAS, or what
    ``ATTENTION_REF_BLAS=mkl|openblas`` asks for; ``cpu_info()["blas"]`` says which. The loops keep
    the masks, the online softmax (on the raw logits, with a vectorised ``exp``) and the rescaling;
    the backward pass is one KV-stationary sweep that also accumulates dQ in a fixed number of
    private partial sums. Each optimisation is named in a comment where it is applied, with its
    measured gain (``benchmarks/ablation_kernels.py`` steps 0-7, measured by
    ``benchmarks/bench_cpu.py``; numbers in ``benchmarks/results/``). Any head dimension (BLAS has
    no fast path to miss). Tiles of ``B_q`` query rows by ``B_k`` keys are chosen per machine and
    dtype: ``tile_sizes()`` shows the choice and its reason (a rule from the L2 cache size, or an
    autotune stored on disk: ``tune_tile_sizes()``, ``reset_tile_sizes()``,
    ``ATTENTION_REF_TILES``).

Threads: the kernels run in Numba's thread pool (``NUMBA_NUM_THREADS``) and BLAS runs on one thread
inside them, from the first call of a process on (OpenBLAS through threadpoolctl when it is
installed; MKL is loaded with its sequential layer). Results are bit-identical from run to run on
one machine: every output element is written by one work item in a fixed order, and the dQ partial
sums are added in a fixed order whatever the thread count (the tiles, chosen per machine, change the
rounding slightly).

Numba is an optional dependency: ``import attention_ref`` never imports this module; the first call
compiles the kernels (seconds) and ``cache=True`` stores them on disk (``NUMBA_CACHE_DIR``), so a
second process loads them in a fraction of a second.

Fast-math: the kernels use ``fastmath={"reassoc", "contract", "arcp", "nsz"}`` (not ``True``,
which also assumes no infinities and would silently break ``-inf`` masks). Both tiers mask with
``-inf`` (a finite sentinel would collide with genuine logits that negative) and guard fully
masked rows explicitly.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numba as nb
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .backends import cpu_model as _cpu_model
from .contract import check_attention, check_choice, check_gradients, check_real
from .dot_product import attention_arrays, default_scale, sum_kv_heads
from .masks import checked_band, key_range

__all__ = [
    "numba_flash_forward", "numba_flash_backward", "tile_sizes", "tune_tile_sizes",
    "reset_tile_sizes", "cpu_info",
]

# Fast-math subset that keeps inf/NaN semantics (no "nnan", "ninf"): lets LLVM reassociate sums
# (vectorised reductions), fuse multiply-adds and use reciprocals, but -inf stays -inf.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

# Readable tier: square tiles, as in the NumPy reference.
READABLE_BLOCK = 64


_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# shared helper: the band of keys a query row sees
# ---------------------------------------------------------------------------------------------
# masks.key_range compiled: the one definition of the band. (Numba's disk cache notices edits to
# this file only: after editing masks.key_range, clear NUMBA_CACHE_DIR / __pycache__.)
_band_key_range = nb.njit(cache=True, inline="always")(key_range)


@nb.njit(cache=True, inline="always")
def _key_range(i, L, S, offset, causal, left, right, length):
    """Keys ``lo <= j < hi`` visible to query row ``i``: the band (offset, left, right) of
    ``masks.band`` (the glue folds causal into right; ``causal`` is honoured too), cut at ``length``.
    Both ends are cut at the last key: a row that sees none has lo = hi (key_range puts them at
    the band's start, which can lie past the keys), and the kernels run tiles up to hi."""
    end = min(S, length)
    lo, hi = _band_key_range(i, offset, left, min(right, 0) if causal else right, end)
    return min(lo, end), min(hi, end)


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
# Tile sizes are run-time arguments (B_q query rows per work item, B_k keys per tile): they are
# chosen per machine and dtype by ``tile_sizes`` below, not fixed here. B_k is a power of two
# >= 32, so that a tile row is a whole number of vectors.
# Query rows per group on a tile the causal diagonal cuts (_fwd_fast): each group computes only
# the keys its last row sees, about half the diagonal tile's masked logits saved instead of none.
# Measured on a Sapphire Rapids VM (causal forward, paired with whole-block tiles in one process):
# N = 4096 2-2.5% faster (float32 and float64, groups of 32, 64 or 128), N = 2048 4-6%.
_EDGE_ROWS = 64
# Lazy rescaling (_fwd_fast): a row's shift m moves only when a key tile holds a logit more than
# _LAZY_RESCALE / tau above it, so P stays below e^8 (about 3000). Up to _SHIFT_LIMIT / tau above
# it P = e^(tau (X - m)) is still finite (e^64 < 10^28, and a tile row of them sums far below
# float32's largest number), and rescaling it moves the shift; beyond, P is recomputed.
_LAZY_RESCALE = 8.0
_SHIFT_LIMIT = 64.0
# Fixed number of key-block chunks per head in the backward pass: each chunk owns a private dQ
# partial sum; a fixed count (not the thread count) keeps results bit-identical on any machine.
BWD_CHUNKS = 4


# Optimisation (gemm with beta): np.dot always overwrites its output, so P V_j went to a scratch
# tile and a loop added it to O (and dK, dV, dQ likewise in the backward pass). BLAS's ?gemm takes
# beta: the products accumulate in place, C = alpha op(A) op(B) + beta C, and the extra passes are
# gone.
# Optimisation (BLAS chosen at run time): the kernels call the Fortran ?gemm whose address they
# are given (``_blas()`` below: Intel MKL when the ``mkl`` package is installed, else SciPy's
# OpenBLAS), so one compiled kernel serves both and the choice needs no recompilation.
@intrinsic
def _call_gemm(typingctx, address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Call the Fortran BLAS ?gemm at ``address`` (an integer): characters and sizes are passed
    by reference, as Fortran expects (32-bit integers: the LP64 interface)."""
    sig = types.void(address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, sig, args):
        i8, i32 = ir.IntType(8), ir.IntType(32)

        def by_reference(value, ty):
            slot = cgutils.alloca_once(builder, ty)
            builder.store(builder.trunc(value, ty) if value.type != ty else value, slot)
            return builder.bitcast(slot, cgutils.voidptr_t)

        address, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc = args
        fnty = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t] * 13)
        fn = builder.inttoptr(address, fnty.as_pointer())
        builder.call(fn, [by_reference(ta, i8), by_reference(tb, i8), by_reference(m, i32),
                          by_reference(n, i32), by_reference(k, i32), alpha, a,
                          by_reference(lda, i32), b, by_reference(ldb, i32), beta, c,
                          by_reference(ldc, i32)])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _address(typingctx, arr):
    """The data pointer of an array, as void* (for the BLAS call)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.bitcast(ary.data, cgutils.voidptr_t)
    return types.voidptr(arr), codegen


# Optimisation (512-bit vectors): on Intel's AVX-512 server cores LLVM vectorises with 256-bit
# registers unless told otherwise (a default made for the first of them, whose clock dropped under
# 512-bit code). Asking for 512 bits in the kernels' parallel loops -- a function attribute that
# Numba has no option for -- made the exponential's loop alone a third faster (0.26 -> 0.18 ns
# per logit in float32, 0.73 -> 0.47 in float64) and whole calls 3-6% faster on a Sapphire Rapids
# VM (forward and forward + backward, float32 and float64, causal or not: old and new kernel
# called in turn in one process, 41 pairs). Applied where the target has AVX-512 and is not of
# that first family (_vector_bits); elsewhere the attribute is left out.
@intrinsic
def _prefer_target_vector_width(typingctx):
    """Let LLVM vectorise the function this is called in with _vector_bits()-bit registers."""
    bits = _vector_bits()

    def codegen(context, builder, sig, args):
        if bits == 512:
            # llvmlite's FunctionAttributes accepts only keyword attributes: a string attribute
            # goes into the set directly and is printed as written
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.none(), codegen


@nb.njit(cache=True, inline="always")
def _gemm(gemm, a, b, c, trans_a, trans_b, alpha_beta):
    """c = alpha op(a) @ op(b) + beta c with the ?gemm at address ``gemm``, op = transpose where
    trans_*; a, b, c are 2-D arrays with unit column stride (rows may be strided: slices of
    bigger tiles); alpha_beta = [alpha, beta]. BLAS is column-major: a row-major
    C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T."""
    M, N = c.shape
    K = a.shape[0] if trans_a else a.shape[1]
    it = c.itemsize
    ta = np.int8(ord("T")) if trans_a else np.int8(ord("N"))
    tb = np.int8(ord("T")) if trans_b else np.int8(ord("N"))
    _call_gemm(gemm, tb, ta, N, M, K, _address(alpha_beta), _address(b), b.strides[0] // it,
               _address(a), a.strides[0] // it, _address(alpha_beta[1:]), _address(c),
               c.strides[0] // it)


# Accuracy (short float32 sums): inside one gemm BLAS sums the inner dimension in one running
# sum per output number, so its rounding error grows with the length: 512 keys in P V_j gave
# float32 outputs up to 2.8x the error of stage 05's 64 x 64 NumPy tiles (6 of 25 random inputs
# above 2x at E = 40). Products that add into their output (beta = 1) are therefore cut into
# pieces of _SUM_KEYS keys or _SUM_ROWS query rows along the summed dimension, each one gemm
# that adds to C. In float64 the sums stay whole (their error is far below the tolerance).
# Measured (Sapphire Rapids VM, paired old/new in one process, float32): forward 0.98-1.02x
# (N = 2048 and 4096; causal 0.99x; compiled for AVX2 1.00x), forward + backward 1.01x.
_SUM_KEYS = 128
_SUM_ROWS = 64


@nb.njit(cache=True, inline="always")
def _gemm_add(gemm, a, b, c, trans_a, accumulate, piece):
    """c += op(a) @ b (op = transpose where trans_a), in float32 in pieces of ``piece`` along the
    summed dimension (the rows of a when trans_a, else its columns; always the rows of b); in
    float64 in one piece."""
    K = a.shape[0] if trans_a else a.shape[1]
    if c.itemsize != 4:
        piece = max(K, 1)
    for k0 in range(0, K, piece):
        k1 = min(K, k0 + piece)
        if trans_a:
            _gemm(gemm, a[k0:k1], b[k0:k1], c, True, False, accumulate)
        else:
            _gemm(gemm, a[:, k0:k1], b[k0:k1], c, False, False, accumulate)


# Optimisation (vectorised exp): llvmlite has no vector exp, so `math.exp` stays one scalar libm
# call per logit. Written out -- e^t = 2^n e^r with n = round(t log2 e), r = t - n ln 2 (ln 2 in
# two parts, so that r is nearly exact: no error grows with |t|), a polynomial for e^r and 2^n as
# IEEE-754 exponent bits -- it vectorises. Measured on the loop kernel (ablation step 1 -> 2):
# 54 -> 79 GFLOP/s on a Zen 5 VM, 31 -> 48 on a Sapphire Rapids VM (benchmarks/results). Clamping
# t where n reaches the smallest exponent makes n + bias = 0, so 2^n = +0.0 exactly: masked logits
# (-inf) and anything below e^-87.7 give exactly 0 without a
# compare-and-select.
# Optimisation (exponent bits without a conversion): n + 1.5 * 2^23 (2^52 in float64) is exact and
# leaves the integer n in the low bits of the sum's mantissa; shifting those bits into the exponent
# field gives 2^n (the bias is added with the constant). It replaces a float-to-integer conversion:
# AVX2 has no vector float64 -> int64 one, and LLVM made it four scalar conversions per vector. Same
# results bit for bit; measured alone on a Sapphire Rapids VM (256 x 512 tile, ns per logit):
# float64 1.17 -> 0.75 compiled for AVX2 (haswell), 0.77 -> 0.73 native; float32 0.27 -> 0.26.
_EXPONENT_SHIFT_F32 = np.float32(1.5 * 2**23 + 127)  # + 127: the float32 exponent bias
_EXPONENT_SHIFT_F64 = 1.5 * 2**52 + 1023  # + 1023: the float64 exponent bias


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp_f32(t):
    """e**t for float32 t <= 64 (rel. error < 1e-7 for -10 <= t <= 8, 2.5e-7 at |t| = 64, as
    LLVM may merge the two parts of ln 2; t < -87.7, -inf included, gives 0; t > 88.7 gives
    garbage, which the kernels never use)."""
    t = max(t, np.float32(-88.0))
    n = np.floor(t * np.float32(_LOG2E) + np.float32(0.5))
    r = t - n * np.float32(0.693145751953125)  # ln 2, high part: n * it is exact
    r = r - n * np.float32(1.4286068203094173e-06)  # ln 2, low part
    # near-minimax polynomial for e^r on [-ln2/2, ln2/2], degree 6 (rel. error 2e-9)
    y = np.float32(0.001383684303122534)
    y = y * r + np.float32(0.00837481578783439)
    y = y * r + np.float32(0.04166822562294422)
    y = y * r + np.float32(0.16666420170103782)
    y = y * r + np.float32(0.4999999207957711)
    y = y * r + np.float32(1.0000000363231234)
    y = y * r + np.float32(1.00000000055418)
    bits = np.float32(n + _EXPONENT_SHIFT_F32).view(np.int32) << np.int32(23)  # 2^n
    return y * np.int32(bits).view(np.float32)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp_f64(t):
    """e**t for float64 t <= 64 (rel. error < 7e-16 for -10 <= t <= 8, 2.5e-15 at |t| = 64, as
    LLVM may merge the two parts of ln 2; t < -708.7, -inf included, gives 0).
    Optimisation (degree 10): a near-minimax polynomial in place of the degree-12 Taylor series,
    two FMAs fewer per number: float64 forward and backward 1-1.5% faster (paired, N = 4096,
    Sapphire Rapids VM), the error 4.5e-16 instead of 3.3e-16 for |t| <= ln2/2."""
    t = max(t, -709.0)
    n = np.floor(t * _LOG2E + 0.5)
    r = t - n * 6.93147180369123816490e-01  # ln 2, high part (fdlibm's split)
    r = r - n * 1.90821492927058770002e-10  # ln 2, low part
    # near-minimax polynomial for e^r on [-ln2/2, ln2/2], degree 10 (mpmath.chebyfit; 2.2e-16)
    y = 2.7626357241447223e-07
    y = y * r + 2.764018079620985e-06
    y = y * r + 2.4801504346997686e-05
    y = y * r + 0.00019841170270440067
    y = y * r + 0.0013888888932488599
    y = y * r + 0.008333333385667782
    y = y * r + 0.04166666666657314
    y = y * r + 0.16666666666554406
    y = y * r + 0.5000000000000006
    y = y * r + 1.0000000000000067
    y = y * r + 1.0
    bits = np.float64(n + _EXPONENT_SHIFT_F64).view(np.int64) << np.int64(52)  # 2^n
    return y * np.int64(bits).view(np.float64)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp_sum_max_f32(x, m, tau):
    total = np.float32(0.0)
    largest = x.dtype.type(-np.inf)
    for j in range(x.shape[0]):
        largest = _max_assuming_no_nan(largest, x[j])
        p = _exp_f32((x[j] - m) * tau)
        x[j] = p
        total += p
    return total, _frozen(largest)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp_sum_max_f64(x, m, tau):
    total = 0.0
    largest = x.dtype.type(-np.inf)
    for j in range(x.shape[0]):
        largest = _max_assuming_no_nan(largest, x[j])
        p = _exp_f64((x[j] - m) * tau)
        x[j] = p
        total += p
    return total, _frozen(largest)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp_sum_max(x, m, tau):
    """x[:] = e^(tau (x[:] - m)) in place; return its sum and the largest x seen: P, rowsum(P) and
    rowmax(X) of one tile row in one pass. x - m is exact near the row maximum, so large logits
    lose nothing to the scale. The dtype test stays outside the loops: a float64 path inside a
    float32 loop made LLVM vectorise it 4 wide (128-bit) instead of 8 (benchmarks/inspect_codegen.py).
    The maximum is LLVM's no-NaN maxnum (_row_max below), which vectorises along with the rest."""
    if x.itemsize == 4:
        return _exp_sum_max_f32(x, m, tau)
    return _exp_sum_max_f64(x, m, tau)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp_sum(x, m, tau):
    """x[:] = e^(tau (x[:] - m)) in place and return its sum (LLVM drops the unused maximum)."""
    return _exp_sum_max(x, m, tau)[0]


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _probs_and_dlogits_f32(x, y, tau, lse_row, d):
    for j in range(x.shape[0]):
        p = _exp_f32(x[j] * tau - lse_row)
        x[j] = p
        y[j] = p * (y[j] - d)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _probs_and_dlogits_f64(x, y, tau, lse_row, d):
    for j in range(x.shape[0]):
        p = _exp_f64(x[j] * tau - lse_row)
        x[j] = p
        y[j] = p * (y[j] - d)


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _probs_and_dlogits(x, y, tau, lse_row, d):
    """Backward, one tile row: x = Q_i k_j (raw logits) -> P = exp(tau x - lse),
    y = dP -> dZ = P (dP - D)."""
    if x.itemsize == 4:
        _probs_and_dlogits_f32(x, y, tau, lse_row, d)
    else:
        _probs_and_dlogits_f64(x, y, tau, lse_row, d)


# Optimisation (vectorised row max): `m = max(m, x[j])` is a chain of compares and selects that
# LLVM may not reorder (with a NaN the order would matter), so it stays one scalar step per
# logit. LLVM's maxnum with the no-NaN flag may be reordered: LLVM splits the loop into
# independent vector maxima. Alone (512 keys, Sapphire Rapids VM, ns per logit, float32 /
# float64): 0.87 / 0.86 as a chain, 0.08-0.10 / 0.12-0.15 for the halving tree used before,
# 0.045 / 0.09 here. Whole forward calls, paired old/new in one process (61-101 pairs): float32
# 3.5-4% faster (N = 2048, 4096), causal 2%, float64 0.5-2%; with AVX2 code 0-1%.
# With the flag, a NaN logit makes the loop's result LLVM "poison"; _frozen turns that into a
# fixed (unspecified) number, so that the branches on the maximum stay defined. A NaN in q or k
# gives NaN logits, and the wrapper gives such heads the NumPy core's answer
# (_heads_whose_logits_may_not_be_finite); the row is unspecified inside the kernel either way
# (the halving tree kept or dropped a NaN by position).
@intrinsic
def _max_assuming_no_nan(typingctx, a, b):
    """max(a, b) for a, b not NaN (LLVM's maxnum with the nnan flag)."""
    def codegen(context, builder, sig, args):
        ty = context.get_value_type(sig.return_type)
        maxnum = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(maxnum, args, fastmath=("nnan", "nsz"))
    return a(a, b), codegen


@intrinsic
def _frozen(typingctx, x):
    """x, or a fixed number if x is LLVM "poison"."""
    def codegen(context, builder, sig, args):
        # An empty inline-assembly statement: LLVM cannot see through it, so its result is an
        # ordinary value. (LLVM's own freeze instruction would do, but LLVM moves a freeze
        # onto the loop's loads and drops the no-NaN flag to do so.) "r": any integer register,
        # on every CPU (checked: x86-64, AArch64, POWER).
        ty = args[0].type
        int_ty = ir.IntType(32 if ty == ir.FloatType() else 64)
        fnty = ir.FunctionType(int_ty, [int_ty])
        opaque = builder.asm(fnty, "", "=r,0", [builder.bitcast(args[0], int_ty)], side_effect=False)
        return builder.bitcast(opaque, ty)
    return x(x), codegen


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _row_max(x):
    """max(x) of one tile row without NaN (with a NaN: some number, see above)."""
    m = x.dtype.type(-np.inf)
    for j in range(x.shape[0]):
        m = _max_assuming_no_nan(m, x[j])
    return _frozen(m)


@nb.njit(cache=True, fastmath=_FASTMATH)
def _head_magnitudes(x, rows):
    """x (B, H, N, E), rows (B,) -> (B, H): the largest |x| among the first rows[b] rows of each
    head, NaN where those hold a NaN or an infinity. One vectorised pass: x * 0 is 0 for a finite
    x and NaN for NaN and +-inf (LLVM may not fold it to 0 without the no-NaN flag), so their sum
    reports any of them."""
    out = np.empty(x.shape[:2], dtype=x.dtype)
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            flat = x[b, h, : rows[b]].reshape(-1)
            largest = x.dtype.type(0.0)
            probe = x.dtype.type(0.0)
            for i in range(flat.shape[0]):
                largest = _max_assuming_no_nan(largest, abs(flat[i]))
                probe += flat[i] * x.dtype.type(0.0)
            out[b, h] = _frozen(largest) + probe
    return out


@nb.njit(cache=True)
def _heads_whose_logits_may_not_be_finite(q, k, lengths, scale):
    """The kernels' online softmax assumes finite logits: it drops a NaN logit, and a +inf one
    gives +inf - inf. The heads (rows b, h of the result) whose logits may not be finite: a NaN or
    an infinity in their q or in the keys their batch's length lets them see (a KV cache may hold
    anything past it), or |scale q.k| that could come near the dtype's largest number (bounded by
    E max|q| max|k| max(1, |scale|)). Compiled, as one call: composed of NumPy calls in the glue
    it took 0.12 ms instead of 0.065 ms right after a forward call (N = 2048, float32; Sapphire
    Rapids VM), most of it in small NumPy calls whose code the kernel had pushed out of the caches."""
    B, Hq, L, E = q.shape
    group = Hq // k.shape[1]
    largest_q = _head_magnitudes(q, np.full(B, L, dtype=np.int64))
    largest_k = _head_magnitudes(k, lengths)
    limit = np.finfo(q.dtype).max / 4
    heads = np.empty((B * Hq, 2), dtype=np.int64)
    n = 0
    for b in range(B):
        for h in range(Hq):  # query head h reads KV head h // group
            bound = E * largest_q[b, h] * largest_k[b, h // group] * max(1.0, abs(scale))
            if not bound < limit:  # also when bound is NaN
                heads[n, 0], heads[n, 1] = b, h
                n += 1
    return heads[:n]


@nb.njit(cache=True, inline="always")
def _tile_width(visible, block_k):
    """Columns of a key tile to compute when only the first ``visible`` keys can be seen:
    ``visible`` rounded up to a multiple of 32 (whole vectors), at least 32, at most block_k."""
    return min(max(-(-visible // 32), 1) * 32, block_k)


@nb.njit(cache=True, inline="always")
def _group_rows(visible_first, visible_last, block_k, nr):
    """Rows per gemm call on a key tile of a block of ``nr`` query rows whose first and last rows
    see ``visible_first`` and ``visible_last`` of its keys: the whole block, or groups of
    _EDGE_ROWS where the rows need different widths (the causal diagonal). Both passes group
    rows this way, so that with the same tiles each logit comes from the same gemm call."""
    if _tile_width(visible_first, block_k) < _tile_width(visible_last, block_k):
        return _EDGE_ROWS
    return nr


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _mask_row(x, j0, lo, hi, value):
    """Entries of keys outside [lo, hi) -> value (-inf for logits, 0 for probabilities)."""
    for c in range(x.shape[0]):
        j = j0 + c
        if j < lo or j >= hi:
            x[c] = value


@nb.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _fwd_fast(gemm, q, kp, vp, tau, lengths, offset, causal, left, right, L, S, block_q, out, lse):
    """q (B, Hq, L, E) with the sign of the scale folded in; kp (B, H, nkb, B_k, E) and
    vp (B, H, nkb, B_k, Ev): K and V cut into zero-padded key blocks; tau = |scale|
    -> out (B, Hq, L, Ev), lse (B, Hq, L)."""
    B, Hq, _, E = q.shape
    H, block_k = kp.shape[1], kp.shape[3]
    Ev = vp.shape[4]
    group = Hq // H
    nqb = (L + block_q - 1) // block_q
    neg_inf = q.dtype.type(-np.inf)
    for item in prange(B * Hq * nqb):
        _prefer_target_vector_width()  # 512-bit vectors where they pay (see above)
        bh = item // nqb
        t = item % nqb
        # Optimisation (causal load balance): prange hands each thread a contiguous range of
        # items; interleaving the query-block order (first, last, second, second-to-last, ...)
        # gives every thread a mix of short (top) and long (bottom) causal rows.
        qb = t // 2 if t % 2 == 0 else nqb - 1 - t // 2
        b = bh // Hq
        h = bh % Hq
        hk = h // group  # GQA: query head h reads KV head h // (Hq / H)
        i0 = qb * block_q
        nr = min(L, i0 + block_q) - i0
        Qb = q[b, h, i0 : i0 + nr]
        # scratch allocated once per work item, never inside the loops
        s = np.empty((block_q, block_k), dtype=q.dtype)
        overwrite = np.ones(2, dtype=q.dtype)  # gemm's [alpha, beta] = [1, 0]: C = AB
        overwrite[1] = 0.0
        accumulate = np.ones(2, dtype=q.dtype)  # [1, 1]: C += AB
        o = np.zeros((block_q, Ev), dtype=q.dtype)
        m = np.full(block_q, neg_inf, dtype=q.dtype)  # shift: the raw logits' running row max,
        # or (lazy rescaling, below) up to _LAZY_RESCALE / tau under it
        ell = np.zeros(block_q, dtype=q.dtype)
        x_max = np.full(block_q, neg_inf, dtype=q.dtype)  # the row's largest raw logit so far
        # the logits of a tile row group again, when a row's maximum jumps by more than
        # _SHIFT_LIMIT / tau (rare: allocated then); spare_for says which group it holds
        spare = np.empty((0, 0), dtype=q.dtype)
        spare_for = -1
        alpha = np.ones(block_q, dtype=q.dtype)
        lo = np.empty(block_q, dtype=np.int64)
        hi = np.empty(block_q, dtype=np.int64)
        for r in range(nr):
            lo[r], hi[r] = _key_range(i0 + r, L, S, offset, causal, left, right, lengths[b])
        # tile skipping: the block's rows see keys [lo[0], hi[nr-1]) (both bounds grow with i)
        jb_start = lo[0] // block_k
        jb_stop = (hi[nr - 1] + block_k - 1) // block_k if hi[nr - 1] > lo[0] else jb_start
        for jb in range(jb_start, jb_stop):
            j0 = jb * block_k
            # Optimisation (trimmed tiles): on a mask's edge (causal diagonal, key padding) a row
            # sees only the first hi - j0 keys of the tile: compute just the columns the last of
            # a group of rows can see, rounded up to a multiple of 32. Where the rows see
            # different numbers (the diagonal), groups of _EDGE_ROWS rows, each with its width.
            rows = _group_rows(hi[0] - j0, hi[nr - 1] - j0, block_k, nr)
            for r0 in range(0, nr, rows):
                r1 = min(nr, r0 + rows)
                if hi[r1 - 1] <= j0:  # no row of the group sees a key of this tile
                    continue
                width = _tile_width(hi[r1 - 1] - j0, block_k)
                st = s[r0:r1, :width]
                # Optimisation (BLAS tiles): Q_i K_j^T and P V_j go to the BLAS gemm (MKL or
                # OpenBLAS: _blas), as in PyTorch's CPU flash kernel; the loops keep the masks
                # and the online softmax. It works for every head dimension.
                _gemm(gemm, Qb[r0:r1], kp[b, hk, jb, :width], st, False, True, overwrite)
                inside = j0 >= lo[r1 - 1] and j0 + width <= hi[r0]  # no row needs masking
                for r in range(r0, r1):
                    x = s[r, :width]
                    if not inside:
                        _mask_row(x, j0, lo[r], hi[r], neg_inf)
                    # online softmax on the raw logits X = Q_i K_j^T (Z = tau X), shifted by m:
                    # P = e^(tau (X - m)); ell = e^(tau (m - m_new)) ell + rowsum P;
                    # O = diag(e^(tau (m - m_new))) O + P V_j
                    if m[r] == neg_inf:  # no visible key before this tile: m = rowmax X
                        m_new = _row_max(x)
                        if m_new == neg_inf:  # every key seen so far is masked: P = 0
                            for j in range(width):
                                x[j] = 0.0
                            alpha[r] = 1.0
                            continue
                        ell[r] = _exp_sum(x, m_new, tau)
                        alpha[r] = 0.0
                        m[r] = m_new
                        x_max[r] = m_new
                        continue
                    # Optimisation (lazy rescaling): P = e^(tau (X - m)) with the shift m as it
                    # is, and rowmax X from the same pass (no pass of its own). While the row's
                    # maximum stays within _LAZY_RESCALE / tau above m, P <= e^8 and nothing is
                    # rescaled: m is then a shift, not the maximum (x_max keeps that, for lse).
                    total, row_max = _exp_sum_max(x, m[r], tau)
                    x_max[r] = max(x_max[r], row_max)
                    jump = tau * (row_max - m[r])
                    if jump <= _LAZY_RESCALE:
                        alpha[r] = 1.0
                        ell[r] += total
                        continue
                    # the maximum moved further: shift to m_new = rowmax X
                    a = np.exp(-jump)
                    if jump <= _SHIFT_LIMIT:  # P <= e^64, finite: e^(tau (X - m_new)) = a P
                        for j in range(width):
                            x[j] *= a
                        total *= a
                    else:  # P overflowed: the group's logits again, the same product (and so
                        # the same rounding as the backward pass's), into a buffer of their own
                        if spare_for != jb * block_q + r0:
                            if spare.shape[0] == 0:
                                spare = np.empty((block_q, block_k), dtype=q.dtype)
                            _gemm(gemm, Qb[r0:r1], kp[b, hk, jb, :width], spare[: r1 - r0, :width],
                                  False, True, overwrite)
                            spare_for = jb * block_q + r0
                        x[:] = spare[r - r0, :width]
                        if not inside:
                            _mask_row(x, j0, lo[r], hi[r], neg_inf)
                        total = _exp_sum(x, row_max, tau)
                    alpha[r] = a
                    ell[r] = a * ell[r] + total
                    m[r] = row_max
                for r in range(r0, r1):  # O = diag(alpha) O, then O += P V_j in the gemm
                    a = alpha[r]
                    if a != 1.0:
                        orow = o[r]
                        for e in range(Ev):
                            orow[e] *= a
                _gemm_add(gemm, st, vp[b, hk, jb, :width], o[r0:r1], False, accumulate, _SUM_KEYS)
        # O_i = diag(ell)^-1 O_i ; lse = tau x_max + log(ell e^(tau (m - x_max))) ; fully masked
        # rows -> 0 and -inf. lse is taken at the row's largest logit x_max, not at the lazy shift
        # m: tau x_max is rounded as the backward pass rounds tau z for that key, so that its
        # e^(tau z - lse) matches (at m, dV's float32 error with amplified logits was 5-6x NumPy's).
        for r in range(nr):
            orow = out[b, h, i0 + r]
            if ell[r] > 0.0:
                inv = 1.0 / ell[r]
                for e in range(Ev):
                    orow[e] = o[r, e] * inv
                ell_at_max = ell[r] * np.exp(tau * (m[r] - x_max[r]))
                lse[b, h, i0 + r] = tau * x_max[r] + np.log(ell_at_max)
            else:
                for e in range(Ev):
                    orow[e] = 0.0
                lse[b, h, i0 + r] = neg_inf


@nb.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _bwd_fast(gemm, q, kp, vp, do, lse, delta, tau, lengths, offset, causal, left, right, L, S,
              block_q, dq_part, dk, dv):
    """FA-2 backward, one pass: a work item (b, KV head, chunk t) owns the key blocks
    t, t + BWD_CHUNKS, ... and, for each, every query block that sees it: P = exp(Z - lse),
    dZ = P (dO V^T - D), dV_j += P^T dO, dK_j += dZ^T Q, dQ_partial[t] += dZ K_j (tau is applied
    to dK and dQ by the caller).
    Optimisation (one backward sweep): FA-2's separate dK/dV and dQ passes recompute S, P and dP
    twice (14 N^2 d FLOPs instead of 10, and twice the exponentials); here each tile is computed
    once and dQ goes to BWD_CHUNKS private partial sums (no atomics, deterministic)."""
    B, Hq = q.shape[0], q.shape[1]
    H, nkb, block_k = kp.shape[1], kp.shape[2], kp.shape[3]
    group = Hq // H
    T = dq_part.shape[0]
    for item in prange(B * H * T):
        _prefer_target_vector_width()
        b = item // (H * T)
        hk = (item // T) % H
        u = item % T
        t = u // 2 if u % 2 == 0 else T - 1 - u // 2  # causal load balance, as in the forward
        s = np.empty((block_q, block_k), dtype=q.dtype)
        dp = np.empty((block_q, block_k), dtype=q.dtype)
        overwrite = np.ones(2, dtype=q.dtype)  # gemm's [alpha, beta] = [1, 0]: C = AB
        overwrite[1] = 0.0
        accumulate = np.ones(2, dtype=q.dtype)  # [1, 1]: C += AB
        length = lengths[b]
        for jb in range(t, nkb, T):
            j0 = jb * block_k
            kb = kp[b, hk, jb]
            vb = vp[b, hk, jb]
            dkb = dk[b, hk, jb]
            dvb = dv[b, hk, jb]
            for h in range(hk * group, (hk + 1) * group):
                # the forward pass's query blocks, tile range and row groups (_fwd_fast): on
                # the forward's tiles (_run_backward) every logit comes from the same gemm call
                for i0 in range(0, L, block_q):
                    nr = min(L, i0 + block_q) - i0
                    lo_first, hi_first = _key_range(i0, L, S, offset, causal, left, right, length)
                    _, hi_last = _key_range(i0 + nr - 1, L, S, offset, causal, left, right, length)
                    if hi_last <= lo_first or lo_first >= j0 + block_k or hi_last <= j0:
                        continue  # the forward pass skips this tile: no row of the block sees it
                    rows = _group_rows(hi_first - j0, hi_last - j0, block_k, nr)
                    for g0 in range(i0, i0 + nr, rows):
                        g1 = min(i0 + nr, g0 + rows)
                        _, hi_group = _key_range(g1 - 1, L, S, offset, causal, left, right, length)
                        if hi_group <= j0:  # no row of the group sees a key of this tile
                            continue
                        _bwd_tile(gemm, q[b, h, g0:g1], do[b, h, g0:g1], kb, vb, lse[b, h, g0:g1],
                                  delta[b, h, g0:g1], tau, g0, j0,
                                  _tile_width(hi_group - j0, block_k), L, S, offset, causal,
                                  left, right, length, s, dp, overwrite, accumulate, dkb, dvb,
                                  dq_part[t, b, h, g0:g1])


@nb.njit(cache=True, inline="always", fastmath=_FASTMATH)
def _bwd_tile(gemm, Qb, DOb, kb, vb, lse_rows, delta_rows, tau, i0, j0, width, L, S, offset,
              causal, left, right, length, s, dp, overwrite, accumulate, dkb, dvb, dq_rows):
    """One backward tile: the query rows i0 ... i0 + len(Qb) against the first ``width`` keys
    of the key block at j0."""
    nr = Qb.shape[0]
    st = s[:nr, :width]
    dpt = dp[:nr, :width]
    _gemm(gemm, Qb, kb[:width], st, False, True, overwrite)  # Q_i K_j^T (Z / tau)
    _gemm(gemm, DOb, vb[:width], dpt, False, True, overwrite)  # dP = dO_i V_j^T
    for r in range(nr):
        lo, hi = _key_range(i0 + r, L, S, offset, causal, left, right, length)
        x = st[r]
        y = dpt[r]
        lr = lse_rows[r]
        if hi <= lo or lr == -np.inf:  # fully masked row: P = 0
            for j in range(width):
                x[j] = 0.0
                y[j] = 0.0
            continue
        _probs_and_dlogits(x, y, tau, lr, delta_rows[r])
        if j0 < lo or j0 + width > hi:
            _mask_row(x, j0, lo, hi, 0.0)
            _mask_row(y, j0, lo, hi, 0.0)
    # dV_j += P^T dO_i ; dK_j += dZ^T Q_i ; dQ_i += dZ K_j
    _gemm_add(gemm, st, DOb, dvb[:width], True, accumulate, _SUM_ROWS)
    _gemm_add(gemm, dpt, Qb, dkb[:width], True, accumulate, _SUM_ROWS)
    _gemm_add(gemm, dpt, kb[:width], dq_rows, False, accumulate, _SUM_KEYS)


# ---------------------------------------------------------------------------------------------
# tile sizes: a rule from the machine, or a short autotune stored on disk
# ---------------------------------------------------------------------------------------------
# B_q x B_k per direction and dtype. The defaults come from a rule (below); `tune_tile_sizes()`
# (or ATTENTION_REF_TILES=autotune, which tunes on first use) times a few candidates and stores
# the winner per machine and dtype in a JSON file (as Triton's autotune does), used from then on;
# ATTENTION_REF_TILES=BQxBK fixes them. `tile_sizes()` shows the choice and where it came from,
# `reset_tile_sizes()` forgets the stored ones.
_TILE_ENV = "ATTENTION_REF_TILES"
_CACHE_ENV = "ATTENTION_REF_CACHE_DIR"
_DIRECTIONS = ("forward", "backward")
_TILE_MEMO: dict[tuple[str, str], dict] = {}
_AUTOTUNE_SEQ_LEN = 2048  # N of the problem timed by the autotune on first use
# The candidates span what benchmarks/scan_tiles.py found fastest on the machines measured (256 x
# 512 or 256 x 1024 for the forward pass); the rule's own tiles are always timed too.
_AUTOTUNE_TILES = [(bq, bk) for bq in (64, 128, 256) for bk in (128, 256, 512, 1024)]


def _l2_bytes() -> int:
    """Per-core L2 cache size from Linux sysfs (1 MiB when it cannot be read)."""
    import glob

    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{index}/level") as f:
                level = f.read().strip()
            with open(f"{index}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        if level == "2" and size[:-1].isdigit():
            unit = {"K": 1024, "M": 1024**2}.get(size[-1], 1)
            return int(size[:-1]) * unit
    return 1024**2


def _target_cpu() -> tuple[str, str]:
    """What Numba compiles for: the LLVM CPU name and the widest vector ISA in its feature set
    (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` override the host)."""
    import llvmlite.binding as llvm
    from numba.core import config

    name = config.CPU_NAME or llvm.get_host_cpu_name()
    features = (config.CPU_FEATURES if config.CPU_FEATURES is not None
                else llvm.get_host_cpu_features().flatten())
    enabled = {f[1:] for f in features.split(",") if f.startswith("+")}
    if features == "":  # NUMBA_CPU_FEATURES="": the named CPU's own defaults
        enabled = {"avx512f"} if name in _AVX512_CPUS else ({"avx2"} if name in _AVX2_CPUS else set())
    isa = "avx512" if "avx512f" in enabled else ("avx2" if "avx2" in enabled else "sse")
    return name, isa


def _target_isa() -> dict:
    """_target_cpu() as a dict, with the BLAS kernel."""
    name, isa = _target_cpu()
    return {"llvm_cpu": name, "isa": isa, "blas": _blas_kernel()}


def _vector_bits() -> int:
    """The vector width the fast kernels' loops are compiled for: 512 bits where the target has
    AVX-512 and is not of the Skylake-SP family (the first AVX-512 server cores, whose clock
    drops under 512-bit code), else LLVM's own choice for the CPU (256 bits with AVX2 or on
    those cores)."""
    name, isa = _target_cpu()
    return 512 if isa == "avx512" and name not in _CLOCKED_DOWN_AVX512_CPUS else 256


# LLVM CPU names, for NUMBA_CPU_FEATURES="" (LLVM does not list a named CPU's default features)
_AVX2_CPUS = {"haswell", "broadwell", "skylake", "alderlake", "raptorlake", "znver1", "znver2",
              "znver3"}
_AVX512_CPUS = {"skylake-avx512", "cascadelake", "cooperlake", "icelake-client",
                "icelake-server", "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids",
                "graniterapids", "znver4", "znver5"}
_CLOCKED_DOWN_AVX512_CPUS = {"skylake-avx512", "cascadelake", "cooperlake"}


_BLAS_CHOICES = ("auto", "mkl", "openblas")
_BLAS: dict | None = None
# MKL's code paths, narrowest first, as MKL_Get_Version names them, and the vector ISA of
# _target_cpu each one matches
_MKL_PATHS = ("generic", "AVX", "AVX2", "AVX-512")
_ISA_OF_MKL_PATH = {"generic": "sse", "AVX": "sse", "AVX2": "avx2", "AVX-512": "avx512"}
_ISA_ORDER = ("sse", "avx2", "avx512")


def _mkl_keeps_up(mkl_path: str, isa: str) -> bool:
    """Whether MKL's code path is as wide as the vectors Numba compiles for (``isa``). Where it is
    narrower, MKL is not tuned for this CPU and SciPy's OpenBLAS, which picks its kernel for the
    CPU itself, is faster. Measured (forward tile products, one thread, GFLOP/s, float32 /
    float64): on an AMD EPYC Zen 5 VM MKL 2026.2 ran its generic path at 111 / 56 against
    OpenBLAS's SkylakeX kernel at 212 / 86; on an Intel Sapphire Rapids VM MKL's AVX-512 path at
    156 / 73 against 123 / 58 (benchmarks/results/blas_tiles*.json)."""
    return _ISA_ORDER.index(_ISA_OF_MKL_PATH[mkl_path]) >= _ISA_ORDER.index(isa)


def _mkl() -> dict | None:
    """Intel MKL from the ``mkl`` PyPI package (``pip install attention_ref[mkl]``), set to its
    sequential layer (the kernels call it from every Numba thread); None when not installed."""
    import ctypes
    import glob
    import sys
    from importlib import metadata

    try:  # the PyPI wheel lists its libraries; conda's mkl puts them in the environment's lib/
        files = [str(f.locate()) for f in metadata.distribution("mkl").files or []]
    except metadata.PackageNotFoundError:
        files = []
    paths = sorted(f for f in files if f.rsplit("/", 1)[-1].startswith("libmkl_rt.so"))
    paths += sorted(glob.glob(f"{sys.prefix}/lib/libmkl_rt.so*"))
    if not paths:
        return None
    lib = ctypes.CDLL(paths[0])
    # sequential before any other MKL call: no OpenMP runtime, one thread per calling thread
    lib.MKL_Set_Threading_Layer(1)

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int),
                    ("patch", ctypes.c_int), ("status", ctypes.c_char_p),
                    ("build", ctypes.c_char_p), ("processor", ctypes.c_char_p),
                    ("platform", ctypes.c_char_p)]

    version = Version()
    lib.MKL_Get_Version(ctypes.byref(version))
    processor = version.processor.decode()
    # MKL names the code path it dispatched to; on CPUs it has no path for (AMD's, for one) it
    # says "Intel(R) Architecture processors": its generic code
    path = next((name for name in _MKL_PATHS[:0:-1] if name in processor), _MKL_PATHS[0])
    # one_thread: the sequential layer never starts threads, so there is nothing to limit
    return {"name": f"mkl-{version.major}.{version.update}:{path}", "path": path, "library": lib,
            "one_thread": True,
            "float32": ctypes.cast(lib.sgemm_, ctypes.c_void_p).value,
            "float64": ctypes.cast(lib.dgemm_, ctypes.c_void_p).value}


def _package_blas(package: str, infos: list[dict]) -> dict | None:
    """threadpoolctl's record of the BLAS a package ships (``scipy.libs/``, ``numpy.libs/``, or
    inside the package), None when it has none of its own. By directory, not by file name:
    NumPy's wheel ships its OpenBLAS as ``libscipy_openblas64_*.so``."""
    import importlib.util
    import os

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    home = os.path.realpath(list(spec.submodule_search_locations)[0])
    for info in infos:
        where = os.path.realpath(os.path.dirname(str(info.get("filepath", ""))))
        inside = where in (home, home + ".libs") or where.startswith(home + os.sep)
        if info.get("user_api") == "blas" and inside:
            return info
    return None


def _openblas() -> dict:
    """SciPy's OpenBLAS (scipy.linalg.cython_blas), named by its kernel (threadpoolctl's
    "architecture", e.g. ``openblas:SkylakeX``)."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library threadpoolctl then names)
    from numba.extending import get_cython_function_address

    name = "openblas:unknown"
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pass
    else:
        lib = _package_blas("scipy", threadpool_info())
        if lib is not None:
            name = f"{lib.get('internal_api')}:{lib.get('architecture')}"
    return {"name": name, "one_thread": False,  # its thread pool is limited around each call
            "float32": get_cython_function_address("scipy.linalg.cython_blas", "sgemm"),
            "float64": get_cython_function_address("scipy.linalg.cython_blas", "dgemm")}


def _blas() -> dict:
    """The BLAS whose ?gemm the fast kernels call: ``ATTENTION_REF_BLAS`` = ``mkl``, ``openblas``
    or ``auto`` (the default: MKL when the ``mkl`` package is installed and its code path is as
    wide as the vectors Numba compiles for (_mkl_keeps_up), else SciPy's OpenBLAS). ``why`` says
    which rule chose it. Measured on a Sapphire Rapids VM (float32, the forward's 256 x 512 tile
    products): 6.8 ms with MKL against 8.2 ms with OpenBLAS for those of N = 2048, one thread, in
    one process (notebook 06); on an AMD EPYC Zen 5 VM, where MKL runs its generic path,
    OpenBLAS's tile products were twice as fast (benchmarks/results/blas_tiles_znver5.json)."""
    global _BLAS
    import os

    choice = os.environ.get("ATTENTION_REF_BLAS", "auto").strip().lower() or "auto"
    if choice not in _BLAS_CHOICES:
        raise ValueError(f"ATTENTION_REF_BLAS must be one of {', '.join(_BLAS_CHOICES)}; "
                         f"got {choice!r}")
    if _BLAS is None or _BLAS["choice"] != choice:
        found = _mkl() if choice in ("auto", "mkl") else None
        if found is None and choice == "mkl":
            raise ValueError("ATTENTION_REF_BLAS=mkl but the mkl package is not installed "
                             "(pip install mkl)")
        isa = _target_cpu()[1]
        if choice != "auto":
            why = f"ATTENTION_REF_BLAS={choice}"
        elif found is None:
            why = "auto: the mkl package is not installed, so SciPy's OpenBLAS"
        elif _mkl_keeps_up(found["path"], isa):
            why = f"auto: MKL's {found['path']} code matches the {isa} code Numba compiles"
        else:
            why = (f"auto: MKL runs its {found['path']} code here, narrower than the {isa} code "
                   f"Numba compiles, so SciPy's OpenBLAS")
            found = None
        _BLAS = dict(found or _openblas(), choice=choice, why=why)
    return _BLAS


def _blas_kernel(field: str = "name") -> str:
    """The BLAS the fast kernels call and its code path, e.g. ``openblas:SkylakeX`` or
    ``mkl-2026.2:AVX-512`` (``field="why"``: the rule that chose it)."""
    try:
        return _blas()[field]
    except ImportError:
        return "unknown"


def cpu_info() -> dict:
    """What the fast kernels run on here: ``cpu`` (model name), ``llvm_cpu`` and ``isa`` (the
    CPU and widest vector instructions Numba compiles for), ``blas`` (the BLAS library the tile
    products go to and its code path, e.g. ``mkl-2026.2:AVX-512`` or ``openblas:SkylakeX``;
    ``ATTENTION_REF_BLAS`` chooses), ``blas_why`` (the rule that chose it), ``vector_bits`` (the
    width of the vectors the kernels' loops are compiled for), ``l2_kib`` (L2 cache per core) and
    ``threads`` (Numba's thread count).
    Speed depends on all of them: quote them with any timing."""
    target = _target_isa()
    return {"cpu": _cpu_model(), "llvm_cpu": target["llvm_cpu"], "isa": target["isa"],
            "blas": target["blas"], "blas_why": _blas_kernel("why"), "vector_bits": _vector_bits(),
            "l2_kib": _l2_bytes() // 1024, "threads": nb.get_num_threads()}


# The rule's cache budget: a work item's working set may fill up to twice the per-core L2. The
# tile need not fit in L2 alone: the exp pass reads the logit tile row after row, so the part of
# it that spills to L3 streams back at L3's rate, while a taller tile shares each BLAS call's
# packing of K_j and V_j among more query rows. Measured on an AMD EPYC Zen 5 VM (1 MiB L2 per
# core; benchmarks/scan_tiles.py, float64 forward, N = 4096): 256 x 512 (1.8 MB) took 52.3 ms
# against 57.1 for 64 x 512, the largest tile that fits the L2 (SkylakeX OpenBLAS, AVX-512 code),
# and 81.0 against 86.2 ms with AVX2 code; on a Sapphire Rapids VM (2 MiB L2) the tiles are the
# same either way.
_L2_BUDGET = 2


def _tile_rule(dtype: np.dtype, l2: int, isa: str) -> tuple[int, int, str]:
    """The default tiles. B_k = 512 keys (PyTorch's CPU flash kernel splits keys by 512): long
    BLAS calls, few online-softmax rescalings; halved while even 64 query rows would not fit.
    B_q = the most query rows (<= 256) for which a thread's working set fits in _L2_BUDGET times
    the per-core L2: the logit tile (B_q x B_k), K_j and V_j (B_k x E each), Q_i and O_i (B_q x E),
    E = 64. Scans (benchmarks/scan_tiles.py; benchmarks/README.md) put this choice first or within
    2% of the fastest forward tile in float64 on a Sapphire Rapids and a Zen 5 VM, and within 11%
    in float32. The vector width (isa) does not enter: the BLAS kernel and the exp loop adapt to it.
    The backward pass runs on the same tiles (tile_sizes)."""
    item = np.dtype(dtype).itemsize
    E = 64
    budget = _L2_BUDGET * l2

    def working_set(bq: int, bk: int) -> int:
        return item * (bq * bk + 2 * bk * E + 2 * bq * E)

    bk = 512
    while bk > 128 and working_set(64, bk) > budget:
        bk //= 2
    bq = 256
    while bq > 32 and working_set(bq, bk) > budget:
        bq //= 2
    why = (f"rule: {bq} x {bk} is the largest tile whose working set "
           f"({working_set(bq, bk) // 1024} KiB) fits twice the {l2 // 1024} KiB L2 per core; {isa}")
    return bq, bk, why


def _machine_key(dtype: np.dtype) -> str:
    t = _target_isa()
    return f"{_cpu_model()} | {t['llvm_cpu']} {t['isa']} | {t['blas']} | {np.dtype(dtype).name}"


def _cache_file() -> str:
    import os

    base = os.environ.get(_CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "attention_ref")
    return os.path.join(base, "tiles.json")


def _read_cache() -> dict:
    import json

    try:
        with open(_cache_file()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(data: dict) -> None:
    import json
    import os

    path = _cache_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: concurrent processes never read half a file


def _parse_tiles_env(value: str) -> tuple[int, int] | None:
    try:
        bq, bk = (int(x) for x in value.lower().split("x"))
    except ValueError:
        return None
    if bq < 1 or bk < 32 or bk & (bk - 1):
        return None
    return bq, bk


def tile_sizes(dtype: Any = np.float32, direction: str = "forward") -> dict:
    """The tiles (B_q query rows x B_k keys) the fast kernels use on this machine, and why.

    Returns a dict with ``block_q``, ``block_k``, ``source`` (``"rule"``, ``"autotune"`` or
    ``"environment"``), ``reason`` and ``machine`` (the key the choice is stored under: CPU
    model, the CPU and vector ISA Numba compiles for, the BLAS kernel, the dtype). Precedence:
    ``ATTENTION_REF_TILES=BQxBK``; a stored autotune result for this machine and dtype
    (``tune_tile_sizes``, or ``ATTENTION_REF_TILES=autotune`` to tune on first use); the rule.
    The backward pass runs on the forward pass's tiles and row groups: it recomputes every logit
    in the same gemm call, so that each comes out as the same number in both passes (lse is taken
    at each row's largest logit as the forward pass rounded it, and a BLAS may round a logit
    differently with the rows that share its call); ``tile_sizes(dtype, "backward")`` says so.
    A call may use fewer query rows or keys than shown when the problem is small (so that every
    thread gets work) or short (no padding beyond the next power of two).
    """
    import os

    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    if direction == "backward":
        choice = tile_sizes(dt, "forward")
        choice["reason"] = ("the forward pass's tiles: the backward pass recomputes each logit in "
                            f"the forward's gemm call; {choice['reason']}")
        return choice
    env = os.environ.get(_TILE_ENV, "").strip()
    memo_key = (dt.name, os.environ.get("ATTENTION_REF_BLAS", ""))  # per BLAS too
    if memo_key in _TILE_MEMO and _TILE_MEMO[memo_key]["env"] == env:
        return dict(_TILE_MEMO[memo_key]["choice"])
    machine = _machine_key(dt)
    if env and env != "autotune":
        fixed = _parse_tiles_env(env)
        if fixed is None:
            raise ValueError(f"{_TILE_ENV} must be 'autotune' or 'BQxBK' with B_k a power of two "
                             f">= 32 (e.g. '128x512'), got {env!r}")
        choice = {"block_q": fixed[0], "block_k": fixed[1], "source": "environment",
                  "reason": f"{_TILE_ENV}={env}"}
    else:
        stored = _read_cache().get(machine, {}).get("tiles")
        if stored is None and env == "autotune":
            stored = tune_tile_sizes(dt, seq_len=_AUTOTUNE_SEQ_LEN)
        if stored is not None:
            choice = {"block_q": int(stored["block_q"]), "block_k": int(stored["block_k"]),
                      "source": "autotune",
                      "reason": f"autotuned {stored.get('when', '')}: {stored.get('summary', '')}"
                                f" (stored in {_cache_file()})"}
        else:
            isa = _target_isa()["isa"]
            bq, bk, why = _tile_rule(dt, _l2_bytes(), isa)
            choice = {"block_q": bq, "block_k": bk, "source": "rule", "reason": why}
    choice["machine"] = machine
    _TILE_MEMO[memo_key] = {"env": env, "choice": choice}
    return dict(choice)


def reset_tile_sizes() -> None:
    """Forget the autotuned tiles stored for this machine (all dtypes); the rule applies again."""
    data = _read_cache()
    mine = {_machine_key(dt) for dt in (np.float32, np.float64)}
    if any(key in data for key in mine):
        _write_cache({k: v for k, v in data.items() if k not in mine})
    _TILE_MEMO.clear()


def tune_tile_sizes(dtype: Any = np.float32, *, seq_len: int = 2048, repeats: int = 3) -> dict:
    """Time the candidate tiles on this machine and store the fastest.

    One problem of ``seq_len`` queries and keys, E = 64, with as many heads as Numba threads,
    no mask. The tiles serve both passes, so each candidate (and the rule's choice) is timed as a
    forward and a backward call, ``repeats`` times after one warm-up round (best time of each
    kept), the candidates interleaved round by round; the fastest sum wins. A few seconds per
    dtype once the kernels are compiled. Returns what is stored: ``block_q``, ``block_k``, ``ms``
    (forward + backward), ``forward_ms``, ``backward_ms``, ``rule_ms`` (the rule's tiles) and the
    four fastest in ``summary``.
    """
    import datetime
    import os
    import time

    dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    heads = max(1, nb.get_num_threads())
    q, k, v, do = (rng.standard_normal((heads, seq_len, 64)).astype(dt) for _ in range(4))
    rule = _tile_rule(dt, _l2_bytes(), _target_isa()["isa"])[:2]
    candidates = list(dict.fromkeys([*_AUTOTUNE_TILES, rule]))
    forward = dict.fromkeys(candidates, math.inf)
    backward = dict.fromkeys(candidates, math.inf)
    saved = os.environ.get(_TILE_ENV)
    try:
        # interleaved, the order reversed every other round: a slow spell of the machine (another
        # process, a frequency change) then does not fall on a few candidates only
        for round_ in range(repeats + 1):
            for tiles in candidates if round_ % 2 == 0 else candidates[::-1]:
                os.environ[_TILE_ENV] = "{}x{}".format(*tiles)
                t0 = time.perf_counter()
                out, lse = numba_flash_forward(q, k, v)
                t1 = time.perf_counter()
                numba_flash_backward(q, k, v, out, lse, do)
                t2 = time.perf_counter()
                if round_ > 0:  # round 0 warms every candidate up (pads, scratch, caches)
                    forward[tiles] = min(forward[tiles], 1e3 * (t1 - t0))
                    backward[tiles] = min(backward[tiles], 1e3 * (t2 - t1))
    finally:
        if saved is None:
            os.environ.pop(_TILE_ENV, None)
        else:
            os.environ[_TILE_ENV] = saved
        _TILE_MEMO.clear()
    total = {tiles: forward[tiles] + backward[tiles] for tiles in candidates}
    ranked = sorted(total, key=total.get)
    bq, bk = ranked[0]
    result = {
        "block_q": bq, "block_k": bk, "ms": total[ranked[0]], "forward_ms": forward[ranked[0]],
        "backward_ms": backward[ranked[0]], "rule_ms": total[rule], "seq_len": seq_len,
        "heads": heads, "when": datetime.date.today().isoformat(),
        "summary": ("forward + backward: " + ", ".join(f"{a}x{b} {total[a, b]:.1f} ms"
                                                       for a, b in ranked[:4])
                    + f"; the rule's {rule[0]}x{rule[1]} {total[rule]:.1f} ms"),
    }
    data = _read_cache()
    data[_machine_key(dt)] = {"tiles": result}
    _write_cache(data)
    return result


def _call_tiles(dtype: np.dtype, heads: int, L: int, S: int) -> tuple[int, int]:
    """The machine's tiles, shrunk for small problems: B_k no wider than S rounded up to a power
    of two (>= 32), B_q halved (down to 16) until every Numba thread has about four work items of
    the forward pass. The backward pass takes the same tiles, so that it groups the rows as the
    forward pass did."""
    choice = tile_sizes(dtype)
    bq, bk = choice["block_q"], choice["block_k"]
    while bk > 32 and bk // 2 >= S:
        bk //= 2
    # (nb.get_num_threads() costs up to 0.05 ms right after a kernel call: asked only when even
    # the most threads Numba may run, NUMBA_NUM_THREADS, could lack work)
    if heads * -(-L // bq) < 4 * nb.config.NUMBA_NUM_THREADS:
        want = 4 * nb.get_num_threads()
        while bq > 16 and heads * -(-L // bq) < want:
            bq //= 2
    return bq, bk


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


def _single_threaded_blas(blas: dict | None = None):
    """Context in which BLAS runs on one thread: the fast tier calls gemm from every Numba
    thread, and a multi-threaded BLAS inside them spins on the same cores.
    Optimisation (single-threaded BLAS inside the kernels): measured 83 -> 127 GFLOP/s of CPU
    time on a Zen 5 VM (float32 forward, N = 4096, one Numba thread, OpenBLAS with 2 vs 1 threads).
    Uses threadpoolctl when installed; otherwise a no-op. When ``blas`` (the kernels' library,
    ``_blas()``) already runs on one thread (MKL, loaded with its sequential layer) there is
    nothing to limit, and skipping threadpoolctl saves 0.03-0.15 ms per call (entering and leaving its limit, measured
    on a Sapphire Rapids VM; about 1% of a 4096-token forward pass)."""
    global _BLAS_CONTROLLER
    if blas is not None and blas["one_thread"]:
        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _BLAS_CONTROLLER = False
        else:
            # Without MKL the kernels call SciPy's BLAS (scipy.linalg.cython_blas), which was
            # loaded on the first call into a kernel, i.e. after this controller would otherwise
            # be built: load it first, or the limit never reaches the library the kernels use
            # (Zen 3 VM, N = 2048, E = 128: 78-120 ms per first-process call instead of 28-33 ms).
            import scipy.linalg.cython_blas  # noqa: F401

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
    """The kernels on packed float32/float64 arrays q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev)
    with L, S, E, B > 0 -> out (B, H, L, Ev), lse (B, H, L)."""
    B, Hq, L, E = q.shape
    S, Ev, dtype = k.shape[2], v.shape[3], q.dtype
    offset, left, right = band  # causal is folded into right: the kernels' causal flag stays False
    args = (lengths, offset, False, left, right)
    out = np.empty((B, Hq, L, Ev), dtype=dtype)
    lse = np.empty((B, Hq, L), dtype=dtype)
    if kernel == "readable":
        _fwd_readable(q, k, v, scale, *args, out, lse)
        return out, lse
    block_q, block_k = _call_tiles(dtype, B * Hq, L, S)
    nkb = -(-S // block_k)
    # The kernel's online softmax keeps the raw logits q.k and applies tau inside e^(tau (Z - m)):
    # the difference Z - m is exact near the maximum, so large logits lose no precision to the
    # scale (folding tau log2(e) into Q cost up to 5x NumPy's gradient error with amplified
    # logits). A negative scale flips the sign of Q; a zero scale makes every logit 0.
    sign = 1.0 if scale > 0 else (-1.0 if scale < 0 else 0.0)
    qe = q if sign == 1.0 else np.ascontiguousarray(q * dtype.type(sign))
    tau = abs(scale) if sign != 0.0 else 1.0
    kp = _pad_rows(k, nkb * block_k).reshape(B, -1, nkb, block_k, E)
    vp = _pad_rows(v, nkb * block_k).reshape(B, -1, nkb, block_k, Ev)
    blas = _blas()
    with _single_threaded_blas(blas):
        _fwd_fast(blas[dtype.name], qe, kp, vp, dtype.type(tau), *args, L, S, block_q, out, lse)
    return out, lse


def _run_backward(q, k, v, o, lse, do, scale, lengths, band, kernel):
    """The backward kernels on packed arrays (as _run_forward, plus o, do (B, H, L, Ev) and
    lse (B, H, L)) -> dq (B, H, L, E), dk (B, Hkv, S, E), dv (B, Hkv, S, Ev)."""
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
    blas = _blas()
    # the forward pass's tiles, and _bwd_fast groups rows as _fwd_fast does: every logit is
    # recomputed in the same gemm call as in the forward pass, so it is the same float32 number
    # there, as lse needs. A BLAS may round a logit differently with the rows that share its call:
    # OpenBLAS 0.3.30's Haswell kernel (AVX2 CPUs) changed 2-17% of a product's logits when its
    # rows went in parts, and its SkylakeX kernel 3-5% of those of 100-128 keys (100 rows against
    # parts of 32, 203 against parts of 64), on a Zen 5 VM. On tiles of its own the backward's
    # float32 dV for amplified logits (q, k x 8) then had up to 2.5-4.7x the error of NumPy's tiles
    # (L = S = 100 with the rule's tiles: 3.2x); on the forward's, 1.0x.
    block_q, block_k = _call_tiles(dtype, B * Hq, L, S)
    nkb = -(-S // block_k)
    kp = _pad_rows(k, nkb * block_k).reshape(B, H, nkb, block_k, E)
    vp = _pad_rows(v, nkb * block_k).reshape(B, H, nkb, block_k, Ev)
    dq_part = np.zeros((BWD_CHUNKS, B, Hq, L, E), dtype=dtype)
    dk = np.zeros((B, H, nkb, block_k, E), dtype=dtype)
    dv = np.zeros((B, H, nkb, block_k, Ev), dtype=dtype)
    with _single_threaded_blas(blas):
        _bwd_fast(blas[dtype.name], q, kp, vp, do, lse, delta, dtype.type(scale), *args, L, S,
                  block_q, dq_part, dk, dv)
    # dQ = tau sum_t dQ_t (fixed order); dK = tau dZ^T Q
    dq = dq_part.sum(axis=0) * dtype.type(scale)
    return dq, dk.reshape(B, H, -1, E)[:, :, :S] * dtype.type(scale), dv.reshape(B, H, -1, Ev)[:, :, :S]


def _numpy_cores_inputs(q, k, v, lengths):
    """For the NumPy cores: key/value heads repeated for GQA, the key lengths as a mask (B, Hq, L, S)."""
    return attention_arrays(q, k, v, np.arange(k.shape[2]) < lengths[:, None, None, None])[1:]


def _numpy_heads(heads, q, k, v, out, lse, scale, band, lengths):
    """out[b, h], lse[b, h] for the heads (b, h) from the NumPy core, so that this backend answers
    exactly what the NumPy one answers (NaN rows included)."""
    if len(heads) == 0:  # the common case: no import statement to run (0.02 ms after a kernel call)
        return out, lse
    from .flash import forward_fa2

    group = q.shape[1] // k.shape[1]
    for b, h in heads:
        kv_head = (slice(b, b + 1), slice(h // group, h // group + 1))
        k_one, v_one, mask = _numpy_cores_inputs(q[b:b + 1, h:h + 1], k[kv_head], v[kv_head], lengths[b:b + 1])
        o_one, lse_one = forward_fa2(q[b:b + 1, h:h + 1], k_one, v_one, mask, scale, band, 64, 64)
        out[b, h], lse[b, h] = o_one[0, 0], lse_one[0, 0]
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
        not_finite = _heads_whose_logits_may_not_be_finite(q, k, lengths, float(scale))
        out, lse = _numpy_heads(not_finite, q, k, v, *_run_forward(q, k, v, scale, lengths, band, kernel),
                                scale, band, lengths)
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

    Shapes: ``query (..., H, L, E)``, ``key (..., Hkv, S, E)``, ``value (..., Hkv, S, Ev)``
    (also 2-D ``(L, E)``); NumPy arrays of one floating dtype (float16 runs in float32).

    Computes O = softmax(τ Q Kᵀ + Δ) V one query block at a time with the online softmax: for
    each visible key block m_new = max(m, rowmax Z), P̃ = e^{Z − m_new}, ℓ = e^{m − m_new} ℓ +
    rowsum P̃, O = diag(e^{m − m_new}) O + P̃ V_j; at the end O = diag(ℓ)⁻¹ O and λ = m + log ℓ.

    ``is_causal`` / ``window = (left, right)`` (``None`` = unbounded) are aligned by
    ``causal_alignment`` (``"top_left"`` or ``"bottom_right"``); ``key_lengths`` (ints, shape
    ``query.shape[:-3]`` or broadcastable) masks keys ``j >= key_lengths[b]``; ``enable_gqa`` lets
    H be a multiple of Hkv. ``kernel="readable"`` runs the loop-for-loop tier.

    Returns ``(out, lse)``: O (..., H, L, Ev) and λ (..., H, L); rows whose keys are all masked
    give O = 0 and λ = −∞, rows with a NaN logit NaN.
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

    Shapes as :func:`numba_flash_forward`, plus ``out`` = O (..., H, L, Ev) and ``lse`` = λ
    (..., H, L) from the forward pass and ``grad_out`` = dO (..., H, L, Ev).

    D = rowsum(dO ∘ O); for every visible tile P = e^{τ Q_i K_jᵀ − λ_i}, dV_j += Pᵀ dO_i,
    dZ = P ∘ (dO_i V_jᵀ − D_i), dQ_i += τ dZ K_j, dK_j += τ dZᵀ Q_i. With GQA the gradients of the
    query heads sharing a key/value head are summed.

    Returns ``(dq (..., H, L, E), dk (..., Hkv, S, E), dv (..., Hkv, S, Ev))``; fully masked rows
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
