"""Stage 01: additive (Bahdanau) attention and the Luong scores.

Bahdanau, Cho and Bengio 2014, "Neural Machine Translation by Jointly Learning to Align and
Translate" (arXiv:1409.0473), eq. 5-6 and appendix A.1.2::

    e_ij  = v_aᵀ tanh(W_a s_{i-1} + U_a h_j)        (alignment model, the "score")
    α_ij  = exp(e_ij) / Σ_k exp(e_ik)               (eq. 6)
    c_i   = Σ_j α_ij h_j                            (eq. 5)

The query is the *previous* decoder state s_{i-1}; the keys (and values) are the encoder
annotations h_j. ``U_a h_j`` does not depend on i, so it can be computed once per sentence and
passed back in as ``projected_keys``.

Luong, Pham and Manning 2015, "Effective Approaches to Attention-based Neural Machine
Translation" (arXiv:1508.04025, §3.1, eq. 5 and 8) score the *current* decoder state h_t::

    dot      h_tᵀ h̄_s
    general  h_tᵀ W_a h̄_s
    concat   v_aᵀ tanh(W_a [h_t; h̄_s])

and build the attentional state h̃_t = tanh(W_c [c_t; h_t]) (eq. 5).

Weight layout: every matrix is stored (in_features, out_features), so the paper's ``W_a s``
is written ``s @ W_a`` here, as in the rest of the package.

All functions are namespace-neutral: they take NumPy, CuPy or any array-API arrays and return
arrays of the same library and dtype. Masks are boolean with True = attend; a masked position gets
weight exactly 0, and a row whose positions are all masked gets all-zero weights (context 0).
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

Array = Any

__all__ = [
    "additive_score",
    "additive_attention",
    "luong_dot_score",
    "luong_general_score",
    "luong_concat_score",
    "luong_score",
    "luong_attention",
    "luong_attentional_state",
]


# ----------------------------------------------------------------------------------------------
# private helpers
# ----------------------------------------------------------------------------------------------
def _check_ndim(name: str, x: Array, ndim: int, shape_doc: str) -> None:
    if x.ndim < ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(x.shape)}")


def _check_2d(name: str, w: Array, rows: int | None, shape_doc: str) -> None:
    if w.ndim != 2 or (rows is not None and w.shape[0] != rows):
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(w.shape)}")


def _check_float(name: str, x: Array, xp: Any) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating-point array, got dtype {x.dtype}")


def _masked_softmax(scores: Array, mask: Array | None, xp: Any) -> Array:
    """Softmax over the last axis; positions where ``mask`` is False get weight exactly 0.

    A row with every position masked returns all zeros (no NaN, no warning).
    """
    if mask is None:
        m = xp.max(scores, axis=-1, keepdims=True)
        e = xp.exp(scores - m)
        return e / xp.sum(e, axis=-1, keepdims=True)
    scores = xp.where(mask, scores, xp.full_like(scores, -math.inf))
    m = xp.max(scores, axis=-1, keepdims=True)
    m = xp.where(xp.isinf(m), xp.zeros_like(m), m)  # fully masked row: avoid -inf - -inf
    e = xp.exp(scores - m)  # exp(-inf) = 0 exactly
    denom = xp.sum(e, axis=-1, keepdims=True)
    denom = xp.where(denom == 0, xp.ones_like(denom), denom)
    return e / denom


def _broadcastable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two shapes broadcast together (NumPy rules)."""
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y and x != 1 and y != 1:
            return False
    return True


def _check_mask(mask: Array, scores_shape: tuple[int, ...], xp: Any) -> None:
    if mask.dtype != xp.bool:
        raise TypeError(f"mask must be a boolean array (True = attend), got dtype {mask.dtype}")
    if mask.ndim > len(scores_shape) or not _broadcastable(tuple(mask.shape), scores_shape):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
            f"{scores_shape} (..., S)"
        )


def _weighted_sum(weights: Array, values: Array, xp: Any) -> Array:
    """c = Σ_j α_j v_j: weights (..., S), values (..., S, D) -> (..., D)."""
    return xp.matmul(xp.expand_dims(weights, axis=-2), values)[..., 0, :]


