"""Checker batteries for stage 09: ``rope(x, positions, theta=10000.0)`` and
``rope_decode_step(q_new, k_new, v_new, cache, theta=10000.0)``.

The references are written independently of ``attention_ref.positions``: every pair of features
is turned by its angle with Python's ``math.cos`` / ``math.sin`` in float64 (rotate-half layout:
pair f is (f, f + E/2); interleaved: (2f, 2f + 1)), and the decoding step appends the rotated keys
and attends over the whole matrix with the bottom-right causal mask. Sizes in the course's
notation: L rows (new tokens), t tokens already cached, S = t + L keys, ``batch`` sequences.
"""

from __future__ import annotations

import math

import numpy as np

from .check_attention import attention64, causal
from .check_core import Battery, Call, Case, Mistake, Unexpected, randn, register, small_ints


def _rope64(x, positions, theta=10000.0, interleaved=False, *, sign=1.0, exponent=2.0,
            halves_plus=False):
    """Rotate every pair f of x (..., L, E) by positions[l]·ω_f in float64 (or with one slip)."""
    x = np.asarray(x, dtype=np.float64)
    E = x.shape[-1]
    out = np.empty_like(x)
    for l, pos in enumerate(np.asarray(positions).tolist()):
        for f in range(E // 2):
            angle = sign * pos * theta ** (-exponent * f / E)
            c, s = math.cos(angle), math.sin(angle)
            a, b = (2 * f, 2 * f + 1) if interleaved else (f, f + E // 2)
            xa, xb = x[..., l, a], x[..., l, b]
            out[..., l, a] = xa * c - xb * s if not halves_plus else xa * c + xb * s
            out[..., l, b] = xb * c + xa * s
    return out


def _rope_reference(x, positions, theta=10000.0, *, interleaved=False):
    return _rope64(x, positions, theta, interleaved)


def _rope_build(*, ints=False, start=0, positions=None, theta=None, interleaved=None, scale=1.0):
    def build(rng, dtype, L, E, H=None, batch=None):
        shape = tuple(n for n in (batch, H) if n is not None) + (L, E)
        x = small_ints(rng, shape, dtype, -2, 2) if ints else randn(rng, shape, dtype, scale)
        pos = np.arange(start, start + L) if positions is None else np.asarray(positions[:L])
        kwargs = {}
        if theta is not None:
            kwargs["theta"] = theta
        if interleaved is not None:
            kwargs["interleaved"] = interleaved
        return Call((x, pos), kwargs)

    return build


_ROPE_CASES = [
    Case("tiny hand-checkable example: one pair, positions 0 and 1", _rope_build(ints=True),
         dict(L=2, E=2), shrink=False),
    Case("random rows, E = 8", _rope_build(), dict(L=5, E=8), minimum=dict(L=1, E=2)),
    Case("positions that do not start at 0 (a cache of 7 tokens before)", _rope_build(start=7),
         dict(L=3, E=4), minimum=dict(L=1, E=2)),
    Case("positions in any order, repeated", _rope_build(positions=[5, 0, 5, 2, 9]), dict(L=5, E=6),
         minimum=dict(L=1, E=2)),
    Case("leading batch and head dims (batch, H, L, E)", _rope_build(), dict(L=4, E=8, H=3, batch=2),
         minimum=dict(L=1, E=2, H=1, batch=1)),
    Case("theta given (θ = 100000, Llama 3 / SmolLM2)", _rope_build(theta=100000.0, start=30),
         dict(L=4, E=16), minimum=dict(L=1, E=2)),
    Case("float32 stays float32", _rope_build(start=100), dict(L=4, E=8), dtype="float32",
         minimum=dict(L=1, E=2)),
    Case("interleaved layout: pairs (2f, 2f + 1)", _rope_build(interleaved=True, start=3),
         dict(L=4, E=8), minimum=dict(L=1, E=2)),
]


def _rope_slip(**slip):
    def wrong(call):
        x, positions = call.args
        theta = call.kwargs.get("theta", 10000.0)
        interleaved = call.kwargs.get("interleaved", False)
        if slip.get("swap_layout"):
            interleaved = not interleaved
            slip_rest = {}
        else:
            slip_rest = {k: v for k, v in slip.items() if k != "from_zero"}
        if slip.get("from_zero"):
            positions = np.arange(len(positions))
        return _rope64(x, positions, theta, interleaved, **slip_rest).astype(x.dtype)

    return wrong


register(
    Battery(
        name="rope",
        stage="09",
        signature="rope(x, positions, theta=10000.0)",
        inputs=("x", "positions"),
        reference=_rope_reference,
        cases=_ROPE_CASES,
        mistakes=[
            Mistake("neighbouring pairs (2f, 2f + 1) rotated instead of the halves",
                    "the rotate-half layout (Llama in transformers) pairs feature f with feature f + E/2: "
                    "x_a = x[..., :E/2], x_b = x[..., E/2:] (interleaved=True is the other layout).",
                    _rope_slip(swap_layout=True)),
            Mistake("rotated the wrong way (the sign of sin flipped)",
                    "out_a = x_a cos(pos·ω_f) − x_b sin(pos·ω_f) and out_b = x_b cos(pos·ω_f) + "
                    "x_a sin(pos·ω_f): a rotation by +pos·ω_f.",
                    _rope_slip(sign=-1.0)),
            Mistake("the minus sign of the rotation is missing (x_a cos + x_b sin)",
                    "the first feature of each pair is x_a cos(pos·ω_f) − x_b sin(pos·ω_f): rotate_half(x) is "
                    "(−x_b, x_a), not (x_b, x_a).",
                    _rope_slip(halves_plus=True)),
            Mistake("frequencies θ^(−f/E) instead of θ^(−2f/E)",
                    "pair f turns at ω_f = θ^(−2f/E), f = 0 … E/2 − 1 (RoFormer eq. 15, which calls it "
                    "θ_i): the exponent counts features, two per pair.",
                    _rope_slip(exponent=1.0)),
            Mistake("positions ignored: rows rotated by 0, 1, 2, … instead of `positions`",
                    "row l is at position positions[l] (after a cache of t tokens that is t + l): use "
                    "the positions given, not arange(L).",
                    _rope_slip(from_zero=True)),
        ],
        shapes=("(..., L, E)",),
        required_options=("theta",),
    )
)


# ------------------------------------------------------------------------------ rope_decode_step


def _kv_cache(keys, values):
    from . import KVCache

    return KVCache(keys, values)


def _step64(q_new, k_new, v_new, cache, *, theta=10000.0, enable_gqa=False, interleaved=False,
            start=None, rotate_values=False, rotate_cached=False):
    """(out, cached keys, cached values) of the step in float64 (or with one slip)."""
    t, L = cache.keys.shape[-2], q_new.shape[-2]
    first = t if start is None else start
    positions = np.arange(first, first + L)
    q = _rope64(q_new, positions, theta, interleaved)
    k = _rope64(k_new, positions, theta, interleaved)
    v = _rope64(v_new, positions, theta, interleaved) if rotate_values else np.asarray(v_new, np.float64)
    old_keys = np.asarray(cache.keys, np.float64)
    if rotate_cached:  # the cached keys rotated once more by their positions
        old_keys = _rope64(old_keys, np.arange(t), theta, interleaved)
    keys = np.concatenate([old_keys, k], -2)
    values = np.concatenate([np.asarray(cache.values, np.float64), v], -2)
    out = attention64(q, keys, values, allowed=causal(L, t + L, "bottom_right"))[0]
    return out, keys, values


def _step_reference(q_new, k_new, v_new, cache, *, theta=10000.0, enable_gqa=False):
    out, keys, values = _step64(q_new, k_new, v_new, cache, theta=theta)
    return out, _kv_cache(keys, values)


def _step_unpack(value, outputs):
    if not isinstance(value, tuple | list) or len(value) != 2:
        kind = f"a {type(value).__name__}" if value is not None else "None (a missing `return`?)"
        raise Unexpected(f"returned {kind}, expected a tuple (out, new_cache)")
    out, cache = value
    keys, values = getattr(cache, "keys", None), getattr(cache, "values", None)
    if not isinstance(out, np.ndarray) or not isinstance(keys, np.ndarray) or not isinstance(values, np.ndarray):
        raise Unexpected("expected (out, new_cache) with a NumPy array `out` and a KVCache (.keys, .values)")
    return out, keys, values


def _step_build(*, gqa=False, theta=None, rotated_cache=True):
    def build(rng, dtype, t, L, E, Ev, H, Hkv=None, batch=None):
        lead = () if batch is None else (batch,)
        hkv = H if Hkv is None else Hkv
        q_new = randn(rng, lead + (H, L, E), dtype)
        k_new = randn(rng, lead + (hkv, L, E), dtype)
        v_new = randn(rng, lead + (hkv, L, Ev), dtype)
        keys = randn(rng, lead + (hkv, t, E), dtype)
        if rotated_cache:  # what earlier steps stored: keys already rotated to 0 … t − 1
            keys = _rope64(keys, np.arange(t), 10000.0 if theta is None else theta).astype(dtype)
        cache = _kv_cache(keys, randn(rng, lead + (hkv, t, Ev), dtype))
        kwargs = {}
        if theta is not None:
            kwargs["theta"] = theta
        if gqa:
            kwargs["enable_gqa"] = True
        return Call((q_new, k_new, v_new, cache), kwargs)

    return build


_STEP_CASES = [
    Case("one new token after 3 cached, one head", _step_build(), dict(t=3, L=1, E=2, Ev=2, H=1),
         minimum=dict(t=1, Ev=2)),
    Case("prefill: 4 tokens into an empty cache", _step_build(), dict(t=0, L=4, E=4, Ev=3, H=2),
         minimum=dict(L=2, Ev=2)),
    Case("2 new tokens after 5 cached, 2 heads", _step_build(), dict(t=5, L=2, E=8, Ev=3, H=2),
         minimum=dict(t=1, L=1, E=2, Ev=2)),
    Case("theta given (θ = 100000)", _step_build(theta=100000.0), dict(t=6, L=2, E=8, Ev=4, H=2),
         minimum=dict(t=1, L=1, E=2, Ev=2)),
    Case("leading batch dim (batch, H, L, E)", _step_build(), dict(t=4, L=1, E=4, Ev=2, H=2, batch=2),
         minimum=dict(t=1, E=2, Ev=2)),
    Case("float32 stays float32", _step_build(), dict(t=4, L=2, E=4, Ev=4, H=2), dtype="float32",
         minimum=dict(t=1, L=1, E=2, Ev=2)),
    Case("GQA (enable_gqa, H = 4 query heads, Hkv = 2)", _step_build(gqa=True),
         dict(t=3, L=2, E=4, Ev=2, H=4, Hkv=2), minimum=dict(t=1, L=1, E=2, Ev=2, H=2, Hkv=1)),
]


def _step_slip(**slip):
    def wrong(call):
        q_new, k_new, v_new, cache = call.args
        theta = call.kwargs.get("theta", 10000.0)
        out, keys, values = _step64(q_new, k_new, v_new, cache, theta=theta, **slip)
        dtype = q_new.dtype
        return out.astype(dtype), _kv_cache(keys.astype(dtype), values.astype(dtype))

    return wrong


def _unrotated_keys_cached(call):
    """Attends like the course but stores k_new before rotating it."""
    q_new, k_new, v_new, cache = call.args
    theta = call.kwargs.get("theta", 10000.0)
    out, _, values = _step64(q_new, k_new, v_new, cache, theta=theta)
    keys = np.concatenate([cache.keys, k_new], -2)
    return out.astype(q_new.dtype), _kv_cache(keys, values.astype(q_new.dtype))


register(
    Battery(
        name="rope_decode_step",
        stage="09",
        signature="rope_decode_step(q_new, k_new, v_new, cache, theta=10000.0)",
        inputs=("q_new", "k_new", "v_new", "cache"),
        reference=_step_reference,
        cases=_STEP_CASES,
        mistakes=[
            Mistake("the new tokens are rotated as if at positions 0, 1, … (the cache length ignored)",
                    "the L new tokens come after the t cached ones: rotate them to positions "
                    "t … t + L − 1, t = cache.length.",
                    _step_slip(start=0)),
            Mistake("the cached keys are rotated again",
                    "keys enter the cache already rotated to their positions; rotate only the new "
                    "queries and keys, never what is in the cache.",
                    _step_slip(rotate_cached=True)),
            Mistake("the values are rotated too",
                    "RoPE rotates queries and keys only: it changes the logits q·k, not what is read.",
                    _step_slip(rotate_values=True)),
            Mistake("the keys are cached before they are rotated",
                    "append the *rotated* k_new: later steps compare their queries with the cached keys "
                    "as they are.",
                    _unrotated_keys_cached),
        ],
        outputs=("out", "new_cache.keys", "new_cache.values"),
        shapes=("(..., H, L, Ev)", "(..., Hkv, S, E)", "(..., Hkv, S, Ev)"),
        required_options=("theta",),
        unpack=_step_unpack,
    )
)
