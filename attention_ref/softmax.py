"""Stage 02 (reused by stage 05): numerically stable softmax, logsumexp, masked and online softmax.

Every function takes its array namespace from its input, so the same code runs on NumPy, CuPy and
array-api-strict arrays. No function here emits a floating-point warning, even for rows in which
every entry is −∞ (every key masked): such rows get softmax 0 and logsumexp −∞. A NaN in a row
makes that whole row NaN, as in PyTorch.

:func:`stable_softmax` is :func:`softmax` without the input check, for callers that made it.

Three guards, used wherever a softmax is computed in the package (FlashAttention's tiles, split-KV
merges, Bahdanau's weights), each a one-line function documented here:

``safe_shift(m)``    the shift m of e^{x − m} with m = −∞ (no entry seen yet) replaced by 0, so that
                     no (−∞) − (−∞) = NaN appears; a NaN stays NaN
``safe_divisor(ℓ)``  a row sum ℓ with 0 (every entry −∞) replaced by 1: such a row divides 0 by 1
``safe_log(ℓ)``      log ℓ with log 0 = −∞ (every entry −∞), without a divide-by-zero warning
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from .contract import check_float_arrays, check_int, check_mask

Array = Any


def safe_shift(m: Array) -> Array:
    return array_namespace(m).where(m == -float("inf"), 0.0, m)  # m = −∞ (no entry yet): no (−∞) − (−∞)


def safe_divisor(total: Array) -> Array:
    return array_namespace(total).where(total == 0, 1.0, total)  # ℓ = 0 (every entry −∞): 0 / 1


def safe_log(total: Array) -> Array:
    xp = array_namespace(total)
    return xp.where(total == 0, -xp.inf, xp.log(safe_divisor(total)))  # log 0 = −∞, without a warning


def stable_softmax(x: Array, axis: int = -1) -> Array:
    """e^{x_j − m} / Σ_k e^{x_k − m} along ``axis`` with m = max_k x_k (no overflow), unchecked."""
    xp = array_namespace(x)
    if x.shape[axis] == 0:
        return xp.zeros_like(x)  # no entries (max would fail)
    e = xp.exp(x - safe_shift(xp.max(x, axis=axis, keepdims=True)))
    return e / safe_divisor(xp.sum(e, axis=axis, keepdims=True))


def softmax(x: Array, axis: int = -1) -> Array:
    """Stable softmax along ``axis``, e^{x_j − m} / Σ_k e^{x_k − m} with m = max_k x_k (no overflow).

    x: (..., n) floating. Returns x's shape and dtype; a row of all −∞ gives 0, one with a NaN NaN.
    Export with ``python -m attention_ref.export softmax``.
    """
    check_float_arrays(x=x)
    return stable_softmax(x, axis)


def logsumexp(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """λ = log Σ_j e^{x_j} along ``axis``, computed stably as m + log Σ_j e^{x_j − m}.

    x: (..., n). Returns (...) (or (..., 1) with ``keepdims``). A row of all −∞ (or no entries at
    all) gives −∞, without a warning.
    Export with ``python -m attention_ref.export logsumexp``.
    """
    m, ell = softmax_stats(x, axis=axis)  # (checks x)
    out = m + safe_log(ell)
    return out if keepdims else array_namespace(out).squeeze(out, axis=axis)


def masked_softmax(x: Array, mask: Array, axis: int = -1) -> Array:
    """Softmax over the entries where ``mask`` is True (True = attend); the others get exactly 0.

    x: (..., n) floating; mask: boolean, broadcastable to x. Entries equal to −∞ in ``x`` count as
    masked too. A row with nothing to attend to returns all zeros (PyTorch's choice for SDPA).
    Returns an array with x's shape and dtype.
    Export with ``python -m attention_ref.export masked_softmax``.
    """
    check_float_arrays(x=x)
    check_mask("mask", mask, tuple(x.shape), ("bool",))
    return stable_softmax(array_namespace(x, mask).where(mask, x, -float("inf")), axis=axis)


def softmax_stats(x: Array, axis: int = -1) -> tuple[Array, Array]:
    """The running statistics (m, ℓ) of one chunk: m = max_j x_j, ℓ = Σ_j e^{x_j − m}.

    These two numbers per row are all that the online softmax (Milakov & Gimelshein 2018) and
    FlashAttention keep. x: (..., n). Returns m, ℓ of shape (..., 1) (keeping ``axis``). An all
    −∞ row, or a chunk with no entries, gives (−∞, 0).
    Export with ``python -m attention_ref.export softmax_stats``.
    """
    check_float_arrays(x=x)
    xp = array_namespace(x)
    if x.shape[axis] == 0:
        shape = tuple(1 if a == axis % x.ndim else n for a, n in enumerate(x.shape))
        return xp.full(shape, -xp.inf, dtype=x.dtype), xp.zeros(shape, dtype=x.dtype)
    m = xp.max(x, axis=axis, keepdims=True)
    return m, xp.sum(xp.exp(x - safe_shift(m)), axis=axis, keepdims=True)


def merge_softmax_stats(m1: Array, l1: Array, m2: Array, l2: Array) -> tuple[Array, Array]:
    """Merge the statistics of two chunks (Milakov & Gimelshein 2018, §3):

        m = max(m₁, m₂),   ℓ = e^{m₁ − m} ℓ₁ + e^{m₂ − m} ℓ₂.

    Each argument: (..., 1) (any matching shapes). Returns (m, ℓ). When both chunks are empty
    (m₁ = m₂ = −∞) the result is (−∞, 0) and no NaN appears.
    Export with ``python -m attention_ref.export merge_softmax_stats``.
    """
    check_float_arrays(m1=m1, l1=l1, m2=m2, l2=l2)
    xp = array_namespace(m1, l1, m2, l2)
    m = xp.maximum(m1, m2)
    return m, xp.exp(m1 - safe_shift(m)) * l1 + xp.exp(m2 - safe_shift(m)) * l2


def online_softmax(x: Array, chunk_size: int, axis: int = -1) -> Array:
    """Softmax computed by streaming over chunks of ``chunk_size`` entries (one pass for the
    statistics, as in FlashAttention), then normalising: equals :func:`softmax`.

    Pass 1 keeps only (m, ℓ) per row and folds in one chunk at a time with
    :func:`merge_softmax_stats`; pass 2 writes e^{x − m} / ℓ. x: (..., n). Returns x's shape.
    Export with ``python -m attention_ref.export online_softmax``.
    """
    check_float_arrays(x=x)
    chunk_size = check_int("chunk_size", chunk_size, 1)
    xp = array_namespace(x)
    x_last = xp.moveaxis(x, axis, -1)
    n = x_last.shape[-1]
    m = xp.full((*x_last.shape[:-1], 1), -xp.inf, dtype=x.dtype)
    ell = xp.zeros((*x_last.shape[:-1], 1), dtype=x.dtype)
    for start in range(0, n, chunk_size):  # pass 1: the statistics, one chunk at a time
        m, ell = merge_softmax_stats(m, ell, *softmax_stats(x_last[..., start : min(start + chunk_size, n)]))
    out = xp.exp(x_last - safe_shift(m)) / safe_divisor(ell)  # pass 2: normalise
    return xp.moveaxis(out, -1, axis)
