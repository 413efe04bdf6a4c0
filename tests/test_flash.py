"""Tiled FlashAttention (FA-1, FA-2) against the materialised float64 scaled_dot_product_attention."""

import math

import numpy as np
import pytest
from arrays import namespace_name, to_numpy

from attention_ref import (
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
)
from attention_ref.flash import (
    TileStats,
    attention_backward,
    attention_weights_from_lse,
    expand_block_mask,
    flash_attention,
    flash_attention_backward,
    merge_attention_partials,
)

ALGORITHMS = ["fa1", "fa2"]
# (L, S, E, Ev): L = 1, S = 1, L ≠ S, d = 59, lengths that are not multiples of the blocks
SHAPES = [(1, 1, 8, 8), (1, 37, 16, 7), (37, 1, 16, 16), (37, 53, 59, 31), (64, 64, 16, 16), (130, 70, 8, 5)]
BLOCKS = dict(block_q=16, block_k=32)


def _rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def _structure_mask(L, S, is_causal, window, alignment):
    m = np.ones((L, S), dtype=bool)
    if is_causal:
        m &= causal_mask(L, S, alignment)
    if window is not None:
        m &= sliding_window_mask(L, S, window[0], window[1], alignment)
    return m


def _ref_lse(q, k, mask=None, scale=None):
    """logsumexp of the masked logits, materialised in float64 (−inf for fully masked rows)."""
    s = q @ np.swapaxes(k, -1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m_safe = np.where(np.isinf(m), 0.0, m)
    total = np.sum(np.exp(s - m_safe), axis=-1)
    with np.errstate(divide="ignore"):
        return np.log(total) + m_safe[..., 0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_sdpa(xp, rng, shape, algorithm):
    L, S, E, Ev = shape
    q, k, v = rng.standard_normal((2, 3, L, E)), rng.standard_normal((2, 3, S, E)), rng.standard_normal((2, 3, S, Ev))
    out, lse = flash_attention(
        xp.asarray(q), xp.asarray(k), xp.asarray(v), algorithm=algorithm, return_lse=True, **BLOCKS
    )
    assert namespace_name(out) == namespace_name(xp.asarray(q)) == namespace_name(lse)
    assert out.shape == (2, 3, L, Ev) and lse.shape == (2, 3, L)
    ref = scaled_dot_product_attention(q, k, v)
    assert _rel_err(to_numpy(out), ref) < 1e-12
    np.testing.assert_allclose(to_numpy(lse), _ref_lse(q, k), rtol=1e-12)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize(
    "is_causal, window",
    [(True, None), (False, (5, 3)), (True, (9, None)), (False, (None, 2)), (False, (0, 0))],
)
@pytest.mark.parametrize("L, S", [(37, 53), (53, 37), (40, 40)])
def test_causal_and_window_both_alignments(xp, rng, L, S, is_causal, window, alignment, algorithm):
    q, k, v = rng.standard_normal((2, L, 24)), rng.standard_normal((2, S, 24)), rng.standard_normal((2, S, 6))
    out, lse = flash_attention(
        xp.asarray(q), xp.asarray(k), xp.asarray(v), is_causal=is_causal, window=window,
        causal_alignment=alignment, algorithm=algorithm, return_lse=True, block_q=8, block_k=16,
    )
    mask = _structure_mask(L, S, is_causal, window, alignment)
    ref = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert _rel_err(to_numpy(out), ref) < 1e-12
    np.testing.assert_allclose(to_numpy(lse), _ref_lse(q, k, mask), rtol=1e-12)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_padding_mask_gqa_and_causal_combined(xp, rng, algorithm):
    B, Hq, H, L, S, E = 3, 6, 2, 29, 45, 59
    q, k, v = rng.standard_normal((B, Hq, L, E)), rng.standard_normal((B, H, S, E)), rng.standard_normal((B, H, S, 9))
    lengths = np.array([45, 17, 0])  # the last batch element has no keys at all
    pad = padding_mask(lengths, S)
    out, lse = flash_attention(
        xp.asarray(q), xp.asarray(k), xp.asarray(v), attn_mask=xp.asarray(pad), is_causal=True,
        causal_alignment="bottom_right", enable_gqa=True, algorithm=algorithm, return_lse=True, **BLOCKS
    )
    mask = pad & causal_mask(L, S, "bottom_right")
    ref = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert _rel_err(to_numpy(out), ref) < 1e-12
    assert np.all(to_numpy(out)[2] == 0) and np.all(np.isneginf(to_numpy(lse)[2]))


def test_float_mask_is_added(xp, rng):
    q, k, v = rng.standard_normal((2, 19, 8)), rng.standard_normal((2, 23, 8)), rng.standard_normal((2, 23, 8))
    bias = rng.standard_normal((19, 23))
    bias[3, :] = -np.inf  # a row masked through the float mask
    bias[:, 5] = -np.inf
    out = flash_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), attn_mask=xp.asarray(bias), block_q=4, block_k=8)
    ref = scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert _rel_err(to_numpy(out), ref) < 1e-12
    assert np.all(to_numpy(out)[:, 3] == 0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_float32_in_float32_out(xp, rng, algorithm):
    q, k, v = (rng.standard_normal((2, 2, 77, 40)).astype(np.float32) for _ in range(3))
    out, lse = flash_attention(
        xp.asarray(q), xp.asarray(k), xp.asarray(v), is_causal=True, algorithm=algorithm, return_lse=True, **BLOCKS
    )
    assert out.dtype == xp.float32 and lse.dtype == xp.float32
    ref = scaled_dot_product_attention(*(x.astype(np.float64) for x in (q, k, v)), is_causal=True)
    assert _rel_err(to_numpy(out), ref) < 1e-5


def test_float16_accumulates_in_float32(rng):
    # logits of 40·40·64 = 102400 overflow float16 (max 65504); the flash loop works in float32
    q = np.full((20, 64), 40, dtype=np.float16)
    v = rng.standard_normal((33, 64)).astype(np.float16)
    out, lse = flash_attention(q, q[:1].repeat(33, axis=0), v, return_lse=True, block_q=8, block_k=8)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out.astype(np.float64), np.broadcast_to(v.astype(np.float64).mean(0), (20, 64)), atol=2e-3)
    q, k, v = (rng.standard_normal((30, 64)).astype(np.float16) * 20 for _ in range(3))
    ref = scaled_dot_product_attention(*(x.astype(np.float64) for x in (q, k, v)))
    np.testing.assert_allclose(flash_attention(q, k, v).astype(np.float64), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_large_inputs_no_nan_or_inf(xp, rng, algorithm):
    q, k, v = (rng.standard_normal((2, 41, 16)) * 100 for _ in range(3))
    for dtype in (np.float64, np.float32):
        args = [xp.asarray(x.astype(dtype)) for x in (q, k, v)]
        out, lse = flash_attention(*args, is_causal=True, algorithm=algorithm, return_lse=True, **BLOCKS)
        assert np.all(np.isfinite(to_numpy(out))) and np.all(np.isfinite(to_numpy(lse)))
        do = xp.asarray(np.ones((2, 41, 16), dtype=dtype))
        grads = flash_attention_backward(*args, out, lse, do, is_causal=True, **BLOCKS)
        assert all(np.all(np.isfinite(to_numpy(g))) for g in grads)
    ref = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert _rel_err(flash_attention(q, k, v, is_causal=True, algorithm=algorithm, **BLOCKS), ref) < 1e-12


def test_fully_masked_rows_zero_output_neg_inf_lse_zero_grads(xp, rng):
    L, S = 21, 34
    q, k, v = rng.standard_normal((2, L, 8)), rng.standard_normal((2, S, 8)), rng.standard_normal((2, S, 5))
    mask = rng.random((2, L, S)) < 0.5
    mask[:, [0, 7, 20], :] = False
    args = [xp.asarray(x) for x in (q, k, v)]
    for algorithm in ALGORITHMS:
        out, lse = flash_attention(*args, attn_mask=xp.asarray(mask), algorithm=algorithm, return_lse=True, **BLOCKS)
        o, l_ = to_numpy(out), to_numpy(lse)
        assert np.all(o[:, [0, 7, 20]] == 0) and np.all(np.isneginf(l_[:, [0, 7, 20]]))
        assert np.all(np.isfinite(np.delete(l_, [0, 7, 20], axis=1)))
    do = xp.asarray(rng.standard_normal((2, L, 5)))
    dq, dk, dv = flash_attention_backward(*args, out, lse, do, attn_mask=xp.asarray(mask), **BLOCKS)
    assert all(np.all(np.isfinite(to_numpy(g))) for g in (dq, dk, dv))
    assert np.all(to_numpy(dq)[:, [0, 7, 20]] == 0)
    ref = attention_backward(q, k, v, to_numpy(do), attn_mask=mask)
    for g, r in zip((dq, dk, dv), ref, strict=True):
        assert _rel_err(to_numpy(g), r) < 1e-12


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


def _finite_difference_grads(f, arrays, eps=1e-6):
    """Central differences of the scalar f(*arrays) with respect to every element of every array."""
    grads = []
    for idx in range(len(arrays)):
        g = np.zeros_like(arrays[idx])
        for pos in np.ndindex(*arrays[idx].shape):
            plus = [a.copy() for a in arrays]
            minus = [a.copy() for a in arrays]
            plus[idx][pos] += eps
            minus[idx][pos] -= eps
            g[pos] = (f(*plus) - f(*minus)) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(is_causal=True, causal_alignment="bottom_right"),
        dict(window=(2, 1)),
        dict(enable_gqa=True),
    ],
    ids=["plain", "causal-br", "window", "gqa"],
)
def test_backward_against_finite_differences(rng, options):
    Hk = 1 if options.get("enable_gqa") else 2
    q = rng.standard_normal((2, 5, 3))
    k, v = rng.standard_normal((Hk, 7, 3)), rng.standard_normal((Hk, 7, 2))
    mask = rng.random((1, 5, 7)) < 0.8
    mask[0, 2, :] = False  # a fully masked row: its gradients are 0
    do = rng.standard_normal((2, 5, 2))
    kw = dict(block_q=2, block_k=3, **options)

    def loss(q_, k_, v_):
        return float(np.sum(flash_attention(q_, k_, v_, attn_mask=mask, **kw) * do))

    out, lse = flash_attention(q, k, v, attn_mask=mask, return_lse=True, **kw)
    grads = flash_attention_backward(q, k, v, out, lse, do, attn_mask=mask, **kw)
    for g, fd in zip(grads, _finite_difference_grads(loss, [q, k, v]), strict=True):
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    plain = attention_backward(q, k, v, do, attn_mask=mask, **options)
    for g, r in zip(grads, plain, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "options",
    [
        dict(is_causal=True),
        dict(is_causal=True, causal_alignment="bottom_right", window=(6, None)),
        dict(window=(3, 4), causal_alignment="bottom_right"),
    ],
    ids=["causal", "causal-br-window", "window-br"],
)
def test_backward_matches_materialised_with_masks(xp, rng, options):
    B, Hq, H, L, S, E = 2, 4, 2, 37, 29, 59
    q, k, v = rng.standard_normal((B, Hq, L, E)), rng.standard_normal((B, H, S, E)), rng.standard_normal((B, H, S, 11))
    pad = padding_mask(np.array([29, 13]), S)
    do = rng.standard_normal((B, Hq, L, 11))
    a = [xp.asarray(x) for x in (q, k, v)]
    out, lse = flash_attention(*a, attn_mask=xp.asarray(pad), enable_gqa=True, return_lse=True, **BLOCKS, **options)
    grads = flash_attention_backward(*a, out, lse, xp.asarray(do), attn_mask=xp.asarray(pad), enable_gqa=True, **BLOCKS, **options)
    ref = attention_backward(q, k, v, do, attn_mask=pad, enable_gqa=True, **options)
    for g, r, x in zip(grads, ref, (q, k, v), strict=True):
        assert g.shape == x.shape and namespace_name(g) == namespace_name(a[0])
        assert _rel_err(to_numpy(g), r) < 1e-11


