"""Self-, cross- and multi-head attention: built from, and checked against, the earlier stages."""

import numpy as np
import pytest
from arrays import namespace_name, to_numpy
from reference import reference_attention

from attention_ref import (
    AttentionParams,
    cross_attention,
    init_attention_params,
    init_multi_head_params,
    merge_heads,
    multi_head_attention,
    multi_head_params_from_torch,
    padding_mask,
    self_attention,
    sinusoidal_positional_encoding,
    split_heads,
)


def _to(xp, params):
    return AttentionParams(*(None if a is None else xp.asarray(a) for a in
                             (params.W_q, params.W_k, params.W_v, params.W_o,
                              params.b_q, params.b_k, params.b_v, params.b_o)))


def _random_biases(rng, params):
    return AttentionParams(params.W_q, params.W_k, params.W_v, params.W_o,
                           *(rng.standard_normal(b.shape) for b in (params.b_q, params.b_k, params.b_v, params.b_o)))


def test_positional_encoding_formula():
    pe = sinusoidal_positional_encoding(50, 16)
    pos, i = 37, 5
    angle = pos / 10000 ** (2 * i / 16)
    assert pe.shape == (50, 16)
    np.testing.assert_allclose(pe[pos, 2 * i], np.sin(angle), rtol=1e-13)
    np.testing.assert_allclose(pe[pos, 2 * i + 1], np.cos(angle), rtol=1e-13)
    assert sinusoidal_positional_encoding(3, 7).shape == (3, 7)


def test_self_attention_is_sdpa_on_projections(xp, rng):
    params = _random_biases(rng, init_attention_params(rng, 12, d_k=8, d_v=6, d_out=10))
    x = rng.standard_normal((2, 9, 12))
    out, w = self_attention(xp.asarray(x), _to(xp, params), is_causal=True, return_weights=True)
    assert namespace_name(out) == namespace_name(xp.asarray(x))
    q, k, v = (x @ W + b for W, b in ((params.W_q, params.b_q), (params.W_k, params.b_k), (params.W_v, params.b_v)))
    ref, ref_w = reference_attention(q, k, v, allowed=np.tril(np.ones((9, 9), bool)))
    np.testing.assert_allclose(to_numpy(out), ref @ params.W_o + params.b_o, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(w), ref_w, rtol=1e-12, atol=1e-14)


def test_cross_attention_shapes(rng):
    params = init_attention_params(rng, 8, kdim=5, vdim=5, d_out=8)
    out, w = cross_attention(rng.standard_normal((3, 4, 8)), rng.standard_normal((3, 6, 5)), params, return_weights=True)
    assert out.shape == (3, 4, 8) and w.shape == (3, 4, 6)


def test_self_attention_permutation_equivariant_without_positions(rng):
    params = _random_biases(rng, init_attention_params(rng, 8))
    x = rng.standard_normal((7, 8))
    perm = rng.permutation(7)
    np.testing.assert_allclose(self_attention(x[perm], params), self_attention(x, params)[perm], rtol=1e-12)
    pe = sinusoidal_positional_encoding(7, 8)
    with_pos = self_attention(x + pe, params)
    assert not np.allclose(self_attention(x[perm] + pe, params), with_pos[perm])


def test_split_merge_roundtrip(xp, rng):
    x = xp.asarray(rng.standard_normal((2, 5, 12)))
    h = split_heads(x, 3)
    assert tuple(h.shape) == (2, 3, 5, 4)
    np.testing.assert_array_equal(to_numpy(h)[:, 1], to_numpy(x)[..., 4:8])
    np.testing.assert_array_equal(to_numpy(merge_heads(h)), to_numpy(x))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1), (1, 1)])
def test_multi_head_is_a_loop_of_single_heads(xp, rng, num_heads, num_kv_heads):
    d_model, L, S, D = 16, 7, 10, 4
    params = _random_biases(rng, init_multi_head_params(rng, d_model, num_heads, num_kv_heads=num_kv_heads,
                                                         head_dim=D, kdim=6, vdim=5))
    query, key, value = rng.standard_normal((2, L, d_model)), rng.standard_normal((2, S, 6)), rng.standard_normal((2, S, 5))
    mask = padding_mask(np.array([S, 4]), S)
    out, w = multi_head_attention(xp.asarray(query), xp.asarray(key), xp.asarray(value), _to(xp, params), num_heads,
                                  num_kv_heads=num_kv_heads, attn_mask=xp.asarray(mask), return_weights=True)
    assert namespace_name(out) == namespace_name(xp.asarray(query))
    heads = []
    group = num_heads // num_kv_heads
    for h in range(num_heads):
        g = h // group
        qs = slice(h * D, (h + 1) * D)
        ks = slice(g * D, (g + 1) * D)
        q = query @ params.W_q[:, qs] + params.b_q[qs]
        k = key @ params.W_k[:, ks] + params.b_k[ks]
        v = value @ params.W_v[:, ks] + params.b_v[ks]
        o, wh = reference_attention(q, k, v, allowed=mask[:, 0])
        np.testing.assert_allclose(to_numpy(w)[:, h], wh, rtol=1e-12, atol=1e-14)
        heads.append(o)
    expected = np.concatenate(heads, axis=-1) @ params.W_o + params.b_o
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-12, atol=1e-12)


