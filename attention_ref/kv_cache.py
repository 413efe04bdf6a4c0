"""Stage 07: efficient decoding with a key/value cache, and split-KV decoding (Flash-Decoding).

An autoregressive decoder (Vaswani et al. 2017, §3.2.3) produces token t+1 from tokens 1..t. The
keys and values of the past tokens never change, so they are kept in a **KV cache** and each step
only computes the new token's q, k, v:

    K ← [K; k_new],   V ← [V; v_new],   O = softmax(τ q_new Kᵀ + Δ) V.

A step then costs O(t·E) per head instead of the O(t²·E) of re-running attention over the prefix.
The L new queries of a step (1 when decoding, the whole prompt when prefilling) are the *last* L
of the S = t + L positions, so the causal mask is aligned bottom-right: ``tril(ones(L, S), S − L)``.

Split-KV decoding (Flash-Decoding, Dao, Haziza, Massa & Sizov 2023) cuts the long cache into
chunks, computes (O_s, λ_s) per chunk in parallel and merges them with the logsumexp rule of
``flash.merge_attention_partials``.

Public names
------------
``KVCache``             immutable container of the cached keys (..., Hkv, S, E) and values (..., Hkv, S, Ev)
``empty_kv_cache``      a cache with S = 0
``append_kv``           a new cache with k_new, v_new concatenated along S
``truncate_kv``         a new cache with only the last ``max_length`` tokens (sliding-window buffer)
``decode_step``         append, then attend the new queries to the whole cache (bottom-right causal)
``split_kv_attention``  attention over the keys in ``num_splits`` chunks, merged (Flash-Decoding)

Everything is namespace-neutral (NumPy, CuPy, array-api-strict). Inputs are never modified.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import array_namespace

from .contract import check_attention, check_float_arrays, check_int, check_window
from .dot_product import scaled_dot_product_attention
from .flash import flash_attention, merge_attention_partials
from .masks import causal_mask, sliding_window_mask

Array = Any

__all__ = [
    "KVCache",
    "append_kv",
    "decode_step",
    "empty_kv_cache",
    "split_kv_attention",
    "truncate_kv",
]


class KVCache:
    """The keys and values of the tokens seen so far: an immutable value, never updated in place.

    * ``keys``: (..., Hkv, S, E) — Hkv key/value heads, S cached tokens, head size E;
    * ``values``: (..., Hkv, S, Ev) — same leading dimensions and S, value size Ev.

    Functions that "update" a cache (:func:`append_kv`, :func:`decode_step`, :func:`truncate_kv`)
    return a new ``KVCache``. Memory: Hkv × (E + Ev) numbers per token, per layer.
    """

    __slots__ = ("keys", "values")

    def __init__(self, keys: Array, values: Array) -> None:
        check_float_arrays(3, "(..., Hkv, S, E)", **{"cache keys": keys})
        check_float_arrays(3, "(..., Hkv, S, Ev)", **{"cache values": values})
        check_float_arrays(**{"cache keys": keys, "cache values": values})
        if tuple(keys.shape[:-1]) != tuple(values.shape[:-1]):
            raise ValueError(f"cache keys and values must share (..., Hkv, S), got keys {tuple(keys.shape)} "
                             f"and values {tuple(values.shape)}")
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "values", values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a KVCache is immutable (cannot set {name!r}): append_kv returns a new one")

    def __reduce__(self) -> tuple[type, tuple[Array, Array]]:
        # copy, deepcopy and pickle rebuild the cache through __init__ (setattr is closed).
        return KVCache, (self.keys, self.values)

    def __repr__(self) -> str:
        return f"KVCache(keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)}, {self.keys.dtype})"

    @property
    def length(self) -> int:
        """S, the number of cached tokens."""
        return int(self.keys.shape[-2])

    @property
    def num_kv_heads(self) -> int:
        """Hkv, the number of key/value heads."""
        return int(self.keys.shape[-3])

    @property
    def dtype(self) -> Any:
        return self.keys.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values together."""
        itemsize = array_namespace(self.keys).finfo(self.keys.dtype).bits // 8
        return (_size(self.keys) + _size(self.values)) * itemsize


def _size(x: Array) -> int:
    n = 1
    for d in x.shape:
        n *= d
    return n


def _check_cache(cache: Any) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")


