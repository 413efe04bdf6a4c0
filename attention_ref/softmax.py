"""Stage 02 (reused by stage 05): numerically stable softmax, logsumexp, masked and online softmax.

Every function takes its array namespace from its input, so the same code runs on NumPy, CuPy and
array-api-strict arrays. No function here emits a floating-point warning, even for rows in which
every entry is −∞ (every key masked): such rows get softmax 0 and logsumexp −∞.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

Array = Any


def softmax(x: Array, axis: int = -1) -> Array:
    """Numerically stable softmax along ``axis``.

    softmax(x)_j = exp(x_j − m) / Σ_k exp(x_k − m) with m = max_k x_k. Subtracting the maximum
    changes nothing mathematically but keeps every exponent ≤ 0, so nothing overflows.

    x: (..., n) floating array. Returns an array of the same shape and dtype. A row of all −∞
    (nothing to attend to) gives zeros; :func:`masked_softmax` takes an explicit boolean mask.
    """
    xp = array_namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    # A row that is all −inf would give (−inf) − (−inf) = NaN: shift it by 0 instead.
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    e = xp.exp(x - m)
    total = xp.sum(e, axis=axis, keepdims=True)
    return e / xp.where(total > 0, total, xp.ones_like(total))


def logsumexp(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """log Σ_j exp(x_j) along ``axis``, computed stably as m + log Σ_j exp(x_j − m).

    x: (..., n). Returns (...) (or (..., 1) with ``keepdims``). A row of all −∞ gives −∞
    (without a divide-by-zero warning).
    """
    xp = array_namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    total = xp.sum(xp.exp(x - m), axis=axis, keepdims=True)
    positive = total > 0
    log_total = xp.where(
        positive, xp.log(xp.where(positive, total, xp.ones_like(total))), -xp.inf
    )
    out = m + log_total
    return out if keepdims else xp.squeeze(out, axis=axis)


def masked_softmax(x: Array, mask: Array, axis: int = -1) -> Array:
    """Softmax over the entries where ``mask`` is True (True = attend); the others get exactly 0.

    x: (..., n) floating; mask: boolean, broadcastable to x. Entries equal to −∞ in ``x`` count as
    masked too. A row with nothing to attend to returns all zeros (PyTorch's choice for SDPA).
    Returns an array with x's shape and dtype.
    """
    xp = array_namespace(x, mask)
    if x.shape[axis] == 0:  # no keys at all: every row is fully masked
        return xp.zeros_like(x)
    attend = xp.logical_and(mask, x != -xp.inf)
    logits = xp.where(attend, x, -xp.inf)
    m = xp.max(logits, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    e = xp.where(attend, xp.exp(logits - m), xp.zeros_like(logits))
    total = xp.sum(e, axis=axis, keepdims=True)
    return e / xp.where(total > 0, total, xp.ones_like(total))


def softmax_stats(x: Array, axis: int = -1) -> tuple[Array, Array]:
    """The running statistics (m, ℓ) of one chunk: m = max_j x_j, ℓ = Σ_j exp(x_j − m).

    These two numbers per row are all that the online softmax (Milakov & Gimelshein 2018) and
    FlashAttention keep. x: (..., n). Returns m, ℓ of shape (..., 1). An all −∞ row gives
    (−∞, 0).
    """
    xp = array_namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m_safe = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    ell = xp.sum(xp.exp(x - m_safe), axis=axis, keepdims=True)
    return m, ell


def merge_softmax_stats(m1: Array, l1: Array, m2: Array, l2: Array) -> tuple[Array, Array]:
    """Merge the statistics of two chunks (Milakov & Gimelshein 2018, §3):

        m = max(m₁, m₂),   ℓ = e^{m₁ − m} ℓ₁ + e^{m₂ − m} ℓ₂.

    Each argument: (..., 1) (any matching shapes). Returns (m, ℓ). When both chunks are empty
    (m₁ = m₂ = −∞) the result is (−∞, 0) and no NaN appears.
    """
    xp = array_namespace(m1, l1, m2, l2)
    m = xp.maximum(m1, m2)
    m_safe = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    ell = xp.exp(m1 - m_safe) * l1 + xp.exp(m2 - m_safe) * l2
    return m, ell


def online_softmax(x: Array, chunk_size: int, axis: int = -1) -> Array:
    """Softmax computed by streaming over chunks of ``chunk_size`` entries (one pass for the
    statistics, as in FlashAttention), then normalising: equals :func:`softmax`.

    Pass 1 keeps only (m, ℓ) per row and folds in one chunk at a time with
    :func:`merge_softmax_stats`; pass 2 writes exp(x − m) / ℓ. x: (..., n). Returns x's shape.
    """
    xp = array_namespace(x)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    x_last = xp.moveaxis(x, axis, -1)
    n = x_last.shape[-1]
    m = xp.full((*x_last.shape[:-1], 1), -xp.inf, dtype=x.dtype)
    ell = xp.zeros((*x_last.shape[:-1], 1), dtype=x.dtype)
    for start in range(0, n, chunk_size):
        m_chunk, l_chunk = softmax_stats(x_last[..., start : min(start + chunk_size, n)])
        m, ell = merge_softmax_stats(m, ell, m_chunk, l_chunk)
    m_safe = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    out = xp.exp(x_last - m_safe) / xp.where(ell > 0, ell, xp.ones_like(ell))
    return xp.moveaxis(out, -1, axis)
