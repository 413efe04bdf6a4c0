"""Checker batteries for stages 01–04: ``additive_attention``, ``scaled_dot_product_attention``,
``self_attention`` and ``multi_head_attention``.

The references materialise the L × S matrix in float64 and are written here, independently of the
library's internals (the tests show they agree with the library). ``attention64`` is shared with
the FlashAttention and decoding batteries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .check_core import Battery, Call, Candidates, Case, Mistake, randn, register, small_ints
from .check_softmax import softmax64

# ---------------------------------------------------------------------------------------------
# The float64 reference every attention battery uses
# ---------------------------------------------------------------------------------------------


def repeat_kv(q, k, v, tile: bool = False):
    """GQA: give each query head its key/value head, i // (Hq / Hkv) (``tile``: i % Hkv instead)."""
    if q.ndim < 3 or k.ndim < 3 or q.shape[-3] == k.shape[-3]:
        return k, v
    group = q.shape[-3] // k.shape[-3]
    if tile:
        return np.concatenate([k] * group, axis=-3), np.concatenate([v] * group, axis=-3)
    return np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)


def attention64(q, k, v, *, scale=None, allowed=None, bias=None, axis=-1, tile_kv=False):
    """(O, P) for P = softmax(τ Q Kᵀ + Δ) with masked entries exactly 0, O = P V, all in float64.

    q (..., L, E), k (..., S, E), v (..., S, Ev); τ = ``scale`` or 1/√E; ``allowed`` a boolean mask
    (True = attend) and ``bias`` a float mask, both broadcastable to (..., L, S). A query with no
    key left gets O = 0. ``axis=-2`` and ``tile_kv`` reproduce two classic mistakes.
    """
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    k, v = repeat_kv(q, k, v, tile_kv)
    tau = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    z = tau * (q @ np.swapaxes(k, -1, -2))
    if bias is not None:
        z = z + bias
    if allowed is not None:
        allowed = np.broadcast_to(allowed, z.shape)
    p = softmax64(z, axis, allowed)
    return p @ v, p


def causal(L: int, S: int, alignment: str = "top_left") -> np.ndarray:
    """tril(ones(L, S)) (top-left, PyTorch's is_causal) or tril(ones(L, S), S − L) (bottom-right)."""
    return np.tril(np.ones((L, S), bool), 0 if alignment == "top_left" else S - L)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def qkv(rng, dtype, L, S, E, Ev, B=None, H=None, Hkv=None, ints=False, size=1.0):
    """q (B, H, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev); B and H only when given."""
    lead = tuple(n for n in (B, H) if n is not None)
    kv_lead = lead if Hkv is None else lead[:-1] + (Hkv,)
    if ints:
        return (small_ints(rng, lead + (L, E), dtype), small_ints(rng, kv_lead + (S, E), dtype),
                small_ints(rng, kv_lead + (S, Ev), dtype, 0, 4))
    return (randn(rng, lead + (L, E), dtype, size), randn(rng, kv_lead + (S, E), dtype, size),
            randn(rng, kv_lead + (S, Ev), dtype))


def bool_mask(rng, L, S, fully_masked_row=False):
    """A random (L, S) boolean mask (True = attend) in which every row keeps a key, except the
    last one when ``fully_masked_row``."""
    mask = rng.random((L, S)) < 0.6
    mask[np.arange(L), rng.integers(0, S, size=L)] = True
    if fully_masked_row:
        mask[-1] = False
    return mask


def float_mask(rng, dtype, L, S):
    """An additive (L, S) mask: finite biases, and −∞ (masked) entries; every row keeps a key."""
    bias = rng.uniform(-2, 2, size=(L, S))
    bias[~bool_mask(rng, L, S)] = -np.inf
    return bias.astype(dtype)


def padding(rng, B, S):
    """A key-padding mask (B, 1, 1, S): sequence b has lengths[b] ≥ 1 real keys."""
    lengths = rng.integers(1, S + 1, size=B)
    lengths[0] = max(1, S - 1) if S > 1 else 1
    return np.arange(S)[None, None, None, :] < lengths[:, None, None, None]


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None)
# ---------------------------------------------------------------------------------------------


@dataclass
class SDPAParts:
    """A call of an attention function, read with the course's semantics."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    allowed: np.ndarray | None
    bias: np.ndarray | None
    scale: float | None
    mask: np.ndarray | None
    causal_alignment: str | None

    @property
    def E(self) -> int:
        return self.q.shape[-1]

    @property
    def tau(self) -> float:
        return 1.0 / math.sqrt(self.E) if self.scale is None else self.scale

    def attend(self, **changes):
        """O with the course's semantics, or with one thing changed (a mistake)."""
        options = dict(scale=self.tau, allowed=self.allowed, bias=self.bias)
        options.update(changes)
        return attention64(self.q, self.k, self.v, **options)[0].astype(self.q.dtype)


def sdpa_parts(q, k, v, attn_mask=None, is_causal=False, scale=None, causal_alignment="top_left", **_):
    L, S = q.shape[-2], k.shape[-2]
    allowed = bias = None
    if is_causal:
        allowed = causal(L, S, causal_alignment)
    if attn_mask is not None and attn_mask.dtype == bool:
        allowed = attn_mask if allowed is None else allowed & attn_mask
    elif attn_mask is not None:
        bias = attn_mask
    return SDPAParts(q, k, v, allowed, bias, scale, attn_mask,
                     causal_alignment if is_causal else None)