def empty_kv_cache(
    batch_shape: tuple[int, ...], num_kv_heads: int, head_dim: int, value_dim: int | None = None, *,
    dtype: Any, xp: ModuleType | None = None,
) -> KVCache:
    """A cache with no tokens: keys (*batch_shape, Hkv, 0, E), values (*batch_shape, Hkv, 0, Ev).

    ``value_dim`` defaults to ``head_dim``; ``xp`` is the array module (NumPy when omitted);
    ``dtype`` a real floating dtype of that module (e.g. ``xp.float32``).
    Export with ``python -m attention_ref.export empty_kv_cache``.
    """
    if xp is None:
        import numpy as xp
    batch_shape = tuple(check_int("batch_shape entries", b) for b in batch_shape)
    hkv = check_int("num_kv_heads", num_kv_heads, 1)
    e = check_int("head_dim", head_dim)
    ev = e if value_dim is None else check_int("value_dim", value_dim)
    return KVCache(xp.zeros((*batch_shape, hkv, 0, e), dtype=dtype), xp.zeros((*batch_shape, hkv, 0, ev), dtype=dtype))


def append_kv(cache: KVCache, k_new: Array, v_new: Array) -> KVCache:
    """A new cache with the keys k_new (..., Hkv, L, E) and values v_new (..., Hkv, L, Ev) appended.

    K' = [K; k_new], V' = [V; v_new] along the token axis (axis −2): S grows by L. Leading
    dimensions, Hkv, E, Ev and the dtype must match the cache; neither the cache nor the inputs
    are modified.
    Export with ``python -m attention_ref.export append_kv``.
    """
    _check_cache(cache)
    for name, x, ref, ref_name in (("k_new", k_new, cache.keys, "cache.keys"),
                                   ("v_new", v_new, cache.values, "cache.values")):
        check_float_arrays(**{name: x, ref_name: ref})
        if x.ndim != ref.ndim or tuple(x.shape[:-2]) != tuple(ref.shape[:-2]) or x.shape[-1] != ref.shape[-1]:
            raise ValueError(f"{name} must have shape (..., Hkv, L, features) matching {ref_name} "
                             f"{tuple(ref.shape)} except along L; got {name} {tuple(x.shape)}")
    if k_new.shape[-2] != v_new.shape[-2]:
        raise ValueError(f"k_new and v_new must hold the same number of tokens, got {tuple(k_new.shape)} "
                         f"and {tuple(v_new.shape)}")
    xp = array_namespace(cache.keys, cache.values, k_new, v_new)
    return KVCache(xp.concat((cache.keys, k_new), axis=-2), xp.concat((cache.values, v_new), axis=-2))


def truncate_kv(cache: KVCache, max_length: int) -> KVCache:
    """A new cache holding only the last ``max_length`` tokens (a sliding-window / rolling buffer).

    With ``decode_step(..., window=left)`` a step with one new query needs only the last ``left``
    cached tokens plus its own, so ``truncate_kv(cache, left)`` after each step keeps memory at
    O(left) while giving the same outputs (the bottom-right mask is relative to the end).
    Export with ``python -m attention_ref.export truncate_kv``.
    """
    _check_cache(cache)
    start = max(cache.length - check_int("max_length", max_length), 0)
    return KVCache(cache.keys[..., start:, :], cache.values[..., start:, :])


def _window_left(window: Any) -> int | None:
    """``window`` (left, or (left, 0)) as the number of past keys a new query sees, or None."""
    if window is None or not isinstance(window, (tuple, list)):
        return None if window is None else check_int("window", window)
    left, right = check_window(window)
    if right != 0:
        raise ValueError(f"window must be left or (left, 0): a decoder cannot see future tokens; got {window!r}")
    return left


