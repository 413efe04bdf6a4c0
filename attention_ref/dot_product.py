"""Stage 02: scaled dot-product attention (Vaswani et al. 2017, eq. 1), with PyTorch's semantics.

    Attention(Q, K, V) = softmax(Q Kᵀ · scale + bias) V,   scale = 1/√E by default.

This materialises the full (L, S) weight matrix, which makes it the reference every later stage
(multi-head, FlashAttention, the Numba kernels) is checked against.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

from .softmax import masked_softmax

Array = Any

FULLY_MASKED_CHOICES = ("zero", "nan")


def _check_sdpa_inputs(
    xp, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, fully_masked
) -> tuple[int, ...]:
    """Validate shapes, dtypes and options; return the logits' shape (..., Hq, L, S)."""
    for name, arr in (("query", query), ("key", key), ("value", value)):
        if not xp.isdtype(arr.dtype, "real floating"):
            raise TypeError(f"{name} must have a real floating dtype, got {arr.dtype}")
        if arr.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., L, E), got shape {tuple(arr.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (query.ndim == key.ndim == value.ndim):
        raise ValueError(
            "query, key and value must have the same rank, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key must share the feature size E, got query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"key and value must share (..., S), got key {tuple(key.shape)} and value {tuple(value.shape)}"
        )
    if enable_gqa:
        if query.ndim < 3:
            raise ValueError(f"enable_gqa needs a head dimension (..., H, L, E), got query {tuple(query.shape)}")
        if query.shape[:-3] != key.shape[:-3]:
            raise ValueError(
                f"query and key batch dimensions differ: query {tuple(query.shape)}, key {tuple(key.shape)}"
            )
        hq, hkv = query.shape[-3], key.shape[-3]
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(
                f"with enable_gqa the query heads ({hq}) must be a multiple of the key/value heads ({hkv}); "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}"
            )
    elif query.shape[:-2] != key.shape[:-2]:
        raise ValueError(
            "query and key batch/head dimensions differ (pass enable_gqa=True for grouped heads): "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    logits_shape = (*query.shape[:-1], key.shape[-2])
    if attn_mask is not None:
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both")
        if not (attn_mask.dtype == xp.bool or xp.isdtype(attn_mask.dtype, "real floating")):
            raise TypeError(f"attn_mask must be boolean (True = attend) or floating (added), got {attn_mask.dtype}")
        mask_shape = tuple(attn_mask.shape)
        trailing = logits_shape[len(logits_shape) - len(mask_shape):] if mask_shape else ()
        if len(mask_shape) > len(logits_shape) or any(
            m not in (1, t) for m, t in zip(mask_shape, trailing, strict=False)
        ):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the logits' shape "
                f"{logits_shape} (..., Hq, L, S)"
            )
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    if fully_masked not in FULLY_MASKED_CHOICES:
        raise ValueError(f"fully_masked must be one of {FULLY_MASKED_CHOICES}, got {fully_masked!r}")
    return logits_shape


def _dropout_keep_mask(xp, rng: Any, shape: tuple[int, ...], dropout_p: float) -> Array:
    """Boolean keep-mask drawn from a NumPy Generator, moved to the inputs' namespace.

    The one NumPy call of this module: the random draw happens on the host (so results are
    reproducible across backends from the same seed) and is copied to the device once.
    """
    if rng is None:
        raise ValueError("dropout_p > 0 needs rng, a numpy.random.Generator")
    return xp.asarray(rng.random(shape) >= dropout_p)


def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    attn_mask: Array | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    rng: Any = None,
    return_weights: bool = False,
    fully_masked: str = "zero",
) -> Array | tuple[Array, Array]:
    """Scaled dot-product attention, softmax(Q Kᵀ · scale + mask) V (Vaswani et al. 2017, eq. 1).

    Same parameter names, shapes and semantics as ``torch.nn.functional.scaled_dot_product_attention``:

    * query (..., Hq, L, E), key (..., H, S, E), value (..., H, S, Ev) → output (..., Hq, L, Ev).
      Any number of leading dimensions (at least the (L, E) pair); Ev may differ from E.
    * ``attn_mask``: boolean (True = attend) or floating (added to the logits), broadcastable to
      (..., Hq, L, S). ``is_causal=True`` applies the top-left causal mask ``tril(ones(L, S))``
      (use ``masks.causal_mask(L, S, "bottom_right")`` for the other alignment); it cannot be
      combined with ``attn_mask``.
    * ``scale`` defaults to 1/√E.
    * ``enable_gqa``: grouped-query attention; query head i uses key/value head i // (Hq / H).
    * ``dropout_p`` > 0 drops weights with probability p and rescales by 1/(1 − p), drawing from
      ``rng`` (a ``numpy.random.Generator``; required when dropout_p > 0).
    * A row in which every key is masked returns 0 (``fully_masked="zero"``, PyTorch's choice),
      or NaN with ``fully_masked="nan"`` (what the bare formula gives).

    float16 inputs are computed in float32 and returned as float16. Returns the output, or
    ``(output, weights)`` with weights (..., Hq, L, S) (after dropout) when ``return_weights``.

    Builds on ``attention_ref.softmax.masked_softmax`` (copy it along with this function).
    """
    xp = array_namespace(query, key, value, *(() if attn_mask is None else (attn_mask,)))
    logits_shape = _check_sdpa_inputs(
        xp, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, fully_masked
    )
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    in_dtype = query.dtype
    half = getattr(xp, "float16", None)  # the array API standard has no float16
    work_dtype = xp.float32 if half is not None and in_dtype == half else in_dtype
    q, k, v = (xp.astype(t, work_dtype) for t in (query, key, value))

    if enable_gqa and k.shape[-3] != q.shape[-3]:
        # Query head i reads key/value head i // group (PyTorch's repeat_interleave).
        group = q.shape[-3] // k.shape[-3]
        kv_head = xp.arange(q.shape[-3]) // group
        k = xp.take(k, kv_head, axis=-3)
        v = xp.take(v, kv_head, axis=-3)

    logits = xp.matmul(q, xp.matrix_transpose(k)) * scale
    attend = xp.ones(logits_shape, dtype=xp.bool)
    if is_causal:
        rows = xp.reshape(xp.arange(L), (L, 1))
        cols = xp.reshape(xp.arange(S), (1, S))
        attend = xp.logical_and(attend, cols <= rows)
    elif attn_mask is not None and attn_mask.dtype == xp.bool:
        attend = xp.logical_and(attend, attn_mask)
    elif attn_mask is not None:
        logits = logits + xp.astype(attn_mask, work_dtype)
    weights = masked_softmax(logits, attend)

    if fully_masked == "nan":
        empty_row = xp.logical_not(xp.any(xp.logical_and(attend, logits != -xp.inf), axis=-1, keepdims=True))
        weights = xp.where(empty_row, xp.asarray(xp.nan, dtype=work_dtype), weights)
    if dropout_p > 0.0:
        keep = _dropout_keep_mask(xp, rng, logits_shape, dropout_p)
        weights = xp.where(keep, weights / (1.0 - dropout_p), xp.zeros_like(weights))

    out = xp.matmul(weights, v)
    if fully_masked == "nan":  # also covers S = 0, where the matmul alone gives zeros
        out = xp.where(empty_row, xp.asarray(xp.nan, dtype=work_dtype), out)
    out = xp.astype(out, in_dtype)
    if return_weights:
        return out, xp.astype(weights, in_dtype)
    return out
