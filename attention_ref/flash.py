"""Tiled FlashAttention in plain array code: FA-1 and FA-2 forward, backward by recomputation.

FlashAttention (Dao et al. 2022, arXiv:2205.14135) and FlashAttention-2 (Dao 2023,
arXiv:2307.08691) compute exactly ``softmax(scale · Q Kᵀ + mask) V`` without ever holding the
L × S matrix of logits: they cut Q into row blocks and K, V into column blocks ("tiles") and merge
the partial softmaxes with the online-softmax rule (Milakov & Gimelshein 2018)

    m = max(m₁, m₂),   ℓ = e^{m₁ − m} ℓ₁ + e^{m₂ − m} ℓ₂.

Everything here is namespace-neutral (NumPy, CuPy, array-api-strict): the math asks its inputs for
their namespace and uses array-API functions only. Loops run over tiles, never over elements.

Public functions
----------------
``flash_attention``            forward pass, FA-1 (key/value blocks outer) or FA-2 (query blocks
                               outer), optional logsumexp and a tile report
``flash_attention_backward``   dQ, dK, dV by recomputing P tile by tile from the logsumexp
``attention_backward``         the plain backward pass of the materialised attention, to compare with
``merge_attention_partials``   combine (O_s, lse_s) computed over separate key chunks
``attention_weights_from_lse`` rebuild the full weights P from the saved logsumexp (for pictures)
``expand_block_mask``          a block mask blown up to an element mask (for references and pictures)
``TileStats``                  which tiles were computed, masked, or skipped
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from .backends import to_numpy
from .dot_product import _check_sdpa_inputs

Array = Any  # an array of any array-API namespace (NumPy, CuPy, array-api-strict)

__all__ = [
    "TileStats",
    "attention_backward",
    "attention_weights_from_lse",
    "expand_block_mask",
    "flash_attention",
    "flash_attention_backward",
    "merge_attention_partials",
]

_ALIGNMENTS = ("top_left", "bottom_right")
_ALGORITHMS = ("fa1", "fa2")
_BACKENDS = ("numpy", "numba")


# ---------------------------------------------------------------------------------------------
# Small private helpers: input checks, the structure of causal / window masks, tile masks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Structure:
    """Causal / sliding-window masking as arithmetic on positions (never an L × S array).

    Query row ``i`` sits at position ``p = i + offset`` (offset 0 top-left, S − L bottom-right) and
    sees the keys ``p − left ≤ j ≤ p + right``; ``None`` means unbounded on that side.
    """

    offset: int
    left: int | None
    right: int | None

    @property
    def trivial(self) -> bool:
        return self.left is None and self.right is None

    def tile_state(self, i0: int, i1: int, j0: int, j1: int) -> str:
        """'full' (no entry masked), 'partial' or 'skip' (every entry masked) for rows [i0, i1), cols [j0, j1)."""
        # lo(i) = i + offset − left and hi(i) = i + offset + right both grow with i, so the first
        # and last rows of the tile decide.
        if self.trivial:
            return "full"
        lo_first = -math.inf if self.left is None else i0 + self.offset - self.left
        lo_last = -math.inf if self.left is None else (i1 - 1) + self.offset - self.left
        hi_first = math.inf if self.right is None else i0 + self.offset + self.right
        hi_last = math.inf if self.right is None else (i1 - 1) + self.offset + self.right
        if hi_last < j0 or lo_first > j1 - 1:
            return "skip"
        if lo_last <= j0 and hi_first >= j1 - 1:
            return "full"
        return "partial"

    def tile_mask(self, xp, i0: int, i1: int, j0: int, j1: int, device=None):
        """Boolean (i1 − i0, j1 − j0) tile of the structural mask, True = attend."""
        rows = xp.reshape(xp.arange(i0, i1, device=device), (i1 - i0, 1)) + self.offset
        cols = xp.reshape(xp.arange(j0, j1, device=device), (1, j1 - j0))
        allowed = xp.ones((i1 - i0, j1 - j0), dtype=xp.bool, device=device)
        if self.left is not None:
            allowed = allowed & (cols >= rows - self.left)
        if self.right is not None:
            allowed = allowed & (cols <= rows + self.right)
        return allowed


def _structure(
    L: int, S: int, is_causal: bool, window: tuple[int | None, int | None] | None, alignment: str
) -> _Structure:
    if alignment not in _ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {_ALIGNMENTS}, got {alignment!r}")
    offset = 0 if alignment == "top_left" else S - L
    left: int | None = None
    right: int | None = 0 if is_causal else None
    if window is not None:
        if len(window) != 2:
            raise ValueError(f"window must be a pair (left, right), got {window!r}")
        w_left, w_right = window
        for name, w in (("left", w_left), ("right", w_right)):
            if w is not None and (not isinstance(w, int) or w < 0):
                raise ValueError(f"window {name} must be a non-negative int or None, got {w!r}")
        left = w_left
        if w_right is not None:
            right = w_right if right is None else min(right, w_right)
    return _Structure(offset, left, right)


def _broadcast_shapes(*shapes: tuple[int, ...], what: str) -> tuple[int, ...]:
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(ndim):
        sizes = {s[axis - ndim + len(s)] for s in shapes if axis - ndim + len(s) >= 0}
        sizes.discard(1)
        if len(sizes) > 1:
            raise ValueError(f"{what}: leading (batch, head) dims do not broadcast: {shapes}")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _compute_dtype(xp, x, name: str):
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating array, got dtype {x.dtype}")
    # float16 (NumPy / CuPy only) accumulates in float32, as every flash kernel does.
    if getattr(xp, "float16", None) is not None and x.dtype == xp.float16:
        return xp.float32
    return x.dtype


@dataclass
class _Prepared:
    xp: Any
    q: Any  # (*batch, L, E) in the compute dtype
    k: Any  # (*batch, S, E), KV heads already repeated for GQA
    v: Any  # (*batch, S, Ev)
    mask: Any  # None or (*batch', L|1, S|1), ndim = len(batch) + 2
    out_dtype: Any
    dtype: Any
    L: int
    S: int
    gqa_groups: int


def _prepare(query, key, value, attn_mask, enable_gqa: bool) -> _Prepared:
    xp = array_namespace(query, key, value, *(() if attn_mask is None else (attn_mask,)))
    # The same input contract as stage 02's scaled_dot_product_attention (shapes, ranks, dtypes,
    # GQA head counts, a mask that broadcasts without enlarging the output); is_causal may be
    # combined with attn_mask here, so it is not passed on.
    _check_sdpa_inputs(xp, query, key, value, attn_mask, 0.0, False, enable_gqa, "zero")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (..., length, features), got {x.shape}")
    if query.dtype != key.dtype or query.dtype != value.dtype:
        raise TypeError(
            f"query, key, value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    dtype = _compute_dtype(xp, query, "query")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key need the same feature size E: query {query.shape}, key {key.shape}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value need the same length S: key {key.shape}, value {value.shape}"
        )
    L, S = query.shape[-2], key.shape[-2]
    groups = 1
    if query.ndim >= 3 and key.ndim >= 3 and query.shape[-3] != key.shape[-3] and key.shape[-3] != 1:
        hq, hk = query.shape[-3], key.shape[-3]
        if value.shape[-3] != hk:
            raise ValueError(f"key and value need the same heads: {key.shape}, {value.shape}")
        if not enable_gqa or hq % hk != 0:
            raise ValueError(
                f"query has {hq} heads and key/value {hk}: pass enable_gqa=True with a head count "
                f"that divides the query's (query {query.shape}, key {key.shape})"
            )
        # GQA (Ainslie et al. 2023): query head n uses KV head n // (Hq / H).
        groups = hq // hk
        index = xp.arange(hq, device=key.device) // groups
        key = xp.take(key, index, axis=-3)
        value = xp.take(value, index, axis=-3)
    shapes = [query.shape[:-2], key.shape[:-2], value.shape[:-2]]
    if attn_mask is not None:
        if attn_mask.ndim == 0:
            raise ValueError(f"attn_mask must be at least 1-D, got shape {attn_mask.shape}")
        mshape = (1,) * max(0, 2 - attn_mask.ndim) + tuple(attn_mask.shape)
        if mshape[-2] not in (1, L) or mshape[-1] not in (1, S):
            raise ValueError(
                f"attn_mask of shape {attn_mask.shape} does not broadcast to (..., L={L}, S={S})"
            )
        shapes.append(mshape[:-2])
    batch = _broadcast_shapes(*shapes, what=f"query {query.shape}, key {key.shape}, value "
                              f"{value.shape}, attn_mask {None if attn_mask is None else attn_mask.shape}")
    q = xp.broadcast_to(xp.astype(query, dtype), batch + (L, query.shape[-1]))
    k = xp.broadcast_to(xp.astype(key, dtype), batch + (S, key.shape[-1]))
    v = xp.broadcast_to(xp.astype(value, dtype), batch + (S, value.shape[-1]))
    mask = None
    if attn_mask is not None:
        mask = xp.reshape(attn_mask, (1,) * (len(batch) + 2 - attn_mask.ndim) + tuple(attn_mask.shape))
        if not xp.isdtype(mask.dtype, "bool"):
            mask = xp.astype(mask, dtype)
    return _Prepared(xp, q, k, v, mask, query.dtype, dtype, L, S, groups)


def _scores(p: _Prepared, st: _Structure, q_i, k_j, scale: float, i0, i1, j0, j1, state: str):
    """S_ij = τ Q_i K_jᵀ with the user mask and the causal / window structure applied (−∞ = masked)."""
    xp = p.xp
    s = xp.matmul(q_i, xp.matrix_transpose(k_j)) * scale
    allowed = None
    if p.mask is not None:
        rows = slice(i0, i1) if p.mask.shape[-2] != 1 else slice(None)
        cols = slice(j0, j1) if p.mask.shape[-1] != 1 else slice(None)
        m = p.mask[..., rows, cols]
        if xp.isdtype(m.dtype, "bool"):
            allowed = m
        else:
            s = s + m  # float mask: added to the logits
    if state == "partial":
        t = st.tile_mask(xp, i0, i1, j0, j1, device=s.device)
        allowed = t if allowed is None else (allowed & t)
    if allowed is not None:
        s = xp.where(allowed, s, xp.asarray(-math.inf, dtype=s.dtype, device=s.device))
    return s


def _safe(xp, m):
    """Replace −∞ (rows with nothing seen yet) by 0 so that exp(x − m) never evaluates −∞ − (−∞)."""
    return xp.where(xp.isinf(m), xp.zeros_like(m), m)


def _plan(p: _Prepared, st: _Structure, block_q: int, block_k: int, block_mask) -> list[list[str]]:
    """The state of every tile: 'full', 'partial', 'skip' (causal/window) or 'block' (block mask)."""
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    n_q, n_k = -(-p.L // block_q), -(-p.S // block_k)
    if block_mask is not None:
        # The block mask is structure, like the causal pattern: read it on the host once, not
        # one device-to-host copy per tile.
        block_mask = to_numpy(block_mask)
    if block_mask is not None and tuple(block_mask.shape) != (n_q, n_k):
        raise ValueError(
            f"block_mask must have shape (ceil(L/block_q), ceil(S/block_k)) = ({n_q}, {n_k}) for "
            f"L={p.L}, S={p.S}, block_q={block_q}, block_k={block_k}; got {tuple(block_mask.shape)}"
        )
    plan = []
    for bi in range(n_q):
        i0, i1 = bi * block_q, min(p.L, (bi + 1) * block_q)
        row = []
        for bj in range(n_k):
            j0, j1 = bj * block_k, min(p.S, (bj + 1) * block_k)
            state = st.tile_state(i0, i1, j0, j1)
            if state != "skip" and block_mask is not None and not bool(block_mask[bi, bj]):
                state = "block"
            row.append(state)
        plan.append(row)
    return plan


@dataclass(frozen=True)
class TileStats:
    """Which tiles a tiled pass computed and which it skipped.

    ``tile_map[bi][bj]`` is ``'full'`` (computed, no masking needed inside), ``'partial'``
    (computed, the causal/window mask applied inside the tile), ``'skip'`` (wholly masked by
    causality or the window: not computed) or ``'block'`` (switched off by the block mask).
    """

    block_q: int
    block_k: int
    tile_map: tuple[tuple[str, ...], ...]

    def count(self, state: str) -> int:
        """How many tiles are in ``state`` ("full", "partial", "skip" or "block")."""
        return sum(row.count(state) for row in self.tile_map)

    @property
    def total(self) -> int:
        return sum(len(row) for row in self.tile_map)

    @property
    def computed(self) -> int:
        return self.count("full") + self.count("partial")

    @property
    def skipped(self) -> int:
        return self.count("skip") + self.count("block")

    def summary(self) -> str:
        """One line: tiles computed (full / partially masked) and skipped."""
        return (
            f"{self.computed} of {self.total} tiles computed ({self.count('full')} full, "
            f"{self.count('partial')} partially masked); {self.skipped} skipped "
            f"({self.count('skip')} by causality/window, {self.count('block')} by the block mask)"
        )


def _check_common(algorithm: str, backend: str):
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


# ---------------------------------------------------------------------------------------------
# Forward: FA-1 and FA-2 side by side
# ---------------------------------------------------------------------------------------------


def _forward_fa1(p: _Prepared, st: _Structure, plan, scale: float, block_q: int, block_k: int):
    """FlashAttention-1, Algorithm 1 (with τ and MASK from Algorithm 2): key/value blocks outer.

    O, ℓ, m live in "HBM" (here: Python lists of row blocks) and are read and rewritten at every
    step of the inner loop; O is kept normalised (divided by ℓ) after every step.
    """
    xp, dt, dev = p.xp, p.dtype, p.q.device
    batch, Ev = p.q.shape[:-2], p.v.shape[-1]
    q_bounds = [(i0, min(p.L, i0 + block_q)) for i0 in range(0, p.L, block_q)]
    k_bounds = [(j0, min(p.S, j0 + block_k)) for j0 in range(0, p.S, block_k)]
    # line 2: initialise O = (0)_{N×d}, ℓ = (0)_N, m = (−∞)_N in HBM; lines 3–5: divide into blocks
    O = [xp.zeros(batch + (i1 - i0, Ev), dtype=dt, device=dev) for i0, i1 in q_bounds]
    ell = [xp.zeros(batch + (i1 - i0, 1), dtype=dt, device=dev) for i0, i1 in q_bounds]
    m = [xp.full(batch + (i1 - i0, 1), -math.inf, dtype=dt, device=dev) for i0, i1 in q_bounds]
    for bj, (j0, j1) in enumerate(k_bounds):  # line 6: for 1 ≤ j ≤ T_c
        k_j, v_j = p.k[..., j0:j1, :], p.v[..., j0:j1, :]  # line 7: load K_j, V_j
        for bi, (i0, i1) in enumerate(q_bounds):  # line 8: for 1 ≤ i ≤ T_r
            if plan[bi][bj] in ("skip", "block"):
                continue  # a tile wholly masked contributes e^{−∞} = 0: not computed at all
            q_i = p.q[..., i0:i1, :]  # line 9: load Q_i, O_i, ℓ_i, m_i
            s = _scores(p, st, q_i, k_j, scale, i0, i1, j0, j1, plan[bi][bj])  # line 10: S_ij
            # line 11: m̃_ij = rowmax(S_ij), P̃_ij = exp(S_ij − m̃_ij), ℓ̃_ij = rowsum(P̃_ij)
            m_tile = xp.max(s, axis=-1, keepdims=True)
            p_tile = xp.exp(s - _safe(xp, m_tile))
            l_tile = xp.sum(p_tile, axis=-1, keepdims=True)
            # line 12: m_new = max(m_i, m̃_ij), ℓ_new = e^{m_i − m_new} ℓ_i + e^{m̃_ij − m_new} ℓ̃_ij
            m_new = xp.maximum(m[bi], m_tile)
            alpha = xp.exp(m[bi] - _safe(xp, m_new))
            beta = xp.exp(m_tile - _safe(xp, m_new))
            l_new = alpha * ell[bi] + beta * l_tile
            # line 13: O_i ← diag(ℓ_new)⁻¹ (diag(ℓ_i) e^{m_i − m_new} O_i + e^{m̃_ij − m_new} P̃_ij V_j)
            numer = (ell[bi] * alpha) * O[bi] + beta * xp.matmul(p_tile, v_j)
            safe_l = xp.where(l_new > 0, l_new, xp.ones_like(l_new))
            O[bi] = xp.where(l_new > 0, numer / safe_l, xp.zeros_like(numer))
            ell[bi], m[bi] = l_new, m_new  # line 14: write ℓ_i ← ℓ_new, m_i ← m_new
    # (not in Algorithm 1) the logsumexp L = m + log ℓ that the backward pass of FA-2 keeps
    lse = []
    for bi in range(len(q_bounds)):
        seen = ell[bi] > 0
        lse.append(xp.where(seen, m[bi] + xp.log(xp.where(seen, ell[bi], xp.ones_like(ell[bi]))),
                            xp.full_like(ell[bi], -math.inf)))
    return O, lse


def _forward_fa2(p: _Prepared, st: _Structure, plan, scale: float, block_q: int, block_k: int):
    """FlashAttention-2, Algorithm 1 of Dao (2023): query blocks outer, key/value blocks inner.

    O_i, ℓ_i, m_i stay on chip for the whole inner loop; O_i is kept *unscaled* and divided by ℓ
    once at the end (line 12); only L_i = m_i + log ℓ_i is written out (line 13).
    """
    xp, dt, dev = p.xp, p.dtype, p.q.device
    batch, Ev = p.q.shape[:-2], p.v.shape[-1]
    O, lse = [], []
    for bi, i0 in enumerate(range(0, p.L, block_q)):  # line 3: for 1 ≤ i ≤ T_r
        i1 = min(p.L, i0 + block_q)
        q_i = p.q[..., i0:i1, :]  # line 4: load Q_i
        # line 5: on chip, O_i⁽⁰⁾ = (0), ℓ_i⁽⁰⁾ = (0), m_i⁽⁰⁾ = (−∞)
        o_i = xp.zeros(batch + (i1 - i0, Ev), dtype=dt, device=dev)
        l_i = xp.zeros(batch + (i1 - i0, 1), dtype=dt, device=dev)
        m_i = xp.full(batch + (i1 - i0, 1), -math.inf, dtype=dt, device=dev)
        for bj, j0 in enumerate(range(0, p.S, block_k)):  # line 6: for 1 ≤ j ≤ T_c
            if plan[bi][bj] in ("skip", "block"):
                continue  # FA-2 §3.1.1: tiles wholly above the causal diagonal are skipped
            j1 = min(p.S, j0 + block_k)
            k_j, v_j = p.k[..., j0:j1, :], p.v[..., j0:j1, :]  # line 7: load K_j, V_j
            s = _scores(p, st, q_i, k_j, scale, i0, i1, j0, j1, plan[bi][bj])  # line 8: S_i⁽ʲ⁾
            # line 9: m⁽ʲ⁾ = max(m⁽ʲ⁻¹⁾, rowmax S), P̃ = exp(S − m⁽ʲ⁾), ℓ⁽ʲ⁾ = e^{m⁽ʲ⁻¹⁾−m⁽ʲ⁾} ℓ⁽ʲ⁻¹⁾ + rowsum P̃
            m_new = xp.maximum(m_i, xp.max(s, axis=-1, keepdims=True))
            m_safe = _safe(xp, m_new)
            p_tile = xp.exp(s - m_safe)
            alpha = xp.exp(m_i - m_safe)
            l_i = alpha * l_i + xp.sum(p_tile, axis=-1, keepdims=True)
            # line 10: O⁽ʲ⁾ = diag(e^{m⁽ʲ⁻¹⁾ − m⁽ʲ⁾}) O⁽ʲ⁻¹⁾ + P̃ V_j
            # (the paper prints diag(·)⁻¹ here: a known typo; the rescale factor is not inverted)
            o_i = alpha * o_i + xp.matmul(p_tile, v_j)
            m_i = m_new
        seen = l_i > 0  # rows with every key masked have ℓ = 0: output 0 and L = −∞
        safe_l = xp.where(seen, l_i, xp.ones_like(l_i))
        O.append(xp.where(seen, o_i / safe_l, xp.zeros_like(o_i)))  # line 12: O_i = diag(ℓ)⁻¹ O_i
        lse.append(xp.where(seen, m_i + xp.log(safe_l), xp.full_like(l_i, -math.inf)))  # line 13
    return O, lse  # lines 14–15: write O_i, L_i


def flash_attention(
    query: Array,
    key: Array,
    value: Array,
    attn_mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    block_q: int = 64,
    block_k: int = 64,
    window: tuple[int | None, int | None] | None = None,
    causal_alignment: str = "top_left",
    algorithm: str = "fa2",
    block_mask: Array | None = None,
    return_lse: bool = False,
    return_stats: bool = False,
    backend: str = "numpy",
) -> Array | tuple[Any, ...]:
    """Exact attention softmax(τ Q Kᵀ + mask) V computed tile by tile (FlashAttention).

    Shapes: ``query (..., Hq, L, E)``, ``key (..., H, S, E)``, ``value (..., H, S, Ev)`` →
    ``out (..., Hq, L, Ev)``; inputs are checked exactly as by ``scaled_dot_product_attention``, whose
    semantics this follows (boolean ``attn_mask`` True = attend, a float mask is added to the
    logits, τ = ``scale`` or 1/√E, GQA: query head n uses KV head n // (Hq/H)). A row whose keys are
    all masked returns 0 and logsumexp −∞.

    The L × S matrix is never formed: Q is cut into blocks of ``block_q`` rows, K and V into blocks
    of ``block_k`` rows (any lengths; the last block may be short) and partial softmaxes are merged
    with the online-softmax rule. ``algorithm="fa1"`` runs Algorithm 1 of Dao et al. (2022) (key/
    value blocks outer, O, ℓ, m rewritten each step); ``"fa2"`` runs Algorithm 1 of Dao (2023)
    (query blocks outer, 1/ℓ deferred to the end). Both give the same result.

    Masking without a mask array: ``is_causal`` (aligned by ``causal_alignment``: ``"top_left"``
    like PyTorch, ``"bottom_right"`` like flash-attn ≥ 2.1, i.e. query i sits at position
    i + S − L) and ``window=(left, right)`` (query at position p sees keys p − left ≤ j ≤ p + right;
    None = unbounded; combined with causal by intersection) are evaluated per tile, and tiles they
    mask wholly are skipped. ``block_mask`` (bool, shape (⌈L/block_q⌉, ⌈S/block_k⌉), False = skip
    that tile) gives block-sparse attention (FA-1 §3.3). ``attn_mask`` may be combined with both.

    float16 inputs are computed in float32 and returned as float16 (lse stays float32).
    ``backend="numba"`` runs the compiled kernels of ``attention_ref.flash_numba`` (NumPy float32/
    float64 inputs; a boolean ``attn_mask`` only as a key-padding mask of shape (..., 1, 1, S)).

    Returns ``out``, then ``lse (..., Hq, L)`` if ``return_lse``, then a :class:`TileStats` if
    ``return_stats`` (a tuple when more than one is asked for).
    """
    _check_common(algorithm, backend)
    if backend == "numba":
        if block_mask is not None or return_stats:
            raise ValueError("backend='numba' supports neither block_mask nor return_stats")
        out, lse = _numba_forward(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                                  window, causal_alignment)
        return (out, lse) if return_lse else out
    p = _prepare(query, key, value, attn_mask, enable_gqa)
    st = _structure(p.L, p.S, is_causal, window, causal_alignment)
    tau = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    plan = _plan(p, st, block_q, block_k, block_mask)
    loop = _forward_fa1 if algorithm == "fa1" else _forward_fa2
    xp = p.xp
    if p.L == 0:
        out = xp.zeros(p.q.shape[:-1] + (p.v.shape[-1],), dtype=p.dtype, device=p.q.device)
        lse = xp.zeros(p.q.shape[:-1], dtype=p.dtype, device=p.q.device)
    else:
        o_blocks, lse_blocks = loop(p, st, plan, tau, block_q, block_k)
        out = xp.concat(o_blocks, axis=-2)
        lse = xp.concat(lse_blocks, axis=-2)[..., 0]
    out = xp.astype(out, p.out_dtype)
    extra = []
    if return_lse:
        extra.append(lse)
    if return_stats:
        extra.append(TileStats(block_q, block_k, tuple(tuple(r) for r in plan)))
    return (out, *extra) if extra else out


# ---------------------------------------------------------------------------------------------
# Backward: recomputation (FA-1 Algorithm 4 / FA-2 Algorithm 2) and the materialised reference
# ---------------------------------------------------------------------------------------------


def _sum_to_shape(xp, g, shape: tuple[int, ...]):
    """Undo broadcasting: sum the gradient g over the axes that were broadcast up to g.shape."""
    extra = g.ndim - len(shape)
    if extra > 0:
        g = xp.sum(g, axis=tuple(range(extra)))
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and g.shape[a] != 1)
    if axes:
        g = xp.sum(g, axis=axes, keepdims=True)
    return g


def _grads_back(p: _Prepared, query, key, value, dq, dk, dv):
    """Sum the gradients back to the inputs' shapes (broadcast dims, GQA head groups), cast."""
    xp = p.xp
    dq = _sum_to_shape(xp, dq, tuple(query.shape))
    if p.gqa_groups > 1:
        kshape = tuple(key.shape[:-3]) + (key.shape[-3] * p.gqa_groups,) + tuple(key.shape[-2:])
        vshape = tuple(value.shape[:-3]) + (key.shape[-3] * p.gqa_groups,) + tuple(value.shape[-2:])
        dk = _sum_to_shape(xp, dk, kshape)
        dv = _sum_to_shape(xp, dv, vshape)
        g, hk = p.gqa_groups, key.shape[-3]
        dk = xp.sum(xp.reshape(dk, kshape[:-3] + (hk, g) + kshape[-2:]), axis=-3)
        dv = xp.sum(xp.reshape(dv, vshape[:-3] + (hk, g) + vshape[-2:]), axis=-3)
    else:
        dk = _sum_to_shape(xp, dk, tuple(key.shape))
        dv = _sum_to_shape(xp, dv, tuple(value.shape))
    return tuple(xp.astype(g, p.out_dtype) for g in (dq, dk, dv))


def flash_attention_backward(
    query: Array,
    key: Array,
    value: Array,
    out: Array,
    lse: Array,
    grad_out: Array,
    attn_mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    block_q: int = 64,
    block_k: int = 64,
    window: tuple[int | None, int | None] | None = None,
    causal_alignment: str = "top_left",
    block_mask: Array | None = None,
    backend: str = "numpy",
) -> tuple[Array, Array, Array]:
    """Gradients (dQ, dK, dV) of flash_attention by recomputing P tile by tile from the logsumexp.

    Shapes: ``query (..., Hq, L, E)``, ``key (..., H, S, E)``, ``value (..., H, S, Ev)``,
    ``out`` and ``grad_out (..., Hq, L, Ev)``, ``lse (..., Hq, L)`` (from
    ``flash_attention(..., return_lse=True)``); the options must be those of the forward call.
    Returns ``dq, dk, dv`` shaped like ``query, key, value``.

    FA-1 Algorithm 4 / FA-2 Algorithm 2 (Dao 2023): a pre-pass D = rowsum(dO ∘ O) (which equals
    rowsum(P ∘ dP), a length-Ev reduction instead of a length-S one), then for every key/value
    block j (outer) and query block i (inner): P_ij = exp(τ Q_i K_jᵀ − L_i); dV_j += P_ijᵀ dO_i;
    dP_ij = dO_i V_jᵀ; dS_ij = P_ij ∘ (dP_ij − D_i); dQ_i += τ dS_ij K_j; dK_j += τ dS_ijᵀ Q_i.
    Only tiles and row vectors are held; rows with lse = −∞ (fully masked) get zero gradients.
    """
    _check_common("fa2", backend)
    expected = {
        "out": (*query.shape[:-1], value.shape[-1]),
        "grad_out": (*query.shape[:-1], value.shape[-1]),
        "lse": tuple(query.shape[:-1]),
    }
    for name, arr in (("out", out), ("grad_out", grad_out), ("lse", lse)):
        if tuple(arr.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} for query {tuple(query.shape)} and value "
                f"{tuple(value.shape)}, got {tuple(arr.shape)}"
            )
    if backend == "numba":
        if block_mask is not None:
            raise ValueError("backend='numba' does not support block_mask")
        return _numba_backward(query, key, value, out, lse, grad_out, attn_mask, is_causal,
                               scale, enable_gqa, window, causal_alignment)
    p = _prepare(query, key, value, attn_mask, enable_gqa)
    xp, dt, dev = p.xp, p.dtype, p.q.device
    batch = p.q.shape[:-2]
    o = xp.broadcast_to(xp.astype(out, dt), batch + (p.L, p.v.shape[-1]))
    do = xp.broadcast_to(xp.astype(grad_out, dt), batch + (p.L, p.v.shape[-1]))
    lse_ = xp.broadcast_to(xp.astype(lse, dt), batch + (p.L,))
    st = _structure(p.L, p.S, is_causal, window, causal_alignment)
    tau = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    plan = _plan(p, st, block_q, block_k, block_mask)
    # pre-pass (FA-2 Alg. 2 line 4; FA-1 Alg. 4 line 19): D = rowsum(dO ∘ O)
    D = xp.sum(do * o, axis=-1, keepdims=True)
    lse_col = _safe(xp, xp.reshape(lse_, batch + (p.L, 1)))  # −∞ rows: all S are −∞ so P = 0
    q_bounds = [(i0, min(p.L, i0 + block_q)) for i0 in range(0, p.L, block_q)]
    # FA-1 Alg. 4 line 5: dQ = (0) in HBM, in row blocks
    dq = [xp.zeros(batch + (i1 - i0, p.q.shape[-1]), dtype=dt, device=dev) for i0, i1 in q_bounds]
    dk, dv = [], []
    for bj, j0 in enumerate(range(0, p.S, block_k)):  # line 6: for 1 ≤ j ≤ T_c
        j1 = min(p.S, j0 + block_k)
        k_j, v_j = p.k[..., j0:j1, :], p.v[..., j0:j1, :]  # line 7: load K_j, V_j
        dk_j = xp.zeros(batch + (j1 - j0, p.k.shape[-1]), dtype=dt, device=dev)  # line 8
        dv_j = xp.zeros(batch + (j1 - j0, p.v.shape[-1]), dtype=dt, device=dev)
        for bi, (i0, i1) in enumerate(q_bounds):  # line 9: for 1 ≤ i ≤ T_r
            if plan[bi][bj] in ("skip", "block"):
                continue
            q_i, do_i = p.q[..., i0:i1, :], do[..., i0:i1, :]  # line 10: load Q_i, dO_i, L_i, D_i
            # lines 11–13: S_ij = τ Q_i K_jᵀ, MASK, P_ij = exp(S_ij − L_i) (= diag(ℓ)⁻¹ e^{S − m})
            s = _scores(p, st, q_i, k_j, tau, i0, i1, j0, j1, plan[bi][bj])
            p_ij = xp.exp(s - lse_col[..., i0:i1, :])
            dv_j = dv_j + xp.matmul(xp.matrix_transpose(p_ij), do_i)  # line 16: dV_j += P_ijᵀ dO_i
            dp = xp.matmul(do_i, xp.matrix_transpose(v_j))  # line 17: dP_ij = dO_i V_jᵀ
            ds = p_ij * (dp - D[..., i0:i1, :])  # line 20: dS_ij = P_ij ∘ (dP_ij − D_i)
            dq[bi] = dq[bi] + tau * xp.matmul(ds, k_j)  # line 21: dQ_i += τ dS_ij K_j
            dk_j = dk_j + tau * xp.matmul(xp.matrix_transpose(ds), q_i)  # line 22: dK_j += τ dS_ijᵀ Q_i
        dk.append(dk_j)  # line 24: write dK_j, dV_j
        dv.append(dv_j)
    if p.L == 0:
        dq_full = xp.zeros(p.q.shape, dtype=dt, device=dev)
    else:
        dq_full = xp.concat(dq, axis=-2)
    if p.S == 0:
        dk_full = xp.zeros(p.k.shape, dtype=dt, device=dev)
        dv_full = xp.zeros(p.v.shape, dtype=dt, device=dev)
    else:
        dk_full, dv_full = xp.concat(dk, axis=-2), xp.concat(dv, axis=-2)
    return _grads_back(p, query, key, value, dq_full, dk_full, dv_full)


