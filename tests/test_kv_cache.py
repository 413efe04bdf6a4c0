"""Stage 07: KV-cache decoding equals full causal attention; split-KV (Flash-Decoding) equals SDPA."""

import numpy as np
import pytest
from arrays import namespace_name, to_numpy

from attention_ref import (
    KVCache,
    append_kv,
    causal_mask,
    decode_step,
    empty_kv_cache,
    padding_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
    split_kv_attention,
    truncate_kv,
)

TOL = {"float64": 1e-12, "float32": 1e-5}


def _rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def _qkv(rng, B, Hq, Hkv, N, E, Ev, dtype):
    q = rng.standard_normal((B, Hq, N, E)).astype(dtype)
    k = rng.standard_normal((B, Hkv, N, E)).astype(dtype)
    v = rng.standard_normal((B, Hkv, N, Ev)).astype(dtype)
    return q, k, v


def _decode(xp, q, k, v, chunks, *, enable_gqa=False, window=None, keep=None):
    """Feed the sequence through decode_step in chunks of the given sizes; concat the outputs."""
    B, Hkv, _, E = k.shape
    cache = empty_kv_cache((B,), Hkv, E, v.shape[-1], dtype=getattr(xp, str(q.dtype)), xp=xp)
    outs, start = [], 0
    for t in chunks:
        sl = slice(start, start + t)
        out, cache = decode_step(
            xp.asarray(q[:, :, sl]), xp.asarray(k[:, :, sl]), xp.asarray(v[:, :, sl]), cache,
            enable_gqa=enable_gqa, window=window,
        )
        assert namespace_name(out) == namespace_name(xp.asarray(q[:1]))
        if keep is not None:
            cache = truncate_kv(cache, keep)
        outs.append(to_numpy(out))
        start += t
    assert start == q.shape[-2]
    return np.concatenate(outs, axis=-2), cache


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_token_by_token_equals_full_causal(xp, rng, dtype):
    N = 13
    q, k, v = _qkv(rng, 2, 3, 3, N, 8, 5, dtype)
    out, cache = _decode(xp, q, k, v, [1] * N)
    ref = scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), is_causal=True)
    assert out.dtype == np.dtype(dtype)
    assert _rel_err(out, ref) < TOL[dtype]
    assert cache.length == N and cache.num_kv_heads == 3
    np.testing.assert_array_equal(to_numpy(cache.keys), k)
    np.testing.assert_array_equal(to_numpy(cache.values), v)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("chunks", [[7, 1, 1, 1, 1], [4, 3, 1, 3, 1], [12]], ids=["prefill7", "mixed", "prefill_all"])
def test_prefill_then_decode_equals_full_causal(xp, rng, dtype, chunks):
    q, k, v = _qkv(rng, 2, 2, 2, sum(chunks), 16, 16, dtype)
    out, _ = _decode(xp, q, k, v, chunks)
    ref = scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), is_causal=True)
    assert _rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("Hkv", [2, 1], ids=["gqa", "mqa"])
def test_gqa_decoding(xp, rng, Hkv):
    q, k, v = _qkv(rng, 2, 6, Hkv, 11, 8, 4, "float64")
    out, cache = _decode(xp, q, k, v, [5, 1, 1, 3, 1], enable_gqa=True)
    ref = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert _rel_err(out, ref) < 1e-12
    assert cache.keys.shape == (2, Hkv, 11, 8)


@pytest.mark.parametrize("window", [0, 3, (3, 0), 20])
def test_sliding_window_decoding(xp, rng, window):
    N = 15
    q, k, v = _qkv(rng, 1, 2, 2, N, 8, 8, "float64")
    left = window[0] if isinstance(window, tuple) else window
    ref = scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(N, N, left, 0))
    out, _ = _decode(xp, q, k, v, [4, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1], window=window)
    assert _rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("left", [0, 1, 4])
def test_truncated_cache_gives_the_same_windowed_outputs(xp, rng, left):
    """Keeping only the last `left` tokens (a rolling buffer) is enough for one-token steps."""
    N = 12
    q, k, v = _qkv(rng, 2, 2, 1, N, 8, 8, "float64")
    ref = scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(N, N, left, 0), enable_gqa=True)
    out, cache = _decode(xp, q, k, v, [1] * N, enable_gqa=True, window=left, keep=left)
    assert _rel_err(out, ref) < 1e-12
    assert cache.length == left


def test_truncate_kv_keeps_the_last_tokens(rng):
    k, v = rng.standard_normal((1, 2, 9, 4)), rng.standard_normal((1, 2, 9, 3))
    cache = KVCache(k, v)
    short = truncate_kv(cache, 4)
    np.testing.assert_array_equal(short.keys, k[..., 5:, :])
    np.testing.assert_array_equal(short.values, v[..., 5:, :])
    assert truncate_kv(cache, 50).length == 9 and truncate_kv(cache, 0).length == 0