def test_gqa_equals_mha_with_repeated_kv_weights(rng):
    params = init_multi_head_params(rng, 12, 6, num_kv_heads=2)
    D = 2
    rep = lambda W: np.concatenate([W[:, (h // 3) * D:(h // 3 + 1) * D] for h in range(6)], axis=1)  # noqa: E731
    full = AttentionParams(params.W_q, rep(params.W_k), rep(params.W_v), params.W_o, params.b_q,
                           rep(params.b_k[None])[0], rep(params.b_v[None])[0], params.b_o)
    x = rng.standard_normal((5, 12))
    np.testing.assert_allclose(multi_head_attention(x, x, x, params, 6, num_kv_heads=2),
                               multi_head_attention(x, x, x, full, 6), rtol=1e-12)


def test_float32_stays_float32(rng):
    params = init_multi_head_params(rng, 8, 2, dtype=np.float32)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    out, w = multi_head_attention(x, x, x, params, 2, is_causal=True, return_weights=True)
    assert out.dtype == np.float32 and w.dtype == np.float32


def test_inputs_not_modified(rng):
    params = init_multi_head_params(rng, 8, 2)
    x = rng.standard_normal((3, 8))
    before = x.copy(), params.W_q.copy()
    multi_head_attention(x, x, x, params, 2)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(params.W_q, before[1])


def _torch_mha_state(rng, E, kdim=None):
    sd = {"out_proj.weight": rng.standard_normal((E, E)) * 0.3, "out_proj.bias": rng.standard_normal(E)}
    if kdim is None:
        sd["in_proj_weight"] = rng.standard_normal((3 * E, E)) * 0.3
    else:
        sd.update(q_proj_weight=rng.standard_normal((E, E)) * 0.3, k_proj_weight=rng.standard_normal((E, kdim)) * 0.3,
                  v_proj_weight=rng.standard_normal((E, kdim)) * 0.3)
    sd["in_proj_bias"] = rng.standard_normal(3 * E)
    return sd


def test_params_from_torch_state_dict_layout(rng):
    sd = _torch_mha_state(rng, 8)
    p = multi_head_params_from_torch(sd, 2)
    np.testing.assert_array_equal(p.W_k, sd["in_proj_weight"][8:16].T)
    np.testing.assert_array_equal(p.b_v, sd["in_proj_bias"][16:])
    with pytest.raises(ValueError, match="bias_k"):
        multi_head_params_from_torch({**sd, "bias_k": np.zeros((1, 1, 8))}, 2)
    with pytest.raises(ValueError, match="divide"):
        multi_head_params_from_torch(sd, 3)


@pytest.mark.parametrize("kdim", [None, 5])
def test_reproduces_torch_multihead_attention(rng, kdim):
    torch = pytest.importorskip("torch")
    E, H = 8, 2
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=kdim, dtype=torch.float64)
    sd = {name: t.detach().numpy() for name, t in mha.state_dict().items()}
    params = multi_head_params_from_torch(sd, H)
    q = rng.standard_normal((2, 4, E))
    kv = rng.standard_normal((2, 6, kdim or E))
    key_padding = np.array([[False] * 6, [False] * 3 + [True] * 3])  # torch: True = ignore
    want, want_w = mha(*(torch.from_numpy(t) for t in (q, kv, kv)), key_padding_mask=torch.from_numpy(key_padding),
                       average_attn_weights=False)
    got, got_w = multi_head_attention(q, kv, kv, params, H, attn_mask=~key_padding[:, None, None, :], return_weights=True)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_w, want_w.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_weights_follow_input_dtype_even_with_float64_params(rng):
    params = init_multi_head_params(rng, 8, 2)  # float64 parameters
    x = rng.standard_normal((3, 8)).astype(np.float32)
    _, w = multi_head_attention(x, x, x, params, 2, return_weights=True)
    _, w1 = self_attention(x, init_attention_params(rng, 8), return_weights=True)
    assert w.dtype == np.float32 and w1.dtype == np.float32


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_multi_head_with_flash_is_a_loop_of_single_head_attentions(rng, num_heads, num_kv_heads):
    """Step 3 through flash_attention: still H single-head attentions, each with its own
    projections (head h uses the columns h·D:(h+1)·D of W_q and those of its key/value head)."""
    d_model, L, S, D = 16, 9, 11, 4
    params = _random_biases(rng, init_multi_head_params(rng, d_model, num_heads, num_kv_heads=num_kv_heads,
                                                         head_dim=D))
    x, c = rng.standard_normal((2, L, d_model)), rng.standard_normal((2, S, d_model))
    out = multi_head_attention(x, c, c, params, num_heads, num_kv_heads=num_kv_heads, attention="flash")
    group = num_heads // num_kv_heads
    heads = []
    for h in range(num_heads):
        single = AttentionParams(params.W_q[:, h * D:(h + 1) * D], params.W_k[:, h // group * D:(h // group + 1) * D],
                                 params.W_v[:, h // group * D:(h // group + 1) * D], np.eye(D),
                                 params.b_q[h * D:(h + 1) * D], params.b_k[h // group * D:(h // group + 1) * D],
                                 params.b_v[h // group * D:(h // group + 1) * D], None)
        heads.append(cross_attention(x, c, single))
    expected = np.concatenate(heads, axis=-1) @ params.W_o + params.b_o
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
