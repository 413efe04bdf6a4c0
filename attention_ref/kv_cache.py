"""Stage 07: efficient decoding with a key/value cache, and split-KV decoding (Flash-Decoding).

An autoregressive decoder (Vaswani et al. 2017, §3.2.3) produces token t+1 from tokens 1..t. The
keys and values of the past tokens never change, so they are kept in a **KV cache** and each step
only computes the new token's q, k, v:

    K ← [K; k_new],   V ← [V; v_new],   o_new = softmax(q_new Kᵀ · scale + mask) V.

A step then costs O(t·d) per head instead of the O(t²·d) of re-running attention over the prefix.
The t_new queries of a step (1 when decoding, the whole prompt when prefilling) are the *last*
t_new positions, so the causal mask is aligned bottom-right: ``tril(ones(t_new, S), S − t_new)``.

Split-KV decoding (Flash-Decoding, Dao, Haziza, Massa & Sizov 2023) cuts the long cache into
chunks, computes (O_s, lse_s) per chunk in parallel and merges them with the logsumexp rule of
``flash.merge_attention_partials``.

Public names
------------
``KVCache``             immutable container of the cached keys (..., Hkv, T, E) and values (..., Hkv, T, Ev)
``empty_kv_cache``      a cache with T = 0
``append_kv``           a new cache with k_new, v_new concatenated along T
``truncate_kv``         a new cache with only the last ``max_length`` tokens (sliding-window buffer)
``decode_step``         append, then attend the new queries to the whole cache (bottom-right causal)
``split_kv_attention``  attention over the keys in ``num_splits`` chunks, merged (Flash-Decoding)

Everything is namespace-neutral (NumPy, CuPy, array-api-strict). Inputs are never modified.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from array_api_compat import array_namespace

from .dot_product import _check_sdpa_inputs, scaled_dot_product_attention
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


def _shape(x: Array) -> tuple[int, ...]:
    return tuple(x.shape)


@dataclass(frozen=True)
class KVCache:
    """The keys and values of the tokens seen so far (an explicit value; never updated in place).

    * ``keys``: (..., Hkv, T, E) — Hkv key/value heads, T cached tokens, head size E;
    * ``values``: (..., Hkv, T, Ev) — same leading dimensions and T, value size Ev.

    Functions that "update" a cache (:func:`append_kv`, :func:`decode_step`, :func:`truncate_kv`)
    return a new ``KVCache``. Memory: 2 numbers × Hkv × (E + Ev)/2 per token, per layer.
    """

    keys: Array
    values: Array

    def __post_init__(self) -> None:
        xp = array_namespace(self.keys, self.values)
        for name, x in (("keys", self.keys), ("values", self.values)):
            if not xp.isdtype(x.dtype, "real floating"):
                raise TypeError(f"cache {name} must have a real floating dtype, got {x.dtype}")
            if x.ndim < 3:
                raise ValueError(f"cache {name} must have shape (..., Hkv, T, features), got {_shape(x)}")
        if self.keys.dtype != self.values.dtype:
            raise TypeError(f"cache keys and values must share a dtype, got {self.keys.dtype} and {self.values.dtype}")
        if _shape(self.keys)[:-1] != _shape(self.values)[:-1]:
            raise ValueError(
                f"cache keys and values must share (..., Hkv, T), got keys {_shape(self.keys)} "
                f"and values {_shape(self.values)}"
            )

    @property
    def length(self) -> int:
        """T, the number of cached tokens."""
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
        size = 1
        for n in self.keys.shape:
            size *= n
        vsize = 1
        for n in self.values.shape:
            vsize *= n
        xp = array_namespace(self.keys)
        itemsize = xp.finfo(self.keys.dtype).bits // 8
        return (size + vsize) * itemsize


def _count(name: str, value: Any, minimum: int = 0) -> int:
    """An int-like (not bool) >= minimum, else ValueError naming it."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        n = minimum - 1
    if n < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return n