# ----------------------------------------------------------------------------------------------
# Bahdanau (additive) attention
# ----------------------------------------------------------------------------------------------
def additive_score(
    query: Array,
    keys: Array,
    W_a: Array,
    U_a: Array,
    v_a: Array,
    *,
    projected_keys: Array | None = None,
) -> Array:
    """Bahdanau's alignment model e_j = v_aᵀ tanh(W_a s + U_a h_j) (eq. 6, appendix A.1.2).

    Shapes (leading dimensions ``...`` broadcast between ``query`` and ``keys``):
        query:  (..., Dq)      the previous decoder state s_{i-1}
        keys:   (..., S, Dk)   the encoder annotations h_j
        W_a:    (Dq, A)        U_a: (Dk, A)        v_a: (A,)
        projected_keys: optional (..., S, A), the query-independent part ``keys @ U_a``
            computed once per sentence (it is computed here when omitted).

    Returns the unnormalised scores e of shape (..., S).
    """
    xp = array_namespace(query, keys, W_a, U_a, v_a)
    _check_float("query", query, xp)
    _check_ndim("query", query, 1, "(..., Dq)")
    _check_ndim("keys", keys, 2, "(..., S, Dk)")
    _check_2d("W_a", W_a, query.shape[-1], f"(Dq={query.shape[-1]}, A)")
    A = W_a.shape[1]
    _check_2d("U_a", U_a, keys.shape[-1], f"(Dk={keys.shape[-1]}, A={A})")
    if U_a.shape[1] != A:
        raise ValueError(
            f"U_a must have shape (Dk={keys.shape[-1]}, A={A}), got {tuple(U_a.shape)}"
        )
    if v_a.ndim != 1 or v_a.shape[0] != A:
        raise ValueError(f"v_a must have shape (A={A},), got shape {tuple(v_a.shape)}")
    if not _broadcastable(tuple(query.shape[:-1]), tuple(keys.shape[:-2])):
        raise ValueError(
            f"the leading dimensions of query {tuple(query.shape)} (..., Dq) and keys "
            f"{tuple(keys.shape)} (..., S, Dk) do not broadcast"
        )
    dtypes = {a.dtype for a in (query, keys, W_a, U_a, v_a)}
    if len(dtypes) > 1:
        raise TypeError(
            "query, keys, W_a, U_a and v_a must share one dtype, got "
            f"{[str(a.dtype) for a in (query, keys, W_a, U_a, v_a)]}"
        )
    if projected_keys is None:
        projected_keys = xp.matmul(keys, U_a)  # U_a h_j for every j: (..., S, A)
    elif tuple(projected_keys.shape) != tuple(keys.shape[:-1]) + (A,):
        raise ValueError(
            f"projected_keys must have shape {tuple(keys.shape[:-1]) + (A,)} (keys @ U_a), "
            f"got {tuple(projected_keys.shape)}"
        )
    projected_query = xp.expand_dims(xp.matmul(query, W_a), axis=-2)  # W_a s: (..., 1, A)
    hidden = xp.tanh(projected_query + projected_keys)  # (..., S, A)
    return xp.matmul(hidden, xp.expand_dims(v_a, axis=-1))[..., 0]  # v_aᵀ tanh(.): (..., S)


def additive_attention(
    query: Array,
    keys: Array,
    W_a: Array,
    U_a: Array,
    v_a: Array,
    mask: Array | None = None,
    *,
    projected_keys: Array | None = None,
) -> tuple[Array, Array]:
    """Bahdanau additive attention: the context vector c_i and the weights α_i (eq. 5-6).

    e_j = v_aᵀ tanh(W_a s + U_a h_j);  α = softmax(e) over j;  c = Σ_j α_j h_j.

    Shapes (leading dimensions ``...`` broadcast between ``query`` and ``keys``; for several
    queries at once give ``query`` (..., L, Dq) and ``keys`` (..., 1, S, Dk)):
        query:  (..., Dq)      the previous decoder state s_{i-1}
        keys:   (..., S, Dk)   the encoder annotations h_j (they are also the values)
        W_a:    (Dq, A)        U_a: (Dk, A)        v_a: (A,)
        mask:   optional bool, broadcastable to (..., S); True = attend. Masked (e.g. padded)
            positions get weight exactly 0; a fully masked row gives zero weights and context.
        projected_keys: optional (..., S, A) = ``keys @ U_a``, precomputed once per sentence.

    Returns ``(context, weights)``: context (..., Dk), weights (..., S), in the inputs' dtype.
    """
    xp = array_namespace(query, keys, W_a, U_a, v_a)
    scores = additive_score(query, keys, W_a, U_a, v_a, projected_keys=projected_keys)
    if mask is not None:
        _check_mask(mask, tuple(scores.shape), xp)
    weights = _masked_softmax(scores, mask, xp)  # α_j (eq. 6)
    context = _weighted_sum(weights, keys, xp)  # c = Σ_j α_j h_j (eq. 5)
    return context, weights