def test_decode_step_uses_the_bottom_right_mask(rng):
    """Two new queries after a cache of 5 tokens: the mask tril(ones(2, 7), 5)."""
    k, v = rng.standard_normal((1, 5, 8)), rng.standard_normal((1, 5, 8))
    qn, kn, vn = rng.standard_normal((1, 2, 8)), rng.standard_normal((1, 2, 8)), rng.standard_normal((1, 2, 8))
    out, cache = decode_step(qn[None], kn[None], vn[None], KVCache(k[None], v[None]))
    K, V = np.concatenate([k, kn], axis=-2), np.concatenate([v, vn], axis=-2)
    ref = scaled_dot_product_attention(qn, K, V, attn_mask=causal_mask(2, 7, "bottom_right"))
    np.testing.assert_allclose(out[0], ref, rtol=1e-12, atol=1e-15)
    assert cache.length == 7


# ------------------------------------------------------------------------------------------------
# split-KV (Flash-Decoding)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [1, 12, 37])
@pytest.mark.parametrize("splits", [1, 2, 3, "S"])
def test_split_kv_equals_sdpa(xp, rng, S, splits):
    n = S if splits == "S" else splits
    if n > S:
        pytest.skip("more splits than keys")
    q, k, v = rng.standard_normal((2, 3, 1, 16)), rng.standard_normal((2, 3, S, 16)), rng.standard_normal((2, 3, S, 7))
    out, lse = split_kv_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), n, return_lse=True)
    assert namespace_name(out) == namespace_name(xp.asarray(q))
    assert out.shape == (2, 3, 1, 7) and lse.shape == (2, 3, 1)
    assert _rel_err(to_numpy(out), scaled_dot_product_attention(q, k, v)) < 1e-12
    logits = q @ np.swapaxes(k, -1, -2) / 4.0
    m = logits.max(axis=-1)
    np.testing.assert_allclose(to_numpy(lse), m + np.log(np.exp(logits - m[..., None]).sum(-1)), rtol=1e-12)


@pytest.mark.parametrize("splits", [1, 2, 3, 29])
def test_split_kv_gqa_float32_several_queries_and_scale(xp, rng, splits):
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 4, 5, 8), (2, 2, 29, 8), (2, 2, 29, 8)))
    mask = causal_mask(5, 29, "bottom_right")
    out = split_kv_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), splits, scale=0.3, enable_gqa=True,
                             attn_mask=xp.asarray(mask))
    ref = scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                                       attn_mask=mask, scale=0.3, enable_gqa=True)
    assert to_numpy(out).dtype == np.float32
    assert _rel_err(to_numpy(out), ref) < 1e-5


@pytest.mark.parametrize("splits", [2, 3, 10])
def test_split_kv_with_fully_masked_chunks(xp, rng, splits):
    """Padding masks whole chunks: batch 0 has 3 of 10 keys, batch 1 has none at all."""
    S = 10
    q, k, v = rng.standard_normal((2, 2, 1, 8)), rng.standard_normal((2, 2, S, 8)), rng.standard_normal((2, 2, S, 8))
    pad = padding_mask(np.array([3, 0]), S)
    out, lse = split_kv_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), splits,
                                  attn_mask=xp.asarray(pad), return_lse=True)
    out, lse = to_numpy(out), to_numpy(lse)
    ref = scaled_dot_product_attention(q, k, v, attn_mask=pad)
    assert np.all(np.isfinite(out))
    assert _rel_err(out, ref) < 1e-12
    assert np.all(out[1] == 0) and np.all(np.isneginf(lse[1]))