def empty_kv_cache(
    batch_shape: tuple[int, ...],
    num_kv_heads: int,
    head_dim: int,
    value_dim: int | None = None,
    *,
    dtype: Any,
    xp: ModuleType | None = None,
) -> KVCache:
    """A cache with no tokens: keys (*batch_shape, Hkv, 0, E), values (*batch_shape, Hkv, 0, Ev).

    ``value_dim`` defaults to ``head_dim``; ``xp`` is the array module (NumPy when omitted);
    ``dtype`` a real floating dtype of that module (e.g. ``xp.float32``).
    """
    if xp is None:
        import numpy as xp
    batch_shape = tuple(_count("batch_shape entries", b) for b in batch_shape)
    hkv = _count("num_kv_heads", num_kv_heads, 1)
    e = _count("head_dim", head_dim)
    ev = e if value_dim is None else _count("value_dim", value_dim)
    keys = xp.zeros((*batch_shape, hkv, 0, e), dtype=dtype)
    values = xp.zeros((*batch_shape, hkv, 0, ev), dtype=dtype)
    return KVCache(keys, values)


def append_kv(cache: KVCache, k_new: Array, v_new: Array) -> KVCache:
    """A new cache with the keys k_new (..., Hkv, t, E) and values v_new (..., Hkv, t, Ev) appended.

    K' = [K; k_new], V' = [V; v_new] along the token axis T (axis −2). Leading dimensions, Hkv, E, Ev
    and the dtype must match the cache; neither the cache nor the inputs are modified.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    xp = array_namespace(cache.keys, cache.values, k_new, v_new)
    for name, x, ref, ref_name in (("k_new", k_new, cache.keys, "cache.keys"),
                                   ("v_new", v_new, cache.values, "cache.values")):
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")
        if x.ndim != ref.ndim or _shape(x)[:-2] != _shape(ref)[:-2] or x.shape[-1] != ref.shape[-1]:
            raise ValueError(
                f"{name} must have shape (..., Hkv, t, features) matching {ref_name} {_shape(ref)} "
                f"except along t; got {name} {_shape(x)}"
            )
    if k_new.shape[-2] != v_new.shape[-2]:
        raise ValueError(f"k_new and v_new must hold the same number of tokens, got {_shape(k_new)} and {_shape(v_new)}")
    return KVCache(xp.concat((cache.keys, k_new), axis=-2), xp.concat((cache.values, v_new), axis=-2))


def truncate_kv(cache: KVCache, max_length: int) -> KVCache:
    """A new cache holding only the last ``max_length`` tokens (a sliding-window / rolling buffer).

    With ``decode_step(..., window=left)`` a step with one new query needs only the last ``left``
    cached tokens plus its own, so ``truncate_kv(cache, left)`` after each step keeps memory at
    O(left) while giving the same outputs (the bottom-right mask is relative to the end).
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    n = _count("max_length", max_length)
    start = max(cache.length - n, 0)
    return KVCache(cache.keys[..., start:, :], cache.values[..., start:, :])


def _window_left(window: Any) -> int | None:
    """``window`` as the number of past keys to look back, or None; right must be 0 (causal)."""
    if window is None:
        return None
    if isinstance(window, tuple | list):
        if len(window) != 2 or window[1] != 0:
            raise ValueError(
                f"window must be left or (left, 0): a decoder cannot see future tokens; got {window!r}"
            )
        window = window[0]
    return _count("window left", window)