# ----------------------------------------------------------------------------------------------
# Luong scores
# ----------------------------------------------------------------------------------------------
def _check_luong(h_t: Array, h_s: Array, xp: Any) -> None:
    _check_float("h_t", h_t, xp)
    _check_float("h_s", h_s, xp)
    if h_t.dtype != h_s.dtype:
        raise TypeError(f"h_t and h_s must share one dtype, got {h_t.dtype} and {h_s.dtype}")
    _check_ndim("h_t", h_t, 1, "(..., Dt)")
    _check_ndim("h_s", h_s, 2, "(..., S, Ds)")


def luong_dot_score(h_t: Array, h_s: Array) -> Array:
    """Luong's *dot* score h_tᵀ h̄_s (Luong et al. 2015, eq. 8, first line).

    Shapes: h_t (..., D) the current decoder state; h_s (..., S, D) the encoder states.
    Returns the scores (..., S). There is no 1/√D scaling (that comes with Vaswani et al. 2017).
    """
    xp = array_namespace(h_t, h_s)
    _check_luong(h_t, h_s, xp)
    if h_t.shape[-1] != h_s.shape[-1]:
        raise ValueError(
            f"the dot score needs h_t (..., D) and h_s (..., S, D) with the same D, got shapes "
            f"{tuple(h_t.shape)} and {tuple(h_s.shape)}"
        )
    return xp.matmul(h_s, xp.expand_dims(h_t, axis=-1))[..., 0]


def luong_general_score(h_t: Array, h_s: Array, W_a: Array) -> Array:
    """Luong's *general* score h_tᵀ W_a h̄_s (Luong et al. 2015, eq. 8, second line).

    Shapes: h_t (..., Dt); h_s (..., S, Ds); W_a (Dt, Ds). Returns the scores (..., S).
    """
    xp = array_namespace(h_t, h_s, W_a)
    _check_luong(h_t, h_s, xp)
    if W_a.ndim != 2 or tuple(W_a.shape) != (h_t.shape[-1], h_s.shape[-1]):
        raise ValueError(
            f"W_a must have shape (Dt={h_t.shape[-1]}, Ds={h_s.shape[-1]}), got {tuple(W_a.shape)}"
        )
    projected = xp.matmul(h_t, W_a)  # h_tᵀ W_a: (..., Ds)
    return xp.matmul(h_s, xp.expand_dims(projected, axis=-1))[..., 0]


def luong_concat_score(h_t: Array, h_s: Array, W_a: Array, v_a: Array) -> Array:
    """Luong's *concat* score v_aᵀ tanh(W_a [h_t; h̄_s]) (Luong et al. 2015, eq. 8, third line).

    Shapes: h_t (..., Dt); h_s (..., S, Ds); W_a (Dt + Ds, A) acting on the concatenation
    [h_t; h̄_s] (rows 0..Dt-1 multiply h_t); v_a (A,). Returns the scores (..., S).
    This is Bahdanau's additive score with [W_a; U_a] stacked into one matrix.
    """
    xp = array_namespace(h_t, h_s, W_a, v_a)
    _check_luong(h_t, h_s, xp)
    Dt, Ds = h_t.shape[-1], h_s.shape[-1]
    if W_a.ndim != 2 or W_a.shape[0] != Dt + Ds:
        raise ValueError(f"W_a must have shape (Dt + Ds={Dt + Ds}, A), got {tuple(W_a.shape)}")
    if v_a.ndim != 1 or v_a.shape[0] != W_a.shape[1]:
        raise ValueError(f"v_a must have shape (A={W_a.shape[1]},), got {tuple(v_a.shape)}")
    # W_a [h_t; h_s] = h_t @ W_a[:Dt] + h_s @ W_a[Dt:], without building the concatenation
    from_t = xp.expand_dims(xp.matmul(h_t, W_a[:Dt, :]), axis=-2)  # (..., 1, A)
    from_s = xp.matmul(h_s, W_a[Dt:, :])  # (..., S, A)
    hidden = xp.tanh(from_t + from_s)
    return xp.matmul(hidden, xp.expand_dims(v_a, axis=-1))[..., 0]


