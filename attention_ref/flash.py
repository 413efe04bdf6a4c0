"""Stage 05: FlashAttention in plain array code — FA-1 and FA-2 forward, backward by recomputation.

FlashAttention (Dao et al. 2022, arXiv:2205.14135) and FlashAttention-2 (Dao 2023,
arXiv:2307.08691) compute exactly O = softmax(τ Q Kᵀ + Δ) V without ever holding the L × S matrix
Z: they cut Q into tiles of B_q rows and K, V into tiles of B_k rows and merge the partial
softmaxes with the online-softmax rule (Milakov & Gimelshein 2018)

    m = max(m₁, m₂),   ℓ = e^{m₁ − m} ℓ₁ + e^{m₂ − m} ℓ₂.

The cores
---------
``forward_fa2``, ``forward_fa1`` and ``backward_fa2`` are the papers' algorithms on plain arrays,
line by line (the comments give the algorithm's line numbers). Each takes q, k, v (and o, λ, dO)
with equal leading dimensions, a mask (None, boolean A or float Δ, broadcast to (..., L, S)), τ,
the tile sizes, the band (``masks.band``: causal / sliding window as three ints) and an optional
block mask, and decides per tile whether to skip it, mask it or compute it in full.

``flash_attention`` and ``flash_attention_backward`` check their inputs once (``contract``), bring
q, k, v to the compute dtype with the key/value heads repeated for GQA, and call a core; with
``backend="numba"`` they hand over to ``attention_ref.flash_numba`` instead. Everything here is
namespace-neutral (NumPy, CuPy, array-api-strict); loops run over tiles, never over elements.

Other public names: ``attention_backward`` (the materialised backward pass, to compare with),
``merge_attention_partials`` (combine results over key chunks), ``attention_weights_from_lse``
(rebuild P from λ, for pictures), ``expand_block_mask`` and ``TileStats`` (which tiles ran).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from .contract import (
    check_attention,
    check_blocks,
    check_bool,
    check_choice,
    check_float_arrays,
    check_gradients,
    check_int,
    check_real,
)
from .dot_product import (
    attention_arrays,
    attention_logits,
    default_scale,
    sum_kv_heads,
)
from .masks import checked_band, tile_state
from .softmax import safe_divisor, safe_log, safe_shift, stable_softmax

Array = Any  # an array of any array-API namespace (NumPy, CuPy, array-api-strict)

__all__ = [
    "TileStats",
    "attention_backward",
    "attention_weights_from_lse",
    "backward_fa2",
    "expand_block_mask",
    "flash_attention",
    "flash_attention_backward",
    "forward_fa1",
    "forward_fa2",
    "merge_attention_partials",
]

# ---------------------------------------------------------------------------------------------
# The cores: FA-2 forward, FA-1 forward, FA-2 backward
# ---------------------------------------------------------------------------------------------


def forward_fa2(q: Array, k: Array, v: Array, mask: Array | None, scale: float, band: tuple[int, int, int],
                block_q: int, block_k: int, block_mask: list[list[bool]] | None = None) -> tuple[Array, Array]:
    """FlashAttention-2 forward pass (Dao 2023, Algorithm 1): query tiles outer, key tiles inner.

    q (..., L, E), k (..., S, E), v (..., S, Ev); mask None, A or Δ (..., L, S); band (offset, left,
    right) from masks.band; block_mask None or T_q × T_k bools. Returns O (..., L, Ev) and λ (..., L).
    Export with ``python -m attention_ref.export forward_fa2``.
    """
    xp = array_namespace(q, k, v)
    L, S, Ev = q.shape[-2], k.shape[-2], v.shape[-1]
    O = xp.zeros((*q.shape[:-1], Ev), dtype=q.dtype, device=q.device)  # line 2: O and λ in HBM
    lse = xp.zeros(q.shape[:-1], dtype=q.dtype, device=q.device)
    for bi, i0 in enumerate(range(0, L, block_q)):  # line 3: for each query tile i
        i1 = min(i0 + block_q, L)
        q_i = q[..., i0:i1, :]  # line 4: load Q_i
        # line 5: on chip, O_i = 0, ℓ_i = 0, m_i = −∞
        o_i = xp.zeros((*q_i.shape[:-1], Ev), dtype=q.dtype, device=q.device)
        ell = xp.zeros((*q_i.shape[:-1], 1), dtype=q.dtype, device=q.device)
        m = xp.full((*q_i.shape[:-1], 1), -xp.inf, dtype=q.dtype, device=q.device)
        for bj, j0 in enumerate(range(0, S, block_k)):  # line 6: for each key tile j
            j1 = min(j0 + block_k, S)
            state = tile_state(i0, i1, j0, j1, *band)  # §3.1.1: a tile the band hides is skipped
            if state == "skip" or (block_mask is not None and not block_mask[bi][bj]):
                continue
            k_j, v_j = k[..., j0:j1, :], v[..., j0:j1, :]  # line 7: load K_j, V_j
            # line 8: Z = τ Q_i K_jᵀ + Δ, masked by A and, in a partial tile, by the band
            a_ij = None if mask is None else mask[..., i0:i1, j0:j1]
            z = attention_logits(q_i, k_j, a_ij, scale, band if state == "partial" else None, i0, j0)
            # line 9: m_new = max(m, rowmax Z), P̃ = e^{Z − m_new}, ℓ = e^{m − m_new} ℓ + rowsum P̃
            m_new = xp.maximum(m, xp.max(z, axis=-1, keepdims=True))
            p = xp.exp(z - safe_shift(m_new))
            alpha = xp.exp(m - safe_shift(m_new))
            ell = alpha * ell + xp.sum(p, axis=-1, keepdims=True)
            # line 10: O_i = diag(e^{m − m_new}) O_i + P̃ V_j (the paper's diag(·)⁻¹ here is a typo)
            o_i = alpha * o_i + xp.matmul(p, v_j)
            m = m_new
        O[..., i0:i1, :] = o_i / safe_divisor(ell)  # lines 12, 14: O_i = diag(ℓ)⁻¹ O_i, to HBM
        lse[..., i0:i1] = (m + safe_log(ell))[..., 0]  # lines 13, 15: λ_i = m_i + log ℓ_i, to HBM
    return O, lse


def forward_fa1(q: Array, k: Array, v: Array, mask: Array | None, scale: float, band: tuple[int, int, int],
                block_q: int, block_k: int, block_mask: list[list[bool]] | None = None) -> tuple[Array, Array]:
    """FlashAttention forward pass (Dao et al. 2022, Algorithm 2 without dropout): key tiles outer.

    O, ℓ, m live in HBM and every inner step reads and rewrites one query tile's rows; O is kept
    normalised. Inputs and results as :func:`forward_fa2`.
    Export with ``python -m attention_ref.export forward_fa1``.
    """
    xp = array_namespace(q, k, v)
    L, S = q.shape[-2], k.shape[-2]
    O = xp.zeros((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)  # line 3: O = 0,
    ell = xp.zeros((*q.shape[:-1], 1), dtype=q.dtype, device=q.device)  # ℓ = 0,
    m = xp.full((*q.shape[:-1], 1), -xp.inf, dtype=q.dtype, device=q.device)  # m = −∞ in HBM
    for bj, j0 in enumerate(range(0, S, block_k)):  # line 6: for each key tile j
        j1 = min(j0 + block_k, S)
        k_j, v_j = k[..., j0:j1, :], v[..., j0:j1, :]  # line 7: load K_j, V_j
        for bi, i0 in enumerate(range(0, L, block_q)):  # line 8: for each query tile i
            i1 = min(i0 + block_q, L)
            state = tile_state(i0, i1, j0, j1, *band)  # a tile the band hides adds e^{−∞} = 0
            if state == "skip" or (block_mask is not None and not block_mask[bi][bj]):
                continue
            q_i, o_i, l_i, m_i = (x[..., i0:i1, :] for x in (q, O, ell, m))  # line 9: load them
            # lines 10–11: Z = τ Q_i K_jᵀ, MASK(Z) (the paper's S)
            a_ij = None if mask is None else mask[..., i0:i1, j0:j1]
            z = attention_logits(q_i, k_j, a_ij, scale, band if state == "partial" else None, i0, j0)
            # line 12: m̃ = rowmax(Z), P̃ = e^{Z − m̃}, ℓ̃ = rowsum(P̃)
            m_t = xp.max(z, axis=-1, keepdims=True)
            p = xp.exp(z - safe_shift(m_t))
            l_t = xp.sum(p, axis=-1, keepdims=True)
            # line 13: m_new = max(m_i, m̃), ℓ_new = e^{m_i − m_new} ℓ_i + e^{m̃ − m_new} ℓ̃
            m_new = xp.maximum(m_i, m_t)
            a, b = xp.exp(m_i - safe_shift(m_new)), xp.exp(m_t - safe_shift(m_new))
            l_new = a * l_i + b * l_t
            # line 15: O_i ← diag(ℓ_new)⁻¹ (diag(ℓ_i) e^{m_i − m_new} O_i + e^{m̃ − m_new} P̃ V_j)
            O[..., i0:i1, :] = (l_i * a * o_i + b * xp.matmul(p, v_j)) / safe_divisor(l_new)
            ell[..., i0:i1, :], m[..., i0:i1, :] = l_new, m_new  # line 16: ℓ_i ← ℓ_new, m_i ← m_new
    return O, (m + safe_log(ell))[..., 0]  # λ = m + log ℓ, which FA-2's backward pass keeps


def backward_fa2(q: Array, k: Array, v: Array, o: Array, lse: Array, do: Array, mask: Array | None,
                 scale: float, band: tuple[int, int, int], block_q: int, block_k: int,
                 block_mask: list[list[bool]] | None = None) -> tuple[Array, Array, Array]:
    """FlashAttention-2 backward pass (Dao 2023, Algorithm 2): key tiles outer, query tiles inner.

    P is recomputed tile by tile from λ instead of stored, P_ij = e^{Z_ij − λ_i}. Inputs as
    :func:`forward_fa2`, with o = O and do = dO (..., L, Ev), lse = λ (..., L). Returns dQ, dK, dV.
    Export with ``python -m attention_ref.export backward_fa2``.
    """
    xp = array_namespace(q, k, v)
    L, S = q.shape[-2], k.shape[-2]
    dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)  # line 3: dQ = 0 in HBM
    D = xp.sum(do * o, axis=-1, keepdims=True)  # line 4: D = rowsum(dO ∘ O)
    lse = safe_shift(lse[..., None])  # a row with every key masked (λ = −∞) has Z = −∞: P = 0
    for bj, j0 in enumerate(range(0, S, block_k)):  # line 5: for each key tile j
        j1 = min(j0 + block_k, S)
        k_j, v_j = k[..., j0:j1, :], v[..., j0:j1, :]  # line 6: load K_j, V_j
        dk_j, dv_j = xp.zeros_like(k_j), xp.zeros_like(v_j)  # line 7: dK_j = 0, dV_j = 0 on chip
        for bi, i0 in enumerate(range(0, L, block_q)):  # line 8: for each query tile i
            i1 = min(i0 + block_q, L)
            state = tile_state(i0, i1, j0, j1, *band)
            if state == "skip" or (block_mask is not None and not block_mask[bi][bj]):
                continue
            q_i, do_i = q[..., i0:i1, :], do[..., i0:i1, :]  # line 9: load Q_i, dO_i, λ_i, D_i
            # line 10: Z = τ Q_i K_jᵀ + Δ, masked
            a_ij = None if mask is None else mask[..., i0:i1, j0:j1]
            z = attention_logits(q_i, k_j, a_ij, scale, band if state == "partial" else None, i0, j0)
            p = xp.exp(z - lse[..., i0:i1, :])  # line 11: P = e^{Z − λ_i}
            dv_j = dv_j + xp.matmul(xp.matrix_transpose(p), do_i)  # line 12: dV_j += Pᵀ dO_i
            dp = xp.matmul(do_i, xp.matrix_transpose(v_j))  # line 13: dP = dO_i V_jᵀ
            dz = p * (dp - D[..., i0:i1, :])  # line 14: dZ = P ∘ (dP − D_i) (the paper's dS)
            dq[..., i0:i1, :] = dq[..., i0:i1, :] + scale * xp.matmul(dz, k_j)  # line 15: dQ_i += τ dZ K_j
            dk_j = dk_j + scale * xp.matmul(xp.matrix_transpose(dz), q_i)  # line 16: dK_j += τ dZᵀ Q_i
        dk[..., j0:j1, :], dv[..., j0:j1, :] = dk_j, dv_j  # line 18: write dK_j, dV_j to HBM
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# The tile report
# ---------------------------------------------------------------------------------------------


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

    @classmethod
    def of(cls, L: int, S: int, block_q: int, block_k: int, band: tuple[int, int, int],
           block_mask: list[list[bool]] | None) -> TileStats:
        """The report of a pass over L × S in tiles of block_q × block_k: the cores' decisions."""

        def state(bi: int, bj: int) -> str:
            i0, j0 = bi * block_q, bj * block_k
            st = tile_state(i0, min(i0 + block_q, L), j0, min(j0 + block_k, S), *band)
            return "block" if st != "skip" and block_mask is not None and not block_mask[bi][bj] else st

        n_q, n_k = -(-L // block_q), -(-S // block_k)
        return cls(block_q, block_k, tuple(tuple(state(bi, bj) for bj in range(n_k)) for bi in range(n_q)))


# ---------------------------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------------------------


def flash_attention(
    query: Array, key: Array, value: Array, attn_mask: Array | None = None, is_causal: bool = False,
    scale: float | None = None, enable_gqa: bool = False, *, block_q: int = 64, block_k: int = 64,
    window: tuple[int | None, int | None] | None = None, causal_alignment: str = "top_left",
    algorithm: str = "fa2", block_mask: Array | None = None, return_lse: bool = False,
    return_stats: bool = False, backend: str = "numpy",
) -> Array | tuple[Any, ...]:
    """O = softmax(τ Q Kᵀ + Δ) V tile by tile, never forming the L × S matrix (FlashAttention).

    query (..., H, L, E), key and value (..., Hkv, S, E | Ev), attn_mask, scale and enable_gqa as in
    scaled_dot_product_attention; tiles of block_q × block_k (any L, S). is_causal and window = (left,
    right) (None: unbounded), aligned by causal_alignment ("top_left" as PyTorch, "bottom_right" as
    flash-attn), combine with attn_mask and skip the tiles they hide, as does block_mask (⌈L/block_q⌉,
    ⌈S/block_k⌉) where False. algorithm: "fa2" (Dao 2023) or "fa1" (Dao et al. 2022); backend="numba":
    the kernels of attention_ref.flash_numba. Returns O (..., H, L, Ev), then λ (..., H, L) with
    return_lse (−∞ where no key is seen: O is 0 there), then a TileStats with return_stats.
    Export with ``python -m attention_ref.export flash_attention``.
    """
    check_attention(query, key, value, attn_mask, enable_gqa)
    L, S = query.shape[-2], key.shape[-2]
    band = checked_band(L, S, is_causal, window, causal_alignment)
    block_q, block_k, block_mask = check_blocks(L, S, block_q, block_k, block_mask)
    check_choice("algorithm", algorithm, ("fa2", "fa1"))
    check_choice("backend", backend, ("numpy", "numba"))
    check_bool(return_lse=return_lse, return_stats=return_stats)
    tau = default_scale(query.shape[-1]) if scale is None else check_real("scale", scale)
    if backend == "numba":  # export: omit
        from .flash_numba import flash_attention_numba

        return flash_attention_numba(query, key, value, attn_mask, tau, band, block_mask, return_lse, return_stats)
    q, k, v, mask = attention_arrays(query, key, value, attn_mask)
    forward = forward_fa2
    if algorithm == "fa1":  # export: omit
        forward = forward_fa1
    out, lse = forward(q, k, v, mask, tau, band, block_q, block_k, block_mask)
    out = array_namespace(out).astype(out, query.dtype)
    if return_stats:  # export: omit
        stats = TileStats.of(L, S, block_q, block_k, band, block_mask)
        return (out, lse, stats) if return_lse else (out, stats)
    return (out, lse) if return_lse else out


def flash_attention_backward(
    query: Array, key: Array, value: Array, out: Array, lse: Array, grad_out: Array,
    attn_mask: Array | None = None, is_causal: bool = False, scale: float | None = None,
    enable_gqa: bool = False, *, block_q: int = 64, block_k: int = 64,
    window: tuple[int | None, int | None] | None = None, causal_alignment: str = "top_left",
    block_mask: Array | None = None, backend: str = "numpy",
) -> tuple[Array, Array, Array]:
    """Gradients dQ, dK, dV of flash_attention, recomputing P tile by tile from λ (FA-2 Alg. 2).

    out = O and lse = λ from flash_attention(..., return_lse=True), grad_out = dO (..., H, L, Ev);
    every other argument as in that call. Per tile P = e^{Z − λ}, dV += Pᵀ dO, dZ = P ∘ (dO Vᵀ − D)
    with D = rowsum(dO ∘ O), dQ += τ dZ K, dK += τ dZᵀ Q; a row that sees no key gets 0, and GQA's
    query heads that share a key/value head sum their dK, dV. Returns dq, dk, dv like query, key, value.
    Export with ``python -m attention_ref.export flash_attention_backward``.
    """
    check_attention(query, key, value, attn_mask, enable_gqa)
    check_gradients(query, value, out, lse, grad_out)
    L, S = query.shape[-2], key.shape[-2]
    band = checked_band(L, S, is_causal, window, causal_alignment)
    block_q, block_k, block_mask = check_blocks(L, S, block_q, block_k, block_mask)
    check_choice("backend", backend, ("numpy", "numba"))
    tau = default_scale(query.shape[-1]) if scale is None else check_real("scale", scale)
    if backend == "numba":  # export: omit
        from .flash_numba import flash_attention_backward_numba

        return flash_attention_backward_numba(query, key, value, out, lse, grad_out, attn_mask, tau, band, block_mask)
    xp = array_namespace(query, key, value)
    q, k, v, mask = attention_arrays(query, key, value, attn_mask)
    o, do, lse = (xp.astype(x, q.dtype, copy=False) for x in (out, grad_out, lse))
    dq, dk, dv = backward_fa2(q, k, v, o, lse, do, mask, tau, band, block_q, block_k, block_mask)
    return tuple(xp.astype(g, query.dtype) for g in (dq, sum_kv_heads(dk, key), sum_kv_heads(dv, value)))


def attention_backward(
    query: Array, key: Array, value: Array, grad_out: Array, attn_mask: Array | None = None,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
    window: tuple[int | None, int | None] | None = None, causal_alignment: str = "top_left",
) -> tuple[Array, Array, Array]:
    """Gradients dQ, dK, dV of softmax(τ Q Kᵀ + Δ) V through the materialised L × S matrices.

    Shapes and options as :func:`flash_attention_backward`. This is the standard backward pass
    (FA-1 Algorithm 3), kept to check the tiled one against: P = softmax(Z); dV = Pᵀ dO;
    dP = dO Vᵀ; dZ = P ∘ (dP − rowsum(P ∘ dP)); dQ = τ dZ K; dK = τ dZᵀ Q. Returns dq, dk, dv.
    Export with ``python -m attention_ref.export attention_backward``.
    """
    check_attention(query, key, value, attn_mask, enable_gqa)
    check_float_arrays(query=query, grad_out=grad_out)
    L, S = query.shape[-2], key.shape[-2]
    band = checked_band(L, S, is_causal, window, causal_alignment)
    tau = default_scale(query.shape[-1]) if scale is None else check_real("scale", scale)
    xp = array_namespace(query, key, value)
    q, k, v, mask = attention_arrays(query, key, value, attn_mask)
    P = stable_softmax(attention_logits(q, k, mask, tau, band))  # the whole L × S matrix
    do = xp.astype(grad_out, q.dtype, copy=False)
    dv = xp.matmul(xp.matrix_transpose(P), do)
    dp = xp.matmul(do, xp.matrix_transpose(v))
    dz = P * (dp - xp.sum(P * dp, axis=-1, keepdims=True))
    dq, dk = tau * xp.matmul(dz, k), tau * xp.matmul(xp.matrix_transpose(dz), q)
    return tuple(xp.astype(g, query.dtype) for g in (dq, sum_kv_heads(dk, key), sum_kv_heads(dv, value)))


# ---------------------------------------------------------------------------------------------
# Merging partial results, weights from the logsumexp, block masks
# ---------------------------------------------------------------------------------------------


def merge_attention_partials(outs: Sequence[Array], lses: Sequence[Array]) -> tuple[Array, Array]:
    """Combine attention results computed over disjoint key/value chunks into the full result.

    ``outs[s] (..., L, Ev)`` and ``lses[s] (..., L)`` are the outputs and logsumexps of attention
    over chunk s of the keys (e.g. ``flash_attention(q, k_s, v_s, return_lse=True)``). The rule
    behind split-KV decoding (Flash-Decoding) and ring attention (Liu et al. 2023):

        λ = m + log Σ_s e^{λ_s − m},  m = max_s λ_s;     O = Σ_s e^{λ_s − λ} O_s.

    A row masked in every chunk (all λ_s = −∞) gives O = 0 and λ = −∞ without warnings.
    Returns ``(out, lse)``. Export with ``python -m attention_ref.export merge_attention_partials``.
    """
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError(f"outs and lses must be lists of arrays, got {type(outs).__name__} and {type(lses).__name__}")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}")
    for s, (o, lse) in enumerate(zip(outs, lses, strict=True)):
        check_float_arrays(1, "(..., L, Ev)", **{f"outs[{s}]": o})
        check_float_arrays(**{f"lses[{s}]": lse})
        if tuple(o.shape[:-1]) != tuple(outs[0].shape[:-1]) or tuple(lse.shape) != tuple(outs[0].shape[:-1]):
            raise ValueError(f"outs[{s}] {tuple(o.shape)} and lses[{s}] {tuple(lse.shape)} must be (..., L, Ev) and "
                             f"(..., L) like outs[0] {tuple(outs[0].shape)}")
    xp = array_namespace(*outs, *lses)
    o, lse_s = xp.stack(list(outs), axis=0), xp.stack(list(lses), axis=0)  # (C, ..., L, Ev), (C, ..., L)
    m = safe_shift(xp.max(lse_s, axis=0))  # all chunks masked: m = −∞ → 0
    lse = m + safe_log(xp.sum(xp.exp(lse_s - m), axis=0))
    w = xp.exp(lse_s - safe_shift(lse))  # e^{λ_s − λ}; 0 for the chunks that saw no key
    return xp.sum(w[..., None] * o, axis=0), lse