def decode_step(
    q_new: Array,
    k_new: Array,
    v_new: Array,
    cache: KVCache,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    window: int | tuple[int, int] | None = None,
) -> tuple[Array, KVCache]:
    """One decoding (or prefill) step with a KV cache: append, then attend to everything cached.

    Shapes: ``q_new (..., Hq, t, E)``, ``k_new (..., Hkv, t, E)``, ``v_new (..., Hkv, t, Ev)`` — the
    projections of the t new tokens (t = 1 per generated token; t = prompt length for a prefill) —
    and a ``cache`` of T tokens. With S = T + t:

        K = [cache.keys; k_new],  V = [cache.values; v_new],
        out = softmax(q_new Kᵀ · scale + M) V,   M = tril(ones(t, S), S − t)  (bottom-right causal),

    i.e. new query i sits at position T + i and sees keys j ≤ T + i. ``window=left`` (or
    ``(left, 0)``) keeps only keys T + i − left ≤ j ≤ T + i (``sliding_window_mask``, Mistral).
    ``enable_gqa``: query head n uses KV head n // (Hq / Hkv) (Ainslie et al. 2023).
    Both cases run stage 02's ``scaled_dot_product_attention`` with a stage-02 mask.

    Returns ``(out (..., Hq, t, Ev), new_cache)``; the old cache and the inputs are unchanged.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    xp = array_namespace(q_new, k_new, v_new, cache.keys)
    if q_new.dtype != cache.dtype:
        raise TypeError(f"q_new has dtype {q_new.dtype} but the cache holds {cache.dtype}")
    if q_new.ndim != k_new.ndim or q_new.ndim < 3:
        raise ValueError(
            f"q_new must have shape (..., Hq, t, E) with the rank of k_new; got q_new {_shape(q_new)}, "
            f"k_new {_shape(k_new)}"
        )
    if q_new.shape[-1] != cache.keys.shape[-1]:
        raise ValueError(
            f"q_new and the cached keys must share the head size E, got q_new {_shape(q_new)} and "
            f"cache.keys {_shape(cache.keys)}"
        )
    if q_new.shape[-2] != k_new.shape[-2]:
        raise ValueError(
            f"q_new and k_new must hold the same new tokens t, got q_new {_shape(q_new)} and k_new {_shape(k_new)}"
        )
    left = _window_left(window)
    new_cache = append_kv(cache, k_new, v_new)
    t, S = q_new.shape[-2], new_cache.length
    if left is None:
        mask = causal_mask(t, S, "bottom_right", xp=xp)
    else:
        mask = sliding_window_mask(t, S, left, 0, "bottom_right", xp=xp)
    out = scaled_dot_product_attention(
        q_new, new_cache.keys, new_cache.values, attn_mask=mask, scale=scale, enable_gqa=enable_gqa
    )
    return out, new_cache


def split_kv_attention(
    q: Array,
    k: Array,
    v: Array,
    num_splits: int,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    attn_mask: Array | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Attention over the keys cut into ``num_splits`` chunks, merged exactly (Flash-Decoding).

    Shapes: ``q (..., Hq, L, E)``, ``k (..., Hkv, S, E)``, ``v (..., Hkv, S, Ev)``, ``attn_mask``
    broadcastable to (..., Hq, L, S) (boolean True = attend, or float added) → ``(..., Hq, L, Ev)``.
    The keys are split into ``num_splits`` contiguous chunks of ⌊S/n⌋ or ⌈S/n⌉ tokens (1 ≤ n ≤ S);
    each chunk s gives ``(O_s, lse_s) = flash_attention(q, k_s, v_s, return_lse=True)`` (in a real
    kernel, in parallel: this is what keeps a GPU busy when L = 1) and
    ``merge_attention_partials`` combines them:

        lse = log Σ_s e^{lse_s},   O = Σ_s e^{lse_s − lse} O_s.

    A chunk whose keys are all masked has lse_s = −∞ and weight 0. Returns ``out``, or
    ``(out, lse (..., Hq, L))`` with ``return_lse``.
    """
    xp = array_namespace(q, k, v, *(() if attn_mask is None else (attn_mask,)))
    _check_sdpa_inputs(xp, q, k, v, attn_mask, 0.0, False, enable_gqa, "zero")
    S = int(k.shape[-2])
    n = _count("num_splits", num_splits, 1)
    if n > max(S, 1):
        raise ValueError(f"num_splits must lie in [1, S] = [1, {S}] for key {_shape(k)}, got {num_splits!r}")
    bounds = [s * S // n for s in range(n + 1)]
    outs, lses = [], []
    for j0, j1 in zip(bounds[:-1], bounds[1:], strict=True):
        mask_s = None
        if attn_mask is not None:
            mask_s = attn_mask if attn_mask.ndim == 0 or attn_mask.shape[-1] == 1 else attn_mask[..., j0:j1]
        o_s, lse_s = flash_attention(
            q, k[..., j0:j1, :], v[..., j0:j1, :], attn_mask=mask_s, scale=scale,
            enable_gqa=enable_gqa, return_lse=True,
        )
        outs.append(o_s)
        lses.append(lse_s)
    out, lse = merge_attention_partials(outs, lses)
    out = xp.astype(out, q.dtype)
    return (out, lse) if return_lse else out
