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

from typing import Any

from array_api_compat import array_namespace

from .contract import check_choice, check_float_arrays
from .softmax import masked_softmax, stable_softmax

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
def _check_matrix(name: str, w: Array, rows: int | None, cols: int | None, shape_doc: str) -> None:
    """A floating (rows, cols) weight matrix (None: any size)."""
    check_float_arrays(**{name: w})
    if w.ndim != 2 or w.shape[0] != (rows or w.shape[0]) or w.shape[1] != (cols or w.shape[1]):
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(w.shape)}")


def _check_vector(name: str, v: Array, size: int) -> None:
    """A floating vector (size,)."""
    check_float_arrays(**{name: v})
    if v.ndim != 1 or v.shape[0] != size:
        raise ValueError(f"{name} must have shape (Da={size},), got shape {tuple(v.shape)}")


def _check_leading(a_name: str, a: Array, a_doc: str, b_name: str, b: Array, b_doc: str, a_cut: int, b_cut: int) -> None:
    """The leading dimensions of two arrays (all but their last ``a_cut`` / ``b_cut``) broadcast."""
    lead_a, lead_b = tuple(a.shape[: a.ndim - a_cut]), tuple(b.shape[: b.ndim - b_cut])
    if any(x != y and 1 not in (x, y) for x, y in zip(lead_a[::-1], lead_b[::-1], strict=False)):
        raise ValueError(f"the leading dimensions of {a_name} {tuple(a.shape)} {a_doc} and {b_name} "
                         f"{tuple(b.shape)} {b_doc} do not broadcast")


def _weights(scores: Array, mask: Array | None) -> Array:
    """α = softmax(e) over the last axis; where ``mask`` (True = attend) is False, exactly 0."""
    if mask is None:
        return stable_softmax(scores)
    return masked_softmax(scores, mask)  # (checks the mask)


def _weighted_sum(weights: Array, values: Array, xp: Any) -> Array:
    """c = Σ_j α_j v_j: weights (..., S), values (..., S, Dv) -> (..., Dv)."""
    return xp.matmul(xp.expand_dims(weights, axis=-2), values)[..., 0, :]


# ----------------------------------------------------------------------------------------------
# Bahdanau (additive) attention
# ----------------------------------------------------------------------------------------------
def additive_score(
    query: Array, keys: Array, W_a: Array, U_a: Array, v_a: Array, *, projected_keys: Array | None = None,
) -> Array:
    """Bahdanau's alignment model e_j = v_aᵀ tanh(W_a s + U_a h_j) (eq. 6, appendix A.1.2).

    Shapes (leading dimensions ``...`` broadcast between ``query`` and ``keys``):
        query:  (..., Dq)      the previous decoder state s_{i-1}
        keys:   (..., S, Dk)   the encoder annotations h_j
        W_a:    (Dq, Da)       U_a: (Dk, Da)       v_a: (Da,)   (Da: the alignment model's size)
        projected_keys: optional (..., S, Da), the query-independent part ``keys @ U_a``
            computed once per sentence (it is computed here when omitted).

    Returns the unnormalised scores e of shape (..., S).
    Export with ``python -m attention_ref.export additive_score``.
    """
    check_float_arrays(1, "(..., Dq)", query=query)
    check_float_arrays(2, "(..., S, Dk)", keys=keys)
    _check_matrix("W_a", W_a, query.shape[-1], None, f"(Dq={query.shape[-1]}, Da)")
    Da = W_a.shape[1]
    _check_matrix("U_a", U_a, keys.shape[-1], Da, f"(Dk={keys.shape[-1]}, Da={Da})")
    _check_vector("v_a", v_a, Da)
    _check_leading("query", query, "(..., Dq)", "keys", keys, "(..., S, Dk)", 1, 2)
    given = {} if projected_keys is None else {"projected_keys": projected_keys}
    check_float_arrays(query=query, keys=keys, W_a=W_a, U_a=U_a, v_a=v_a, **given)
    xp = array_namespace(query, keys, W_a, U_a, v_a, *given.values())
    if projected_keys is None:
        projected_keys = xp.matmul(keys, U_a)  # U_a h_j for every j: (..., S, Da)
    elif tuple(projected_keys.shape) != (*keys.shape[:-1], Da):
        raise ValueError(f"projected_keys must have shape {(*keys.shape[:-1], Da)} (keys @ U_a), "
                         f"got {tuple(projected_keys.shape)}")
    projected_query = xp.expand_dims(xp.matmul(query, W_a), axis=-2)  # W_a s: (..., 1, Da)
    hidden = xp.tanh(projected_query + projected_keys)  # (..., S, Da)
    return xp.matmul(hidden, xp.expand_dims(v_a, axis=-1))[..., 0]  # v_aᵀ tanh(.): (..., S)