def decode_step(
    q_new: Array, k_new: Array, v_new: Array, cache: KVCache, *, scale: float | None = None,
    enable_gqa: bool = False, window: int | tuple[int, int] | None = None,
) -> tuple[Array, KVCache]:
    """One decoding (or prefill) step with a KV cache: append, then attend to everything cached.

    Shapes: ``q_new (..., H, L, E)``, ``k_new (..., Hkv, L, E)``, ``v_new (..., Hkv, L, Ev)`` — the
    projections of the L new tokens (L = 1 per generated token; L = prompt length for a prefill) —
    and a ``cache`` of t tokens. With S = t + L:

        K = [cache.keys; k_new],  V = [cache.values; v_new],
        O = softmax(τ q_new Kᵀ + Δ) V,   A = tril(ones(L, S), S − L)  (bottom-right causal),

    i.e. new query i sits at position t + i and sees keys j ≤ t + i. ``window=left`` (or
    ``(left, 0)``) keeps only keys t + i − left ≤ j ≤ t + i (``sliding_window_mask``, Mistral).
    ``enable_gqa``: query head i uses key/value head i // (H / Hkv) (Ainslie et al. 2023).
    Both cases run stage 02's ``scaled_dot_product_attention`` with a stage-02 mask.

    Returns ``(O (..., H, L, Ev), new_cache)``; the old cache and the inputs are unchanged.
    Export with ``python -m attention_ref.export decode_step``.
    """
    _check_cache(cache)
    check_float_arrays(3, "(..., H, L, E)", **{"q_new": q_new, "cache.keys": cache.keys})
    left = _window_left(window)
    new_cache = append_kv(cache, k_new, v_new)
    if q_new.ndim != k_new.ndim or q_new.shape[-1] != cache.keys.shape[-1] or q_new.shape[-2] != k_new.shape[-2]:
        raise ValueError(f"q_new {tuple(q_new.shape)} must be (..., H, L, E) with the rank and L of k_new "
                         f"{tuple(k_new.shape)} and the E of cache.keys {tuple(cache.keys.shape)}")
    xp = array_namespace(q_new, k_new, v_new, cache.keys)
    L, S = q_new.shape[-2], new_cache.length
    if left is None:
        mask = causal_mask(L, S, "bottom_right", xp=xp)
    else:
        mask = sliding_window_mask(L, S, left, 0, "bottom_right", xp=xp)
    out = scaled_dot_product_attention(q_new, new_cache.keys, new_cache.values, attn_mask=mask, scale=scale,
                                       enable_gqa=enable_gqa)
    return out, new_cache


def split_kv_attention(
    query: Array, key: Array, value: Array, num_splits: int, *, scale: float | None = None,
    enable_gqa: bool = False, attn_mask: Array | None = None, return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Attention over the keys cut into ``num_splits`` chunks, merged exactly (Flash-Decoding).

    Shapes: query (..., H, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev), attn_mask
    broadcastable to (..., H, L, S) (A: True = attend, or Δ: added) → O (..., H, L, Ev).
    The keys are split into ``num_splits`` contiguous chunks of ⌊S/n⌋ or ⌈S/n⌉ tokens (1 ≤ n ≤ S);
    each chunk s gives ``(O_s, λ_s) = flash_attention(query, key_s, value_s, return_lse=True)`` (in
    a real kernel, in parallel: this is what keeps a GPU busy when L = 1) and
    ``merge_attention_partials`` combines them:

        λ = log Σ_s e^{λ_s},   O = Σ_s e^{λ_s − λ} O_s.

    A chunk whose keys are all masked has λ_s = −∞ and weight 0. Returns O, or (O, λ (..., H, L))
    with ``return_lse``. Export with ``python -m attention_ref.export split_kv_attention``.
    """
    check_attention(query, key, value, attn_mask, enable_gqa)
    S = key.shape[-2]
    n = check_int("num_splits", num_splits, 1)
    if n > max(S, 1):
        raise ValueError(f"num_splits must lie in [1, S] = [1, {S}] for key {tuple(key.shape)}, got {num_splits!r}")
    bounds = [s * S // n for s in range(n + 1)]
    outs, lses = [], []
    for j0, j1 in zip(bounds[:-1], bounds[1:], strict=True):
        whole = attn_mask is None or attn_mask.ndim == 0 or attn_mask.shape[-1] == 1  # the same for every key
        o_s, lse_s = flash_attention(query, key[..., j0:j1, :], value[..., j0:j1, :],
                                     attn_mask=attn_mask if whole else attn_mask[..., j0:j1], scale=scale,
                                     enable_gqa=enable_gqa, return_lse=True)
        outs.append(o_s)
        lses.append(lse_s)
    out, lse = merge_attention_partials(outs, lses)
    out = array_namespace(out).astype(out, query.dtype)
    return (out, lse) if return_lse else out