def test_attention_backward_against_finite_differences(rng):
    q, k, v = rng.standard_normal((4, 3)), rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    bias = rng.standard_normal((4, 6))
    do = rng.standard_normal((4, 2))

    def loss(q_, k_, v_):
        return float(np.sum(scaled_dot_product_attention(q_, k_, v_, attn_mask=bias) * do))

    grads = attention_backward(q, k, v, do, attn_mask=bias)
    for g, fd in zip(grads, _finite_difference_grads(loss, [q, k, v]), strict=True):
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "shapes,mask_shape,enable_gqa,exc",
    [
        (((3, 2, 9, 4), (2, 11, 4), (1, 11, 4)), None, False, ValueError),  # ranks differ
        (((2, 2, 9, 4), (1, 2, 11, 4), (1, 2, 11, 4)), None, False, ValueError),  # batch needs broadcast
        (((2, 4, 9, 4), (2, 1, 11, 4), (2, 1, 11, 4)), None, False, ValueError),  # 1 KV head without GQA
        (((2, 3, 9, 4), (2, 2, 11, 4), (2, 2, 11, 4)), None, True, ValueError),  # 2 does not divide 3
        (((2, 3, 9, 4), (2, 3, 11, 4), (2, 3, 11, 4)), (4, 2, 3, 9, 11), False, ValueError),  # mask enlarges
        (((2, 3, 9, 4), (2, 3, 11, 4), (2, 3, 11, 4)), "int", False, TypeError),  # integer mask
    ],
)
def test_rejects_what_sdpa_rejects(rng, shapes, mask_shape, enable_gqa, exc):
    q, k, v = (rng.standard_normal(s) for s in shapes)
    mask = None
    if mask_shape == "int":
        mask = np.ones((9, 11), dtype=np.int64)
    elif mask_shape is not None:
        mask = np.ones(mask_shape, dtype=bool)
    for fn in (scaled_dot_product_attention, flash_attention):
        with pytest.raises(exc):
            fn(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def test_float32_backward_within_tolerance(rng):
    q, k, v, do = (rng.standard_normal((2, 45, 16)).astype(np.float32) for _ in range(4))
    out, lse = flash_attention(q, k, v, is_causal=True, return_lse=True, **BLOCKS)
    grads = flash_attention_backward(q, k, v, out, lse, do, is_causal=True, **BLOCKS)
    ref = attention_backward(*(x.astype(np.float64) for x in (q, k, v, do)), is_causal=True)
    for g, r in zip(grads, ref, strict=True):
        assert g.dtype == np.float32
        assert _rel_err(g, r) < 1e-5


# ------------------------------------------------------------------------------------------------
# tiles: skipping, block-sparse, the report
# ------------------------------------------------------------------------------------------------


def test_causal_square_skips_the_upper_triangle_of_tiles():
    q = np.zeros((256, 8))
    _, stats = flash_attention(q, q, q, is_causal=True, block_q=64, block_k=64, return_stats=True)
    assert isinstance(stats, TileStats)
    assert (stats.total, stats.computed, stats.skipped) == (16, 10, 6)
    assert (stats.count("full"), stats.count("partial")) == (6, 4)
    assert "10 of 16 tiles computed" in stats.summary()


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_tile_states_agree_with_the_element_mask(rng, alignment):
    for _ in range(20):
        L, S = (int(x) for x in rng.integers(1, 60, size=2))
        bq, bk = (int(x) for x in rng.integers(1, 17, size=2))
        is_causal = bool(rng.random() < 0.5)
        window = None if rng.random() < 0.3 else tuple(
            None if rng.random() < 0.3 else int(x) for x in rng.integers(0, 20, size=2)
        )
        mask = _structure_mask(L, S, is_causal, window, alignment)
        q = np.zeros((L, 2))
        _, stats = flash_attention(q, np.zeros((S, 2)), np.zeros((S, 2)), is_causal=is_causal, window=window,
                                   causal_alignment=alignment, block_q=bq, block_k=bk, return_stats=True)
        for bi, row in enumerate(stats.tile_map):
            for bj, state in enumerate(row):
                tile = mask[bi * bq:(bi + 1) * bq, bj * bk:(bj + 1) * bk]
                expected = "skip" if not tile.any() else ("full" if tile.all() else "partial")
                assert state == expected, (L, S, bq, bk, is_causal, window, bi, bj)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_block_sparse_equals_dense_with_expanded_mask(xp, rng, algorithm):
    L, S, bq, bk = 45, 70, 16, 16
    q, k, v = rng.standard_normal((2, L, 8)), rng.standard_normal((2, S, 8)), rng.standard_normal((2, S, 8))
    block_mask = rng.random((3, 5)) < 0.5
    block_mask[1, :] = False  # whole query block off: those rows give 0
    out, stats = flash_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), is_causal=True,
                                 causal_alignment="bottom_right", block_mask=xp.asarray(block_mask),
                                 block_q=bq, block_k=bk, algorithm=algorithm, return_stats=True)
    dense = np.asarray(to_numpy(expand_block_mask(xp.asarray(block_mask), L, S, bq, bk)))
    assert dense.shape == (L, S)
    ref = scaled_dot_product_attention(q, k, v, attn_mask=dense & causal_mask(L, S, "bottom_right"))
    assert _rel_err(to_numpy(out), ref) < 1e-12
    causal = flash_attention(q, k, v, is_causal=True, causal_alignment="bottom_right", block_q=bq,
                             block_k=bk, return_stats=True)[1]
    assert stats.count("skip") == causal.count("skip")
    assert stats.count("block") == sum(
        1 for bi in range(3) for bj in range(5) if not block_mask[bi, bj] and causal.tile_map[bi][bj] != "skip"
    )
    assert stats.computed + stats.skipped == 15