def _sdpa_reference(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    return sdpa_parts(query, key, value, attn_mask, is_causal, scale).attend().astype(np.float64)


def _naive_attention(p: SDPAParts, q, k, v):
    """softmax without the max, computed in the input's dtype (as a student's float32 code would)."""
    k, v = repeat_kv(q, k, v)
    z = (q @ np.swapaxes(k, -1, -2)) * np.asarray(p.tau, q.dtype)
    if p.bias is not None:
        z = z + p.bias
    if p.allowed is not None:
        z = np.where(p.allowed, z, -np.inf)
    e = np.exp(z)
    total = np.sum(e, axis=-1, keepdims=True)
    return Candidates([(e / total) @ v, (e / np.where(total > 0, total, 1)) @ v])


def _always(p: SDPAParts) -> bool:
    return True


def _has_bool_mask(p: SDPAParts) -> bool:
    return p.mask is not None and p.mask.dtype == bool


def _square_probe(sizes):
    """Shrink with E = S, so that K Kᵀ-shaped mistakes (K not transposed) still run."""
    return {**sizes, "E": sizes["S"]} if "E" in sizes and "S" in sizes else sizes


def _ls_probe(sizes):
    """Shrink with L = S, so that mistakes that swap queries and keys still run."""
    return {**sizes, "L": sizes["S"]} if "L" in sizes and "S" in sizes else sizes


def _k_untransposed(p: SDPAParts):
    return attention_variant_logits(p, p.q @ p.k)


def _qk_swapped(p: SDPAParts):
    z = p.tau * (np.asarray(p.k, np.float64) @ np.swapaxes(np.asarray(p.q, np.float64), -1, -2))
    if p.bias is not None:
        z = z + p.bias
    w = softmax64(z, -1, None if p.allowed is None else np.broadcast_to(p.allowed, z.shape))
    return (w @ np.asarray(p.v, np.float64)).astype(p.q.dtype)


def _dot_t(p: SDPAParts):
    """``.T`` on a batched key, which reverses every axis (only defined beyond 2-D)."""
    return None if p.q.ndim <= 2 else attention_variant_logits(p, p.q @ p.k.T)


def _mask_swapped(p: SDPAParts, padding: bool):
    """attn_mask applied with its last two axes swapped, L = S: a key-padding mask (..., 1, S) used
    on the queries (``padding``), or a full (L, S) mask transposed."""
    m = p.mask
    if m is None or m.dtype != bool or m.ndim < 2 or (m.shape[-2] == 1) != padding or p.q.shape[-2] != p.k.shape[-2]:
        return None
    return p.attend(allowed=np.swapaxes(m, -1, -2))


def _fully_masked(fill: str):
    """The rows whose keys are all masked filled with NaN (``fill="nan"``) or with the mean of V, as
    −1e9 instead of −∞ gives (``fill="mean"``)."""

    def make(p: SDPAParts):
        out = p.attend()
        none_left = ~np.any(np.broadcast_to(p.allowed, out.shape[:-1] + (p.k.shape[-2],)), axis=-1)
        if not none_left.any():
            return None
        if fill == "nan":
            return np.where(none_left[..., None], np.nan, out).astype(p.q.dtype)
        k, v = repeat_kv(p.q, p.k, p.v)
        mean_v = np.broadcast_to(np.mean(np.asarray(v, np.float64), axis=-2, keepdims=True), out.shape)
        return np.where(none_left[..., None], mean_v, out).astype(p.q.dtype)

    return make


def _core_mistakes(when) -> list[Mistake]:
    """Scale, softmax axis, transposes and overflow: mistakes any attention core can make."""
    return [
        Mistake("no scale", "the logits must be scaled: Z = τ Q Kᵀ with τ = 1/√E (E = query.shape[-1]) "
                "unless `scale` is given. Without it the softmax saturates as E grows.",
                when(_always, lambda p: p.attend(scale=1.0 if p.scale is None else p.scale))),
        Mistake("wrong scale: divided by E", "divide the logits by √E, not by E: τ = 1/√E.",
                when(lambda p: p.scale is None, lambda p: p.attend(scale=1.0 / p.E))),
        Mistake("wrong scale: multiplied by √E", "divide the logits by √E (τ = 1/√E), do not multiply.",
                when(lambda p: p.scale is None, lambda p: p.attend(scale=math.sqrt(p.E)))),
        Mistake("softmax over the wrong axis",
                "the weights P must sum to 1 along each row, over the keys: softmax along axis −1 "
                "of Z (L × S), not along the queries.",
                when(_always, lambda p: p.attend(axis=-2))),
        Mistake("K not transposed", "the logits are Q Kᵀ: (L × E) times (E × S). Use "
                "`np.swapaxes(key, -1, -2)` (or `key.mT`).",
                when(_always, _k_untransposed), probe=_square_probe),
        Mistake("Q and K swapped", "Z = Q Kᵀ has one row per query (L × S); K Qᵀ has one row per key.",
                when(_always, _qk_swapped), probe=_ls_probe),
        Mistake("`.T` on a batched array", "`.T` reverses *every* axis of a 3-D or 4-D array; "
                "transpose only the last two with `np.swapaxes(key, -1, -2)` (or `key.mT`).",
                when(_always, _dot_t), match_errors=True),
        Mistake("no max-subtraction", "e^z overflows for large logits (float32: z > 88) and inf/inf "
                "gives NaN. Subtract each row's maximum before exponentiating.",
                when(_always, lambda p: _naive_attention(p, p.q, p.k, p.v))),
    ]


def _attn_mask_mistakes(when) -> list[Mistake]:
    """Mistakes with attn_mask: its convention, its axes and the rows it masks entirely."""
    return [
        Mistake("mask convention inverted (True = ignore)",
                "a boolean attn_mask means True = *attend* (PyTorch's SDPA); "
                "`torch.nn.MultiheadAttention` uses the opposite.",
                when(_has_bool_mask, lambda p: p.attend(allowed=~np.asarray(p.mask)))),
        Mistake("boolean mask added to the logits",
                "a boolean mask selects keys (masked logits become −∞); only a float mask is added.",
                when(_has_bool_mask, lambda p: p.attend(allowed=None, bias=np.asarray(p.mask, np.float64)))),
        Mistake("logits multiplied by the mask",
                "Z · mask makes masked logits 0, which still get weight e^0; set them to −∞.",
                when(_has_bool_mask, lambda p: attention_variant_logits(
                    p, p.q @ np.swapaxes(p.k, -1, -2), post=lambda z: z * p.mask, masked=False))),
        Mistake("padding mask applied to queries instead of keys",
                "a key-padding mask (..., 1, S) removes *keys* (columns of Z) for every query; "
                "yours removed queries (rows).",
                when(_always, lambda p: _mask_swapped(p, padding=True)), probe=_ls_probe),
        Mistake("attn_mask transposed", "attn_mask[i, j] is about query i and key j: rows are "
                "queries, columns keys (shape (L, S)).",
                when(_always, lambda p: _mask_swapped(p, padding=False)), probe=_ls_probe),
        Mistake("a fully masked row gives NaN",
                "a query whose keys are all masked must get 0 (PyTorch's choice): guard the "
                "0/0 of its softmax.",
                when(lambda p: p.allowed is not None, _fully_masked("nan"))),
        Mistake("masked logits set to a large finite number",
                "−1e9 instead of −∞ gives a fully masked row the mean of V; this course returns 0.",
                when(lambda p: p.allowed is not None, _fully_masked("mean"))),
    ]


def _causal_triu(p: SDPAParts):
    """np.triu where np.tril was meant: the future (and the diagonal) instead of the past."""
    L, S = p.q.shape[-2], p.k.shape[-2]
    diagonal = np.eye(L, S, k=0 if p.causal_alignment == "top_left" else S - L, dtype=bool)
    return p.attend(allowed=~causal(L, S, p.causal_alignment) | diagonal)


def _causal_mistakes(when) -> list[Mistake]:
    """Mistakes with is_causal: the alignment when L ≠ S, and triu for tril."""
    return [
        Mistake("causal mask aligned bottom-right where top-left was asked",
                "is_causal=True is top-left (PyTorch): query i sees keys j ≤ i, "
                "tril(ones(L, S)). Bottom-right, tril(ones(L, S), S − L), is for decoding.",
                when(lambda p: p.causal_alignment == "top_left" and p.q.shape[-2] != p.k.shape[-2],
                     lambda p: p.attend(allowed=causal(p.q.shape[-2], p.k.shape[-2], "bottom_right")))),
        Mistake("causal mask aligned top-left where bottom-right was asked",
                "bottom-right lines the last query up with the last key: query i sees keys "
                "j ≤ i + S − L, tril(ones(L, S), S − L).",
                when(lambda p: p.causal_alignment == "bottom_right" and p.q.shape[-2] != p.k.shape[-2],
                     lambda p: p.attend(allowed=causal(p.q.shape[-2], p.k.shape[-2], "top_left")))),
        Mistake("causal mask built with triu",
                "np.triu keeps the *future*: with True = attend the causal mask is np.tril.",
                when(lambda p: p.causal_alignment is not None, _causal_triu)),
    ]


def attention_mistakes(parts, *, has_scale=True, has_mask=True, has_causal=True) -> list[Mistake]:
    """The classic mistakes of the attention core; ``parts(call)`` reads a call as SDPAParts (or
    returns None where the battery's function does more than attention, see ``wrap``)."""

    def when(test, make):
        def wrong(call):
            p = parts(call)
            return make(p) if p is not None and test(p) else None

        return wrong

    mistakes = _core_mistakes(when)
    if has_scale:
        mistakes.append(Mistake("ignores the `scale` argument",
                                "when `scale` is given use it instead of 1/√E.",
                                when(lambda p: p.scale is not None, lambda p: p.attend(scale=1 / math.sqrt(p.E)))))
    if has_mask:
        mistakes += _attn_mask_mistakes(when)
    if has_causal:
        mistakes += _causal_mistakes(when)
    return mistakes


def attention_variant_logits(p: SDPAParts, qk, post=None, masked=True):
    """O when the logits τ·``qk`` (+ bias) are computed another way (and ``post`` applied)."""
    z = p.tau * np.asarray(qk, np.float64)
    if p.bias is not None:
        z = z + p.bias
    if post is not None:
        z = post(z)
    allowed = p.allowed if masked else None
    w = softmax64(z, -1, None if allowed is None else np.broadcast_to(allowed, z.shape))
    k, v = repeat_kv(p.q, p.k, p.v)
    return (w @ np.asarray(v, np.float64)).astype(p.q.dtype)


def attention_options(rng, dtype, L, S, B=None, *, mask=None, causal=False, scale=None, **others) -> dict:
    """Keyword options of an attention call: ``attn_mask`` of one kind ("bool", "float", "padding"
    (B, 1, 1, S), "fully": a bool mask with a fully masked row), ``is_causal``, ``scale``, and
    ``others`` as given (None values left out)."""
    kwargs = {}
    if mask == "bool":
        kwargs["attn_mask"] = bool_mask(rng, L, S)
    elif mask == "float":
        kwargs["attn_mask"] = float_mask(rng, dtype, L, S)
    elif mask == "padding":
        kwargs["attn_mask"] = padding(rng, B, S)
    elif mask == "fully":
        kwargs["attn_mask"] = bool_mask(rng, L, S, fully_masked_row=True)
    if causal:
        kwargs["is_causal"] = True
    if scale is not None:
        kwargs["scale"] = scale
    kwargs.update({k: v for k, v in others.items() if v is not None})
    return kwargs


def _sdpa_build(*, ints=False, mask=None, causal=False, scale=None, size=1.0, gqa=False):
    def build(rng, dtype, L, S, E, Ev, B=None, H=None, Hkv=None):
        q, k, v = qkv(rng, dtype, L, S, E, Ev, B, H, Hkv, ints=ints, size=size)
        options = attention_options(rng, dtype, L, S, B, mask=mask, causal=causal, scale=scale,
                                    enable_gqa=True if gqa else None)
        return Call((q, k, v), options)

    return build


LARGE_LOGITS = dict(dtype="float32", tol=(2e-3, 2e-3))  # a float32 case whose logits overflow e^z

_SDPA_CASES = [
    Case("tiny hand-checkable example", _sdpa_build(ints=True), dict(L=2, S=3, E=2, Ev=2)),
    Case("random, L = S", _sdpa_build(), dict(L=5, S=5, E=4, Ev=4)),
    Case("L ≠ S, Ev ≠ E, odd sizes", _sdpa_build(), dict(L=3, S=7, E=5, Ev=3)),
    Case("leading batch dims (B, H, L, E)", _sdpa_build(), dict(L=4, S=6, E=4, Ev=3, B=2, H=3)),
    Case("boolean mask (True = attend)", _sdpa_build(mask="bool"), dict(L=4, S=6, E=4, Ev=3)),
    Case("float mask (added to the logits)", _sdpa_build(mask="float"), dict(L=4, S=6, E=4, Ev=3)),
    Case("key-padding mask (B, 1, 1, S)", _sdpa_build(mask="padding"),
         dict(L=4, S=5, E=4, Ev=3, B=2, H=2), minimum=dict(B=1, S=2)),
    Case("is_causal, L = S", _sdpa_build(causal=True), dict(L=5, S=5, E=4, Ev=3)),
    Case("is_causal with L ≠ S (top-left, as PyTorch)", _sdpa_build(causal=True),
         dict(L=3, S=6, E=4, Ev=3)),
    Case("scale given", _sdpa_build(scale=0.3), dict(L=4, S=5, E=4, Ev=3)),
    Case("a fully masked row gives 0", _sdpa_build(mask="fully"), dict(L=3, S=5, E=4, Ev=3)),
    Case("float32 stays float32", _sdpa_build(), dict(L=4, S=6, E=4, Ev=3), dtype="float32"),
    Case("float32, large logits (overflow)", _sdpa_build(size=22.0), dict(L=4, S=6, E=4, Ev=3), **LARGE_LOGITS),
    Case("GQA (enable_gqa, Hq = 4, Hkv = 2)", _sdpa_build(gqa=True),
         dict(L=3, S=5, E=4, Ev=3, B=1, H=4, Hkv=2), minimum=dict(H=2, Hkv=2)),
]

register(
    Battery(
        name="scaled_dot_product_attention",
        stage="02",
        signature="scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None)",
        inputs=("query", "key", "value"),
        reference=_sdpa_reference,
        cases=_SDPA_CASES,
        mistakes=attention_mistakes(lambda call: sdpa_parts(*call.args, **call.kwargs)),
        shapes=("(..., L, Ev)",),
        required_options=("attn_mask", "is_causal", "scale"),
    )
)

# ---------------------------------------------------------------------------------------------
# additive_attention(query, keys, W_a, U_a, v_a, mask=None) -> (context, weights)
# ---------------------------------------------------------------------------------------------


def _additive(query, keys, W_a, U_a, v_a, mask=None, *, tanh=True, swap=False, axis=-1, nan_rows=False,
              values="keys", weights_used="alpha", dtype_naive=False):
    """Bahdanau's e_j = v_aᵀ tanh(W_a s + U_a h_j), α = softmax(e), c = Σ_j α_j h_j — or a mistake."""
    dtype = query.dtype
    if not dtype_naive:
        query, keys, W_a, U_a, v_a = (np.asarray(t, np.float64) for t in (query, keys, W_a, U_a, v_a))
    Wq, Uk = (keys @ W_a, query @ U_a) if swap else (query @ W_a, keys @ U_a)
    pre = Wq[..., None, :] + Uk if not swap else Uk[..., None, :] + Wq
    e = (np.tanh(pre) if tanh else pre) @ v_a
    h = keys @ U_a if values == "projected" else keys

    def finish(alpha):
        w = e if weights_used == "scores" else alpha
        context = (w[..., None, :] @ h)[..., 0, :]
        return context.astype(dtype), alpha.astype(dtype)

    if dtype_naive:  # no max-subtraction, in the input's dtype; the 0/0 of a row guarded or not
        ez = np.exp(e if mask is None else np.where(mask, e, -np.inf))
        total = np.sum(ez, axis=-1, keepdims=True)
        return Candidates([finish(ez / total), finish(ez / np.where(total > 0, total, 1))])
    alpha = softmax64(e, axis, None if mask is None else np.broadcast_to(mask, e.shape))
    if nan_rows and mask is not None:
        alpha = np.where(np.any(np.broadcast_to(mask, e.shape), axis=-1, keepdims=True), alpha, np.nan)
    return finish(alpha)


def _additive_reference(query, keys, W_a, U_a, v_a, mask=None):
    c, a = _additive(query, keys, W_a, U_a, v_a, mask)
    return c.astype(np.float64), a.astype(np.float64)


def _additive_build(*, ints=False, several=False, mask=None, v_size=1.0):
    def build(rng, dtype, S, Dq, Dk, Da, B=None, L=None):
        gen = (lambda shape: small_ints(rng, shape, dtype, -1, 1)) if ints else (lambda shape: randn(rng, shape, dtype))
        lead = () if B is None else (B,)
        q_shape = lead + ((L,) if several else ()) + (Dq,)
        k_shape = lead + ((1,) if several else ()) + (S, Dk)
        query, keys = gen(q_shape), gen(k_shape)
        W_a, U_a = gen((Dq, Da)), gen((Dk, Da))
        v_a = (gen((Da,)) * v_size).astype(dtype)
        kwargs = {}
        if mask is not None:
            m = bool_mask(rng, B or 1, S, fully_masked_row=(mask == "fully"))
            kwargs["mask"] = m if B is not None else m[0]
        return Call((query, keys, W_a, U_a, v_a), kwargs)

    return build


def _additive_variant(**change):
    def wrong(call):
        return _additive(*call.args, **call.kwargs, **change)

    return wrong


def _has_mask(call):
    return call.kwargs.get("mask") is not None


_ADDITIVE_CASES = [
    Case("tiny hand-checkable example (one query)", _additive_build(ints=True), dict(S=3, Dq=2, Dk=2, Da=2)),
    Case("random sizes, Dq ≠ Dk", _additive_build(), dict(S=6, Dq=3, Dk=4, Da=5)),
    Case("a batch of queries (B, Dq) with keys (B, S, Dk)", _additive_build(), dict(S=5, Dq=3, Dk=4, Da=3, B=2)),
    Case("several queries at once (B, L, Dq) with keys (B, 1, S, Dk)", _additive_build(several=True),
         dict(S=5, Dq=3, Dk=4, Da=3, B=2, L=3)),
    Case("float32 stays float32", _additive_build(), dict(S=5, Dq=3, Dk=4, Da=3), dtype="float32"),
    Case("float32, large scores (overflow)", _additive_build(v_size=200.0), dict(S=6, Dq=3, Dk=4, Da=4),
         **LARGE_LOGITS),
    Case("boolean mask (B, S), True = attend", _additive_build(mask="bool"), dict(S=5, Dq=3, Dk=4, Da=3, B=3)),
    Case("a fully masked row gives zero weights and context", _additive_build(mask="fully"),
         dict(S=4, Dq=3, Dk=2, Da=3, B=2)),
]


def _mask_inverted(call):
    if not _has_mask(call):
        return None
    kwargs = dict(call.kwargs, mask=~call.kwargs["mask"])
    return _additive(*call.args, **kwargs)


register(
    Battery(
        name="additive_attention",
        stage="01",
        signature="additive_attention(query, keys, W_a, U_a, v_a)",
        inputs=("query", "keys", "W_a", "U_a", "v_a"),
        reference=_additive_reference,
        cases=_ADDITIVE_CASES,
        mistakes=[
            Mistake("tanh missing", "Bahdanau's score is e_j = v_aᵀ tanh(W_a s + U_a h_j): the tanh "
                    "makes the alignment model a one-hidden-layer network.", _additive_variant(tanh=False)),
            Mistake("W_a and U_a swapped", "W_a projects the query s (Dq × Da), U_a the keys h_j (Dk × Da).",
                    _additive_variant(swap=True), probe=lambda s: {**s, "Dq": s["Dk"]}),
            Mistake("context built from the projected keys", "the context is c = Σ_j α_j h_j over the "
                    "keys themselves (the annotations h_j), not over U_a h_j.",
                    _additive_variant(values="projected")),
            Mistake("context built from the scores instead of the weights",
                    "normalise first: c = Σ_j α_j h_j with α = softmax(e).",
                    _additive_variant(weights_used="scores")),
            Mistake("softmax over the wrong axis", "α is a softmax over the keys j (the last axis of e).",
                    lambda call: _additive(*call.args, **call.kwargs, axis=-2)
                    if call.args[0].ndim >= 2 and call.args[1].ndim >= 3 else None),
            Mistake("no max-subtraction", "e^e overflows for large scores (float32: > 88); subtract "
                    "each row's maximum first.", _additive_variant(dtype_naive=True)),
            Mistake("mask convention inverted (True = ignore)", "True means the key takes part "
                    "(attend); padded keys are False.", _mask_inverted),
            Mistake("a fully masked row gives NaN", "a row with every key masked must get zero weights "
                    "and a zero context.", lambda call: _additive(*call.args, **call.kwargs, nan_rows=True)
                    if _has_mask(call) else None),
        ],
        outputs=("context", "weights"),
        shapes=("(..., Dk)", "(..., S)"),
    )
)

# ---------------------------------------------------------------------------------------------
# self_attention(x, params, *, attn_mask=None, is_causal=False) and
# multi_head_attention(query, key, value, params, num_heads, *, num_kv_heads=None, attn_mask=None, is_causal=False)
# ---------------------------------------------------------------------------------------------


def _params(rng, dtype, d_q, d_k_in, d_v_in, E_total, Ev_total, d_out, size=1.0):
    from . import AttentionParams

    def w(n_in, n_out, s=1.0):
        return randn(rng, (n_in, n_out), dtype, s / math.sqrt(n_in))

    return AttentionParams(
        W_q=w(d_q, E_total, size), W_k=w(d_k_in, E_total, size), W_v=w(d_v_in, Ev_total), W_o=w(Ev_total, d_out),
        b_q=randn(rng, (E_total,), dtype, 0.5), b_k=randn(rng, (E_total,), dtype, 0.5),
        b_v=randn(rng, (Ev_total,), dtype, 0.5), b_o=randn(rng, (d_out,), dtype, 0.5),
    )


def _project(x, W, b, use_bias=True):
    y = np.asarray(x, np.float64) @ np.asarray(W, np.float64)
    return y + np.asarray(b, np.float64) if (use_bias and b is not None) else y


def split_heads64(x, H, plain_reshape=False):
    """(..., L, H·E) → (..., H, L, E); ``plain_reshape`` is the classic mistake (no transpose)."""
    *lead, L, D = x.shape
    if plain_reshape:
        return x.reshape(*lead, H, L, D // H)
    return np.swapaxes(x.reshape(*lead, L, H, D // H), -2, -3)


def merge_heads64(x, plain_reshape=False):
    *lead, H, L, E = x.shape
    if plain_reshape:
        return x.reshape(*lead, L, H * E)
    return np.swapaxes(x, -2, -3).reshape(*lead, L, H * E)


def _mha(query, key, value, params, num_heads, *, num_kv_heads=None, attn_mask=None, is_causal=False,
         scale=None, bias=True, w_o=True, split_plain=False, merge_plain=False, keys_from_wq=False,
         tile_kv=False, allowed_override=None, axis=-1, naive=False):
    """Multi-head attention in float64 (or with one of the classic mistakes)."""
    dtype = query.dtype
    H = num_heads
    Hkv = num_heads if num_kv_heads is None else num_kv_heads
    W_k, b_k = (params.W_q, params.b_q) if keys_from_wq else (params.W_k, params.b_k)
    q = _project(query, params.W_q, params.b_q, bias)
    k = _project(key, W_k, b_k, bias)
    v = _project(value, params.W_v, params.b_v, bias)
    if H is not None:  # num_heads=None: single-head attention without a head axis
        q, k, v = (split_heads64(x, h, split_plain) for x, h in ((q, H), (k, Hkv), (v, Hkv)))
    p = sdpa_parts(q, k, v, attn_mask, is_causal, scale)
    if naive:
        q32, k32, v32 = (t.astype(dtype) for t in (q, k, v))
        return Candidates(_mha_finish(h.astype(np.float64), H, merge_plain, w_o, params, bias, dtype)
                          for h in _naive_attention(p, q32, k32, v32))
    else:
        heads = attention64(q, k, v, scale=p.tau, allowed=p.allowed if allowed_override is None else allowed_override,
                            bias=p.bias, axis=axis, tile_kv=tile_kv)[0]
    return _mha_finish(heads, H, merge_plain, w_o, params, bias, dtype)


def _mha_finish(heads, H, merge_plain, w_o, params, bias, dtype):
    """Merge the heads and apply the output projection."""
    out = heads if H is None else merge_heads64(heads, merge_plain)
    if w_o:
        out = _project(out, params.W_o, params.b_o, bias)
    return out.astype(dtype)


def _self(x, params, *, attn_mask=None, is_causal=False, **mistake):
    return _mha(x, x, x, params, None, attn_mask=attn_mask, is_causal=is_causal, **mistake)


def _self_reference(x, params, *, attn_mask=None, is_causal=False):
    return _self(x, params, attn_mask=attn_mask, is_causal=is_causal).astype(np.float64)


def _mha_reference(query, key, value, params, num_heads, *, num_kv_heads=None, attn_mask=None, is_causal=False):
    return _mha(query, key, value, params, num_heads, num_kv_heads=num_kv_heads, attn_mask=attn_mask,
                is_causal=is_causal).astype(np.float64)


def _self_build(*, mask=None, causal=False, size=1.0):
    def build(rng, dtype, L, d_model, E, Ev, d_out, B=None):
        lead = () if B is None else (B,)
        x = randn(rng, lead + (L, d_model), dtype)
        params = _params(rng, dtype, d_model, d_model, d_model, E, Ev, d_out, size)
        kwargs = {}
        if mask == "bool":
            kwargs["attn_mask"] = bool_mask(rng, L, L)
        elif mask == "padding":
            kwargs["attn_mask"] = padding(rng, B, L)[:, 0]
        if causal:
            kwargs["is_causal"] = True
        return Call((x, params), kwargs)

    return build


def _projection_mistakes(run, *, heads: bool) -> list[Mistake]:
    """Mistakes in the projections around the attention core; ``run(call, **change)``."""
    def scale_by_width(call):
        params = call.args[1] if not heads else call.args[3]
        d_model = params.W_q.shape[0]
        head = params.W_q.shape[1] // (call.args[4] if heads else 1)
        return None if d_model == head else run(call, scale=1.0 / math.sqrt(d_model))

    mistakes = [
        Mistake("scaled by the model width, not the head size",
                "τ = 1/√E with E the size of one head's queries and keys "
                + ("(d_model / H), not 1/√d_model." if heads else "(W_q.shape[1]), not 1/√d_model."),
                scale_by_width),
        Mistake("biases ignored", "each projection is x W + b (b_q, b_k, b_v, b_o).",
                lambda call: run(call, bias=False)),
        Mistake("output projection W_o missing", "finish with out = O W_o + b_o.",
                lambda call: run(call, w_o=False)),
        Mistake("keys projected with W_q", "keys use W_k (and b_k), queries W_q.",
                lambda call: run(call, keys_from_wq=True)),
        Mistake("no scale", "scale the logits by τ = 1/√E (E = the head size).",
                lambda call: run(call, scale=1.0)),
        Mistake("softmax over the wrong axis", "softmax along the keys (the last axis of Z).",
                lambda call: run(call, axis=-2)),
        Mistake("no max-subtraction", "e^z overflows for large logits (float32: z > 88); subtract "
                "each row's maximum first.", lambda call: run(call, naive=True)),
    ]
    return mistakes


def _mask_mistakes(run, L_equals_S) -> list[Mistake]:
    def inverted(call):
        m = call.kwargs.get("attn_mask")
        if m is None or m.dtype != bool:
            return None
        return run(call, attn_mask=~m)

    def query_padding(call):
        m = call.kwargs.get("attn_mask")
        if m is None or m.dtype != bool or m.ndim < 2 or m.shape[-2] != 1 or not L_equals_S(call):
            return None
        return run(call, allowed_override=np.swapaxes(m, -1, -2))

    def transposed(call):
        m = call.kwargs.get("attn_mask")
        if m is None or m.dtype != bool or m.ndim < 2 or m.shape[-2] == 1 or not L_equals_S(call):
            return None
        return run(call, allowed_override=np.swapaxes(m, -1, -2))

    def triu(call):
        if not call.kwargs.get("is_causal"):
            return None
        L = call.args[0].shape[-2]
        return run(call, is_causal=False, attn_mask=np.triu(np.ones((L, L), bool)))

    return [
        Mistake("mask convention inverted (True = ignore)",
                "a boolean attn_mask means True = attend (PyTorch's SDPA convention).", inverted),
        Mistake("padding mask applied to queries instead of keys",
                "a key-padding mask (B, 1, …, S) removes keys (columns of Z) for every query.",
                query_padding, probe=lambda s: {**s, "L": s["S"]} if "S" in s else s),
        Mistake("attn_mask transposed", "attn_mask[i, j] is about query i and key j: rows are queries, "
                "columns keys.", transposed, probe=lambda s: {**s, "L": s["S"]} if "S" in s else s),
        Mistake("causal mask built with triu", "with True = attend the causal mask is np.tril.", triu),
    ]


def _self_run(call, **change):
    kwargs = dict(call.kwargs)
    kwargs.update({k: change.pop(k) for k in ("attn_mask", "is_causal") if k in change})
    return _self(*call.args, **kwargs, **change)


_SELF_CASES = [
    Case("tiny example", _self_build(), dict(L=2, d_model=2, E=2, Ev=2, d_out=2)),
    Case("random sizes (d_model, E, Ev, d_out all different)", _self_build(),
         dict(L=5, d_model=6, E=4, Ev=3, d_out=5), minimum=dict(d_model=2, E=1)),
    Case("leading batch dim (B, L, d_model)", _self_build(), dict(L=4, d_model=6, E=4, Ev=3, d_out=5, B=2)),
    Case("float32 stays float32", _self_build(), dict(L=4, d_model=6, E=4, Ev=3, d_out=5), dtype="float32"),
    Case("float32, large logits (overflow)", _self_build(size=30.0), dict(L=4, d_model=6, E=4, Ev=3, d_out=5),
         **LARGE_LOGITS),
    Case("is_causal", _self_build(causal=True), dict(L=5, d_model=6, E=4, Ev=3, d_out=5)),
    Case("boolean mask (True = attend)", _self_build(mask="bool"), dict(L=5, d_model=6, E=4, Ev=3, d_out=5)),
    Case("key-padding mask (B, 1, L)", _self_build(mask="padding"),
         dict(L=5, d_model=6, E=4, Ev=3, d_out=5, B=2), minimum=dict(L=2)),
]

register(
    Battery(
        name="self_attention",
        stage="03",
        signature="self_attention(x, params)",
        inputs=("x", "params"),
        reference=_self_reference,
        cases=_SELF_CASES,
        mistakes=_projection_mistakes(_self_run, heads=False) + _mask_mistakes(_self_run, lambda call: True),
        shapes=("(..., L, d_out)",),
    )
)


def _mha_build(*, self_attn=False, mask=None, causal=False, kv_heads=None, size=1.0):
    def build(rng, dtype, L, S, d_model, H, E, B=None):
        lead = () if B is None else (B,)
        Hkv = H if kv_heads is None else kv_heads
        query = randn(rng, lead + (L, d_model), dtype)
        if self_attn:
            key = value = query
        else:
            key, value = randn(rng, lead + (S, d_model), dtype), randn(rng, lead + (S, d_model), dtype)
        params = _params(rng, dtype, d_model, d_model, d_model, H * E, H * E, d_model, size)
        if Hkv != H:
            from . import AttentionParams

            params = AttentionParams(params.W_q, params.W_k[:, : Hkv * E], params.W_v[:, : Hkv * E], params.W_o,
                                     params.b_q, params.b_k[: Hkv * E], params.b_v[: Hkv * E], params.b_o)
        kwargs = {}
        if Hkv != H:
            kwargs["num_kv_heads"] = Hkv
        if mask == "padding":
            kwargs["attn_mask"] = padding(rng, B, key.shape[-2])
        elif mask == "bool":
            kwargs["attn_mask"] = bool_mask(rng, L, key.shape[-2])
        if causal:
            kwargs["is_causal"] = True
        return Call((query, key, value, params, H), kwargs)

    return build


def _mha_run(call, **change):
    kwargs = dict(call.kwargs)
    kwargs.update({k: change.pop(k) for k in ("attn_mask", "is_causal") if k in change})
    return _mha(*call.args, **kwargs, **change)


_MHA_CASES = [
    Case("tiny example (2 heads of size 1)", _mha_build(), dict(L=2, S=3, d_model=2, H=2, E=1)),
    Case("self-attention (query = key = value)", _mha_build(self_attn=True), dict(L=5, S=5, d_model=8, H=2, E=4),
         minimum=dict(H=2)),
    Case("cross-attention, L ≠ S", _mha_build(), dict(L=3, S=6, d_model=8, H=2, E=4), minimum=dict(H=2)),
    Case("4 heads, head size ≠ d_model / H", _mha_build(), dict(L=4, S=5, d_model=6, H=4, E=3), minimum=dict(H=2)),
    Case("leading batch dim (B, L, d_model)", _mha_build(), dict(L=4, S=5, d_model=8, H=2, E=4, B=2),
         minimum=dict(H=2)),
    Case("float32 stays float32", _mha_build(), dict(L=4, S=5, d_model=8, H=2, E=4), dtype="float32"),
    Case("float32, large logits (overflow)", _mha_build(size=30.0), dict(L=4, S=5, d_model=8, H=2, E=4), **LARGE_LOGITS),
    Case("GQA (num_kv_heads = 2 of 4)", _mha_build(kv_heads=2), dict(L=3, S=5, d_model=8, H=4, E=2),
         minimum=dict(H=4)),
    Case("MQA (num_kv_heads = 1)", _mha_build(kv_heads=1), dict(L=3, S=5, d_model=8, H=4, E=2), minimum=dict(H=2)),
    Case("is_causal", _mha_build(self_attn=True, causal=True), dict(L=5, S=5, d_model=8, H=2, E=4)),
    Case("key-padding mask (B, 1, 1, S)", _mha_build(mask="padding"), dict(L=4, S=5, d_model=8, H=2, E=4, B=2),
         minimum=dict(S=2)),
]

register(
    Battery(
        name="multi_head_attention",
        stage="04",
        signature="multi_head_attention(query, key, value, params, num_heads)",
        inputs=("query", "key", "value", "params", "num_heads"),
        reference=_mha_reference,
        cases=_MHA_CASES,
        mistakes=_projection_mistakes(_mha_run, heads=True)
        + [
            Mistake("heads split with a plain reshape", "(…, L, H·E) → (…, H, L, E) needs a reshape to "
                    "(…, L, H, E) and then swapping the L and H axes; a reshape alone mixes tokens across heads.",
                    lambda call: _mha_run(call, split_plain=True)),
            Mistake("heads merged with a plain reshape", "(…, H, L, E) → (…, L, H·E): swap the H and L axes "
                    "back before reshaping.", lambda call: _mha_run(call, merge_plain=True)),
            Mistake("heads split and merged with plain reshapes", "reshape to (…, L, H, E) and swap axes "
                    "(and back when merging).", lambda call: _mha_run(call, split_plain=True, merge_plain=True)),
            Mistake("GQA heads tiled instead of repeated", "query head i uses key/value head i // (H / Hkv) "
                    "(np.repeat along the head axis), not i % Hkv (np.tile).",
                    lambda call: _mha_run(call, tile_kv=True) if call.kwargs.get("num_kv_heads") else None),
        ]
        + _mask_mistakes(_mha_run, lambda call: call.args[0].shape[-2] == call.args[1].shape[-2]),
        shapes=("(..., L, d_model)",),
    )
)