def additive_attention(
    query: Array, keys: Array, W_a: Array, U_a: Array, v_a: Array, mask: Array | None = None, *,
    projected_keys: Array | None = None,
) -> tuple[Array, Array]:
    """Bahdanau additive attention: the context vector c_i and the weights α_i (eq. 5-6).

    e_j = v_aᵀ tanh(W_a s + U_a h_j);  α = softmax(e) over j;  c = Σ_j α_j h_j.

    Shapes (leading dimensions ``...`` broadcast between ``query`` and ``keys``; for several
    queries at once give ``query`` (..., L, Dq) and ``keys`` (..., 1, S, Dk)):
        query:  (..., Dq)      the previous decoder state s_{i-1}
        keys:   (..., S, Dk)   the encoder annotations h_j (they are also the values)
        W_a:    (Dq, Da)       U_a: (Dk, Da)       v_a: (Da,)   (Da: the alignment model's size)
        mask:   optional bool, broadcastable to (..., S); True = attend. Masked (e.g. padded)
            positions get weight exactly 0; a fully masked row (or S = 0) gives zero weights and context.
        projected_keys: optional (..., S, Da) = ``keys @ U_a``, precomputed once per sentence.

    Returns ``(context, weights)``: context (..., Dk), weights (..., S), in the inputs' dtype.
    Export with ``python -m attention_ref.export additive_attention``.
    """
    scores = additive_score(query, keys, W_a, U_a, v_a, projected_keys=projected_keys)
    weights = _weights(scores, mask)  # α_j (eq. 6)
    return _weighted_sum(weights, keys, array_namespace(weights, keys)), weights  # c = Σ_j α_j h_j (eq. 5)


# ----------------------------------------------------------------------------------------------
# Luong scores
# ----------------------------------------------------------------------------------------------
def _check_luong(h_t: Array, h_s: Array, **weights: Array) -> None:
    """h_t (..., Dt), h_s (..., S, Ds) and the weights, floating arrays of one dtype."""
    check_float_arrays(1, "(..., Dt)", h_t=h_t)
    check_float_arrays(2, "(..., S, Ds)", h_s=h_s)
    check_float_arrays(h_t=h_t, h_s=h_s, **weights)


def luong_dot_score(h_t: Array, h_s: Array) -> Array:
    """Luong's *dot* score h_tᵀ h̄_s (Luong et al. 2015, eq. 8, first line).

    Shapes: h_t (..., Ds) the current decoder state; h_s (..., S, Ds) the encoder states.
    Returns the scores (..., S). There is no scale (τ = 1/√E comes with Vaswani et al. 2017).
    Export with ``python -m attention_ref.export luong_dot_score``.
    """
    _check_luong(h_t, h_s)
    if h_t.shape[-1] != h_s.shape[-1]:
        raise ValueError(f"the dot score needs h_t (..., Ds) and h_s (..., S, Ds) with the same Ds, got shapes "
                         f"{tuple(h_t.shape)} and {tuple(h_s.shape)}")
    xp = array_namespace(h_t, h_s)
    return xp.matmul(h_s, xp.expand_dims(h_t, axis=-1))[..., 0]


def luong_general_score(h_t: Array, h_s: Array, W_a: Array) -> Array:
    """Luong's *general* score h_tᵀ W_a h̄_s (Luong et al. 2015, eq. 8, second line).

    Shapes: h_t (..., Dt); h_s (..., S, Ds); W_a (Dt, Ds). Returns the scores (..., S).
    Export with ``python -m attention_ref.export luong_general_score``.
    """
    _check_luong(h_t, h_s, W_a=W_a)
    _check_matrix("W_a", W_a, h_t.shape[-1], h_s.shape[-1], f"(Dt={h_t.shape[-1]}, Ds={h_s.shape[-1]})")
    xp = array_namespace(h_t, h_s, W_a)
    projected = xp.matmul(h_t, W_a)  # h_tᵀ W_a: (..., Ds)
    return xp.matmul(h_s, xp.expand_dims(projected, axis=-1))[..., 0]