def luong_score(
    h_t: Array,
    h_s: Array,
    method: str = "dot",
    W_a: Array | None = None,
    v_a: Array | None = None,
) -> Array:
    """One of Luong's three scores by name: ``"dot"``, ``"general"`` (needs W_a) or ``"concat"``
    (needs W_a and v_a); see :func:`luong_dot_score` and its siblings for the shapes (eq. 8).

    Returns the scores (..., S).
    """
    if method == "dot":
        return luong_dot_score(h_t, h_s)
    if method == "general":
        if W_a is None:
            raise ValueError("method='general' needs W_a of shape (Dt, Ds)")
        return luong_general_score(h_t, h_s, W_a)
    if method == "concat":
        if W_a is None or v_a is None:
            raise ValueError(
                "method='concat' needs W_a of shape (Dt + Ds, A) and v_a of shape (A,)"
            )
        return luong_concat_score(h_t, h_s, W_a, v_a)
    raise ValueError(f"method must be 'dot', 'general' or 'concat', got {method!r}")


def luong_attention(
    h_t: Array,
    h_s: Array,
    method: str = "dot",
    W_a: Array | None = None,
    v_a: Array | None = None,
    mask: Array | None = None,
) -> tuple[Array, Array]:
    """Luong global attention: a_t = softmax(score(h_t, h̄_s)), c_t = Σ_s a_t(s) h̄_s (eq. 7).

    Shapes: h_t (..., Dt) the *current* decoder state; h_s (..., S, Ds); mask optional bool
    broadcastable to (..., S), True = attend (masked positions get weight exactly 0).
    Returns ``(context, weights)``: context (..., Ds), weights (..., S).
    """
    xp = array_namespace(h_t, h_s)
    scores = luong_score(h_t, h_s, method, W_a, v_a)
    if mask is not None:
        _check_mask(mask, tuple(scores.shape), xp)
    weights = _masked_softmax(scores, mask, xp)
    return _weighted_sum(weights, h_s, xp), weights


def luong_attentional_state(context: Array, h_t: Array, W_c: Array) -> Array:
    """Luong's attentional hidden state h̃_t = tanh(W_c [c_t; h_t]) (Luong et al. 2015, eq. 5).

    Shapes: context (..., Dc); h_t (..., Dt); W_c (Dc + Dt, D) acting on the concatenation
    [c_t; h_t] (rows 0..Dc-1 multiply the context). Returns h̃_t of shape (..., D); the output
    distribution is then softmax(h̃_t @ W_s) (eq. 6).
    """
    xp = array_namespace(context, h_t, W_c)
    _check_float("context", context, xp)
    _check_ndim("context", context, 1, "(..., Dc)")
    _check_ndim("h_t", h_t, 1, "(..., Dt)")
    Dc, Dt = context.shape[-1], h_t.shape[-1]
    if W_c.ndim != 2 or W_c.shape[0] != Dc + Dt:
        raise ValueError(f"W_c must have shape (Dc + Dt={Dc + Dt}, D), got {tuple(W_c.shape)}")
    if not _broadcastable(tuple(context.shape[:-1]), tuple(h_t.shape[:-1])):
        raise ValueError(
            f"context {tuple(context.shape)} and h_t {tuple(h_t.shape)} must share (broadcast) "
            "their leading dimensions"
        )
    return xp.tanh(xp.matmul(context, W_c[:Dc, :]) + xp.matmul(h_t, W_c[Dc:, :]))