def test_block_sparse_backward(rng):
    L, S, bq, bk = 30, 41, 8, 8
    q, k, v, do = rng.standard_normal((L, 8)), rng.standard_normal((S, 8)), rng.standard_normal((S, 8)), rng.standard_normal((L, 8))
    block_mask = rng.random((4, 6)) < 0.6
    kw = dict(block_mask=block_mask, block_q=bq, block_k=bk)
    out, lse = flash_attention(q, k, v, return_lse=True, **kw)
    grads = flash_attention_backward(q, k, v, out, lse, do, **kw)
    ref = attention_backward(q, k, v, do, attn_mask=expand_block_mask(block_mask, L, S, bq, bk))
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# merging partials, weights from the logsumexp
# ------------------------------------------------------------------------------------------------


def test_merge_partials_over_key_chunks_equals_full(xp, rng):
    L, S = 13, 50
    q, k, v = rng.standard_normal((2, L, 8)), rng.standard_normal((2, S, 8)), rng.standard_normal((2, S, 3))
    mask = rng.random((2, L, S)) < 0.6
    mask[:, 4, :] = False  # masked in every chunk
    mask[:, :, 20:35] = False  # one chunk masked entirely
    a = [xp.asarray(x) for x in (q, k, v)]
    outs, lses = [], []
    for j0, j1 in [(0, 20), (20, 35), (35, 50)]:
        o, l_ = flash_attention(a[0], a[1][:, j0:j1, :], a[2][:, j0:j1, :],
                                attn_mask=xp.asarray(mask[:, :, j0:j1]), return_lse=True, block_q=4, block_k=8)
        outs.append(o)
        lses.append(l_)
    out, lse = merge_attention_partials(outs, lses)
    full, full_lse = flash_attention(*a, attn_mask=xp.asarray(mask), return_lse=True)
    assert _rel_err(to_numpy(out), to_numpy(full)) < 1e-12
    np.testing.assert_allclose(to_numpy(lse), to_numpy(full_lse), rtol=1e-12)
    assert np.all(to_numpy(out)[:, 4] == 0) and np.all(np.isneginf(to_numpy(lse)[:, 4]))