def attention_weights_from_lse(
    query: Array, key: Array, lse: Array, attn_mask: Array | None = None, is_causal: bool = False,
    scale: float | None = None, enable_gqa: bool = False, *,
    window: tuple[int | None, int | None] | None = None, causal_alignment: str = "top_left",
) -> Array:
    """Rebuild the full attention weights P = e^{Z − λ} from the saved logsumexp λ.

    Shapes: query (..., H, L, E), key (..., Hkv, S, E), lse (..., H, L) → P (..., H, L, S). This is
    what the backward pass recomputes tile by tile (FA-2 Alg. 2, line 11); here the whole matrix is
    formed on purpose, for pictures and checks.
    Export with ``python -m attention_ref.export attention_weights_from_lse``.
    """
    check_attention(query, key, key, attn_mask, enable_gqa)
    check_float_arrays(lse=lse)
    if tuple(lse.shape) != tuple(query.shape[:-1]):
        raise ValueError(f"lse must have shape {tuple(query.shape[:-1])} for query {tuple(query.shape)}, got {tuple(lse.shape)}")
    L, S = query.shape[-2], key.shape[-2]
    band = checked_band(L, S, is_causal, window, causal_alignment)
    tau = default_scale(query.shape[-1]) if scale is None else check_real("scale", scale)
    xp = array_namespace(query, key, lse)
    q, k, _, mask = attention_arrays(query, key, key, attn_mask)
    z = attention_logits(q, k, mask, tau, band)
    return xp.exp(z - safe_shift(xp.astype(lse, q.dtype)[..., None]))


def expand_block_mask(block_mask: Array, L: int, S: int, block_q: int, block_k: int) -> Array:
    """Element mask (L, S) of a block mask (⌈L/block_q⌉, ⌈S/block_k⌉): True where the tile is on.

    Block-sparse FlashAttention (FA-1 §3.3) with ``block_mask`` equals dense attention with this
    mask; the expansion is for references and pictures (it forms the L × S array).
    Export with ``python -m attention_ref.export expand_block_mask``.
    """
    L, S = check_int("L", L), check_int("S", S)
    block_q, block_k = check_int("block_q", block_q, 1), check_int("block_k", block_k, 1)
    xp = array_namespace(block_mask)
    rows = xp.arange(L, device=block_mask.device) // block_q
    cols = xp.arange(S, device=block_mask.device) // block_k
    return xp.take(xp.take(block_mask, rows, axis=0), cols, axis=1)
