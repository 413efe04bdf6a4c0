"""Stage 02: scaled dot-product attention (Vaswani et al. 2017, eq. 1), with PyTorch's semantics.

    O = P V,   P = softmax(Z) row by row,   Z = τ Q Kᵀ + Δ,   τ = 1/√E by default.

This materialises the full L × S matrix of weights P, which makes it the reference every later
stage (multi-head, FlashAttention, the Numba kernels) is checked against. The core is two lines of
:func:`scaled_dot_product_attention`; the helpers around it are shared with FlashAttention:
:func:`attention_logits` (Z with a boolean or float mask applied), :func:`default_scale` (τ),
:func:`compute_dtype` (float16 runs in float32) and :func:`repeat_kv_heads` (GQA).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from .contract import check_attention, check_bool, check_choice, check_real
from .masks import band, band_mask
from .softmax import softmax

Array = Any

FULLY_MASKED_CHOICES = ("zero", "nan")


def default_scale(E: int) -> float:
    """τ = 1/√E (Vaswani et al. 2017, §3.2.1), which keeps the logits' variance near 1 for any
    head size E; τ = 1 when E = 0 (every logit is then 0 and O the mean of V, as in PyTorch)."""
    return 1.0 / E**0.5 if E > 0 else 1.0


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype the math runs in: float16 in float32 (its logits overflow at 65504), else itself."""
    return xp.float32 if dtype == getattr(xp, "float16", None) else dtype


def repeat_kv_heads(x: Array, query: Array) -> Array:
    """GQA (Ainslie et al. 2023): key or value heads (..., H, S, ·) repeated to the query's Hq heads,
    query head i reading key/value head i // (Hq / H), as PyTorch's repeat_interleave does."""
    if x.ndim < 3 or x.shape[-3] == query.shape[-3]:
        return x
    xp = array_namespace(x)
    hq = query.shape[-3]
    return xp.take(x, xp.arange(hq, device=x.device) // (hq // x.shape[-3]), axis=-3)


def sum_kv_heads(grad: Array, like: Array) -> Array:
    """The gradient of :func:`repeat_kv_heads`: (..., Hq, S, ·) → the heads of ``like`` (..., H,
    S, ·), summing the query heads that read one key/value head."""
    if grad.ndim < 3 or grad.shape[-3] == like.shape[-3]:
        return grad
    xp = array_namespace(grad)
    *batch, hq, s, d = grad.shape
    return xp.sum(xp.reshape(grad, (*batch, like.shape[-3], hq // like.shape[-3], s, d)), axis=-3)


def attention_logits(q: Array, k: Array, attn_mask: Array | None, scale: float) -> Array:
    """Z = τ Q Kᵀ + Δ (..., L, S) for q (..., L, E) and k (..., S, E): a float mask Δ is added; where
    a boolean mask A is False the logit is −∞, so that key gets weight exactly 0."""
    xp = array_namespace(q, k)
    z = xp.matmul(q, xp.matrix_transpose(k)) * scale
    if attn_mask is None:
        return z
    return xp.where(attn_mask, z, -xp.inf) if attn_mask.dtype == xp.bool else z + xp.astype(attn_mask, z.dtype)


def _dropout(weights: Array, p: float, rng: Any) -> Array:
    """Zero each weight with probability p and scale the others by 1/(1 − p). The draw is made on
    the host by ``rng`` (reproducible on every backend) and copied to the device once."""
    if rng is None:
        raise ValueError("dropout_p > 0 needs rng, a numpy.random.Generator")
    xp = array_namespace(weights)
    keep = xp.asarray(rng.random(tuple(weights.shape)) >= p, device=weights.device)
    return xp.where(keep, weights / (1.0 - p), 0.0)


def scaled_dot_product_attention(
    query: Array, key: Array, value: Array, attn_mask: Array | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *, rng: Any = None,
    return_weights: bool = False, fully_masked: str = "zero",
) -> Array | tuple[Array, Array]:
    """O = softmax(τ Q Kᵀ + Δ) V (Vaswani et al. 2017, eq. 1), as PyTorch's function of that name.

    query (..., Hq, L, E), key (..., H, S, E), value (..., H, S, Ev) → O (..., Hq, L, Ev).
    attn_mask: boolean A (True = attend) or float Δ (added), broadcast to (..., Hq, L, S);
    is_causal: A = tril(ones(L, S)) (top-left; not with attn_mask). τ = scale or 1/√E. enable_gqa:
    query head i uses key/value head i // (Hq / H). dropout_p: weights dropped with probability p
    (drawn by rng, a numpy.random.Generator), the rest scaled by 1/(1 − p). A row with every key
    masked gives 0 (fully_masked="zero", PyTorch) or NaN ("nan"); a NaN logit makes its row NaN.
    float16 runs in float32. Returns O, and P (..., Hq, L, S) after dropout with return_weights.
    Export with ``python -m attention_ref.export scaled_dot_product_attention``.
    """
    check_attention(query, key, value, attn_mask, enable_gqa)
    if check_bool("is_causal", is_causal) and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both")
    if not 0.0 <= check_real("dropout_p", dropout_p) < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    check_bool("return_weights", return_weights)
    check_choice("fully_masked", fully_masked, FULLY_MASKED_CHOICES)
    xp = array_namespace(query, key, value)
    L, S, tau = query.shape[-2], key.shape[-2], check_real("scale", scale, default_scale(query.shape[-1]))
    q, k, v = (xp.astype(x, compute_dtype(xp, query.dtype), copy=False) for x in (query, key, value))
    k, v = repeat_kv_heads(k, q), repeat_kv_heads(v, q)
    if is_causal:
        attn_mask = band_mask(xp, 0, L, 0, S, *band(L, S, is_causal=True))
    weights = softmax(attention_logits(q, k, attn_mask, tau))  # P = softmax(τ Q Kᵀ + Δ)
    no_key = xp.all(weights == 0, axis=-1, keepdims=True)  # the rows with every key masked
    if dropout_p > 0.0:
        weights = _dropout(weights, dropout_p, rng)
    out = xp.matmul(weights, v)  # O = P V
    if fully_masked == "nan":
        out, weights = xp.where(no_key, xp.nan, out), xp.where(no_key, xp.nan, weights)
    out = xp.astype(out, query.dtype)
    return (out, xp.astype(weights, query.dtype)) if return_weights else out