def _materialised_weights(p: _Prepared, st: _Structure, tau: float):
    """P = softmax(τ Q Kᵀ + mask) over the whole L × S matrix (the standard, non-flash way)."""
    xp = p.xp
    state = "full" if st.trivial else "partial"
    s = _scores(p, st, p.q, p.k, tau, 0, p.L, 0, p.S, state)
    m = _safe(xp, xp.max(s, axis=-1, keepdims=True))
    e = xp.exp(s - m)
    total = xp.sum(e, axis=-1, keepdims=True)
    return xp.where(total > 0, e / xp.where(total > 0, total, xp.ones_like(total)),
                    xp.zeros_like(e))


def attention_backward(
    query: Array,
    key: Array,
    value: Array,
    grad_out: Array,
    attn_mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window: tuple[int | None, int | None] | None = None,
    causal_alignment: str = "top_left",
) -> tuple[Array, Array, Array]:
    """Gradients (dQ, dK, dV) of softmax(τ Q Kᵀ + mask) V through the materialised L × S matrices.

    Shapes as in :func:`flash_attention`; ``grad_out (..., Hq, L, Ev)``. This is the standard
    backward pass (FA-1 Algorithm 3), kept to check the tiled one against:
    P = softmax(S); dV = Pᵀ dO; dP = dO Vᵀ; dS = P ∘ (dP − rowsum(P ∘ dP)); dQ = τ dS K;
    dK = τ dSᵀ Q. Fully masked rows (P = 0) get zero gradients. Returns ``dq, dk, dv``.
    """
    p = _prepare(query, key, value, attn_mask, enable_gqa)
    xp, dt = p.xp, p.dtype
    st = _structure(p.L, p.S, is_causal, window, causal_alignment)
    tau = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    P = _materialised_weights(p, st, tau)
    do = xp.broadcast_to(xp.astype(grad_out, dt), p.q.shape[:-1] + (p.v.shape[-1],))
    dv = xp.matmul(xp.matrix_transpose(P), do)
    dp = xp.matmul(do, xp.matrix_transpose(p.v))
    ds = P * (dp - xp.sum(P * dp, axis=-1, keepdims=True))
    dq = tau * xp.matmul(ds, p.k)
    dk = tau * xp.matmul(xp.matrix_transpose(ds), p.q)
    return _grads_back(p, query, key, value, dq, dk, dv)


