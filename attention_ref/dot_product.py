"""Stage 02: scaled dot-product attention (Vaswani et al. 2017, eq. 1), with PyTorch's semantics.

    O = P V,   P = softmax(Z) row by row,   Z = τ Q Kᵀ + Δ,   τ = 1/√E by default.

This materialises the full L × S matrix of weights P, which makes it the reference every later
stage (multi-head, FlashAttention, the Numba kernels) is checked against. The core is two lines of
:func:`scaled_dot_product_attention`; the helpers around it are shared with FlashAttention:
:func:`attention_logits` (Z with a boolean or float mask applied), :func:`default_scale` (τ),
:func:`attention_arrays` (float16 runs in float32, GQA's repeated heads) and :func:`sum_kv_heads`.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from .contract import check_attention, check_bool, check_choice, check_real
from .masks import band, band_mask
from .softmax import stable_softmax

Array = Any

def default_scale(E: int) -> float:
    """τ = 1/√E (Vaswani et al. 2017, §3.2.1); 1 for E = 0 (all logits 0: O = mean of V, as torch)."""
    return 1.0 / E**0.5 if E > 0 else 1.0


def attention_arrays(query: Array, key: Array, value: Array, attn_mask: Array | None = None) -> tuple[Array, ...]:
    """q, k, v in the compute dtype, GQA's key/value heads repeated, the mask broadcast to (..., H, L, S).

    float16 runs in float32 (its logits overflow at 65504); query head i reads key/value head
    i // (H / Hkv), as PyTorch's repeat_interleave.
    """
    xp = array_namespace(query, key, value)
    work = xp.float32 if query.dtype == getattr(xp, "float16", None) else query.dtype
    q, k, v = (xp.astype(x, work, copy=False) for x in (query, key, value))
    if q.ndim > 2 and k.shape[-3] != q.shape[-3]:  # each key/value head H / Hkv times, in place
        k, v = (xp.repeat(x, q.shape[-3] // x.shape[-3], axis=-3) for x in (k, v))
    return q, k, v, None if attn_mask is None else xp.broadcast_to(attn_mask, (*q.shape[:-1], k.shape[-2]))


def sum_kv_heads(grad: Array, like: Array) -> Array:
    """The gradient of GQA's repeated heads: (..., H, S, ·) summed to the Hkv heads of ``like``."""
    if grad.ndim < 3 or grad.shape[-3] == like.shape[-3]:
        return grad
    xp = array_namespace(grad)
    *batch, hq, s, d = grad.shape
    return xp.sum(xp.reshape(grad, (*batch, like.shape[-3], hq // like.shape[-3], s, d)), axis=-3)


def attention_logits(q: Array, k: Array, attn_mask: Array | None, scale: float, band: Any = None,
                     i0: int = 0, j0: int = 0) -> Array:
    """Z = τ Q Kᵀ + Δ (..., L, S), −∞ where a boolean A is False or the band hides the key.

    q (..., L, E) holds the query rows from i0 on, k (..., S, E) the keys from j0 on; ``band`` is
    (offset, left, right) of masks.band, or None.
    """
    xp = array_namespace(q, k)
    z = xp.matmul(q, xp.matrix_transpose(k)) * scale
    if attn_mask is not None:
        z = xp.where(attn_mask, z, -xp.inf) if attn_mask.dtype == xp.bool else z + xp.astype(attn_mask, z.dtype)
    if band is not None:
        z = xp.where(band_mask(xp, i0, i0 + q.shape[-2], j0, j0 + k.shape[-2], *band, device=z.device), z, -xp.inf)
    return z


def scaled_dot_product_attention(
    query: Array, key: Array, value: Array, attn_mask: Array | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *, rng: Any = None,
    return_weights: bool = False, fully_masked: str = "zero",
) -> Array | tuple[Array, Array]:
    """O = softmax(τ Q Kᵀ + Δ) V (Vaswani et al. 2017, eq. 1), as PyTorch's function of that name.

    query (..., H, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) → O (..., H, L, Ev); attn_mask
    A (bool, True = attend) or Δ (float, added); is_causal: A = tril(ones(L, S)); τ = scale or 1/√E;
    enable_gqa: query head i reads key/value head i // (H / Hkv); dropout_p: P's entries dropped by
    rng. No key seen: O = 0 (NaN if fully_masked="nan"). Returns O, and P if return_weights.
    Export with ``python -m attention_ref.export scaled_dot_product_attention``.
    """
    check_attention(query, key, value, attn_mask, enable_gqa)
    check_bool(is_causal=is_causal, return_weights=return_weights)
    check_choice("fully_masked", fully_masked, ("zero", "nan"))
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both")
    if not 0.0 <= check_real("dropout_p", dropout_p) < 1.0 or (dropout_p > 0 and rng is None):
        raise ValueError(f"dropout_p must lie in [0, 1), and dropout_p > 0 needs rng; got {dropout_p}, rng={rng}")
    xp = array_namespace(query, key, value)
    tau = default_scale(query.shape[-1]) if scale is None else check_real("scale", scale)
    q, k, v, attn_mask = attention_arrays(query, key, value, attn_mask)
    causal = band(query.shape[-2], key.shape[-2], is_causal=True) if is_causal else None  # A = tril(ones(L, S))
    weights = stable_softmax(attention_logits(q, k, attn_mask, tau, causal))  # P = softmax(τ Q Kᵀ + Δ)
    unseen = xp.all(weights == 0, axis=-1, keepdims=True) & (fully_masked == "nan")  # no key seen: NaN rows
    if dropout_p > 0.0:  # the draw is made on the host by rng (the same on every backend)
        keep = xp.asarray(rng.random(tuple(weights.shape)) >= dropout_p, device=weights.device)
        weights = xp.where(keep, weights / (1.0 - dropout_p), 0.0)
    out = xp.where(unseen, xp.nan, xp.astype(xp.matmul(weights, v), query.dtype))  # O = P V
    return (out, xp.astype(xp.where(unseen, xp.nan, weights), query.dtype)) if return_weights else out