def test_merge_partials_rejects_mismatched_inputs(rng):
    o = rng.standard_normal((3, 4))
    with pytest.raises(ValueError, match="equal length"):
        merge_attention_partials([o, o], [np.zeros(3)])
    with pytest.raises(ValueError, match="lses"):
        merge_attention_partials([o], [np.zeros(4)])


def test_weights_from_lse_rebuild_the_softmax(xp, rng):
    q, k, v = rng.standard_normal((2, 17, 8)), rng.standard_normal((2, 23, 8)), rng.standard_normal((2, 23, 8))
    a = [xp.asarray(x) for x in (q, k, v)]
    _, lse = flash_attention(*a, is_causal=True, causal_alignment="bottom_right", return_lse=True, **BLOCKS)
    w = attention_weights_from_lse(a[0], a[1], lse, is_causal=True, causal_alignment="bottom_right")
    _, ref_w = scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(17, 23, "bottom_right"), return_weights=True)
    np.testing.assert_allclose(to_numpy(w), ref_w, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# checks and errors
# ------------------------------------------------------------------------------------------------


def test_inputs_are_not_modified(rng):
    q, k, v, do = rng.standard_normal((9, 4)), rng.standard_normal((11, 4)), rng.standard_normal((11, 4)), rng.standard_normal((9, 4))
    mask = rng.random((9, 11)) < 0.7
    copies = [x.copy() for x in (q, k, v, do, mask)]
    out, lse = flash_attention(q, k, v, attn_mask=mask, return_lse=True, block_q=4, block_k=4)
    out_copy, lse_copy = out.copy(), lse.copy()
    flash_attention_backward(q, k, v, out, lse, do, attn_mask=mask, block_q=4, block_k=4)
    for x, c in zip((q, k, v, do, mask, out, lse), (*copies, out_copy, lse_copy), strict=True):
        np.testing.assert_array_equal(x, c)


def test_zero_length_keys_give_zero_rows(rng):
    q = rng.standard_normal((5, 4))
    out, lse = flash_attention(q, np.zeros((0, 4)), np.zeros((0, 3)), return_lse=True)
    assert out.shape == (5, 3) and np.all(out == 0) and np.all(np.isneginf(lse))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(backend="torch"), ValueError, "backend"),
        (dict(algorithm="fa3"), ValueError, "algorithm"),
        (dict(causal_alignment="centre"), ValueError, "causal_alignment"),
        (dict(block_q=0), ValueError, "block_q"),
        (dict(window=(-1, 2)), ValueError, "window"),
        (dict(window=(1, 2, 3)), ValueError, "window"),
        (dict(block_mask=np.ones((2, 2), dtype=bool)), ValueError, "block_mask"),
        (dict(attn_mask=np.ones((7, 5), dtype=bool)), ValueError, "attn_mask"),
    ],
)
def test_bad_options_raise(rng, kwargs, error, match):
    q, k, v = rng.standard_normal((2, 6, 4)), rng.standard_normal((2, 10, 4)), rng.standard_normal((2, 10, 4))
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, **kwargs)