def test_split_kv_float_mask_is_added(rng):
    q, k, v = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 11, 6)), rng.standard_normal((2, 11, 6))
    bias = rng.standard_normal((3, 11))
    out = split_kv_attention(q, k, v, 4, attn_mask=bias)
    np.testing.assert_allclose(out, scaled_dot_product_attention(q, k, v, attn_mask=bias), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# inputs unmodified, bad inputs
# ------------------------------------------------------------------------------------------------


def test_inputs_are_not_modified(rng):
    k0, v0 = rng.standard_normal((1, 2, 4, 8)), rng.standard_normal((1, 2, 4, 8))
    qn, kn, vn = rng.standard_normal((1, 2, 1, 8)), rng.standard_normal((1, 2, 1, 8)), rng.standard_normal((1, 2, 1, 8))
    cache = KVCache(k0, v0)
    arrays = (k0, v0, qn, kn, vn)
    copies = [x.copy() for x in arrays]
    _, new = decode_step(qn, kn, vn, cache, window=2)
    append_kv(cache, kn, vn)
    truncate_kv(new, 2)
    mask = rng.random((1, 1, 1, 4)) < 0.8
    mask_copy = mask.copy()
    split_kv_attention(qn, k0, v0, 3, attn_mask=mask)
    for x, c in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(x, c)
    np.testing.assert_array_equal(mask, mask_copy)
    assert cache.length == 4 and new.length == 5 and cache.keys is k0
    with pytest.raises(AttributeError):
        cache.keys = kn  # frozen


def test_empty_cache_and_properties(xp):
    cache = empty_kv_cache((3,), 2, 8, 5, dtype=xp.float32, xp=xp)
    assert cache.keys.shape == (3, 2, 0, 8) and cache.values.shape == (3, 2, 0, 5)
    assert cache.length == 0 and cache.num_kv_heads == 2 and cache.dtype == xp.float32
    assert empty_kv_cache((), 1, 4, dtype=xp.float64, xp=xp).values.shape == (1, 0, 4)
    grown = append_kv(cache, xp.ones((3, 2, 4, 8), dtype=xp.float32), xp.ones((3, 2, 4, 5), dtype=xp.float32))
    assert grown.nbytes == 3 * 2 * 4 * (8 + 5) * 4


def test_bad_inputs_raise_naming_the_argument(rng):
    cache = KVCache(rng.standard_normal((1, 2, 3, 8)), rng.standard_normal((1, 2, 3, 6)))
    q, k, v = rng.standard_normal((1, 2, 1, 8)), rng.standard_normal((1, 2, 1, 8)), rng.standard_normal((1, 2, 1, 6))
    with pytest.raises(ValueError, match=r"k_new.*\(1, 2, 3, 8\).*\(1, 2, 1, 5\)"):
        append_kv(cache, rng.standard_normal((1, 2, 1, 5)), v)
    with pytest.raises(ValueError, match=r"v_new.*\(1, 3, 1, 6\)"):
        append_kv(cache, k, rng.standard_normal((1, 3, 1, 6)))
    with pytest.raises(ValueError, match="same number of tokens"):
        append_kv(cache, k, rng.standard_normal((1, 2, 2, 6)))
    with pytest.raises(TypeError, match="k_new.*float32.*float64"):
        append_kv(cache, k.astype(np.float32), v)
    with pytest.raises(TypeError, match="q_new.*float32"):
        decode_step(q.astype(np.float32), k, v, cache)
    with pytest.raises(ValueError, match=r"q_new.*\(1, 2, 1, 7\).*cache.keys"):
        decode_step(rng.standard_normal((1, 2, 1, 7)), k, v, cache)
    with pytest.raises(ValueError, match=r"q_new.*k_new"):
        decode_step(rng.standard_normal((1, 2, 2, 8)), k, v, cache)
    with pytest.raises(ValueError, match="window"):
        decode_step(q, k, v, cache, window=(2, 1))
    with pytest.raises(ValueError, match="window"):
        decode_step(q, k, v, cache, window=-1)
    with pytest.raises(ValueError, match="enable_gqa"):
        decode_step(rng.standard_normal((1, 4, 1, 8)), k, v, cache)
    with pytest.raises(TypeError, match="KVCache"):
        decode_step(q, k, v, (k, v))
    with pytest.raises(ValueError, match=r"keys and values.*\(1, 2, 3, 8\).*\(1, 2, 4, 6\)"):
        KVCache(rng.standard_normal((1, 2, 3, 8)), rng.standard_normal((1, 2, 4, 6)))
    with pytest.raises(TypeError, match="cache keys must be a floating-point array, got int64"):
        KVCache(np.zeros((1, 2, 3, 8), dtype=np.int64), np.zeros((1, 2, 3, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="num_kv_heads"):
        empty_kv_cache((1,), 0, 8, dtype=np.float64)
    with pytest.raises(ValueError, match="max_length"):
        truncate_kv(cache, -1)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError),
                                        (6, ValueError)])
def test_split_kv_rejects_bad_num_splits(rng, bad, error):
    q, k, v = rng.standard_normal((2, 1, 8)), rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    with pytest.raises(error, match="num_splits"):
        split_kv_attention(q, k, v, bad)


def test_split_kv_checks_shapes_and_dtypes_like_sdpa(rng):
    q, k, v = rng.standard_normal((2, 1, 8)), rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    with pytest.raises(ValueError, match=r"query and key.*\(2, 5, 7\)"):
        split_kv_attention(q, rng.standard_normal((2, 5, 7)), v, 2)
    with pytest.raises(TypeError, match="dtype"):
        split_kv_attention(q.astype(np.float32), k, v, 2)
    with pytest.raises(ValueError, match=r"attn_mask.*\(1, 7\)"):
        split_kv_attention(q, k, v, 2, attn_mask=np.ones((1, 7), dtype=bool))


def test_a_cache_survives_copy_deepcopy_and_pickle():
    import copy
    import pickle

    from attention_ref import KVCache

    cache = KVCache(np.ones((1, 2, 3, 4)), np.zeros((1, 2, 3, 5)))
    for clone in (copy.copy(cache), copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert isinstance(clone, KVCache)
        np.testing.assert_array_equal(clone.keys, cache.keys)
        np.testing.assert_array_equal(clone.values, cache.values)
