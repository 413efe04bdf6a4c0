"""Stage 09: rotary position embeddings and ALiBi.

Truths: RoFormer's rotation matrix written out (eq. 13–15), ``transformers``' Llama
``apply_rotary_pos_emb`` where installed, the relative property, the slopes printed in the ALiBi
paper and its authors' rule for H not a power of two, and float64 attention loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from arrays import namespace_name, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_ref import (
    alibi_bias,
    alibi_slopes,
    flash_attention,
    rope,
    rope_frequencies,
    rope_permutation,
    scaled_dot_product_attention,
)

# ----------------------------------------------------------------------------- RoPE


def roformer_matrix(m: int, E: int, theta: float) -> np.ndarray:
    """R^E_{Θ,m} of RoFormer eq. 15: block-diagonal 2×2 rotations by m·θ_i of features (2i, 2i+1)."""
    R = np.zeros((E, E))
    for i in range(E // 2):
        angle = m * theta ** (-2.0 * i / E)
        c, s = math.cos(angle), math.sin(angle)
        R[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c, -s], [s, c]]
    return R


def test_frequencies_follow_the_paper():
    f = rope_frequencies(8, theta=10000.0)
    np.testing.assert_allclose(f, [1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75], rtol=1e-15)
    assert f.dtype == np.float64


@pytest.mark.parametrize("theta", [10000.0, 100000.0])
def test_interleaved_rope_is_roformers_rotation_matrix(rng, theta):
    E, positions = 16, [0, 1, 5, 37, 1000, 8191]
    x = rng.standard_normal((2, 3, len(positions), E))
    got = rope(x, positions, theta=theta, interleaved=True)
    for t, m in enumerate(positions):
        expected = x[..., t, :] @ roformer_matrix(m, E, theta).T  # row vectors: (R x)ᵀ = xᵀ Rᵀ
        np.testing.assert_allclose(got[..., t, :], expected, rtol=1e-12, atol=1e-12)


def test_rotate_half_pairs_feature_i_with_i_plus_half(rng):
    E, theta = 8, 500.0
    x = rng.standard_normal((4, E))
    positions = [0, 3, 7, 100]
    got = rope(x, positions, theta=theta)
    for t, m in enumerate(positions):
        for i in range(E // 2):
            a = m * theta ** (-2 * i / E)
            xa, xb = x[t, i], x[t, i + E // 2]
            assert got[t, i] == pytest.approx(xa * math.cos(a) - xb * math.sin(a), abs=1e-12)
            assert got[t, i + E // 2] == pytest.approx(xb * math.cos(a) + xa * math.sin(a), abs=1e-12)


def test_layouts_agree_up_to_a_fixed_feature_permutation(rng):
    E = 64
    perm = rope_permutation(E)
    assert perm[:6].tolist() == [0, 32, 1, 33, 2, 34]
    assert sorted(perm.tolist()) == list(range(E))
    x = rng.standard_normal((2, 9, 11, E))
    positions = rng.integers(0, 5000, size=11)
    half = rope(x, positions, theta=1e5)
    inter = rope(x[..., perm], positions, theta=1e5, interleaved=True)
    np.testing.assert_allclose(inter, half[..., perm], rtol=0, atol=1e-12)
    # ... and they are different functions of the same features
    assert np.abs(rope(x, positions, interleaved=True) - half).max() > 0.1


def test_position_zero_is_the_identity_and_norms_are_kept(rng):
    x = rng.standard_normal((3, 5, 32))
    for interleaved in (False, True):
        y = rope(x, np.arange(5) * 97, interleaved=interleaved)
        np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=0, atol=0)
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 10_000),
    n=st.integers(0, 10_000),
    shift=st.integers(-5_000, 5_000),
    interleaved=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_relative_property(m, n, shift, interleaved, seed):
    """<RoPE(q, m), RoPE(k, n)> depends only on n − m: it equals <q, RoPE(k, n − m)>."""
    r = np.random.default_rng(seed)
    q, k = r.standard_normal((2, 1, 32))

    def logit(m_q: int, n_k: int) -> float:
        return float((rope(q, [m_q], interleaved=interleaved) @ rope(k, [n_k], interleaved=interleaved).T)[0, 0])

    dot = logit(m, n)
    relative = float((q @ rope(k, [n - m], interleaved=interleaved).T)[0, 0])
    assert relative == pytest.approx(dot, abs=1e-9)
    if m + shift >= 0 and n + shift >= 0:
        assert logit(m + shift, n + shift) == pytest.approx(dot, abs=1e-9)


def test_dtypes_namespaces_and_inputs_untouched(xp, rng):
    x64 = rng.standard_normal((2, 7, 16))
    expected = rope(x64, np.arange(3, 10))
    for dtype, tol in ((xp.float64, 1e-14), (xp.float32, 2e-6)):
        x = xp.asarray(x64, dtype=dtype)
        before = to_numpy(x).copy()
        y = rope(x, xp.arange(3, 10))
        assert namespace_name(y) == namespace_name(x) and y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(to_numpy(y), expected, rtol=0, atol=tol)
        np.testing.assert_array_equal(to_numpy(x), before)


def test_float16_is_computed_in_float32(rng):
    x = rng.standard_normal((5, 8)).astype(np.float16)
    y = rope(x, np.arange(5))
    assert y.dtype == np.float16
    np.testing.assert_allclose(y, rope(x.astype(np.float64), np.arange(5)), atol=4e-3)


def test_zero_sizes():
    assert rope(np.zeros((3, 0, 8)), np.zeros(0, dtype=np.int64)).shape == (3, 0, 8)
    assert rope(np.zeros((2, 0)), [0, 1]).shape == (2, 0)


def test_rope_rejects_bad_input():
    x = np.zeros((4, 8))
    with pytest.raises(ValueError, match="even"):
        rope(np.zeros((4, 7)), np.arange(4))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        rope(np.zeros((4, 8), dtype=np.int64), np.arange(4))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        rope([[1.0, 2.0]], [0])
    with pytest.raises(TypeError, match="interleaved must be True or False"):
        rope(x, np.arange(4), interleaved="yes")
    with pytest.raises(TypeError, match="positions must be an integer array"):
        rope(x, np.arange(4.0))
    with pytest.raises(ValueError, match=r"positions must have shape \(L,\).*\(3,\).*\(4, 8\)"):
        rope(x, np.arange(3))
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        rope(np.zeros(8), np.arange(1))
    with pytest.raises(ValueError, match="theta"):
        rope(x, np.arange(4), theta=-1.0)


def test_rope_matches_transformers_apply_rotary_pos_emb(rng):
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    H, Hkv, E, theta = 4, 2, 32, 100000.0
    try:
        config = LlamaConfig(hidden_size=H * E, num_attention_heads=H, num_key_value_heads=Hkv,
                             head_dim=E, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:  # transformers < 5
        config = LlamaConfig(hidden_size=H * E, num_attention_heads=H, num_key_value_heads=Hkv,
                             head_dim=E, rope_theta=theta)
    rotary = llama.LlamaRotaryEmbedding(config)
    positions = np.array([0, 1, 2, 50, 51, 400])
    q = rng.standard_normal((2, H, len(positions), E)).astype(np.float32)
    k = rng.standard_normal((2, Hkv, len(positions), E)).astype(np.float32)
    pos_t = torch.tensor(positions)[None].expand(2, -1)
    cos, sin = rotary(torch.from_numpy(q), pos_t)
    q_ref, k_ref = llama.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin)
    # transformers computes the angles in float32; ours are float64, rounded once
    np.testing.assert_allclose(rope(q, positions, theta=theta), q_ref.numpy(), rtol=0, atol=5e-5)
    np.testing.assert_allclose(rope(k, positions, theta=theta), k_ref.numpy(), rtol=0, atol=5e-5)


# ----------------------------------------------------------------------------- ALiBi

# The slopes as the paper states them (§3: "for 8 heads ... 1/2, 1/2², …, 1/2⁸"; for 16 heads
# the geometric sequence starting at 1/√2) and as its authors' code extends them to 12 heads
# (the 8 of H = 8, then every other slope of H = 16: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5).
PAPER_SLOPES = {
    8: [2.0 ** -h for h in range(1, 9)],
    16: [2.0 ** (-h / 2) for h in range(1, 17)],
    12: [2.0 ** -h for h in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5],
    6: [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3],
    4: [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8],
    1: [2.0 ** -8],
}


@pytest.mark.parametrize("H", sorted(PAPER_SLOPES))
def test_alibi_slopes_match_the_paper(H):
    np.testing.assert_allclose(alibi_slopes(H), PAPER_SLOPES[H], rtol=1e-15)


def test_alibi_slopes_rejects_bad_counts():
    for bad, error in ((0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="num_heads must be an int"):
            alibi_slopes(bad)


def _bias_loops(H: int, L: int, S: int, causal: bool, alignment: str) -> np.ndarray:
    slopes = PAPER_SLOPES[H]
    offset = 0 if alignment == "top_left" else S - L
    out = np.zeros((H, L, S))
    for h in range(H):
        for i in range(L):
            for j in range(S):
                d = i + offset - j
                out[h, i, j] = -math.inf if causal and d < 0 else -slopes[h] * abs(d)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(5, 5), (3, 7), (7, 3), (1, 9), (0, 4)])
def test_alibi_bias_values(causal, alignment, L, S):
    got = alibi_bias(8, L, S, causal=causal, alignment=alignment, dtype=np.float64)
    assert got.shape == (8, L, S) and got.dtype == np.float64
    np.testing.assert_array_equal(got, _bias_loops(8, L, S, causal, alignment))
    assert alibi_bias(8, L, S, causal=causal, alignment=alignment).dtype == np.float32


def test_alibi_bias_depends_only_on_the_offset():
    """Why ALiBi extrapolates: the bias of (i, j) is the bias of (i + s, j + s) at any length."""
    short, long = alibi_bias(8, 16, 16), alibi_bias(8, 1024, 1024)
    np.testing.assert_array_equal(long[:, 1000:1016, 1000:1016], short)


def _attention_loops(q, k, v, bias):
    """float64 softmax(q kᵀ/√E + Δ) v, one head and one query at a time."""
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for idx in np.ndindex(q.shape[:-2]):
        for i in range(q.shape[-2]):
            z = q[idx][i] @ k[idx].T / math.sqrt(q.shape[-1]) + bias[idx[-1], i]
            p = np.exp(z - z.max())
            out[idx][i] = (p / p.sum()) @ v[idx]
    return out


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_alibi_as_float_mask_in_sdpa_and_flash(rng, alignment):
    B, H, L, S, E = 2, 8, 37, 70 if alignment == "bottom_right" else 37, 16
    q = rng.standard_normal((B, H, L, E))
    k, v = rng.standard_normal((2, B, H, S, E))
    bias = alibi_bias(H, L, S, alignment=alignment, dtype=np.float64)
    expected = _attention_loops(q, k, v, bias)
    np.testing.assert_allclose(scaled_dot_product_attention(q, k, v, attn_mask=bias), expected, atol=1e-12)
    np.testing.assert_allclose(flash_attention(q, k, v, attn_mask=bias, block_q=16, block_k=16),
                               expected, atol=1e-12)
    # the symmetric bias with flash's own causal mask is the same attention (and skips tiles)
    sym = alibi_bias(H, L, S, causal=False, alignment=alignment, dtype=np.float64)
    got = flash_attention(q, k, v, attn_mask=sym, is_causal=True, causal_alignment=alignment,
                          block_q=16, block_k=16)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_alibi_decoding_rows_are_the_last_rows_of_the_prefill(rng):
    """With bottom-right alignment, one new query over S cached keys = row S − 1 of the S × S bias."""
    full = alibi_bias(12, 20, 20)
    np.testing.assert_array_equal(alibi_bias(12, 1, 20, alignment="bottom_right"), full[:, -1:])
    np.testing.assert_array_equal(alibi_bias(12, 4, 20, alignment="bottom_right"), full[:, -4:])


def test_alibi_bias_namespaces(xp):
    got = alibi_bias(4, 3, 6, alignment="bottom_right", xp=xp)
    assert namespace_name(got) == namespace_name(xp.asarray(0))
    np.testing.assert_allclose(to_numpy(got), _bias_loops(4, 3, 6, True, "bottom_right"), rtol=1e-7)


def test_alibi_bias_rejects_bad_input():
    with pytest.raises(ValueError, match="alignment"):
        alibi_bias(8, 2, 2, alignment="middle")
    with pytest.raises(ValueError, match="L must be"):
        alibi_bias(8, -1, 2)
    with pytest.raises(TypeError, match="dtype"):
        alibi_bias(8, 2, 2, dtype=np.int32)


def test_rope_exports_as_a_numpy_only_file(tmp_path, rng):
    """python -m attention_ref.export rope gives a file that runs with NumPy alone and agrees."""
    import subprocess
    import sys

    from attention_ref.export import export

    source = export("rope")
    assert "import attention_ref" not in source and "array_api_compat" not in source
    (tmp_path / "my_rope.py").write_text(source)
    x = rng.standard_normal((2, 5, 8))
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); from my_rope import rope; "
            "x = np.load(sys.argv[1] + '/x.npy'); "
            "np.save(sys.argv[1] + '/y.npy', rope(x, np.arange(3, 8), theta=500.0, interleaved=True))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), rope(x, np.arange(3, 8), theta=500.0, interleaved=True))