def test_bad_inputs_raise(rng):
    q, k, v = rng.standard_normal((4, 6, 4)), rng.standard_normal((2, 10, 4)), rng.standard_normal((2, 10, 4))
    with pytest.raises(ValueError, match="enable_gqa"):
        flash_attention(q, k, v)
    with pytest.raises(ValueError, match="enable_gqa"):
        flash_attention(q[:3], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="feature size"):
        flash_attention(q[:2], k[..., :3], v)
    with pytest.raises(ValueError, match=r"key and value must share \(..., S\)"):
        flash_attention(q[:2], k, v[:, :9])
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q[:2], k.astype(np.float32), v)
    with pytest.raises(TypeError, match="floating"):
        flash_attention(q[:2].astype(int), k.astype(int), v.astype(int))
    with pytest.raises(ValueError, match="shape"):
        flash_attention(q[0, 0], k, v)


# ------------------------------------------------------------------------------------------------
# backend="numba": the key-padding conversion (host side) and the dispatch
# ------------------------------------------------------------------------------------------------


def test_key_lengths_from_padding_mask():
    pytest.importorskip("numba")
    from attention_ref.flash_numba import _key_lengths_from_padding_mask

    lengths = np.array([5, 0, 3])
    mask = padding_mask(lengths, 7)  # (3, 1, 1, 7)
    np.testing.assert_array_equal(_key_lengths_from_padding_mask(mask, (3, 2, 4, 8), 7), lengths)
    np.testing.assert_array_equal(  # broadcast over the batch
        _key_lengths_from_padding_mask(mask[:1], (3, 2, 4, 8), 7), [5, 5, 5]
    )
    np.testing.assert_array_equal(_key_lengths_from_padding_mask(None, (3, 2, 4, 8), 7), [7, 7, 7])
    holes = mask.copy()
    holes[0, 0, 0, 1] = False
    with pytest.raises(ValueError, match="prefix"):
        _key_lengths_from_padding_mask(holes, (3, 2, 4, 8), 7)
    with pytest.raises(ValueError, match="key-padding"):
        _key_lengths_from_padding_mask(np.ones((3, 1, 4, 7), dtype=bool), (3, 2, 4, 8), 7)
    with pytest.raises(ValueError, match="boolean"):
        _key_lengths_from_padding_mask(np.zeros((3, 1, 1, 7)), (3, 2, 4, 8), 7)