def luong_concat_score(h_t: Array, h_s: Array, W_a: Array, v_a: Array) -> Array:
    """Luong's *concat* score v_aᵀ tanh(W_a [h_t; h̄_s]) (Luong et al. 2015, eq. 8, third line).

    Shapes: h_t (..., Dt); h_s (..., S, Ds); W_a (Dt + Ds, Da) acting on the concatenation
    [h_t; h̄_s] (rows 0..Dt-1 multiply h_t); v_a (Da,). Returns the scores (..., S).
    This is Bahdanau's additive score with [W_a; U_a] stacked into one matrix.
    Export with ``python -m attention_ref.export luong_concat_score``.
    """
    _check_luong(h_t, h_s, W_a=W_a, v_a=v_a)
    Dt, Ds = h_t.shape[-1], h_s.shape[-1]
    _check_matrix("W_a", W_a, Dt + Ds, None, f"(Dt + Ds={Dt + Ds}, Da)")
    _check_vector("v_a", v_a, W_a.shape[1])
    xp = array_namespace(h_t, h_s, W_a, v_a)
    # W_a [h_t; h_s] = h_t @ W_a[:Dt] + h_s @ W_a[Dt:], without building the concatenation
    from_t = xp.expand_dims(xp.matmul(h_t, W_a[:Dt, :]), axis=-2)  # (..., 1, Da)
    from_s = xp.matmul(h_s, W_a[Dt:, :])  # (..., S, Da)
    hidden = xp.tanh(from_t + from_s)
    return xp.matmul(hidden, xp.expand_dims(v_a, axis=-1))[..., 0]


def luong_score(h_t: Array, h_s: Array, method: str = "dot", W_a: Array | None = None,
                v_a: Array | None = None) -> Array:
    """One of Luong's three scores by name: ``"dot"``, ``"general"`` (needs W_a) or ``"concat"``
    (needs W_a and v_a); see :func:`luong_dot_score` and its siblings for the shapes (eq. 8).

    Returns the scores (..., S). Export with ``python -m attention_ref.export luong_score``.
    """
    check_choice("method", method, ("dot", "general", "concat"))
    if method == "general" and W_a is None:
        raise TypeError("method='general' needs W_a of shape (Dt, Ds)")
    if method == "concat" and (W_a is None or v_a is None):
        raise TypeError("method='concat' needs W_a of shape (Dt + Ds, Da) and v_a of shape (Da,)")
    if method == "dot":
        return luong_dot_score(h_t, h_s)
    return luong_general_score(h_t, h_s, W_a) if method == "general" else luong_concat_score(h_t, h_s, W_a, v_a)


def luong_attention(h_t: Array, h_s: Array, method: str = "dot", W_a: Array | None = None,
                    v_a: Array | None = None, mask: Array | None = None) -> tuple[Array, Array]:
    """Luong global attention: a_t = softmax(score(h_t, h̄_s)), c_t = Σ_s a_t(s) h̄_s (eq. 7).

    Shapes: h_t (..., Dt) the *current* decoder state; h_s (..., S, Ds); mask optional bool
    broadcastable to (..., S), True = attend (masked positions get weight exactly 0).
    Returns ``(context, weights)``: context (..., Ds), weights (..., S).
    Export with ``python -m attention_ref.export luong_attention``.
    """
    weights = _weights(luong_score(h_t, h_s, method, W_a, v_a), mask)
    return _weighted_sum(weights, h_s, array_namespace(weights, h_s)), weights


def luong_attentional_state(context: Array, h_t: Array, W_c: Array) -> Array:
    """Luong's attentional hidden state h̃_t = tanh(W_c [c_t; h_t]) (Luong et al. 2015, eq. 5).

    Shapes: context (..., Dc); h_t (..., Dt); W_c (Dc + Dt, Dh) acting on the concatenation
    [c_t; h_t] (rows 0..Dc-1 multiply the context). Returns h̃_t of shape (..., Dh); the output
    distribution is then softmax(h̃_t @ W_s) (eq. 6).
    Export with ``python -m attention_ref.export luong_attentional_state``.
    """
    check_float_arrays(1, "(..., Dc)", context=context)
    check_float_arrays(1, "(..., Dt)", h_t=h_t)
    Dc, Dt = context.shape[-1], h_t.shape[-1]
    _check_matrix("W_c", W_c, Dc + Dt, None, f"(Dc + Dt={Dc + Dt}, Dh)")
    check_float_arrays(context=context, h_t=h_t, W_c=W_c)
    _check_leading("context", context, "(..., Dc)", "h_t", h_t, "(..., Dt)", 1, 1)
    xp = array_namespace(context, h_t, W_c)
    return xp.tanh(xp.matmul(context, W_c[:Dc, :]) + xp.matmul(h_t, W_c[Dc:, :]))
