"""scaled_dot_product_attention against an independent float64 reference, and its properties."""

import numpy as np
import pytest
from arrays import namespace_name, to_numpy
from reference import reference_attention

from attention_ref import causal_mask, padding_mask, scaled_dot_product_attention

SIZES = [1, 7, 113, 203]


@pytest.mark.parametrize("L", SIZES)
@pytest.mark.parametrize("S", SIZES)
def test_against_reference_awkward_lengths(rng, L, S):
    E = int(rng.choice([1, 59, 64]))
    q, k = rng.standard_normal((2, L, E)), rng.standard_normal((2, S, E))
    v = rng.standard_normal((2, S, 5))
    out, w = scaled_dot_product_attention(q, k, v, return_weights=True)
    ref_out, ref_w = reference_attention(q, k, v)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(w, ref_w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("E", [1, 59, 64])
def test_heads_batches_and_backends(xp, rng, E):
    q = rng.standard_normal((2, 3, 7, E))
    k = rng.standard_normal((2, 3, 11, E))
    v = rng.standard_normal((2, 3, 11, 4))
    mask = rng.random((2, 1, 7, 11)) < 0.7
    out, w = scaled_dot_product_attention(
        xp.asarray(q), xp.asarray(k), xp.asarray(v), attn_mask=xp.asarray(mask), return_weights=True
    )
    assert namespace_name(out) == namespace_name(xp.asarray(q)) == namespace_name(w)
    ref_out, ref_w = reference_attention(q, k, v, allowed=mask)
    np.testing.assert_allclose(to_numpy(out), ref_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_numpy(w), ref_w, rtol=1e-12, atol=1e-14)


def test_float32_in_float32_out_within_tolerance(xp, rng):
    q, k, v = (rng.standard_normal((3, 13, 16)).astype(np.float32) for _ in range(3))
    out, w = scaled_dot_product_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), return_weights=True)
    assert out.dtype == xp.float32 and w.dtype == xp.float32
    ref_out, _ = reference_attention(q, k, v)
    np.testing.assert_allclose(to_numpy(out), ref_out, rtol=1e-5, atol=1e-5)


def test_float16_accumulates_in_float32(rng):
    q, k, v = (rng.standard_normal((20, 64)).astype(np.float16) * 20 for _ in range(3))
    out = scaled_dot_product_attention(q, k, v)
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    ref_out, _ = reference_attention(q, k, v)
    np.testing.assert_allclose(out.astype(np.float64), ref_out, rtol=2e-2, atol=2e-2)


def test_float_mask_is_added(xp, rng):
    q, k, v = (rng.standard_normal((5, 8)) for _ in range(3))
    bias = rng.standard_normal((5, 5))
    bias[1, :] = -np.inf  # a fully masked row through the float mask
    out, w = scaled_dot_product_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v),
                                          attn_mask=xp.asarray(bias), return_weights=True)
    ref_out, ref_w = reference_attention(q, k, v, bias=bias)
    np.testing.assert_allclose(to_numpy(out), ref_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(to_numpy(out)[1], 0.0)


def test_is_causal_is_top_left(rng):
    q, k, v = rng.standard_normal((4, 8)), rng.standard_normal((9, 8)), rng.standard_normal((9, 3))
    a = scaled_dot_product_attention(q, k, v, is_causal=True)
    b = scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(4, 9))
    np.testing.assert_array_equal(a, b)
    c, w = scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(4, 9, "bottom_right"), return_weights=True)
    assert np.all(w[:, :6].sum(-1) > 0.0) and np.all(w[0, 6:] == 0.0)


def test_weights_sum_to_one_over_attended_and_zero_elsewhere(xp, rng):
    q, k, v = (rng.standard_normal((2, 2, 6, 4)) for _ in range(3))
    mask = padding_mask(np.array([4, 0]), 6)
    _, w = scaled_dot_product_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v),
                                        attn_mask=xp.asarray(mask), return_weights=True)
    w = to_numpy(w)
    np.testing.assert_allclose(w[0].sum(-1), 1.0, rtol=1e-12)
    assert np.all(w[0, ..., 4:] == 0.0)
    assert np.all(w[1] == 0.0)  # every key masked: zeros (PyTorch's choice)


