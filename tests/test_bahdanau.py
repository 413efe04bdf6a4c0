"""Stage 01: additive (Bahdanau) attention and the Luong scores against float64 loops."""

import numpy as np
import pytest
from arrays import namespace_name, to_numpy

from attention_ref import (
    additive_attention,
    additive_score,
    luong_attention,
    luong_attentional_state,
    luong_concat_score,
    luong_dot_score,
    luong_general_score,
    luong_score,
)


def _additive_loop(s, H, W_a, U_a, v_a, mask=None):
    """e_j = v_aᵀ tanh(W_a s + U_a h_j) one j at a time; one query s (Dq,), keys H (S, Dk)."""
    S = H.shape[0]
    e = np.empty(S)
    for j in range(S):
        e[j] = sum(v_a[k] * np.tanh(s @ W_a[:, k] + H[j] @ U_a[:, k]) for k in range(v_a.shape[0]))
    alpha = np.zeros(S)
    keep = np.ones(S, bool) if mask is None else mask
    if keep.any():
        ex = np.exp(e[keep] - e[keep].max())
        alpha[keep] = ex / ex.sum()
    context = sum(alpha[j] * H[j] for j in range(S))
    return context, alpha, e


def _params(rng, Dq=5, Dk=6, A=4):
    return rng.standard_normal((Dq, A)), rng.standard_normal((Dk, A)), rng.standard_normal(A)


