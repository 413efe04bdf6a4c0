"""Checker battery for stage 07: ``decode_step(q_new, k_new, v_new, cache) -> (out, new_cache)``.

The cache is the course's immutable ``attention_ref.KVCache`` (keys (..., Hkv, t, E), values
(..., Hkv, t, Ev) for t cached tokens); the reference appends in float64 and attends with the bottom-right causal mask
over the whole L × S matrix.
"""

from __future__ import annotations

import numpy as np

from .check_attention import LARGE_LOGITS, SDPAParts, attention64, attention_mistakes, causal, qkv
from .check_core import Battery, Call, Case, Mistake, Unexpected, register, small_ints


def _kv_cache(keys, values):
    from . import KVCache

    return KVCache(keys, values)


def _decode_parts(q_new, k_new, v_new, cache, *, scale=None, enable_gqa=False, window=None,
                  prepend=False, append=True, alignment="bottom_right", masked=True) -> SDPAParts:
    """The step read with the course's semantics (or with one classic slip)."""
    if not append:
        keys, values = cache.keys, cache.values
    elif prepend:
        keys, values = np.concatenate([k_new, cache.keys], -2), np.concatenate([v_new, cache.values], -2)
    else:
        keys, values = np.concatenate([cache.keys, k_new], -2), np.concatenate([cache.values, v_new], -2)
    L, S = q_new.shape[-2], keys.shape[-2]
    allowed = causal(L, S, alignment) if masked else None
    if window is not None and masked:
        left = window[0] if isinstance(window, tuple | list) else window
        allowed = allowed & (np.arange(S)[None, :] >= np.arange(L)[:, None] + (S - L) - left)
    return SDPAParts(q_new, keys, values, allowed, None, scale, None, alignment if masked else None)


def _step(call, **slip):
    """(out, new_cache) of the step as the course defines it, or with ``slip``."""
    p = _decode_parts(*call.args, **call.kwargs, **slip)
    dtype = call.args[0].dtype
    out = attention64(p.q, p.k, p.v, scale=p.tau, allowed=p.allowed)[0].astype(dtype)
    return out, _kv_cache(p.k, p.v)


def _decode_reference(q_new, k_new, v_new, cache, *, scale=None, enable_gqa=False, window=None):
    out, new_cache = _step(Call((q_new, k_new, v_new, cache), {"scale": scale, "window": window}))
    return out.astype(np.float64), new_cache


def _unpack(value, outputs):
    """(out, new_cache) → (out, new_cache.keys, new_cache.values)."""
    if not isinstance(value, tuple | list) or len(value) != 2:
        kind = f"a {type(value).__name__}" if value is not None else "None (a missing `return`?)"
        raise Unexpected(f"returned {kind}, expected a tuple (out, new_cache)")
    out, cache = value
    if not isinstance(out, np.ndarray):
        raise Unexpected(f"returned {type(out).__name__} as `out`, expected a NumPy array")
    keys, values = getattr(cache, "keys", None), getattr(cache, "values", None)
    if not isinstance(keys, np.ndarray) or not isinstance(values, np.ndarray):
        raise Unexpected(f"returned {type(cache).__name__} as the new cache; return a KVCache "
                         "(with .keys and .values arrays)")
    return out, keys, values


def _decode_build(*, ints=False, size=1.0, gqa=False, window=None, scale=None):
    def build(rng, dtype, t, L, E, Ev, H, batch=None, Hkv=None):
        # t tokens already cached, L new ones: S = t + L keys after the step
        q_new, k_all, v_all = qkv(rng, dtype, L, t + L, E, Ev, batch, H, Hkv, ints=ints, size=size)
        if ints:
            q_new = small_ints(rng, q_new.shape, dtype, -1, 1)
        cache = _kv_cache(k_all[..., :t, :], v_all[..., :t, :])
        kwargs = {}
        if gqa:
            kwargs["enable_gqa"] = True
        if window is not None:
            kwargs["window"] = window
        if scale is not None:
            kwargs["scale"] = scale
        return Call((q_new, k_all[..., t:, :], v_all[..., t:, :], cache), kwargs)

    return build


_DECODE_CASES = [
    Case("tiny hand-checkable example: one new token, 2 cached", _decode_build(ints=True),
         dict(t=2, L=1, E=2, Ev=2, H=1), minimum=dict(t=0)),
    Case("one new token after 4 cached, 2 heads", _decode_build(), dict(t=4, L=1, E=4, Ev=3, H=2),
         minimum=dict(t=0)),
    Case("prefill: 3 tokens into an empty cache", _decode_build(), dict(t=0, L=3, E=4, Ev=3, H=2),
         minimum=dict(t=0)),
    Case("2 new tokens after 3 cached (bottom-right causal)", _decode_build(), dict(t=3, L=2, E=4, Ev=3, H=2),
         minimum=dict(t=1, L=2)),
    Case("leading batch dim (batch, H, L, E)", _decode_build(), dict(t=3, L=2, E=4, Ev=3, H=2, batch=2), minimum=dict(t=0)),
    Case("float32 stays float32", _decode_build(), dict(t=4, L=2, E=4, Ev=3, H=2), dtype="float32",
         minimum=dict(t=0)),
    Case("float32, large logits (overflow)", _decode_build(size=22.0), dict(t=5, L=2, E=4, Ev=3, H=2),
         minimum=dict(t=0), **LARGE_LOGITS),
    Case("GQA (enable_gqa, H = 4, Hkv = 2)", _decode_build(gqa=True), dict(t=4, L=1, E=4, Ev=3, H=4, Hkv=2),
         minimum=dict(H=4, Hkv=2, t=0)),
    Case("sliding window (window=2)", _decode_build(window=2), dict(t=5, L=2, E=4, Ev=3, H=1), minimum=dict(t=0)),
    Case("scale given", _decode_build(scale=0.3), dict(t=4, L=2, E=4, Ev=3, H=1), minimum=dict(t=0)),
]


def _parts_of(call):
    return _decode_parts(*call.args, **call.kwargs)


register(
    Battery(
        name="decode_step",
        stage="07",
        signature="decode_step(q_new, k_new, v_new, cache)",
        inputs=("q_new", "k_new", "v_new", "cache"),
        reference=_decode_reference,
        cases=_DECODE_CASES,
        mistakes=[
            Mistake("the new keys and values are not appended",
                    "append first — K = [cache.keys; k_new], V = [cache.values; v_new] — then attend to "
                    "all S = t + L of them, and return the new cache.",
                    lambda call: _step(call, append=False)),
            Mistake("the new keys and values are put before the cache",
                    "the new tokens are the latest: K = [cache.keys; k_new] (concatenate along axis −2).",
                    lambda call: _step(call, prepend=True)),
            Mistake("no causal mask", "with L > 1 new tokens, new token i must not see the new tokens "
                    "after it: use the bottom-right causal mask tril(ones(L, S), S − L).",
                    lambda call: _step(call, masked=False)),
        ]
        + attention_mistakes(_parts_of, has_scale=True, has_mask=False),
        outputs=("out", "new_cache.keys", "new_cache.values"),
        shapes=("(..., H, L, Ev)", "(..., Hkv, t + L, E)", "(..., Hkv, t + L, Ev)"),
        unpack=_unpack,
    )
)