def _numba_module():
    module = pytest.importorskip("attention_ref.flash_numba")
    if not hasattr(module, "numba_flash_forward") or not hasattr(module, "numba_flash_backward"):
        pytest.skip("attention_ref.flash_numba does not provide numba_flash_forward/backward yet")
    return module


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_numba_backend_dispatch(rng, dtype, tol):
    _numba_module()
    B, Hq, H, L, S, E = 2, 4, 2, 19, 27, 16
    q = rng.standard_normal((B, Hq, L, E)).astype(dtype)
    k, v = rng.standard_normal((B, H, S, E)).astype(dtype), rng.standard_normal((B, H, S, E)).astype(dtype)
    do = rng.standard_normal((B, Hq, L, E)).astype(dtype)
    pad = padding_mask(np.array([27, 9]), S)
    kw = dict(attn_mask=pad, is_causal=True, causal_alignment="bottom_right", enable_gqa=True)
    out, lse = flash_attention(q, k, v, return_lse=True, backend="numba", **kw)
    ref, ref_lse = flash_attention(q, k, v, return_lse=True, **kw)
    assert out.dtype == dtype
    assert _rel_err(out, ref) < tol
    grads = flash_attention_backward(q, k, v, out, lse, do, backend="numba", **kw)
    ref_grads = flash_attention_backward(q, k, v, ref, ref_lse, do, **kw)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.shape == r.shape and _rel_err(g, r) < 10 * tol


def test_numba_backend_rejects_general_masks(rng):
    _numba_module()
    q = rng.standard_normal((1, 2, 5, 4))
    with pytest.raises(ValueError, match="key-padding"):
        flash_attention(q, q, q, attn_mask=np.ones((5, 5), dtype=bool), backend="numba")
    with pytest.raises(ValueError, match="boolean"):
        flash_attention(q, q, q, attn_mask=np.zeros((1, 1, 1, 5)), backend="numba")


@pytest.mark.parametrize("which", ["out", "grad_out", "lse"])
def test_backward_names_a_misshapen_argument(rng, which):
    q, k, v = rng.standard_normal((2, 7, 4)), rng.standard_normal((2, 9, 4)), rng.standard_normal((2, 9, 3))
    out, lse = flash_attention(q, k, v, return_lse=True)
    args = dict(out=out, grad_out=rng.standard_normal(out.shape), lse=lse)
    args[which] = args[which][..., :-1]
    with pytest.raises(ValueError, match=rf"{which} must have shape"):
        flash_attention_backward(q, k, v, args["out"], args["lse"], args["grad_out"])