def test_additive_attention_matches_loop(xp, rng):
    B, S, Dq, Dk = 3, 7, 5, 6
    s, H = rng.standard_normal((B, Dq)), rng.standard_normal((B, S, Dk))
    W_a, U_a, v_a = _params(rng, Dq, Dk)
    args = [xp.asarray(a) for a in (s, H, W_a, U_a, v_a)]
    context, weights = additive_attention(*args)
    assert namespace_name(context) == namespace_name(args[0])
    assert context.shape == (B, Dk) and weights.shape == (B, S)
    scores = additive_score(*args)
    for b in range(B):
        c_ref, a_ref, e_ref = _additive_loop(s[b], H[b], W_a, U_a, v_a)
        np.testing.assert_allclose(to_numpy(context)[b], c_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(to_numpy(weights)[b], a_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(to_numpy(scores)[b], e_ref, rtol=1e-12, atol=1e-14)


def test_additive_attention_precomputed_keys_and_many_queries(xp, rng):
    """U_a h_j computed once per sentence; several queries broadcast against one key set."""
    B, L, S, Dq, Dk = 2, 4, 5, 3, 6
    s, H = rng.standard_normal((B, L, Dq)), rng.standard_normal((B, 1, S, Dk))
    W_a, U_a, v_a = _params(rng, Dq, Dk, A=7)
    X = [xp.asarray(a) for a in (s, H, W_a, U_a, v_a)]
    projected = xp.matmul(X[1], X[3])
    c1, w1 = additive_attention(*X)
    c2, w2 = additive_attention(*X, projected_keys=projected)
    assert c1.shape == (B, L, Dk) and w1.shape == (B, L, S)
    np.testing.assert_allclose(to_numpy(c1), to_numpy(c2), rtol=1e-13)
    np.testing.assert_allclose(to_numpy(w1), to_numpy(w2), rtol=1e-13)
    for b in range(B):
        for i in range(L):
            c_ref, a_ref, _ = _additive_loop(s[b, i], H[b, 0], W_a, U_a, v_a)
            np.testing.assert_allclose(to_numpy(w1)[b, i], a_ref, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(to_numpy(c1)[b, i], c_ref, rtol=1e-12, atol=1e-14)


def test_additive_attention_float32_in_float32_out(xp, rng):
    s, H = rng.standard_normal((2, 5)), rng.standard_normal((2, 9, 6))
    params = _params(rng)
    args32 = [xp.asarray(a.astype(np.float32)) for a in (s, H, *params)]
    context, weights = additive_attention(*args32)
    assert context.dtype == xp.float32 and weights.dtype == xp.float32
    c64, w64 = additive_attention(*[np.asarray(a, dtype=np.float64) for a in (s, H, *params)])
    np.testing.assert_allclose(to_numpy(weights), w64, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(context), c64, rtol=2e-5, atol=1e-5)


def test_padded_positions_get_weight_exactly_zero(xp, rng):
    B, S, Dq, Dk = 3, 8, 4, 5
    lengths = np.array([8, 3, 1])
    s, H = rng.standard_normal((B, Dq)), rng.standard_normal((B, S, Dk))
    W_a, U_a, v_a = _params(rng, Dq, Dk)
    mask = np.arange(S)[None, :] < lengths[:, None]
    H_garbage = H.copy()
    H_garbage[~mask] = 1e6  # whatever sits in the padding must not matter
    args = [xp.asarray(a) for a in (s, H_garbage, W_a, U_a, v_a)]
    context, weights = additive_attention(*args, mask=xp.asarray(mask))
    w = to_numpy(weights)
    assert np.all(w[~mask] == 0.0)
    for b in range(B):
        c_ref, a_ref, _ = _additive_loop(s[b], H[b, : lengths[b]], W_a, U_a, v_a)
        np.testing.assert_allclose(w[b, : lengths[b]], a_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(to_numpy(context)[b], c_ref, rtol=1e-12, atol=1e-12)


def test_fully_masked_row_gives_zeros_without_warning(xp, rng):
    s, H = rng.standard_normal((2, 4)), rng.standard_normal((2, 3, 5))
    W_a, U_a, v_a = _params(rng, 4, 5)
    mask = np.array([[True, False, True], [False, False, False]])
    context, weights = additive_attention(
        *[xp.asarray(a) for a in (s, H, W_a, U_a, v_a)], mask=xp.asarray(mask)
    )
    assert np.all(to_numpy(weights)[1] == 0.0) and np.all(to_numpy(context)[1] == 0.0)
    np.testing.assert_allclose(to_numpy(weights)[0].sum(), 1.0, rtol=1e-12)


def test_inputs_are_not_modified(rng):
    arrays = [rng.standard_normal((2, 4)), rng.standard_normal((2, 3, 5)), *_params(rng, 4, 5)]
    copies = [a.copy() for a in arrays]
    additive_attention(*arrays, mask=np.array([True, True, False]))
    for a, c in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(a, c)


# ---------------------------------------------------------------------------------------------
# Luong
# ---------------------------------------------------------------------------------------------
def test_luong_scores_match_loops(xp, rng):
    B, S, D, Ds, A = 2, 6, 4, 5, 3
    h_t, h_s = rng.standard_normal((B, D)), rng.standard_normal((B, S, D))
    h_s2 = rng.standard_normal((B, S, Ds))
    W_g = rng.standard_normal((D, Ds))
    W_c, v_c = rng.standard_normal((D + Ds, A)), rng.standard_normal(A)
    X = lambda a: xp.asarray(a)  # noqa: E731
    dot = to_numpy(luong_dot_score(X(h_t), X(h_s)))
    general = to_numpy(luong_general_score(X(h_t), X(h_s2), X(W_g)))
    concat = to_numpy(luong_concat_score(X(h_t), X(h_s2), X(W_c), X(v_c)))
    for b in range(B):
        for j in range(S):
            assert dot[b, j] == pytest.approx(float(np.dot(h_t[b], h_s[b, j])), rel=1e-12)
            assert general[b, j] == pytest.approx(float(h_t[b] @ W_g @ h_s2[b, j]), rel=1e-12)
            cat = np.concatenate([h_t[b], h_s2[b, j]])
            assert concat[b, j] == pytest.approx(float(v_c @ np.tanh(cat @ W_c)), rel=1e-12)
    # the dispatcher gives the same numbers
    np.testing.assert_allclose(to_numpy(luong_score(X(h_t), X(h_s))), dot, rtol=1e-14)
    np.testing.assert_allclose(
        to_numpy(luong_score(X(h_t), X(h_s2), "general", X(W_g))), general, rtol=1e-14
    )
    np.testing.assert_allclose(
        to_numpy(luong_score(X(h_t), X(h_s2), "concat", X(W_c), X(v_c))), concat, rtol=1e-14
    )


def test_luong_concat_is_bahdanau_with_stacked_weights(xp, rng):
    """concat's W_a [h_t; h_s] = Bahdanau's W_a s + U_a h with [W_a; U_a] stacked."""
    s, H = rng.standard_normal((3, 4)), rng.standard_normal((3, 5, 6))
    W_a, U_a, v_a = _params(rng, 4, 6)
    X = [xp.asarray(a) for a in (s, H, W_a, U_a, v_a)]
    add = additive_score(*X)
    cat = luong_concat_score(X[0], X[1], xp.asarray(np.concatenate([W_a, U_a])), X[4])
    np.testing.assert_allclose(to_numpy(add), to_numpy(cat), rtol=1e-13)


def test_luong_attention_and_attentional_state(xp, rng):
    B, S, D = 2, 5, 4
    h_t, h_s = rng.standard_normal((B, D)), rng.standard_normal((B, S, D))
    mask = np.array([[True] * 5, [True, True, False, False, False]])
    context, weights = luong_attention(xp.asarray(h_t), xp.asarray(h_s), mask=xp.asarray(mask))
    w = to_numpy(weights)
    assert np.all(w[~mask] == 0.0)
    for b in range(B):
        e = h_s[b, mask[b]] @ h_t[b]
        a = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
        np.testing.assert_allclose(w[b, mask[b]], a, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(context)[b], a @ h_s[b, mask[b]], rtol=1e-12)
    W_c = rng.standard_normal((D + D, 3))
    state = luong_attentional_state(context, xp.asarray(h_t), xp.asarray(W_c))
    ref = np.tanh(np.concatenate([to_numpy(context), h_t], axis=-1) @ W_c)
    np.testing.assert_allclose(to_numpy(state), ref, rtol=1e-12)
    assert namespace_name(state) == namespace_name(xp.asarray(h_t))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_shapes_name_the_argument(rng):
    s, H = rng.standard_normal((2, 4)), rng.standard_normal((2, 3, 5))
    W_a, U_a, v_a = _params(rng, 4, 5, A=3)
    with pytest.raises(ValueError, match="W_a"):
        additive_attention(s, H, W_a.T, U_a, v_a)
    with pytest.raises(ValueError, match="U_a"):
        additive_attention(s, H, W_a, U_a[:-1], v_a)
    with pytest.raises(ValueError, match="v_a"):
        additive_attention(s, H, W_a, U_a, v_a[:-1])
    with pytest.raises(ValueError, match="keys"):
        additive_attention(s, H[0, 0], W_a, U_a, v_a)
    with pytest.raises(ValueError, match="projected_keys"):
        additive_attention(s, H, W_a, U_a, v_a, projected_keys=H)
    with pytest.raises(ValueError, match="mask"):
        additive_attention(s, H, W_a, U_a, v_a, mask=np.ones(4, bool))
    with pytest.raises(TypeError, match="mask"):
        additive_attention(s, H, W_a, U_a, v_a, mask=np.ones(3))
    with pytest.raises(TypeError, match="query"):
        additive_attention(np.ones((2, 4), dtype=np.int64), H, W_a, U_a, v_a)
    with pytest.raises(ValueError, match=r"query \(3, 4\).*keys \(2, 3, 5\)"):
        additive_attention(np.ones((3, 4)), H, W_a, U_a, v_a)
    with pytest.raises(TypeError, match="one dtype"):
        additive_attention(s.astype(np.float32), H, W_a, U_a, v_a)
    with pytest.raises(ValueError, match="same D"):
        luong_dot_score(s, H)
    with pytest.raises(ValueError, match="W_a"):
        luong_general_score(s, H, np.ones((5, 4)))
    with pytest.raises(ValueError, match="W_a"):
        luong_concat_score(s, H, np.ones((8, 3)), np.ones(3))
    with pytest.raises(ValueError, match="method"):
        luong_score(s, H, "cosine")
    with pytest.raises(TypeError, match="W_a"):
        luong_score(s, H, "general")
    with pytest.raises(ValueError, match="W_c"):
        luong_attentional_state(H[:, 0], s, np.ones((8, 3)))