def test_fully_masked_nan_on_request(rng):
    q, k, v = (rng.standard_normal((3, 4)) for _ in range(3))
    mask = np.array([[True, False, True], [False, False, False], [True, True, True]])
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, fully_masked="nan")
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[[0, 2]]))


def test_changing_future_tokens_leaves_earlier_outputs(rng):
    q, k, v = (rng.standard_normal((10, 6)) for _ in range(3))
    out = scaled_dot_product_attention(q, k, v, is_causal=True)
    k2, v2 = k.copy(), v.copy()
    k2[6:] = rng.standard_normal((4, 6))
    v2[6:] = rng.standard_normal((4, 6))
    out2 = scaled_dot_product_attention(q, k2, v2, is_causal=True)
    np.testing.assert_array_equal(out[:6], out2[:6])
    assert not np.allclose(out[6:], out2[6:])


def test_gqa_equals_repeated_kv_heads(xp, rng):
    q = rng.standard_normal((2, 6, 5, 8))
    k, v = rng.standard_normal((2, 2, 7, 8)), rng.standard_normal((2, 2, 7, 3))
    got = scaled_dot_product_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), enable_gqa=True)
    expected = scaled_dot_product_attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1))
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-13)


def test_scale_and_value_dim(rng):
    q, k, v = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal((4, 9))
    out = scaled_dot_product_attention(q, k, v, scale=0.3)
    ref, _ = reference_attention(q, k, v, scale=0.3)
    assert out.shape == (3, 9)
    np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_dropout_uses_rng_and_rescales(rng):
    q, k, v = (rng.standard_normal((6, 4)) for _ in range(3))
    _, w = scaled_dot_product_attention(q, k, v, return_weights=True)
    out1, w1 = scaled_dot_product_attention(q, k, v, dropout_p=0.5, rng=np.random.default_rng(3), return_weights=True)
    out2, _ = scaled_dot_product_attention(q, k, v, dropout_p=0.5, rng=np.random.default_rng(3), return_weights=True)
    np.testing.assert_array_equal(out1, out2)
    kept = w1 != 0
    np.testing.assert_allclose(w1[kept], 2 * w[kept], rtol=1e-12)
    assert 0 < kept.sum() < kept.size


def test_inputs_not_modified(rng):
    q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    mask = rng.random((5, 5)) < 0.5
    copies = [a.copy() for a in (q, k, v, mask)]
    scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.2, rng=rng)
    for a, c in zip((q, k, v, mask), copies):
        np.testing.assert_array_equal(a, c)


def test_matches_torch_when_installed(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    q = rng.standard_normal((2, 4, 9, 16))
    k, v = rng.standard_normal((2, 2, 11, 16)), rng.standard_normal((2, 2, 11, 8))
    mask = rng.random((2, 1, 9, 11)) < 0.6
    mask[0, 0, 3] = False
    for kwargs, tkwargs in (
        (dict(attn_mask=mask), dict(attn_mask=torch.from_numpy(mask))),
        (dict(is_causal=True), dict(is_causal=True)),
    ):
        got = scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        want = F.scaled_dot_product_attention(
            *(torch.from_numpy(t) for t in (q, k, v)), enable_gqa=True, **tkwargs
        ).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_no_keys_gives_zeros_or_nan(rng):
    q = rng.standard_normal((3, 4))
    out = scaled_dot_product_attention(q, np.zeros((0, 4)), np.zeros((0, 2)))
    np.testing.assert_array_equal(out, np.zeros((3, 2)))
    assert np.all(np.isnan(scaled_dot_product_attention(q, np.zeros((0, 4)), np.zeros((0, 2)), fully_masked="nan")))