# ---------------------------------------------------------------------------------------------
# Merging partial results, weights from the logsumexp, block masks
# ---------------------------------------------------------------------------------------------


def merge_attention_partials(outs: Sequence[Array], lses: Sequence[Array]) -> tuple[Array, Array]:
    """Combine attention results computed over disjoint key/value chunks into the full result.

    ``outs[s] (..., L, Ev)`` and ``lses[s] (..., L)`` are the outputs and logsumexps of attention
    over chunk s of the keys (e.g. ``flash_attention(q, k_s, v_s, return_lse=True)``). The rule
    behind split-KV decoding (Flash-Decoding) and ring attention (Liu et al. 2023):

        lse = m + log Σ_s e^{lse_s − m},  m = max_s lse_s;     O = Σ_s e^{lse_s − lse} O_s.

    A row masked in every chunk (all lse_s = −∞) gives O = 0 and lse = −∞ without warnings.
    Returns ``(out, lse)``.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(
            f"outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}"
        )
    xp = array_namespace(*outs, *lses)
    o = xp.stack(list(outs), axis=0)  # (C, ..., L, Ev)
    lse_s = xp.stack(list(lses), axis=0)  # (C, ..., L)
    if o.shape[:-1] != lse_s.shape:
        raise ValueError(f"outs (stacked {o.shape}) and lses (stacked {lse_s.shape}) disagree")
    m = xp.max(lse_s, axis=0)
    m_safe = _safe(xp, m)  # guard: all chunks masked → m = −∞
    total = xp.sum(xp.exp(lse_s - m_safe), axis=0)
    seen = total > 0
    lse = xp.where(seen, m_safe + xp.log(xp.where(seen, total, xp.ones_like(total))),
                   xp.full_like(total, -math.inf))
    w = xp.exp(lse_s - _safe(xp, lse))  # e^{lse_s − lse}; 0 for masked chunks
    out = xp.sum(w[..., None] * o, axis=0)
    return out, lse


def attention_weights_from_lse(
    query: Array,
    key: Array,
    lse: Array,
    attn_mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window: tuple[int | None, int | None] | None = None,
    causal_alignment: str = "top_left",
) -> Array:
    """Rebuild the full attention weights P = exp(τ Q Kᵀ + mask − L) from the saved logsumexp L.

    Shapes: ``query (..., Hq, L, E)``, ``key (..., H, S, E)``, ``lse (..., Hq, L)`` →
    ``(..., Hq, L, S)``. This is what the backward pass recomputes tile by tile (FA-2 Alg. 2,
    P_ij = exp(S_ij − L_i)); here the whole matrix is formed on purpose, for pictures and checks.
    """
    xp = array_namespace(query, key, lse)
    p = _prepare(query, key, key[..., :1], attn_mask, enable_gqa)
    st = _structure(p.L, p.S, is_causal, window, causal_alignment)
    tau = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    s = _scores(p, st, p.q, p.k, tau, 0, p.L, 0, p.S, "full" if st.trivial else "partial")
    lse_col = _safe(xp, xp.astype(lse, p.dtype))[..., None]
    return xp.exp(s - lse_col)


def expand_block_mask(block_mask: Array, L: int, S: int, block_q: int, block_k: int) -> Array:
    """Element mask (L, S) of a block mask (⌈L/block_q⌉, ⌈S/block_k⌉): True where the tile is on.

    Block-sparse FlashAttention (FA-1 §3.3) with ``block_mask`` equals dense attention with this
    mask; the expansion is for references and pictures (it forms the L × S array).
    """
    xp = array_namespace(block_mask)
    rows = xp.arange(L, device=block_mask.device) // block_q
    cols = xp.arange(S, device=block_mask.device) // block_k
    return xp.take(xp.take(block_mask, rows, axis=0), cols, axis=1)


# ---------------------------------------------------------------------------------------------
# backend="numba": host-side glue to attention_ref.flash_numba (NumPy arrays only)
# ---------------------------------------------------------------------------------------------


def _key_lengths_from_padding_mask(attn_mask, query_shape: tuple[int, ...], S: int):
    """A boolean key-padding mask (..., 1, 1, S) → int key_lengths of shape query_shape[:-3].

    The numba kernels take the number of valid keys per batch element instead of a mask; this only
    works when the mask is True on a prefix of the keys and the same for every head and query.
    Any other mask raises ValueError. Host-side NumPy by design.
    """
    import numpy as np

    if attn_mask is None:
        return None
    m = np.asarray(attn_mask)
    if m.dtype != np.bool_:
        raise ValueError(
            f"backend='numba' accepts only a boolean key-padding attn_mask, got dtype {m.dtype}"
        )
    batch = tuple(query_shape[:-3])
    nd = len(batch) + 3
    if m.ndim > nd or m.shape[-1] not in (1, S):
        raise ValueError(
            f"backend='numba' needs a key-padding mask of shape (..., 1, 1, S={S}), got {m.shape}"
        )
    m = m.reshape((1,) * (nd - m.ndim) + m.shape)
    if m.shape[-3] != 1 or m.shape[-2] != 1:
        raise ValueError(
            f"backend='numba' only supports a key-padding attn_mask of shape (..., 1, 1, S); got "
            f"{attn_mask.shape} (masks that vary over heads or queries need backend='numpy')"
        )
    try:
        m = np.broadcast_to(m[..., 0, 0, :], batch + (S,))
    except ValueError as exc:
        raise ValueError(
            f"attn_mask {attn_mask.shape} does not broadcast to the batch dims {batch}"
        ) from exc
    lengths = m.sum(axis=-1).astype(np.int64)
    if not np.array_equal(m, np.arange(S) < lengths[..., None]):
        raise ValueError(
            "backend='numba' only supports key-padding masks whose True entries form a prefix of "
            "the keys in every batch element; use backend='numpy' for this attn_mask"
        )
    return lengths


def _numba_inputs(arrays, names):
    import numpy as np

    out, dtype = [], None
    for name, x in zip(names, arrays, strict=True):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"backend='numba' needs NumPy arrays; {name} is {type(x).__name__}")
        if x.ndim < 3:
            raise ValueError(f"backend='numba' needs {name} of shape (..., H, L, E), got {x.shape}")
        dtype = x.dtype
        out.append(np.ascontiguousarray(x, dtype=np.float32 if x.dtype == np.float16 else x.dtype))
    return out, dtype


def _numba_forward(query, key, value, attn_mask, is_causal, scale, enable_gqa, window, alignment):
    from . import flash_numba

    (q, k, v), dtype = _numba_inputs((query, key, value), ("query", "key", "value"))
    lengths = _key_lengths_from_padding_mask(attn_mask, q.shape, k.shape[-2])
    tau = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = flash_numba.numba_flash_forward(
        q, k, v, scale=tau, is_causal=is_causal, causal_alignment=alignment, window=window,
        key_lengths=lengths, enable_gqa=enable_gqa,
    )
    return out.astype(dtype, copy=False), lse


def _numba_backward(query, key, value, out, lse, grad_out, attn_mask, is_causal, scale,
                    enable_gqa, window, alignment):
    import numpy as np

    from . import flash_numba

    (q, k, v, o, do), dtype = _numba_inputs(
        (query, key, value, out, grad_out), ("query", "key", "value", "out", "grad_out")
    )
    lse = np.ascontiguousarray(lse, dtype=q.dtype)
    lengths = _key_lengths_from_padding_mask(attn_mask, q.shape, k.shape[-2])
    tau = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    grads = flash_numba.numba_flash_backward(
        q, k, v, o, lse, do, scale=tau, is_causal=is_causal, causal_alignment=alignment,
        window=window, key_lengths=lengths, enable_gqa=enable_gqa,
    )
    return tuple(g.astype(dtype, copy=False) for g in grads)
